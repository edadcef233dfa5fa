"""Best-effort recording on a real server: the caller's transaction survives, nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import (
    AuditEventType,
    AuditRepository,
    EventIdConflictError,
    InvalidInputError,
    InvalidPayloadError,
)
from audit_orm.besteffort import BestEffortRepository
from audit_orm.database import session_factory
from audit_orm.errors import AuditSpoolError
from audit_orm.spool import SpooledRecord, read_spool, replay_spool
from tests.faultutil import (
    audit_table_locked,
    business_database,
    event_counts,
    position_of,
    positions,
    set_timeout,
)

E = AuditEventType


@pytest.fixture(scope="module")
async def db(admin_url: str) -> AsyncIterator[AsyncEngine]:
    async with business_database(admin_url) as (_, eng):
        yield eng


@pytest.fixture
def spool_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.spool"


async def fill_with_failing_audit(
    db: AsyncEngine, spool_path: Path, order: uuid.UUID, *, commit: bool = True
) -> SpooledRecord:
    """A fill handler: business change + audit event, while the audit table is locked."""
    async with audit_table_locked(db), session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        await set_timeout(session, "lock_timeout", "200ms")
        await session.execute(insert(positions).values(order_id=order, ticker="AAPL", quantity=10))
        record = await audit.order_filled(order, "AAPL", "buy", 10, Decimal("150.250"), "B-1")
        await session.execute(
            positions.update()
            .where(positions.c.order_id == order)
            .values(version=positions.c.version + 1)
        )
        if commit:
            await session.commit()
        else:
            await session.rollback()
    assert isinstance(record, SpooledRecord)
    return record


async def test_caller_commits_its_business_change_when_the_audit_write_fails(
    db: AsyncEngine, spool_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    order = uuid.uuid4()
    with caplog.at_level(logging.WARNING, logger="audit_orm.spool"):
        record = await fill_with_failing_audit(db, spool_path, order)

    # The business change committed, both statements of it, around the failed write.
    row = await position_of(db, order)
    assert row is not None
    assert row.quantity == 10
    assert row.version == 2
    # The event is not in the database but in the spool, and a warning names it.
    assert (await event_counts(db, [record.id]))[record.id] == 0
    assert record.seq == 0
    assert "lock timeout" in record.error
    contents = read_spool(spool_path)
    assert set(contents.events) == {record.id}
    assert contents.voids == set()
    assert str(record.id) in caplog.text
    assert "order.filled" in caplog.text

    # Replay writes it with its id and exact numbers. No business time was
    # given, so the database stamps it at replay, as it would have at the write.
    report = await replay_spool(spool_path, db)
    assert (report.written, report.voided, report.rejected) == (1, 0, [])
    async with session_factory(db)() as session:
        stored = await AuditRepository(session).get(record.id)
    assert stored is not None
    assert str(stored.data["fill_price"]) == "150.250"
    assert stored.occurred_at == stored.recorded_at >= record.recorded_at
    assert stored.order_id == order


async def test_rolled_back_transaction_voids_its_spooled_event(
    db: AsyncEngine, spool_path: Path
) -> None:
    order = uuid.uuid4()
    record = await fill_with_failing_audit(db, spool_path, order, commit=False)
    assert await position_of(db, order) is None
    contents = read_spool(spool_path)
    assert contents.voids == {record.id}
    report = await replay_spool(spool_path, db)
    assert (report.written, report.voided) == (0, 1)
    assert (await event_counts(db, [record.id]))[record.id] == 0


async def test_session_closed_without_commit_voids(db: AsyncEngine, spool_path: Path) -> None:
    async with audit_table_locked(db), session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        await set_timeout(session, "lock_timeout", "100ms")
        record = await audit.order_accepted(uuid.uuid4(), "X", "B")
    assert read_spool(spool_path).voids == {record.id}


async def failing_savepoint(audit: BestEffortRepository, order: uuid.UUID) -> SpooledRecord:
    """A business step in its own savepoint that records, then fails."""
    record = None
    with contextlib.suppress(RuntimeError):
        async with audit.session.begin_nested():
            record = await audit.order_accepted(order, "X", "B")
            raise RuntimeError("business rule failed")
    assert isinstance(record, SpooledRecord)
    return record


async def test_nested_transactions_of_the_caller(db: AsyncEngine, spool_path: Path) -> None:
    """Events follow the caller's savepoints: a rolled-back one voids, a released one keeps."""
    kept_order, dropped_order = uuid.uuid4(), uuid.uuid4()
    async with audit_table_locked(db), session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        await set_timeout(session, "lock_timeout", "100ms")
        async with session.begin_nested():
            kept = await audit.order_accepted(kept_order, "X", "B")
        dropped = await failing_savepoint(audit, dropped_order)
        await session.commit()
    contents = read_spool(spool_path)
    assert set(contents.events) == {kept.id, dropped.id}
    assert contents.voids == {dropped.id}


