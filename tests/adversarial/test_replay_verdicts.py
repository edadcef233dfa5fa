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
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditRepository, AuditWriter, EventIdConflictError
from audit_orm.besteffort import BestEffortRepository
from audit_orm.cli import main
from audit_orm.database import session_factory
from audit_orm.repository import prepare_event
from audit_orm.retry import RetryPolicy
from audit_orm.spool import (
    CLAIMED_SUFFIX,
    REJECTED_SUFFIX,
    ReplayStoppedError,
    Spool,
    SpooledRecord,
    replay_spool,
)
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


# ------------------------------------------------- the database's own verdicts


async def run_admin(engine: AsyncEngine, *statements: str) -> None:
    async with engine.connect() as conn:
        for statement in statements:
            await conn.execute(text(statement))
        await conn.commit()
    await engine.dispose()  # new connections pick up database-level settings


def spooled(path: Path, count: int) -> list[uuid.UUID]:
    spool = Spool(path)
    ids = []
    for n in range(count):
        event = prepare_event(
            "order.accepted", "order", uuid.uuid4(), {"ticker": "X", "broker_order_id": f"B{n}"}
        )
        spool.append_event(event, "x")
        ids.append(event.id)
    return ids


async def test_replay_and_the_writer_commit_synchronously_whatever_the_default(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """README: replay reports events durable, and the writer's acknowledgement means committed.

    With ``synchronous_commit = off`` as the database default, a commit can
    return before it is on disk. A trigger notes the setting in force when each
    row is inserted: replay's and the writer's must be ``on``.
    """
    url, engine = fresh_db
    name = make_url(url).database
    await run_admin(
        engine,
        "CREATE TABLE commit_mode (mode text NOT NULL)",
        "CREATE FUNCTION note_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO commit_mode VALUES (current_setting('synchronous_commit')); "
        "RETURN NEW; END $$",
        "CREATE TRIGGER note_commit_mode AFTER INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION note_commit_mode()",
        f'ALTER DATABASE "{name}" SET synchronous_commit = off',
    )
    spool = tmp_path / "audit.spool"
    spooled(spool, 3)
    assert (await replay_spool(spool, engine)).written == 3
    async with AuditWriter(engine) as writer:
        await writer.record(**accepted(uuid.uuid4(), "W", uuid.uuid4()))  # type: ignore[arg-type]
    async with engine.connect() as conn:
        modes = (await conn.scalars(text("SELECT mode FROM commit_mode"))).all()
    assert modes == ["on"] * 4


async def test_a_read_only_server_stops_replay_and_keeps_the_spool(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """README: a failure that is not about one line stops replay; nothing is rejected.

    On a read-only database every insert fails the same way: replay must stop
    (non-zero exit), keep the claimed file and reject no line, and a rerun once
    the server is writable again writes every event.
    """
    url, engine = fresh_db
    name = make_url(url).database
    spool = tmp_path / "audit.spool"
    ids = spooled(spool, 3)
    await run_admin(engine, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    with pytest.raises(ReplayStoppedError) as info:
        await replay_spool(spool, engine)
    assert info.value.report.rejected == []
    code, text_out = await asyncio.to_thread(replay_cli, url, spool)
    assert code != 0 and "replay stopped" in text_out
    assert spool.with_name(spool.name + CLAIMED_SUFFIX).exists()
    assert not spool.with_name(spool.name + REJECTED_SUFFIX).exists()
    await run_admin(
        engine,
        "SET TRANSACTION READ WRITE",
        f'ALTER DATABASE "{name}" RESET default_transaction_read_only',
    )
    report = await replay_spool(spool, engine)
    assert (report.written, report.ok) == (3, True)
    assert set((await event_counts(engine, ids)).values()) == {1}


@pytest.mark.parametrize(("state", "retried"), [("40001", True), ("40P01", True), ("53100", False)])
async def test_replay_retries_an_aborted_transaction_and_stops_on_a_full_disk(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path, state: str, retried: bool
) -> None:
    """README: a chunk that fails transiently is retried; a failure not about a line stops replay.

    A trigger fails the first insert with ``state``: a serialization failure or
    a deadlock is retried and every event written; a full disk stops the
    replay, keeps the claimed file and rejects nothing.
    """
    _, engine = fresh_db
    await run_admin(
        engine,
        "CREATE SEQUENCE injected_fault",
        "CREATE FUNCTION inject_fault() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF nextval('injected_fault') = 1 OR '{state}' = '53100' THEN "
        f"RAISE EXCEPTION 'injected fault' USING ERRCODE = '{state}'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER inject_fault BEFORE INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION inject_fault()",
    )
    spool = tmp_path / "audit.spool"
    ids = spooled(spool, 3)
    policy = RetryPolicy(attempts=3, first_delay=0.01)
    if retried:
        report = await replay_spool(spool, engine, retry=policy)
        assert (report.written, report.ok) == (3, True)
        assert set((await event_counts(engine, ids)).values()) == {1}
        return
    with pytest.raises(ReplayStoppedError) as info:
        await replay_spool(spool, engine, retry=policy)
    assert info.value.report.rejected == []
    assert spool.with_name(spool.name + CLAIMED_SUFFIX).exists()
    assert not spool.with_name(spool.name + REJECTED_SUFFIX).exists()


async def test_a_row_over_a_program_limit_is_rejected_and_replay_goes_on(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """README: a line the database refuses for itself is rejected; replay goes on.

    A trigger refuses one row with ``program_limit_exceeded`` (as an index row
    too large would be): that line is rejected, the others are written, and
    the replay does not stop.
    """
    _, engine = fresh_db
    await run_admin(
        engine,
        "CREATE FUNCTION refuse_one() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.data->>'broker_order_id' = 'B1' THEN "
        "RAISE EXCEPTION 'row too large' USING ERRCODE = '54000'; END IF; "
        "RETURN NEW; END $$",
        "CREATE TRIGGER refuse_one BEFORE INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION refuse_one()",
    )
    spool = tmp_path / "audit.spool"
    ids = spooled(spool, 3)
    report = await replay_spool(spool, engine)
    assert report.written == 2
    assert [p.event_id for p in report.rejected] == [str(ids[1])]
