"""Synthetic decision chains, generated inside PostgreSQL so millions of rows load quickly.

A chain is the life of one order: recommendation, risk evaluation, approval
request and decision, submission, acknowledgement, fill, position change.
Chains interleave the way concurrent orders do: ``ACTIVE_CHAINS`` of them
advance a step at a time, so the events of one order lie thousands of rows
apart, on different pages, as in a busy production table.

Ids derive from the chain number (``md5('ord' || chain)``), so the benchmark can
name any order without reading the table.
"""

from __future__ import annotations

import hashlib
import uuid

from sqlalchemy.ext.asyncio import AsyncConnection

#: Events in one chain.
CHAIN_LENGTH = 8
#: Chains in progress at once; a chain's events are this many rows apart.
ACTIVE_CHAINS = 1_000
#: Rows per generated block (whole chains only).
BLOCK = CHAIN_LENGTH * ACTIVE_CHAINS

_STEPS = (
    ("recommendation.generated", "recommendation", "rec", "recommendation_worker"),
    ("risk.evaluated", "risk_evaluation", "eva", "risk_engine"),
    ("approval.requested", "approval", "apr", "broker_service"),
    ("approval.approved", "approval", "apr", "operator"),
    ("order.submitted", "order", "ord", "broker_service"),
    ("order.accepted", "order", "ord", "broker_service"),
    ("order.filled", "order", "ord", "broker_service"),
    ("position.opened", "position", "ord", "broker_service"),
)


def chain_id(kind: str, chain: int) -> uuid.UUID:
    """The id of a chain's entity, as the SQL below derives it (``md5(kind || chain)``)."""
    return uuid.UUID(hashlib.md5(f"{kind}{chain}".encode()).hexdigest())


def rounded_rows(rows: int) -> int:
    """``rows`` rounded down to whole blocks (at least one)."""
    return max(BLOCK, rows // BLOCK * BLOCK)


def _case(values: list[str]) -> str:
    return "CASE s.k " + " ".join(f"WHEN {i} THEN {v}" for i, v in enumerate(values)) + " END"


_DATA = [
    "jsonb_build_object('ticker', x.ticker, 'action', 'buy', 'mode', 'paper', "
    "'confidence', 0.82, 'evidence_count', 4, 'suppressed', false)",
    "jsonb_build_object('recommendation_id', x.rec::text, 'ticker', x.ticker, 'eligible', true, "
    "'allowed_mode', 'live', 'rejection_reasons', '[]'::jsonb, 'check_count', 12)",
    "jsonb_build_object('ticker', x.ticker, 'side', 'buy', 'quantity', 10, "
    "'estimated_value', 1502.50, 'recommendation_id', x.rec::text, 'expires_at', null)",
    "jsonb_build_object('ticker', x.ticker, 'approved', true, 'reviewed_by', 'operator', "
    "'review_note', '')",
    "jsonb_build_object('ticker', x.ticker, 'side', 'buy', 'quantity', 10, "
    "'order_type', 'limit', 'idempotency_key', 'k' || s.c, 'recommendation_id', x.rec::text, "
    "'evaluation_id', x.eva::text)",
    "jsonb_build_object('ticker', x.ticker, 'broker_order_id', 'B' || s.c, 'status', 'new')",
    "jsonb_build_object('ticker', x.ticker, 'side', 'buy', 'fill_quantity', 10, "
    "'fill_price', 150.25, 'broker_order_id', 'B' || s.c)",
    "jsonb_build_object('ticker', x.ticker, 'side', 'buy', 'quantity_before', 0, "
    "'quantity_after', 10, 'avg_entry_before', 0, 'avg_entry_after', 150.25)",
]

#: Rows ``$1 <= g < $2`` of the synthetic table, in insertion order. Ids are
#: UUIDv7-shaped (a millisecond counter up front) so the primary key grows at
#: its right edge, as ids from :func:`audit_orm.ids.uuid7` do.
GENERATE_SQL = f"""
INSERT INTO audit_events (id, event_type, entity_type, entity_id, actor, data,
                          occurred_at, recommendation_id, order_id, ticker)
SELECT (lpad(to_hex(1750000000000 + s.g), 12, '0') || '7' || substr(md5(s.g::text), 1, 3)
        || '8' || substr(md5(s.g::text), 4, 15))::uuid,
       {_case([f"'{step[0]}'" for step in _STEPS])},
       {_case([f"'{step[1]}'" for step in _STEPS])},
       {_case([f"x.{step[2]}" for step in _STEPS])},
       {_case([f"'{step[3]}'" for step in _STEPS])},
       {_case(_DATA)},
       timestamptz '2026-01-01 00:00:00+00' + s.g * interval '1 millisecond',
       CASE WHEN s.k IN (0, 1, 2, 4) THEN x.rec END,
       CASE WHEN s.k >= 4 THEN x.ord END,
       x.ticker
FROM (SELECT g,
             (g / {BLOCK}) * {ACTIVE_CHAINS} + g % {ACTIVE_CHAINS} AS c,
             (g % {BLOCK}) / {ACTIVE_CHAINS} AS k
      FROM generate_series($1::bigint, $2::bigint - 1) AS g) AS s
CROSS JOIN LATERAL (
    SELECT md5('rec' || s.c)::uuid AS rec, md5('eva' || s.c)::uuid AS eva,
           md5('apr' || s.c)::uuid AS apr, md5('ord' || s.c)::uuid AS ord,
           'T' || (s.c % 500) AS ticker) AS x
ORDER BY s.g
"""

SEED_TABLE_SQL = """
CREATE TABLE seed.audit_events (
    id uuid PRIMARY KEY,
    event_type text NOT NULL,
    entity_type text NOT NULL,
    entity_id uuid NOT NULL,
    actor text NOT NULL DEFAULT 'system',
    data jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

COPY_TO_SEED_SQL = """
INSERT INTO seed.audit_events (id, event_type, entity_type, entity_id, actor, data, created_at)
SELECT id, event_type, entity_type, entity_id, actor, data, occurred_at
FROM audit_events WHERE seq > $1 AND seq <= $2
"""


async def create_seed_schema(conn: AsyncConnection) -> None:
    """The original module's table, in schema ``seed`` of the same database."""
    await conn.exec_driver_sql("CREATE SCHEMA IF NOT EXISTS seed")
    await conn.exec_driver_sql(SEED_TABLE_SQL)


async def generate(conn: AsyncConnection, start: int, stop: int) -> None:
    """Insert synthetic rows ``start <= g < stop`` into ``audit_events``."""
    await conn.exec_driver_sql(GENERATE_SQL, (start, stop))


async def copy_to_seed(conn: AsyncConnection, after_seq: int, upto_seq: int) -> None:
    """Copy rows ``after_seq < seq <= upto_seq`` into the original module's table."""
    await conn.exec_driver_sql(COPY_TO_SEED_SQL, (after_seq, upto_seq))
