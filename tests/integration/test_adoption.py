"""Adopting a database the original module wrote: ``stamp 0001_seed_table`` + ``upgrade head``.

The rows are written by the original module's own functions, on a table created
by plain SQL as an existing deployment has it, then the database is adopted and
everything is checked: rows kept, order and correlation backfilled, trails
complete, new events after the old ones, and a schema equal to a fresh one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, migrate
from audit_orm.jsonb import dumps_exact
from audit_orm.repository import prepare_event
from tests.dbutil import asyncpg_dsn, scratch_database
from tests.legacy import execution_audit as legacy

#: The table as deployments created it by hand: the columns of the original
#: INSERT, nothing enforced beyond the primary key.
BARE_TABLE = """
CREATE TABLE audit_events (
    id UUID PRIMARY KEY,
    event_type TEXT,
    entity_type TEXT,
    entity_id UUID,
    actor TEXT,
    data JSONB,
    created_at TIMESTAMPTZ
)
"""

#: The same with the constraints and defaults a careful deployment would have added.
STRICT_TABLE = """
CREATE TABLE audit_events (
    id UUID PRIMARY KEY,
    event_type TEXT NOT NULL,
    entity_type TEXT NOT NULL,
    entity_id UUID NOT NULL,
    actor TEXT NOT NULL DEFAULT 'system',
    data JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""


def _ids() -> str:
    return str(uuid.uuid4())


@dataclass
class LegacyData:
    """What the original module wrote, and what it could read back."""

    rec_id: str
    order_id: str
    approval_id: str
    evaluation_id: str
    chain: list[str]
    other_order_ids: list[str] = field(default_factory=list)
    legacy_trail: list[dict[str, Any]] = field(default_factory=list)
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


def _ok(event_id: str) -> str:
    # The original module swallows write errors and returns "": fail loudly here.
    assert event_id, "the original module failed to write an event"
    return event_id


async def _write_legacy(pool: asyncpg.Pool) -> LegacyData:
    rec, evaluation, approval, order = _ids(), _ids(), _ids(), _ids()
    chain = [
        _ok(await legacy.audit_recommendation_generated(pool, rec, "AAPL", "buy", "live", 0.82, 5)),
        _ok(await legacy.audit_risk_evaluated(pool, evaluation, rec, "AAPL", True, "live", [], 7)),
        _ok(
            await legacy.audit_approval_requested(
                pool,
                approval,
                "AAPL",
                "buy",
                10,
                1890.5,
                rec,
                (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
            )
        ),
        _ok(await legacy.audit_approval_reviewed(pool, approval, "AAPL", True, "alice", "ok")),
        _ok(
            await legacy.audit_order_submitted(
                pool, order, "AAPL", "buy", 10, "market", "idem-1", rec, evaluation
            )
        ),
        _ok(await legacy.audit_order_filled(pool, order, "AAPL", "buy", 4, 189.05, "brk-1")),
        _ok(await legacy.audit_position_change(pool, order, "AAPL", "buy", 0, 4, 0, 189.05)),
        _ok(await legacy.audit_order_filled(pool, order, "AAPL", "buy", 6, 189.1, "brk-1")),
        _ok(await legacy.audit_position_change(pool, order, "AAPL", "buy", 4, 10, 189.05, 189.08)),
    ]
    data = LegacyData(rec, order, approval, evaluation, chain)

    # A risk-rejected recommendation and its rejected order.
    rec2, eval2, order2 = _ids(), _ids(), _ids()
    _ok(await legacy.audit_recommendation_generated(pool, rec2, "TSLA", "sell", "live", 0.4, 2))
    _ok(
        await legacy.audit_risk_evaluated(
            pool, eval2, rec2, "TSLA", False, "none", ["max_exposure", "volatility"], 7
        )
    )
    _ok(await legacy.audit_order_rejected(pool, order2, "TSLA", "risk rejected", "risk_engine"))
    # A cancelled order, a prevented duplicate, a suppressed recommendation,
    # an expired approval and a trading mode change.
    order3, order4 = _ids(), _ids()
    _ok(
        await legacy.audit_order_submitted(
            pool, order3, "MSFT", "buy", 5, "limit", "idem-3", None, None
        )
    )
    _ok(await legacy.audit_order_cancelled(pool, order3, "MSFT", "brk-3"))
    _ok(await legacy.audit_duplicate_prevented(pool, order4, "MSFT", "idem-3", "idempotency_key"))
    _ok(
        await legacy.audit_recommendation_generated(
            pool, _ids(), "NVDA", "buy", "paper", 0.3, 1, True
        )
    )
    _ok(await legacy.audit_approval_expired(pool, _ids(), "NVDA"))
    # The original module accepted an empty reviewer; adoption keeps the row as written.
    _ok(await legacy.audit_approval_reviewed(pool, _ids(), "NVDA", False, "", ""))
    _ok(await legacy.audit_trading_mode_changed(pool, _ids(), "paper", "live", "bob"))
    data.other_order_ids = [order2, order3, order4]

    # Client clocks: two events stamped with the same instant (a tie the id must
    # break), and one written late but stamped early (its place is its timestamp).
    tie = datetime.now(UTC)
    for _ in range(2):
        _ok(
            await legacy.record_audit_event(
                pool,
                "order.accepted",
                "order",
                order3,
                {"ticker": "MSFT", "broker_order_id": "brk-3"},
                "broker_service",
                tie,
            )
        )
    _ok(
        await legacy.record_audit_event(
            pool,
            "order.accepted",
            "order",
            order4,
            {"ticker": "MSFT", "broker_order_id": "brk-4"},
            "broker_service",
            tie - timedelta(hours=1),
        )
    )

    data.legacy_trail = await legacy.get_order_audit_trail(pool, order, rec)
    # Every row as the original module reads it back, through its own query.
    entities = await pool.fetch("SELECT DISTINCT entity_type, entity_id FROM audit_events")
    for entity in entities:
        for item in await legacy.get_entity_audit_trail(
            pool, entity["entity_type"], str(entity["entity_id"])
        ):
            data.rows[item["id"]] = item
    assert len(data.rows) == await pool.fetchval("SELECT count(*) FROM audit_events")
    return data


@pytest.fixture(params=["bare", "strict"])
async def legacy_db(
    request: pytest.FixtureRequest, admin_url: str
) -> AsyncIterator[tuple[str, AsyncEngine, LegacyData]]:
    """A database holding the original table, filled by the original module."""
    async with scratch_database(admin_url) as (url, engine):
        pool = await asyncpg.create_pool(**asyncpg_dsn(url), min_size=1, max_size=2)  # type: ignore[arg-type]
        try:
            await pool.execute(BARE_TABLE if request.param == "bare" else STRICT_TABLE)
            data = await _write_legacy(pool)
        finally:
            await pool.close()
        yield url, engine, data


def _adopt(connection: Connection) -> None:
    config = migrate.alembic_config()
    config.attributes["connection"] = connection
    command.stamp(config, "0001_seed_table")
    command.upgrade(config, "head")


async def _columns(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    """The table's shape as the catalog has it, to compare two databases."""
    async with engine.connect() as conn:
        columns = (
            await conn.execute(
                text(
                    "SELECT column_name, data_type, character_maximum_length, is_nullable, "
                    "column_default, is_identity, identity_generation "
                    "FROM information_schema.columns WHERE table_name = 'audit_events' "
                    "ORDER BY column_name"
                )
            )
        ).all()
        indexes = (
            await conn.execute(
                text(
                    "SELECT indexname, indexdef FROM pg_indexes "
                    "WHERE tablename = 'audit_events' ORDER BY indexname"
                )
            )
        ).all()
        # NOT NULL constraints (PostgreSQL 18 lists them here, named after the
        # column as it was called when the constraint was made, so a renamed
        # created_at keeps its old name) are left out: nullability is compared
        # through the columns above, and the name is never used.
        constraints = (
            await conn.execute(
                text(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conrelid = 'audit_events'::regclass AND contype <> 'n' "
                    "ORDER BY conname"
                )
            )
        ).all()
        triggers = (
            await conn.execute(
                text(
                    "SELECT tgname FROM pg_trigger WHERE tgrelid = 'audit_events'::regclass "
                    "AND NOT tgisinternal ORDER BY tgname"
                )
            )
        ).all()
    return [tuple(r) for r in (*columns, *indexes, *constraints, *triggers)]


async def test_adoption_keeps_rows_backfills_and_serves_trails(
    admin_url: str, legacy_db: tuple[str, AsyncEngine, LegacyData]
) -> None:
    _, engine, legacy_data = legacy_db
    async with engine.begin() as conn:
        await conn.run_sync(_adopt)

    async with AsyncSession(engine) as session:
        repo = AuditRepository(session)
        page = await repo.search(limit=1000)
        assert page.next_cursor is None
        records = page.records

        # Every row kept, with its id, types, actor, data and timestamp as the
        # original module reads them.
        assert {str(r.id) for r in records} == set(legacy_data.rows)
        for record in records:
            before = legacy_data.rows[str(record.id)]
            after = record.to_dict()
            for key in ("event_type", "entity_type", "entity_id", "actor", "created_at"):
                assert after[key] == before[key], key
            assert json.loads(dumps_exact(after["data"])) == before["data"]
            # The stored data is still a valid payload of its type.
            assert record.payload is not None

        # seq: 1..N with no gap or tie, in (created_at, id) order.
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        by_clock = sorted(records, key=lambda r: (r.occurred_at, str(r.id)))
        assert [r.id for r in by_clock] == [r.id for r in records]
        # The only recorded time the old rows have is their own timestamp.
        assert all(r.recorded_at == r.occurred_at for r in records)

        # Correlation columns: exactly what the repository derives for a new event.
        for record in records:
            derived = prepare_event(
                record.event_type, record.entity_type, record.entity_id, record.data
            )
            assert (record.recommendation_id, record.order_id, record.ticker) == (
                derived.recommendation_id,
                derived.order_id,
                derived.ticker,
            ), record

        # The full chain, recommendation included, in order, with or without the
        # recommendation id; the original query lost the recommendation event and
        # the approval decision.
        expected = [uuid.UUID(i) for i in legacy_data.chain]
        for rec_id in (legacy_data.rec_id, None):
            trail = await repo.order_trail(legacy_data.order_id, rec_id)
            assert [r.id for r in trail] == expected
        legacy_ids = {uuid.UUID(row["id"]) for row in legacy_data.legacy_trail}
        assert legacy_ids < set(expected)
        assert uuid.UUID(legacy_data.chain[0]) not in legacy_ids
        assert [r.id for r in await repo.entity_trail("approval", legacy_data.approval_id)] == [
            uuid.UUID(legacy_data.chain[2]),
            uuid.UUID(legacy_data.chain[3]),
        ]
        for other in legacy_data.other_order_ids:
            other_trail = await repo.order_trail(other)
            assert other_trail
            assert all(r.id not in expected for r in other_trail)

    # New events go after every old one, and join the old chain.
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        closed = await repo.position_change(
            legacy_data.order_id, "AAPL", "sell", 10, 0, "189.08", 0
        )
    assert len(closed) == 1
    assert closed[0].seq == len(records) + 1
    assert closed[0].recorded_at > max(r.recorded_at for r in records)
    async with AsyncSession(engine) as session:
        trail = await AuditRepository(session).order_trail(legacy_data.order_id)
    assert [r.id for r in trail] == [*expected, closed[0].id]

    # The adopted schema is the one a fresh database gets.
    async with scratch_database(admin_url) as (_, fresh):
        await migrate.upgrade(fresh)
        assert await _columns(engine) == await _columns(fresh)


async def test_adopted_database_downgrades_to_the_original_table(
    legacy_db: tuple[str, AsyncEngine, LegacyData],
) -> None:
    """Stepping back to the first revision restores the columns the original module writes."""
    url, engine, legacy_data = legacy_db
    async with engine.begin() as conn:
        await conn.run_sync(_adopt)
    await migrate.downgrade(engine, "0001_seed_table")
    pool = await asyncpg.create_pool(**asyncpg_dsn(url), min_size=1, max_size=1)  # type: ignore[arg-type]
    try:
        trail = await legacy.get_order_audit_trail(pool, legacy_data.order_id, legacy_data.rec_id)
        assert [row["id"] for row in trail] == [row["id"] for row in legacy_data.legacy_trail]
        assert trail == legacy_data.legacy_trail
        # And the original module can write again.
        assert await legacy.audit_order_cancelled(pool, legacy_data.order_id, "AAPL", "brk-1")
    finally:
        await pool.close()
