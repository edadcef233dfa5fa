"""AuditWriter's less travelled branches: a correction that finds its event, a split that
meets a failure of the whole server, a writer task cancelled while ``close`` waits for it.

Each test takes a way through the writer that the ordinary tests never take and checks what
the README promises there ("Batches, independent writes"): an ``await`` that returns means
committed, a refused event fails its caller alone, and no queued event is dropped silently.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditStorageError, AuditWriter
from tests.faultutil import audit_table_locked, event_counts


def _fill(broker_order_id: str = "B") -> dict[str, Any]:
    return {"ticker": "AAPL", "side": "buy", "fill_quantity": 1, "broker_order_id": broker_order_id}


async def _record(writer: AuditWriter, event_id: uuid.UUID, **kw: Any) -> Any:
    broker = kw.pop("broker_order_id", "B")
    return await writer.record(
        "order.filled", "order", uuid.uuid4(), _fill(broker), event_id=event_id, **kw
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


async def test_a_correction_of_a_stored_event_is_written(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A ``corrects`` that names a stored event passes the look-up and is committed.

    Promise: a correction must point at a recorded event (README, "Corrections");
    one that does is written with the link kept, and only once.
    """
    _, engine = fresh_db
    original, correction = uuid.uuid4(), uuid.uuid4()
    async with AuditWriter(engine) as writer:
        await _record(writer, original)
        record = await _record(writer, correction, corrects=original)
    assert record.id == correction
    assert record.corrects_id == original
    assert await event_counts(engine, [original, correction]) == {original: 1, correction: 1}
    async with engine.connect() as conn:
        stored = await conn.scalar(
            text("SELECT corrects_id FROM audit_events WHERE id = :id"), {"id": correction}
        )
    assert stored == original


async def test_a_split_that_meets_a_server_failure_fails_the_rest_of_the_group(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A group split for a refused event, whose other half then fails for a reason of the server.

    A trigger refuses one event with a data error (22023), which makes the writer
    split the group, and refuses the other with ``read_only_sql_transaction``
    (25006), which is no event's fault. Promise: the refused event fails its
    caller with its own error; the other caller learns the group's failure
    (not silence, not success); nothing is stored; the writer's connection is
    discarded and the next event is written on a new one.
    """
    _, engine = fresh_db
    async with engine.connect() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION refuse_two() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF NEW.data->>'broker_order_id' = 'BAD' THEN "
                "RAISE EXCEPTION 'bad value' USING ERRCODE = '22023'; END IF; "
                "IF NEW.data->>'broker_order_id' = 'RO' THEN "
                "RAISE EXCEPTION 'server is read-only' USING ERRCODE = '25006'; END IF; "
                "RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER refuse_two BEFORE INSERT ON audit_events "
                "FOR EACH ROW EXECUTE FUNCTION refuse_two()"
            )
        )
        await conn.commit()
    bad, read_only, later = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    writer = AuditWriter(engine)
    async with audit_table_locked(engine):
        # The first event holds the writer on the lock, so the next two queue
        # up and are written as one group once the lock is gone.
        first = asyncio.ensure_future(_record(writer, uuid.uuid4()))
        await _wait_for_blocked_insert(engine)
        group = [
            asyncio.ensure_future(_record(writer, bad, broker_order_id="BAD")),
            asyncio.ensure_future(_record(writer, read_only, broker_order_id="RO")),
        ]
        while writer.queued < 2:  # noqa: ASYNC110 - the queue offers no event to wait on
            await asyncio.sleep(0.01)
    await first
    refused, lost = await asyncio.gather(*group, return_exceptions=True)
    assert isinstance(refused, AuditStorageError), refused
    assert "bad value" in str(refused)
    assert isinstance(lost, AuditStorageError), lost
    assert "read-only" in str(lost)
    assert writer.stats.split_batches == 1
    assert writer.stats.refused_events == 1
    assert writer.stats.failed_batches == 1
    assert writer._conn is None
    record = await _record(writer, later)
    assert record.id == later
    await writer.close()
    assert await event_counts(engine, [bad, read_only, later]) == {
        bad: 0,
        read_only: 0,
        later: 1,
    }


async def test_a_writer_cancelled_while_close_waits_answers_everyone(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """The writer's task is cancelled after ``close`` queued its stop marker.

    Promise: ``close`` still returns (it does not re-raise the cancellation of a
    task it only waits for), the caller whose event was in flight learns that it
    may or may not be stored, and the writer ends closed.
    """
    _, engine = fresh_db
    writer = AuditWriter(engine)
    event_id = uuid.uuid4()
    async with audit_table_locked(engine):
        in_flight = asyncio.ensure_future(_record(writer, event_id))
        await _wait_for_blocked_insert(engine)
        closing = asyncio.ensure_future(writer.close())
        while writer.queued < 1:  # noqa: ASYNC110 - the queue offers no event to wait on
            await asyncio.sleep(0.01)
        task = writer._task
        assert task is not None
        task.cancel()
        await closing
        outcome = await asyncio.gather(in_flight, return_exceptions=True)
    assert task.cancelled()
    assert writer.closed
    assert isinstance(outcome[0], AuditStorageError), outcome
    assert "may or may not be stored" in str(outcome[0])
    assert (await event_counts(engine, [event_id]))[event_id] in (0, 1)