async def test_working_database_writes_normally(db: AsyncEngine, spool_path: Path) -> None:
    order = uuid.uuid4()
    async with session_factory(db)() as session, session.begin():
        audit = BestEffortRepository(session, spool_path)
        records = await audit.position_change(order, "X", "buy", 10, -5, 1, 2)
    assert [r.event_type for r in records] == [E.POSITION_CLOSED, E.POSITION_OPENED]
    assert all(not isinstance(r, SpooledRecord) and r.seq > 0 for r in records)
    assert not await asyncio.to_thread(spool_path.exists)
    assert set((await event_counts(db, [r.id for r in records])).values()) == {1}


async def test_reversal_is_spooled_in_order_and_replayed_in_order(
    db: AsyncEngine, spool_path: Path
) -> None:
    order = uuid.uuid4()
    async with audit_table_locked(db), session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        await set_timeout(session, "lock_timeout", "100ms")
        await audit.order_submitted(order, "X", "sell", 15, "market", "k")
        spooled = await audit.position_change(order, "X", "sell", 10, -5, 1, 2)
        await session.commit()
    assert all(isinstance(r, SpooledRecord) for r in spooled)
    await replay_spool(spool_path, db)
    async with session_factory(db)() as session:
        trail = await AuditRepository(session).order_trail(order)
    assert [r.event_type for r in trail] == [
        E.ORDER_SUBMITTED,
        E.POSITION_CLOSED,
        E.POSITION_OPENED,
    ]


async def test_bad_input_still_raises_and_spools_nothing(db: AsyncEngine, spool_path: Path) -> None:
    async with session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        with pytest.raises(InvalidPayloadError):
            await audit.order_filled(uuid.uuid4(), "X", "buy", "NaN", 1, "B")
        with pytest.raises(InvalidInputError):
            await audit.record("order.exploded", "order", uuid.uuid4(), {})
        event_id = uuid.uuid4()
        order = uuid.uuid4()
        await audit.order_accepted(order, "X", "B", event_id=event_id)
        with pytest.raises(EventIdConflictError):
            await audit.order_accepted(order, "X", "OTHER", event_id=event_id)
        # The session is still usable and the good event commits.
        await session.commit()
    assert not await asyncio.to_thread(spool_path.exists)
    assert (await event_counts(db, [event_id]))[event_id] == 1


