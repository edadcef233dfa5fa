"""AuditWriter's error paths: a closed writer, an unreachable server, a writer stopped mid-write.

The writer promises that an ``await`` that returns means committed, that a
failed group raises to every caller in it, and that nothing queued is dropped
silently. These tests take the paths where the writer itself stops or cannot
reach the server, which the ordinary tests never take.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import (
    AuditStorageError,
    AuditUnavailableError,
    AuditWriter,
    InvalidInputError,
    WriterClosedError,
)
from tests.faultutil import audit_table_locked, event_counts, unreachable_url


def _fill(ticker: str = "AAPL") -> dict[str, Any]:
    return {"ticker": ticker, "side": "buy", "fill_quantity": 1, "broker_order_id": "B"}


async def _record(writer: AuditWriter, event_id: uuid.UUID, **kw: Any) -> Any:
    return await writer.record(
        "order.filled", "order", uuid.uuid4(), _fill(), event_id=event_id, **kw
    )


async def _wait_for_blocked_insert(engine: AsyncEngine) -> None:
    """Until some backend waits for a lock on audit_events (the writer's INSERT)."""
    async with engine.connect() as conn:
        for _ in range(2000):
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                    "WHERE c.relname = 'audit_events' AND NOT l.granted"
                )
            )
            if waiting:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the writer's INSERT never waited for the lock")


async def test_a_closed_writer_takes_nothing_and_closes_once(engine: AsyncEngine) -> None:
    """After close, start and record raise WriterClosedError; close and start are idempotent.

    Promise: nothing is accepted that will not be written (README, "Batches,
    independent writes"); a second start does not start a second task.
    """
    writer = AuditWriter(engine)
    await writer.start()
    task = writer._task
    await writer.start()
    assert writer._task is task
    assert not writer.closed
    await writer.close()
    assert writer.closed
    await writer.close()
    with pytest.raises(WriterClosedError, match="closed"):
        await writer.start()
    with pytest.raises(WriterClosedError, match="closed"):
        await _record(writer, uuid.uuid4())
    assert writer.queued == 0
    assert writer.stats.events == 0


async def test_closing_a_writer_that_never_started(engine: AsyncEngine) -> None:
    """A writer closed before its first event has nothing to write and no task to stop."""
    writer = AuditWriter(engine)
    await writer.close()
    assert writer.closed
    with pytest.raises(WriterClosedError):
        await _record(writer, uuid.uuid4())


async def test_correction_lookup_on_an_unreachable_server_is_typed(db_url: str) -> None:
    """Looking up a corrected event without a server raises AuditUnavailableError at once.

    Promise: every failure to reach the database is one typed error the retry
    path understands; the event is not queued, so no group fails for it.
    """
    writer = AuditWriter(unreachable_url(db_url))
    try:
        with pytest.raises(AuditUnavailableError, match="looking up the corrected event"):
            await _record(writer, uuid.uuid4(), corrects=uuid.uuid4())
        assert writer.queued == 0
        assert writer.stats.failed_batches == 0
    finally:
        await writer.close()


async def test_correction_of_an_unknown_event_fails_its_caller_alone(engine: AsyncEngine) -> None:
    """A correction naming no recorded event is refused before it is queued."""
    async with AuditWriter(engine) as writer:
        unknown = uuid.uuid4()
        with pytest.raises(InvalidInputError) as info:
            await _record(writer, uuid.uuid4(), corrects=unknown)
        assert info.value.field == "corrects"
        assert writer.stats.failed_batches == 0
        stored = await _record(writer, uuid.uuid4())
        assert stored.seq > 0


async def test_a_writer_stopped_mid_write_answers_every_caller(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """The writer's task cancelled while its INSERT waits: every caller learns, none hangs.

    What a loop shutting down does to the writer. The event being written gets
    AuditStorageError saying it may or may not be stored (the statement was in
    flight); the events still queued get AuditStorageError too, are never
    written, and the writer takes no more events. Promise: nothing queued is
    dropped silently (README, "Batches, independent writes").
    """
    _, engine = fresh_db
    writer = AuditWriter(engine)
    first, second, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with audit_table_locked(engine):
        in_flight = asyncio.ensure_future(_record(writer, first))
        await _wait_for_blocked_insert(engine)
        queued = [asyncio.ensure_future(_record(writer, ev)) for ev in (second, third)]
        while writer.queued < 2:  # noqa: ASYNC110 - the queue offers no event to wait on
            await asyncio.sleep(0.01)
        assert writer._task is not None
        writer._task.cancel()
        outcomes = await asyncio.gather(in_flight, *queued, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, AuditStorageError), outcome
        assert "may or may not be stored" in str(outcome)
        assert isinstance(outcome.__cause__, asyncio.CancelledError)
    assert writer.closed
    assert writer.stats.failed_batches == 1
    with pytest.raises(WriterClosedError):
        await _record(writer, uuid.uuid4())
    await writer.close()
    counts = await event_counts(engine, [first, second, third])
    assert counts[second] == counts[third] == 0
    assert counts[first] in (0, 1)
