"""bulk's edge branches: empty batches, a block on a connection that cannot hold one, and a
COPY that meets an id committed meanwhile by another transaction.

The README promises that a batch is written in order with one outcome per event, that an id
stored already comes back as the stored record (idempotent), and that bad input is a typed
error with nothing written.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import InvalidInputError, bulk
from audit_orm.repository import prepare_event
from tests.faultutil import event_counts, total_events


async def test_empty_batches_touch_nothing(fresh_db: tuple[str, AsyncEngine]) -> None:
    """An empty batch has no outcome, adds no row, and an empty id list finds nothing."""
    _, engine = fresh_db
    async with engine.connect() as conn:
        assert await bulk.insert_many(conn, []) == []
        assert await bulk.write_many(conn, []) == 0
        assert await bulk.existing_ids(conn, []) == set()
        await conn.commit()
    assert await total_events(engine) == 0


async def test_a_block_needs_an_autocommit_asyncpg_connection(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """transaction_block on a connection that is neither AUTOCOMMIT nor in a transaction.

    There is no driver connection to send BEGIN on: InvalidInputError, and the
    block's body never runs.
    """
    _, engine = fresh_db
    ran = False
    async with engine.connect() as conn:
        with pytest.raises(InvalidInputError, match="AUTOCOMMIT"):
            async with bulk.transaction_block(conn):
                ran = True
    assert not ran


async def test_a_copy_meeting_an_id_committed_meanwhile_falls_back(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """An id the COPY did not see as stored is committed by another transaction first.

    The COPY waits on that row's unique index, then fails with a unique
    violation once the other transaction commits. Promise: the batch falls back
    to the INSERT that skips stored ids, so the event stored meanwhile comes back
    as the stored record (same content: idempotent), the other event is written,
    and each id has exactly one row.
    """
    _, engine = fresh_db
    shared = prepare_event(
        "order.accepted",
        "order",
        uuid.uuid4(),
        {"ticker": "X", "broker_order_id": "B1"},
        event_id=uuid.uuid4(),
    )
    other = prepare_event(
        "order.accepted",
        "order",
        uuid.uuid4(),
        {"ticker": "Y", "broker_order_id": "B2"},
        event_id=uuid.uuid4(),
    )
    async with engine.connect() as first:
        [stored] = await bulk.insert_many(first, [shared])
        async with engine.connect() as second:
            pid = await second.scalar(text("SELECT pg_backend_pid()"))
            copying = asyncio.ensure_future(
                bulk.insert_many(second, [shared, other], copy_threshold=1)
            )
            async with engine.connect() as watch:
                for _ in range(2000):
                    state = await watch.scalar(
                        text("SELECT wait_event_type FROM pg_stat_activity WHERE pid = :pid"),
                        {"pid": pid},
                    )
                    if state == "Lock":
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("the COPY never waited for the other transaction")
            await first.commit()
            outcomes = await copying
            await second.commit()
    assert outcomes[0] == stored
    assert outcomes[1].id == other.id
    assert outcomes[1].seq > stored.seq
    assert await event_counts(engine, [shared.id, other.id]) == {shared.id: 1, other.id: 1}
