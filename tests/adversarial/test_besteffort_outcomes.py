"""Best effort loses nothing and invents nothing: each spooled attempt meets its own outcome.

Attacks on the promise that best-effort recording never stops trading and still
loses nothing: a unit of work retried under the same event id, an AUTOCOMMIT
session, a connection killed around the audit write, a savepoint statement that
fails while the connection stays up (as behind a transaction pooler).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import nullcontext
from pathlib import Path

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import AuditTransactionLostError, AuditUnavailableError, EventIdConflictError
from audit_orm.besteffort import BestEffortRepository
from audit_orm.database import session_factory
from audit_orm.spool import SpooledRecord, read_spool, replay_spool
from tests.faultutil import (
    audit_table_locked,
    business_database,
    event_counts,
    failing_statements,
    kill_backend,
    position_of,
    positions,
    set_timeout,
)


@pytest.fixture(scope="module")
async def db_and_url(admin_url: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with business_database(admin_url) as (url, engine):
        yield engine, url


@pytest.fixture
def db(db_and_url: tuple[AsyncEngine, str]) -> AsyncEngine:
    return db_and_url[0]


async def test_a_retried_unit_of_work_keeps_the_attempt_that_committed(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """README: "retry the unit of work with the same event_id"; nothing committed is lost.

    While the audit table is unavailable, attempt 1 spools the event and then
    rolls back (its void is spooled); attempt 2 spools the same event id and
    commits. The void cancels attempt 1 only: replay writes the event once.
    """
    spool = tmp_path / "audit.spool"
    order, event_id = uuid.uuid4(), uuid.uuid4()
    async with audit_table_locked(db):
        for attempt, commit in ((1, False), (2, True)):
            async with session_factory(db)() as session:
                audit = BestEffortRepository(session, spool)
                await set_timeout(session, "lock_timeout", "100ms")
                await session.execute(
                    insert(positions).values(order_id=order, ticker="X", quantity=attempt)
                )
                record = await audit.order_accepted(order, "X", "B", event_id=event_id)
                assert isinstance(record, SpooledRecord)
                if commit:
                    await session.commit()
                else:
                    await session.rollback()  # the business step failed after the write
    assert (await position_of(db, order)).quantity == 2
    assert read_spool(spool).duplicates == 1  # two attempts of one event
    report = await replay_spool(spool, db)
    assert (report.written, report.voided, report.ok) == (1, 0, True)
    assert (await event_counts(db, [event_id]))[event_id] == 1


@pytest.fixture
async def autocommit(db_and_url: tuple[AsyncEngine, str]) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(db_and_url[1], isolation_level="AUTOCOMMIT")
    yield engine
    await engine.dispose()


@pytest.mark.parametrize("many", [False, True])
async def test_an_autocommit_session_writes_and_never_voids(
    db: AsyncEngine, autocommit: AsyncEngine, tmp_path: Path, many: bool
) -> None:
    """README: best effort works on any session; an AUTOCOMMIT session commits each statement.

    With the database up, the event is written (no SAVEPOINT is attempted
    outside a transaction block). With the table unavailable it is spooled and,
    since every statement commits on its own, never voided: replay writes it
    although the caller never calls commit.
    """
    spool = tmp_path / "audit.spool"
    written, spooled = uuid.uuid4(), uuid.uuid4()

    async def record(session: AsyncSession, event_id: uuid.UUID) -> object:
        audit = BestEffortRepository(session, spool)
        spec = {
            "event_type": "order.accepted",
            "entity_type": "order",
            "entity_id": uuid.uuid4(),
            "data": {"ticker": "X", "broker_order_id": "B"},
            "event_id": event_id,
        }
        if many:
            (result,) = await audit.record_many([spec])  # type: ignore[list-item]
            return result
        return await audit.record(**spec)  # type: ignore[arg-type]

    async with AsyncSession(autocommit) as session:
        assert not isinstance(await record(session, written), SpooledRecord)
    async with AsyncSession(autocommit) as session:
        await session.execute(text("SET lock_timeout = '100ms'"))
        async with audit_table_locked(db):
            assert isinstance(await record(session, spooled), SpooledRecord)
        await session.execute(text("RESET lock_timeout"))
    contents = read_spool(spool)
    assert contents.voids == set()
    report = await replay_spool(spool, db)
    assert (report.written, report.voided, report.ok) == (1, 0, True)
    assert await event_counts(db, [written, spooled]) == {written: 1, spooled: 1}


async def test_a_killed_backend_raises_and_voids_what_the_transaction_spooled(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """README: best effort never costs the caller its business change silently.

    An event is spooled (table locked), then the backend is killed: the next
    write cannot open its savepoint. It raises ``AuditTransactionLostError``
    (retryable), the event spooled earlier is voided at once (even if the
    process died before rolling back), and the caller's commit fails.
    """
    spool = tmp_path / "audit.spool"
    order = uuid.uuid4()
    async with session_factory(db)() as session:
        audit = BestEffortRepository(session, spool)
        await session.execute(insert(positions).values(order_id=order, ticker="X", quantity=1))
        await set_timeout(session, "lock_timeout", "100ms")
        async with audit_table_locked(db):
            first = await audit.order_submitted(order, "X", "buy", 1, "market", "k")
        assert isinstance(first, SpooledRecord)
        await kill_backend(session, db)
        second = uuid.uuid4()
        with pytest.raises(AuditTransactionLostError) as info:
            await audit.order_accepted(order, "X", "B", event_id=second)
        assert isinstance(info.value, AuditUnavailableError)
        # Voided before the caller does anything more.
        assert read_spool(spool).voids == {first.id}
        with pytest.raises(SQLAlchemyError):
            await session.commit()
    assert await position_of(db, order) is None
    report = await replay_spool(spool, db)
    assert (report.written, report.voided) == (0, 1)
    assert await event_counts(db, [first.id, second]) == {first.id: 0, second: 0}


@pytest.mark.parametrize("statement", ["SAVEPOINT", "RELEASE SAVEPOINT", "ROLLBACK TO SAVEPOINT"])
async def test_a_failing_savepoint_statement_cannot_turn_commit_into_rollback(
    db: AsyncEngine, tmp_path: Path, statement: str
) -> None:
    """README: best effort never costs the caller its business change silently.

    The savepoint around the audit write fails on the server while the
    connection stays up (as behind PgBouncer in transaction pooling): the
    transaction is aborted, and asyncpg would report its COMMIT as a success
    while the server rolls it back. Best effort must raise
    ``AuditTransactionLostError``, make the commit fail, and leave nothing in
    the spool that replay would write.
    """
    spool = tmp_path / "audit.spool"
    order, event_id = uuid.uuid4(), uuid.uuid4()
    async with session_factory(db)() as session:
        audit = BestEffortRepository(session, spool)
        await session.execute(insert(positions).values(order_id=order, ticker="X", quantity=1))
        await set_timeout(session, "lock_timeout", "100ms")
        locked = audit_table_locked(db) if statement.startswith("ROLLBACK") else nullcontext()
        async with locked:
            with (
                failing_statements(db, statement) as hits,
                pytest.raises(AuditTransactionLostError),
            ):
                await audit.order_accepted(order, "X", "B", event_id=event_id)
            assert hits
        with pytest.raises(SQLAlchemyError):
            await session.commit()
    assert await position_of(db, order) is None
    report = await replay_spool(spool, db)
    assert report.written == 0
    assert (await event_counts(db, [event_id]))[event_id] == 0


async def test_a_batch_reusing_an_id_is_refused_during_an_outage_as_without_one(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """README: a reused event id raises in best-effort mode too; a batch is all or nothing.

    Without an outage, ``record_many`` refuses a batch that reuses an id for
    other content (``EventIdConflictError``, nothing written). During one it
    must refuse it the same way rather than spool it, or replay would write
    the first half of a batch the direct path refuses whole.
    """
    spool = tmp_path / "audit.spool"
    event_id, order = uuid.uuid4(), uuid.uuid4()
    specs = [
        {
            "event_type": "order.accepted",
            "entity_type": "order",
            "entity_id": order,
            "data": {"ticker": "X", "broker_order_id": broker},
            "event_id": event_id,
        }
        for broker in ("B1", "B2")
    ]
    async with audit_table_locked(db), session_factory(db)() as session:
        await set_timeout(session, "lock_timeout", "100ms")
        with pytest.raises(EventIdConflictError):
            await BestEffortRepository(session, spool).record_many(specs)  # type: ignore[arg-type]
        await session.commit()
    assert read_spool(spool).events == {}
    assert (await event_counts(db, [event_id]))[event_id] == 0
