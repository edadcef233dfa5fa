"""One event, one verdict, whether it went straight to the table or through the spool.

Attacks on "recording the same event again returns the stored row; reusing an
id for different content is refused": two different events spooled under one
id during an outage, an id reused with other correlation links, an idempotent
retry with no business time that met the spool on one attempt only.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditRepository, EventIdConflictError
from audit_orm.besteffort import BestEffortRepository
from audit_orm.cli import main
from audit_orm.database import session_factory
from audit_orm.spool import SpooledRecord, replay_spool
from tests.faultutil import audit_table_locked, business_database, event_counts, set_timeout


@pytest.fixture(scope="module")
async def db_and_url(admin_url: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with business_database(admin_url) as (url, engine):
        yield engine, url


@pytest.fixture
def db(db_and_url: tuple[AsyncEngine, str]) -> AsyncEngine:
    return db_and_url[0]


async def spool_during_outage(db: AsyncEngine, spool: Path, **record: object) -> SpooledRecord:
    """Record through best effort while the table is locked; commit the transaction."""
    async with audit_table_locked(db), session_factory(db)() as session:
        await set_timeout(session, "lock_timeout", "100ms")
        result = await BestEffortRepository(session, spool).record(**record)  # type: ignore[arg-type]
        await session.commit()
    assert isinstance(result, SpooledRecord)
    return result


def accepted(order: uuid.UUID, broker: str, event_id: uuid.UUID) -> dict[str, object]:
    return {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": order,
        "data": {"ticker": "X", "broker_order_id": broker},
        "event_id": event_id,
    }


def risk(order: uuid.UUID, event_id: uuid.UUID) -> dict[str, object]:
    """An event whose ``order_id`` is chosen by the caller, not derived."""
    return {
        "event_type": "risk.evaluated",
        "entity_type": "risk_evaluation",
        "entity_id": uuid.UUID(int=7),
        "data": {
            "recommendation_id": None,
            "ticker": "X",
            "eligible": True,
            "allowed_mode": "auto",
            "rejection_reasons": [],
            "check_count": 3,
        },
        "order_id": order,
        "event_id": event_id,
    }


def replay_cli(url: str, spool: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--database-url", url, "replay", str(spool)], out=out)
    return code, out.getvalue()


async def test_two_events_sharing_an_id_in_the_spool_are_a_conflict(
    db_and_url: tuple[AsyncEngine, str], tmp_path: Path
) -> None:
    """README: reusing an event id for a different event is refused, during an outage too.

    Two different events spooled under one id: replay writes the first (as the
    table would have kept it), names the second in ``report.conflicts``, keeps
    it in the rejected file, and the command exits 1.
    """
    db, url = db_and_url
    spool = tmp_path / "audit.spool"
    event_id, order = uuid.uuid4(), uuid.uuid4()
    await spool_during_outage(db, spool, **accepted(order, "first", event_id))
    await spool_during_outage(db, spool, **accepted(order, "second", event_id))
    code, text = await asyncio.to_thread(replay_cli, url, spool)
    assert code == 1, text
    assert f"conflict line 2, event {event_id}" in text
    assert "1 conflicts" in text
    async with session_factory(db)() as session:
        stored = await AuditRepository(session).get(event_id)
    assert stored is not None and stored.data["broker_order_id"] == "first"
    rejected = spool.with_name(spool.name + ".rejected").read_text()
    assert '"kind":"conflict"' in rejected and "second" in rejected


async def test_an_id_reused_with_another_order_is_a_conflict_on_both_paths(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """README: "same event" means every column the caller chose, correlation links included.

    An event recorded with ``order_id`` A, then again under its id with
    ``order_id`` B: the direct path raises ``EventIdConflictError``; the same
    repeat replayed from the spool is a conflict in the report.
    """
    event_id = uuid.uuid4()
    async with session_factory(db)() as session, session.begin():
        await AuditRepository(session).record(**risk(uuid.uuid4(), event_id))  # type: ignore[arg-type]
    other = risk(uuid.uuid4(), event_id)
    async with session_factory(db)() as session, session.begin():
        with pytest.raises(EventIdConflictError):
            await AuditRepository(session).record(**other)  # type: ignore[arg-type]
    spool = tmp_path / "audit.spool"
    await spool_during_outage(db, spool, **other)
    report = await replay_spool(spool, db)
    assert not report.ok
    assert [c.event_id for c in report.conflicts] == [str(event_id)]
    assert (await event_counts(db, [event_id]))[event_id] == 1


async def test_an_idempotent_retry_without_business_time_is_the_same_event_in_the_spool(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """README: recording the same event again returns the stored row, on every path.

    An event without ``occurred_at`` is written directly (the database stamps
    it); a retry of it lands in the spool during an outage. The direct path
    would have returned the stored row, so replay must count it as already
    present, not reject it because the spool stamped a local time.
    """
    event_id, order = uuid.uuid4(), uuid.uuid4()
    async with session_factory(db)() as session, session.begin():
        await AuditRepository(session).record(**accepted(order, "B", event_id))  # type: ignore[arg-type]
    spool = tmp_path / "audit.spool"
    await spool_during_outage(db, spool, **accepted(order, "B", event_id))
    report = await replay_spool(spool, db)
    assert (report.already_present, report.ok) == (1, True), report.summary()
    assert report.conflicts == [] and report.rejected == []