async def test_database_and_spool_both_failing_raises(db: AsyncEngine, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "audit.spool"
    async with audit_table_locked(db), session_factory(db)() as session:
        audit = BestEffortRepository(session, missing)
        await set_timeout(session, "lock_timeout", "100ms")
        with pytest.raises(AuditSpoolError) as info:
            await audit.order_accepted(uuid.uuid4(), "X", "B")
    assert str(missing) in str(info.value)
    assert "lock timeout" in str(info.value)


async def test_spool_lines_carry_the_error(db: AsyncEngine, spool_path: Path) -> None:
    record = await fill_with_failing_audit(db, spool_path, uuid.uuid4())
    (line,) = (await asyncio.to_thread(spool_path.read_text)).splitlines()
    parsed = json.loads(line)
    assert parsed["error"] == record.error
    assert parsed["event"]["data"]["fill_price"] == 150.25


async def test_correction_whose_lookup_fails_is_spooled(db: AsyncEngine, spool_path: Path) -> None:
    order = uuid.uuid4()
    async with session_factory(db)() as session, session.begin():
        original = await AuditRepository(session).order_accepted(order, "X", "B-WRONG")
    async with (
        audit_table_locked(db, "ACCESS EXCLUSIVE"),
        session_factory(db)() as session,
    ):
        audit = BestEffortRepository(session, spool_path)
        await set_timeout(session, "lock_timeout", "100ms")
        await session.execute(insert(positions).values(order_id=order, ticker="X", quantity=1))
        fix = await audit.record(
            "order.accepted",
            "order",
            order,
            {"ticker": "X", "broker_order_id": "B-1"},
            corrects=original.id,
        )
        assert isinstance(fix, SpooledRecord)
        assert fix.corrects_id == original.id
        await session.commit()  # the lookup failed in its savepoint; the business change commits
    assert await position_of(db, order) is not None
    assert (await replay_spool(spool_path, db)).written == 1
    async with session_factory(db)() as session:
        stored = await AuditRepository(session).get(fix.id)
    assert stored is not None
    assert stored.corrects_id == original.id


async def test_correction_of_nothing_still_raises(db: AsyncEngine, spool_path: Path) -> None:
    async with session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        with pytest.raises(InvalidInputError) as info:
            await audit.record(
                "order.accepted",
                "order",
                uuid.uuid4(),
                {"ticker": "X", "broker_order_id": "B"},
                corrects=uuid.uuid4(),
            )
    assert info.value.field == "corrects"
    assert not await asyncio.to_thread(spool_path.exists)


def chain_specs(order: uuid.UUID) -> list[dict[str, object]]:
    return [
        {
            "event_type": "order.submitted",
            "entity_type": "order",
            "entity_id": order,
            "data": {
                "ticker": "X",
                "side": "buy",
                "quantity": "2.50",
                "order_type": "limit",
                "idempotency_key": "k",
            },
        },
        {
            "event_type": "order.accepted",
            "entity_type": "order",
            "entity_id": order,
            "data": {"ticker": "X", "broker_order_id": "B"},
        },
    ]


async def test_batch_is_spooled_whole_and_replayed_in_order(
    db: AsyncEngine, spool_path: Path
) -> None:
    order = uuid.uuid4()
    async with audit_table_locked(db), session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        await set_timeout(session, "lock_timeout", "100ms")
        await session.execute(insert(positions).values(order_id=order, ticker="X", quantity=1))
        records = await audit.record_many(chain_specs(order))  # type: ignore[arg-type]
        assert all(isinstance(r, SpooledRecord) for r in records)
        assert await audit.record_many(chain_specs(uuid.uuid4()), returning=False) == 0  # type: ignore[arg-type]
        await session.commit()
    assert await position_of(db, order) is not None
    contents = read_spool(spool_path)
    assert list(contents.events)[:2] == [r.id for r in records]
    assert contents.voids == set()
    assert (await replay_spool(spool_path, db)).written == 4
    async with session_factory(db)() as session:
        trail = await AuditRepository(session).order_trail(order)
    assert [r.id for r in trail] == [r.id for r in records]
    assert str(trail[0].data["quantity"]) == "2.50"


async def test_batch_on_a_working_database_and_a_bad_batch(
    db: AsyncEngine, spool_path: Path
) -> None:
    order = uuid.uuid4()
    async with session_factory(db)() as session:
        audit = BestEffortRepository(session, spool_path)
        written = await audit.record_many(chain_specs(order))  # type: ignore[arg-type]
        assert all(r.seq > 0 and not isinstance(r, SpooledRecord) for r in written)
        bad = chain_specs(uuid.uuid4())
        bad[1]["data"] = {"ticker": "X"}
        with pytest.raises(InvalidPayloadError) as info:
            await audit.record_many(bad)  # type: ignore[arg-type]
        assert info.value.field == "events[1].data.broker_order_id"
        await session.commit()
    assert not await asyncio.to_thread(spool_path.exists)
    assert set((await event_counts(db, [r.id for r in written])).values()) == {1}
