"""BestEffortRepository's correction branches: the corrected event found, or not reachable.

A correction recorded best-effort first looks up the event it corrects. The README
("Best-effort recording") promises that a database failure spools the event rather than
failing the caller, and that a reference is still checked: on the database, or at replay.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from sqlalchemy import Integer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from audit_orm import AuditRepository
from audit_orm.besteffort import BestEffortRepository
from audit_orm.database import session_factory
from audit_orm.spool import SpooledRecord, read_spool
from tests.faultutil import audit_table_locked, event_counts, set_timeout


async def _stored_event(engine: AsyncEngine) -> uuid.UUID:
    async with session_factory(engine)() as session, session.begin():
        record = await AuditRepository(session).order_accepted(uuid.uuid4(), "X", "B")
    return record.id


async def test_a_correction_of_a_stored_event_is_written_directly(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """The corrected event is found: the correction is written, with its link, and not spooled."""
    _, engine = fresh_db
    original = await _stored_event(engine)
    spool = tmp_path / "audit.spool"
    async with session_factory(engine)() as session, session.begin():
        audit = BestEffortRepository(session, spool)
        record = await audit.record(
            "order.accepted",
            "order",
            uuid.uuid4(),
            {"ticker": "X", "broker_order_id": "B2"},
            corrects=original,
        )
    assert not isinstance(record, SpooledRecord)
    assert record.corrects_id == original
    assert record.seq > 0
    assert (await event_counts(engine, [record.id]))[record.id] == 1
    assert not spool.exists() or not read_spool(spool).events


async def test_a_correction_whose_lookup_fails_is_spooled(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """The look-up of the corrected event times out: the correction goes to the spool.

    Nothing reaches the table, the caller gets a SpooledRecord that keeps the
    reference (replay checks it), and the caller's transaction still commits.
    """
    _, engine = fresh_db
    original = await _stored_event(engine)
    spool = tmp_path / "audit.spool"
    async with (
        audit_table_locked(engine, "ACCESS EXCLUSIVE"),
        session_factory(engine)() as session,
    ):
        audit = BestEffortRepository(session, spool)
        await set_timeout(session, "lock_timeout", "100ms")
        record = await audit.record(
            "order.accepted",
            "order",
            uuid.uuid4(),
            {"ticker": "X", "broker_order_id": "B2"},
            corrects=original,
        )
        await session.commit()
    assert isinstance(record, SpooledRecord)
    assert record.corrects_id == original
    assert "lock timeout" in record.error
    contents = read_spool(spool)
    assert set(contents.events) == {record.id}
    assert contents.voids == set()
    assert (await event_counts(engine, [record.id]))[record.id] == 0


class _Base(DeclarativeBase):
    pass


class _Fill(_Base):
    """A business row of the caller's, flushed before the audit write."""

    __tablename__ = "branch_fills"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    quantity: Mapped[int | None] = mapped_column(Integer, nullable=False)


async def test_the_callers_own_flush_failure_reaches_the_caller_as_it_is(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """A pending business row breaks its own NOT NULL when the audit write flushes it.

    Promise: a failure of the caller's changes is theirs to see as it is (the
    driver's IntegrityError), not an audit failure: nothing is spooled and no
    audit row is written.
    """
    _, engine = fresh_db
    async with engine.begin() as conn:
        await conn.run_sync(_Base.metadata.create_all)
    spool = tmp_path / "audit.spool"
    event_id = uuid.uuid4()
    async with session_factory(engine)() as session:
        audit = BestEffortRepository(session, spool)
        session.add(_Fill(id=1, quantity=None))
        with pytest.raises(IntegrityError, match="quantity"):
            await audit.record(
                "order.accepted",
                "order",
                uuid.uuid4(),
                {"ticker": "X", "broker_order_id": "B"},
                event_id=event_id,
            )
        await session.rollback()
    assert not spool.exists()
    assert (await event_counts(engine, [event_id]))[event_id] == 0
