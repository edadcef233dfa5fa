"""Batches sent with COPY while their connections are killed: one typed error, retried.

Attacks on "every failure of a lost connection is one typed error the retry path
understands": ten concurrent ``record_many`` writers send batches large enough
to go through ``COPY`` while another task terminates their server processes,
mid-COPY among other moments. The rollback after a killed COPY must not escape
as a raw driver error; every batch ends up present once, or spooled, or
reported with a typed error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditError, AuditRepository, AuditUnavailableError
from audit_orm.besteffort import BestEffortRepository
from audit_orm.bulk import COPY_THRESHOLD
from audit_orm.database import session_factory
from audit_orm.repository import PreparedEvent, prepare_event
from audit_orm.retry import RetryPolicy, call_with_retries
from audit_orm.spool import SpooledRecord, replay_spool
from tests.faultutil import business_database, event_counts

WRITERS = 10
BATCHES = 2
SIZE = COPY_THRESHOLD


@pytest.fixture(scope="module")
async def db(admin_url: str) -> AsyncIterator[AsyncEngine]:
    async with business_database(admin_url) as (_, engine):
        yield engine


@dataclass
class Outcomes:
    present: list[list[uuid.UUID]] = field(default_factory=list)
    spooled: list[list[uuid.UUID]] = field(default_factory=list)
    failed: list[tuple[list[uuid.UUID], AuditUnavailableError]] = field(default_factory=list)
    #: What the library itself raised that was not an AuditError (must stay empty).
    raw: list[BaseException] = field(default_factory=list)


def batch(n: int) -> list[PreparedEvent]:
    order = uuid.uuid4()
    return [
        prepare_event(
            "order.accepted",
            "order",
            order,
            {"ticker": "X", "broker_order_id": f"B{i}"},
            event_id=uuid.uuid4(),
        )
        for i in range(n)
    ]


async def writer(engine: AsyncEngine, spool: Path, best_effort: bool, out: Outcomes) -> None:
    sessions = session_factory(engine)
    policy = RetryPolicy(attempts=30, first_delay=0.02, max_delay=0.2)
    for _ in range(BATCHES):
        events = batch(SIZE)
        ids = [e.id for e in events]
        spooled = False

        async def write(events: list[PreparedEvent] = events) -> None:
            nonlocal spooled
            async with sessions() as session, session.begin():
                try:
                    if best_effort:
                        records = await BestEffortRepository(session, spool).record_many(events)
                        spooled = isinstance(records[0], SpooledRecord)
                    else:
                        await AuditRepository(session).record_many(events, returning=False)
                except AuditError:
                    raise
                except Exception as exc:
                    out.raw.append(exc)
                    raise

        try:
            await call_with_retries(write, policy=policy, action="writing a batch")
        except AuditUnavailableError as exc:
            out.failed.append((ids, exc))
        else:
            (out.spooled if spooled else out.present).append(ids)


async def killer(engine: AsyncEngine, stop: asyncio.Event) -> int:
    """Terminate the writers' server processes, preferring those in the middle of a COPY."""
    kills = 0
    async with engine.connect() as conn:
        await conn.execute(text("SET application_name = 'killer'"))
        await conn.commit()
        round_no = 0
        while not stop.is_set():
            round_no += 1
            only_copy = round_no % 3 != 0
            killed = await conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend' "
                    "AND (NOT :only_copy OR query ILIKE 'COPY%')"
                ),
                {"only_copy": only_copy},
            )
            await conn.commit()
            kills += int(killed or 0)
            await asyncio.sleep(0.01 if only_copy else 0.05)
    return kills


async def test_killed_copies_become_typed_errors_and_every_batch_is_accounted_for(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """README: a lost connection at any step (COPY, rollback, savepoint, commit) is
    ``AuditUnavailableError``, which ``call_with_retries`` retries.

    Ten writers (half of them best effort) send COPY-sized batches while a task
    kills their backends. No raw driver error escapes; each batch is present
    exactly once, or spooled and then replayed once, or reported failed with
    ``AuditUnavailableError`` and then absent as a whole.
    """
    spool = tmp_path / "audit.spool"
    out = Outcomes()
    stop = asyncio.Event()
    kill_task = asyncio.create_task(killer(db, stop))
    try:
        await asyncio.gather(
            *(writer(db, spool, n % 2 == 1, out) for n in range(WRITERS)),
        )
    finally:
        stop.set()
        kills = await kill_task
        await db.dispose()  # the pool still holds connections killed while idle
    assert kills > 0
    assert out.raw == []
    assert len(out.present) + len(out.spooled) + len(out.failed) == WRITERS * BATCHES
    if out.spooled:
        report = await replay_spool(spool, db)
        assert report.ok, report.summary()
    for ids in out.present + out.spooled:
        assert set((await event_counts(db, ids)).values()) == {1}
    for ids, _ in out.failed:
        assert len(set((await event_counts(db, ids)).values())) == 1  # all or nothing
