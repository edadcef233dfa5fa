"""Every trail query is served by an index: its cost follows the trail, not the table.

A scratch database migrated to head gets a table of realistic size (200k events
in 25k interleaved decision chains, so one chain's rows are spread over the
table as they are in production), plus one long chain written through the
repository itself. Each statement the repository runs is then planned exactly as
the driver sends it (``PREPARE`` of the compiled SQL, ``EXPLAIN EXECUTE``), both
as a custom plan and as the generic plan PostgreSQL switches to for a prepared
statement it has run a few times.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
from sqlalchemy import Select, text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncSession

from audit_orm import AuditRepository, migrate
from audit_orm.repository import (
    entity_trail_statement,
    order_trail_statement,
    search_statement,
)
from tests.dbutil import connect_raw, scratch_database

ROWS = 200_000
STEPS = 8
CHAINS = ROWS // STEPS
TICKERS = 400

# One decision chain per value of c, its STEPS events interleaved with every
# other chain's (step s of every chain, then step s + 1, ...). The correlation
# columns are set as the repository sets them.
FILL = f"""
INSERT INTO audit_events (id, event_type, entity_type, entity_id, actor, data,
                          recommendation_id, order_id, ticker)
SELECT gen_random_uuid(),
       (ARRAY['recommendation.generated', 'risk.evaluated', 'approval.requested',
              'approval.approved', 'order.submitted', 'order.accepted', 'order.filled',
              'position.opened'])[s + 1],
       (ARRAY['recommendation', 'risk_evaluation', 'approval', 'approval', 'order', 'order',
              'order', 'position'])[s + 1],
       CASE WHEN s = 0 THEN rec WHEN s = 1 THEN eval WHEN s IN (2, 3) THEN appr ELSE ord END,
       'system',
       jsonb_build_object('ticker', ticker),
       CASE WHEN s IN (0, 1, 2, 4) THEN rec END,
       CASE WHEN s >= 4 THEN ord END,
       ticker
FROM (SELECT g / {CHAINS} AS s, g % {CHAINS} AS c
      FROM generate_series(0, {ROWS} - 1) AS g) AS steps,
LATERAL (SELECT md5('rec' || c)::uuid AS rec, md5('eval' || c)::uuid AS eval,
                md5('appr' || c)::uuid AS appr, md5('ord' || c)::uuid AS ord,
                'T' || (c % {TICKERS}) AS ticker) AS ids
