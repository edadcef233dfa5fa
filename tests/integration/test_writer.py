"""AuditWriter: grouped commits, durability on return, back-pressure, close, failures."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditRecord,
    AuditRepository,
    AuditStorageError,
    AuditUnavailableError,
    AuditWriter,
    EventIdConflictError,
    InvalidInputError,
    InvalidPayloadError,
    WriterClosedError,
    migrate,
)
from tests.dbutil import scratch_database


def fill_data(ticker: str, n: int = 1) -> dict[str, Any]:
    return {
        "ticker": ticker,
        "side": "buy",
        "fill_quantity": n,
        "fill_price": "10.5",
        "broker_order_id": f"B{n}",
    }


def new_ticker() -> str:
    return "W" + uuid.uuid4().hex[:10].upper()


async def record_fill(writer: AuditWriter, ticker: str, n: int = 1, **kw: Any) -> AuditRecord:
    return await writer.record("order.filled", "order", uuid.uuid4(), fill_data(ticker, n), **kw)


async def committed_count(engine: AsyncEngine, ticker: str) -> int:
    """Rows with ``ticker`` as another connection sees them (committed only)."""
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT count(*) FROM audit_events WHERE ticker = :t"), {"t": ticker}
        )
        return int(result.scalar_one())


@pytest.fixture
async def writer(engine: AsyncEngine) -> AsyncIterator[AuditWriter]:
    async with AuditWriter(engine) as w:
        yield w


async def test_concurrent_records_share_commits(engine: AsyncEngine, writer: AuditWriter) -> None:
    ticker = new_ticker()
    records = await asyncio.gather(*(record_fill(writer, ticker, n) for n in range(40)))

    assert len({r.id for r in records}) == 40
    assert writer.stats.events == 40
    assert writer.stats.batches < 40
    # Rows committed by one transaction share its id (xmin): fewer than one per event.
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT count(DISTINCT xmin::text) FROM audit_events WHERE ticker = :t"),
            {"t": ticker},
        )
        assert result.scalar_one() < 40
    # Queued order is recorded order.
    assert [r.seq for r in records] == sorted(r.seq for r in records)


async def test_event_is_committed_when_record_returns(
    engine: AsyncEngine, writer: AuditWriter
) -> None:
    ticker = new_ticker()
    record = await record_fill(writer, ticker)
    assert await committed_count(engine, ticker) == 1
    assert record.seq > 0
    assert record.recorded_at is not None


async def test_event_survives_the_callers_rollback(
    engine: AsyncEngine, writer: AuditWriter
) -> None:
    ticker = new_ticker()
    async with AsyncSession(engine) as session:
        repo = AuditRepository(session)
        await repo.order_rejected(uuid.uuid4(), ticker, "limit breached", source="risk")
        await writer.record(
            "risk.rejected",
            "risk_evaluation",
            uuid.uuid4(),
            {
                "ticker": ticker,
                "eligible": False,
                "allowed_mode": "none",
                "rejection_reasons": ["limit"],
                "check_count": 3,
            },
            actor="risk_engine",
        )
        await session.rollback()
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT event_type FROM audit_events WHERE ticker = :t"), {"t": ticker}
        )
        assert result.scalars().all() == ["risk.rejected"]


async def test_bad_input_fails_only_its_caller(engine: AsyncEngine, writer: AuditWriter) -> None:
    ticker = new_ticker()
    good = [record_fill(writer, ticker, n) for n in range(5)]
    bad = writer.record("order.filled", "order", uuid.uuid4(), {"ticker": ticker})
    results = await asyncio.gather(*good, bad, return_exceptions=True)

    assert all(isinstance(r, AuditRecord) for r in results[:5])
    assert isinstance(results[5], InvalidPayloadError)
    assert await committed_count(engine, ticker) == 5


async def test_id_conflict_fails_only_its_caller(engine: AsyncEngine, writer: AuditWriter) -> None:
    ticker = new_ticker()
    taken = uuid.uuid4()
    first = await record_fill(writer, ticker, 1, event_id=taken)

    results = await asyncio.gather(
        record_fill(writer, ticker, 2),
        record_fill(writer, ticker, 3, event_id=taken),
        writer.record(
            "order.filled", "order", first.entity_id, fill_data(ticker, 1), event_id=taken
        ),
        record_fill(writer, ticker, 4),
        return_exceptions=True,
    )

    assert isinstance(results[0], AuditRecord)
    assert isinstance(results[1], EventIdConflictError)
    assert results[2] == first  # an exact repeat is idempotent
    assert isinstance(results[3], AuditRecord)
    assert await committed_count(engine, ticker) == 3


async def test_back_pressure_bounds_the_queue(engine: AsyncEngine) -> None:
    """With the table locked elsewhere, one event is in flight, the queue fills, callers wait."""
    ticker = new_ticker()
    async with AuditWriter(engine, max_batch=1, max_queue=2) as writer, engine.connect() as locker:
        await locker.execute(text("LOCK TABLE audit_events IN EXCLUSIVE MODE"))
        tasks = [asyncio.create_task(record_fill(writer, ticker, n)) for n in range(6)]
        for _ in range(500):
            if writer.queued == 2 and writer.blocked == 3:
                break
            await asyncio.sleep(0.01)
        assert writer.queued == 2
        assert writer.blocked == 3
        assert not any(task.done() for task in tasks)
        assert writer.stats.batches == 0

        await locker.rollback()
        records = await asyncio.gather(*tasks)
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    assert writer.stats.batches == 6
    assert await committed_count(engine, ticker) == 6


async def test_close_writes_everything_queued(engine: AsyncEngine) -> None:
    """A long max_delay holds a partial group; close() cuts it short and writes it."""
    ticker = new_ticker()
    writer = AuditWriter(engine, max_delay=30)
    tasks = [asyncio.create_task(record_fill(writer, ticker, n)) for n in range(8)]
    await asyncio.sleep(0.01)
    for _ in range(500):
        if writer.queued == 0:  # all taken into the group that waits for more
            break
        await asyncio.sleep(0.01)
    assert writer.queued == 0
    assert not any(task.done() for task in tasks)

    await writer.close()

    assert all(task.done() for task in tasks)
    assert len({task.result().id for task in tasks}) == 8
    assert await committed_count(engine, ticker) == 8
    with pytest.raises(WriterClosedError):
        await record_fill(writer, ticker)


async def test_failed_group_raises_to_every_caller(admin_url: str) -> None:
    """No table yet: the whole group fails, each caller gets an error; then it recovers."""
    ticker = new_ticker()
    async with scratch_database(admin_url) as (_url, scratch):
        async with AuditWriter(scratch) as writer:
            results = await asyncio.gather(
                *(record_fill(writer, ticker, n) for n in range(6)), return_exceptions=True
            )
            assert all(isinstance(r, AuditStorageError) for r in results)
            assert len({id(r) for r in results}) == 6
            assert all(r.__cause__ is not None for r in results if isinstance(r, Exception))
            assert writer.stats.failed_batches >= 1
            assert writer.stats.events == 0

            await migrate.upgrade(scratch)
            record = await record_fill(writer, ticker, 7)
            assert record.seq >= 1
        assert await committed_count(scratch, ticker) == 1


async def test_writer_owns_an_engine_made_from_a_url(db_url: str) -> None:
    ticker = new_ticker()
    async with AuditWriter(db_url) as writer:
        await record_fill(writer, ticker)
    check = create_async_engine(db_url)
    try:
        assert await committed_count(check, ticker) == 1
    finally:
        await check.dispose()


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_batch", 0), ("max_queue", -1), ("max_delay", -0.5), ("max_batch", True)],
)
async def test_bad_options_are_refused(engine: AsyncEngine, option: str, value: Any) -> None:
    with pytest.raises(InvalidInputError) as caught:
        AuditWriter(engine, **{option: value})
    assert caught.value.field == option


async def test_writer_reconnects_after_losing_its_connection(admin_url: str) -> None:
    ticker = new_ticker()
    async with scratch_database(admin_url) as (_url, scratch):
        await migrate.upgrade(scratch)
        async with AuditWriter(scratch) as writer:
            await record_fill(writer, ticker, 1)
            async with scratch.connect() as killer:
                await killer.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            with pytest.raises(AuditUnavailableError) as lost:
                await record_fill(writer, ticker, 2)
            assert "connection lost" in str(lost.value)
            again = await record_fill(writer, ticker, 3)
            assert again.seq > 0
        assert await committed_count(scratch, ticker) == 2