"""

#: How many fills the chain written through the repository has.
LONG_FILLS = 30


@dataclass(frozen=True)
class BigTable:
    """The filled database and the ids the plans are checked with."""

    url: str
    pages: int
    order_id: uuid.UUID
    rec_id: uuid.UUID
    approval_id: uuid.UUID
    long_order_id: uuid.UUID
    long_rec_id: uuid.UUID
    long_chain: int
    middle_seq: int


def _chain_id(kind: str, chain: int) -> uuid.UUID:
    # The same id FILL derives with md5() in SQL.
    return uuid.UUID(hashlib.md5(f"{kind}{chain}".encode()).hexdigest())


async def _write_long_chain(repo: AuditRepository) -> tuple[uuid.UUID, uuid.UUID, int]:
    rec, evaluation, approval, order = (uuid.uuid4() for _ in range(4))
    await repo.recommendation_generated(rec, "ACME", "buy", "live", 0.9, 4)
    await repo.risk_evaluated(evaluation, rec, "ACME", True, "live", [], 6)
    await repo.approval_requested(approval, "ACME", "buy", LONG_FILLS, "3000.00", rec)
    await repo.approval_reviewed(approval, "ACME", True, "alice")
    await repo.order_submitted(
        order, "ACME", "buy", LONG_FILLS, "market", "k-long", rec, evaluation
    )
    await repo.order_accepted(order, "ACME", "brk-long")
    for i in range(LONG_FILLS):
        await repo.order_filled(order, "ACME", "buy", 1, "100.00", "brk-long")
        await repo.position_change(order, "ACME", "buy", i, i + 1, "100.00", "100.00")
    return order, rec, 6 + 2 * LONG_FILLS


@pytest.fixture(scope="module")
async def big_table(admin_url: str) -> AsyncIterator[BigTable]:
    """A migrated database holding ROWS events, analyzed."""
    async with scratch_database(admin_url) as (url, engine):
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            # The secondary indexes are dropped for the bulk insert and rebuilt
            # from their exact migrated definitions: one sorted build is several
            # times faster than 200k random insertions, and the result is the
            # same index.
            definitions = (
                await conn.execute(
                    text(
                        "SELECT indexname, indexdef FROM pg_indexes "
                        "WHERE tablename = 'audit_events' AND indexname LIKE 'ix\\_%'"
                    )
                )
            ).all()
            assert len(definitions) == 6
            for name, _ in definitions:
                await conn.execute(text(f'DROP INDEX "{name}"'))
            await conn.execute(text(FILL))
            for _, definition in definitions:
                await conn.execute(text(definition))
        async with AsyncSession(engine) as session, session.begin():
            long_order, long_rec, long_chain = await _write_long_chain(AuditRepository(session))
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("VACUUM ANALYZE audit_events"))
            pages = (
                await conn.execute(
                    text("SELECT relpages FROM pg_class WHERE relname = 'audit_events'")
                )
            ).scalar_one()
            middle = (
                await conn.execute(text("SELECT max(seq) / 2 FROM audit_events"))
            ).scalar_one()
        chain = CHAINS // 3
        yield BigTable(
            url=url,
            pages=pages,
            order_id=_chain_id("ord", chain),
            rec_id=_chain_id("rec", chain),
            approval_id=_chain_id("appr", chain),
            long_order_id=long_order,
            long_rec_id=long_rec,
            long_chain=long_chain,
            middle_seq=middle,
        )


@pytest.fixture(scope="module")
async def raw(big_table: BigTable) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for PREPARE / EXPLAIN EXECUTE."""
    conn = await connect_raw(big_table.url)
    yield conn
    await conn.close()


def _literal(value: Any) -> str:
    return "'" + str(value).replace("'", "''") + "'"


async def _explain(
    raw: asyncpg.Connection, stmt: Select[Any], *, generic: bool, analyze: bool
) -> dict[str, Any]:
    """The plan of ``stmt`` compiled exactly as the asyncpg driver sends it."""
    compiled = stmt.compile(dialect=asyncpg_dialect())
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    mode = "force_generic_plan" if generic else "force_custom_plan"
    name = f"audit_q_{uuid.uuid4().hex}"
    await raw.execute(f"SET plan_cache_mode = {mode}")
    await raw.execute(f"PREPARE {name} AS {compiled.string}")
    try:
        options = "FORMAT JSON, ANALYZE, BUFFERS" if analyze else "FORMAT JSON"
        args = ", ".join(_literal(p) for p in params)
        out = await raw.fetchval(f"EXPLAIN ({options}) EXECUTE {name}({args})")
    finally:
        await raw.execute(f"DEALLOCATE {name}")
    plan: dict[str, Any] = json.loads(out)[0]
    return plan


def _nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", ()):
        yield from _nodes(child)


@dataclass(frozen=True)
class Case:
    """A statement, the indexes that must serve it, and how many rows it returns."""

    name: str
    build: Callable[[BigTable], Select[Any]]
    indexes: frozenset[str]
    rows: Callable[[BigTable], int]


CASES = [
    Case(
        "order trail",
        lambda t: order_trail_statement(t.order_id, t.rec_id),
        frozenset(
            {
                "ix_audit_events_order_id_seq",
                "ix_audit_events_recommendation_id_seq",
                "ix_audit_events_entity_id_seq",
            }
        ),
        lambda t: STEPS,
    ),
    Case(
        "order trail, recommendation found through the order",
        lambda t: order_trail_statement(t.order_id),
        frozenset(
            {
                "ix_audit_events_order_id_seq",
                "ix_audit_events_recommendation_id_seq",
                "ix_audit_events_entity_id_seq",
            }
        ),
        lambda t: STEPS,
    ),
    Case(
        "long order trail",
        lambda t: order_trail_statement(t.long_order_id, t.long_rec_id),
        frozenset(
            {
                "ix_audit_events_order_id_seq",
                "ix_audit_events_recommendation_id_seq",
                "ix_audit_events_entity_id_seq",
            }
        ),
        lambda t: t.long_chain,
    ),
    Case(
        "long order trail, recommendation found through the order",
        lambda t: order_trail_statement(t.long_order_id),
        frozenset(
            {
                "ix_audit_events_order_id_seq",
                "ix_audit_events_recommendation_id_seq",
                "ix_audit_events_entity_id_seq",
            }
        ),
        lambda t: t.long_chain,
    ),
    Case(
        "entity trail",
        lambda t: entity_trail_statement("approval", t.approval_id),
        frozenset({"ix_audit_events_entity_id_seq"}),
        lambda t: 2,
    ),
    Case(
        "search by ticker, first page",
        lambda t: search_statement(ticker="T7").limit(101),
        frozenset({"ix_audit_events_ticker_seq"}),
        lambda t: 101,
    ),
    Case(
        "search by ticker, a page deep in the table",
        lambda t: search_statement(ticker="T7", after=t.middle_seq).limit(101),
        frozenset({"ix_audit_events_ticker_seq"}),
        lambda t: 101,
    ),
    Case(
        "search by order id",
        lambda t: search_statement(order_id=t.order_id).limit(101),
        frozenset({"ix_audit_events_order_id_seq"}),
        lambda t: 4,
    ),
]

SCANS = {"Index Scan", "Index Only Scan", "Bitmap Index Scan", "Bitmap Heap Scan"}


@pytest.mark.slow
@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_trail_query_is_served_by_its_indexes(
    big_table: BigTable, raw: asyncpg.Connection, case: Case, generic: bool
) -> None:
    stmt = case.build(big_table)
    plan = await _explain(raw, stmt, generic=generic, analyze=False)
    nodes = list(_nodes(plan["Plan"]))
    shown = json.dumps(plan, indent=1)
    on_table = [n for n in nodes if n.get("Relation Name") == "audit_events" or "Index Name" in n]
    assert on_table, shown
    assert all(n["Node Type"] in SCANS for n in on_table), shown
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], shown
    used = {n["Index Name"] for n in nodes if "Index Name" in n}
    assert used == case.indexes, shown


@pytest.mark.slow
@pytest.mark.parametrize("generic", [False, True], ids=["custom plan", "generic plan"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_trail_query_touches_what_the_trail_holds(
    big_table: BigTable, raw: asyncpg.Connection, case: Case, generic: bool
) -> None:
    plan = await _explain(raw, case.build(big_table), generic=generic, analyze=True)
    top = plan["Plan"]
    shown = json.dumps(plan, indent=1)
    returned = int(top["Actual Rows"])
    assert returned == case.rows(big_table), shown
    # Rows read from the table and its indexes, including those thrown away.
    examined = sum(
        n["Actual Rows"] * n["Actual Loops"]
        + n.get("Rows Removed by Filter", 0)
        + n.get("Rows Removed by Index Recheck", 0)
        for n in _nodes(top)
        if n["Node Type"] in SCANS
    )
    assert examined <= 10 * returned + 20, shown
    # Pages touched: a few per row of the trail, a tiny fraction of the table.
    buffers = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert buffers <= 4 * returned + 40, shown
    assert buffers * 20 < big_table.pages, shown


async def test_table_is_of_realistic_size(big_table: BigTable) -> None:
    """The plans above are only meaningful if the table is large enough to scan slowly."""
    assert big_table.pages > 3000
