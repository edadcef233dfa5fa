"""The spool's error paths: odd files, an append racing a claim, a failed write, a replay stopped.

Promise (README, "Best-effort recording"): an event that cannot be written is
kept in the spool until a replay writes it or reports it; nothing leaves the
spool silently, and a failure says what it is. These tests take the paths the
ordinary spool and replay tests do not: a spool path that is not a regular
file, a symlink, an append that waited for a replay's claim, a write the disk
refuses half-way, and a replay the database refuses as a whole.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import resource
import signal
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit_orm import AuditSpoolError, BestEffortRepository, InvalidInputError
from audit_orm.database import session_factory
from audit_orm.repository import PreparedEvent, prepare_event
from audit_orm.spool import (
    CLAIMED_SUFFIX,
    REJECTED_SUFFIX,
    ReplayStoppedError,
    Spool,
    read_spool,
    replay_spool,
)
from tests.faultutil import audit_table_locked, event_counts, set_timeout


def _fill(broker_order_id: str = "B-1") -> PreparedEvent:
    return prepare_event(
        "order.filled",
        "order",
        uuid.uuid4(),
        {
            "ticker": "AAPL",
            "side": "buy",
            "fill_quantity": Decimal("1.5"),
            "broker_order_id": broker_order_id,
        },
    )


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------ files a spool refuses


def test_a_spool_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    """A FIFO (or device) at the spool path is refused, not written to and left blocking."""
    path = tmp_path / "audit.spool"
    os.mkfifo(path)
    spool = Spool(path)
    with pytest.raises(AuditSpoolError, match="is not a regular file"):
        spool.append_event(_fill(), "database unreachable")
    assert repr(spool) == f"Spool({str(path)!r})"


def test_a_symlinked_spool_cannot_be_claimed(tmp_path: Path) -> None:
    """Claiming a spool whose path is a symbolic link fails loudly and moves nothing."""
    target = tmp_path / "elsewhere"
    Spool(target).append_event(_fill(), "x")
    path = tmp_path / "audit.spool"
    path.symlink_to(target)
    with pytest.raises(AuditSpoolError, match="cannot open"):
        Spool(path).claim()
    assert len(_lines(target)) == 1
    assert not path.with_name(path.name + CLAIMED_SUFFIX).exists()


def test_reading_a_spool_that_is_a_symlink_fails_loudly(tmp_path: Path) -> None:
    """read_spool never follows a link: an error, not another file's records."""
    target = tmp_path / "elsewhere"
    Spool(target).append_event(_fill(), "x")
    path = tmp_path / "audit.spool"
    path.symlink_to(target)
    with pytest.raises(AuditSpoolError, match="cannot read"):
        read_spool(path)


def test_an_empty_attempt_token_is_refused(tmp_path: Path) -> None:
    """A write attempt needs a token a void can name; an empty one is bad input."""
    spool = Spool(tmp_path / "audit.spool")
    with pytest.raises(InvalidInputError) as info:
        spool.append_events([_fill()], "x", attempt="")
    assert info.value.field == "attempt"
    assert not spool.path.exists()


def test_nothing_to_append_writes_nothing(tmp_path: Path) -> None:
    """No events and no voids leave no file behind (an empty spool is no spool)."""
    spool = Spool(tmp_path / "audit.spool")
    assert spool.append_events([], "x") == []
    spool.append_voids([], "rolled back")
    assert not spool.path.exists()
    assert spool.claim() is None


def test_claim_with_a_leftover_claimed_file_and_an_empty_spool(tmp_path: Path) -> None:
    """An interrupted replay's claimed file is reused; an empty new spool adds nothing to it."""
    spool = Spool(tmp_path / "audit.spool")
    spool.append_event(_fill(), "x")
    claimed = spool.claim()
    assert claimed is not None
    before = claimed.read_bytes()
    spool.path.touch(mode=0o600)
    assert spool.claim() == claimed
    assert claimed.read_bytes() == before
    assert not spool.path.exists()


# ------------------------------------------------------- an append racing a claim


@contextmanager
def _spool_locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _opened_by_another(path: Path, own: int) -> bool:
    target = str(path)
    for name in os.listdir("/proc/self/fd"):
        try:
            if int(name) != own and os.readlink(f"/proc/self/fd/{name}") == target:
                return True
        except OSError:
            continue
    return False


@pytest.mark.parametrize("after", ["gone", "replaced"])
def test_an_append_that_waited_for_a_claim_lands_in_the_new_spool(
    tmp_path: Path, after: str
) -> None:
    """A replay moved the file while an append waited for its lock: the record is not lost.

    The append must notice that the file it opened is no longer the spool and
    write to the spool path again (a new file, or one another writer made),
    never to the claimed file that the running replay has already read.
    """
    spool = Spool(tmp_path / "audit.spool")
    spool.append_event(_fill("first"), "x")
    claimed = spool.path.with_name(spool.path.name + CLAIMED_SUFFIX)
    late = _fill("late")
    errors: list[BaseException] = []

    def append() -> None:
        try:
            spool.append_event(late, "x")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    fd = os.open(spool.path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        writer = threading.Thread(target=append)
        writer.start()
        for _ in range(5000):
            if _opened_by_another(spool.path, fd):
                break
            threading.Event().wait(0.001)
        else:  # pragma: no cover
            raise AssertionError("the append never opened the spool")
        os.replace(spool.path, claimed)
        if after == "replaced":
            spool.path.touch(mode=0o600)
    finally:
        os.close(fd)
    writer.join()
    assert errors == []
    assert [line["event_id"] for line in _lines(claimed)] != [str(late.id)]
    assert str(late.id) not in claimed.read_text()
    assert [line["event_id"] for line in _lines(spool.path)] == [str(late.id)]


# ------------------------------------------------------------ a write cut short


@contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Files of this process cannot grow past ``limit`` bytes (EFBIG instead of a signal)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_an_append_the_disk_refuses_half_way_leaves_no_torn_record(tmp_path: Path) -> None:
    """The file cannot grow past a limit mid-write: the append fails and its part is cut off.

    A spooled event must be whole or absent; a failed append that left half a
    line would be reported by replay as a torn record of an event the caller
    was told was not kept.
    """
    spool = Spool(tmp_path / "audit.spool")
    spool.append_event(_fill("kept"), "x")
    size = spool.path.stat().st_size
    big = _fill("x" * 20_000)
    with _file_size_limit(size + 100), pytest.raises(AuditSpoolError, match="cannot append"):
        spool.append_event(big, "x")
    assert spool.path.stat().st_size == size
    assert [line["event"]["data"]["broker_order_id"] for line in _lines(spool.path)] == ["kept"]  # type: ignore[index]


# ----------------------------------------------------------- lines replay skips


async def test_replay_skips_blank_lines_and_counts_duplicates(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """Blank lines are not records; the same event spooled twice is written once.

    A retried unit of work can spool one event from two attempts; replay must
    write it once and say it saw a duplicate, not report a conflict.
    """
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    event = _fill()
    spool.append_events([event], "first attempt")
    with spool.path.open("a", encoding="utf-8") as handle:
        handle.write("\n   \n")
    spool.append_events([event], "second attempt")
    report = await replay_spool(spool.path, engine)
    assert report.ok, report.summary()
    assert report.written == 1
    assert report.duplicates == 1
    assert (await event_counts(engine, [event.id]))[event.id] == 1


async def test_replay_reports_lines_whose_ids_or_tokens_are_wrong(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """A line whose event_id differs from its event's id, or whose attempt is not a token,
    is reported and kept, never written under either id."""
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    moved, untokened, good = _fill("moved"), _fill("untokened"), _fill("good")
    spool.append_events([moved, untokened, good], "x")
    lines = _lines(spool.path)
    other = str(uuid.uuid4())
    lines[0]["event_id"] = other
    lines[1]["attempt"] = 5
    spool.path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    report = await replay_spool(spool.path, engine)
    assert report.written == 1
    reasons = {problem.event_id: problem.reason for problem in report.rejected}
    assert "differs from event.id" in reasons[other]
    assert reasons[str(untokened.id)] == "attempt 5 is not a token"
    counts = await event_counts(engine, [moved.id, untokened.id, good.id, uuid.UUID(other)])
    assert counts == {moved.id: 0, untokened.id: 0, good.id: 1, uuid.UUID(other): 0}
    rejected = spool.path.with_name(spool.path.name + REJECTED_SUFFIX)
    assert len(_lines(rejected)) == 2


async def test_a_rejected_file_with_a_foreign_line_still_takes_new_entries(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """A line in the rejected file that is not an entry (edited by hand) is ignored, not fatal."""
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    rejected = spool.path.with_name(spool.path.name + REJECTED_SUFFIX)
    rejected.write_text('["not an entry"]\n{"key": 5}\nnot json\n', encoding="utf-8")
    rejected.chmod(0o600)
    spool.append_voids([uuid.uuid4()], "rolled back")
    report = await replay_spool(spool.path, engine)
    assert len(report.rejected) == 1
    assert len(rejected.read_text().splitlines()) == 4


# ------------------------------------------------------ a replay the database refuses


async def test_a_replay_the_database_refuses_stops_and_keeps_the_spool(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """Replaying as a role that may not insert stops with ReplayStoppedError; nothing is lost.

    A refusal that is not about one line (here a missing privilege) must not
    reject every line into the rejected file: replay stops, says why, and the
    claimed file stays for a rerun once the cause is fixed; the rerun writes
    every event.
    """
    url, engine = fresh_db
    role = f"replay_reader_{uuid.uuid4().hex[:8]}"
    async with engine.connect() as conn:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        await conn.execute(text(f'GRANT SELECT ON audit_events TO "{role}"'))
        await conn.commit()
    reader = create_async_engine(make_url(url).set(username=role, password=None))
    spool = Spool(tmp_path / "audit.spool")
    events = [_fill(f"B-{i}") for i in range(3)]
    spool.append_events(events, "database unreachable")
    claimed = spool.path.with_name(spool.path.name + CLAIMED_SUFFIX)
    try:
        with pytest.raises(ReplayStoppedError, match="not about one spooled line") as info:
            await replay_spool(spool.path, reader)
    finally:
        await reader.dispose()
    assert info.value.report.written == 0
    assert info.value.report.rejected == []
    assert claimed.exists()
    assert not spool.path.with_name(spool.path.name + REJECTED_SUFFIX).exists()
    report = await replay_spool(spool.path, engine)
    assert report.ok, report.summary()
    assert report.written == 3
    counts = await event_counts(engine, [event.id for event in events])
    assert set(counts.values()) == {1}
    async with engine.connect() as conn:
        await conn.execute(text(f'DROP OWNED BY "{role}"'))
        await conn.execute(text(f'DROP ROLE "{role}"'))
        await conn.commit()


# -------------------------------------------------------------- best effort's spool


async def test_best_effort_with_nothing_to_record(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """An empty batch writes nothing and spools nothing, whichever result is asked for."""
    _, engine = fresh_db
    path = tmp_path / "audit.spool"
    async with session_factory(engine)() as session:
        audit = BestEffortRepository(session, path)
        assert repr(audit) == f"BestEffortRepository(spool=Spool({str(path)!r}))"
        assert await audit.record_many([]) == []
        assert await audit.record_many([], returning=False) == 0
    assert not path.exists()


async def test_a_void_that_cannot_be_written_is_logged_with_the_event_ids(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller rolls back, but the spool can no longer take the void: say so, loudly.

    The rollback itself must not raise (that would hide the caller's own error),
    and since replay will now write the rolled-back event, the log must name it.
    This is the documented limit of voids: they need the spool to be writable.
    """
    _, engine = fresh_db
    path = tmp_path / "audit.spool"
    async with audit_table_locked(engine), session_factory(engine)() as session:
        audit = BestEffortRepository(session, path)
        await set_timeout(session, "lock_timeout", "100ms")
        record = await audit.order_accepted(uuid.uuid4(), "AAPL", "B-1")
        # The spool file is replaced by something that is not a regular file.
        path.rename(tmp_path / "moved.spool")
        os.mkfifo(path)
        with caplog.at_level(logging.ERROR, logger="audit_orm"):
            await session.rollback()
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("could not void" in m and str(record.id) in m for m in messages), messages
    assert read_spool(tmp_path / "moved.spool").voids == set()


# ------------------------------------------------------- how replay sorts the lines


def _fill_with_id(event_id: uuid.UUID, broker_order_id: str = "B-1") -> PreparedEvent:
    return prepare_event(
        "order.filled",
        "order",
        uuid.UUID(int=event_id.int ^ 1),
        {"ticker": "AAPL", "side": "buy", "fill_quantity": 1, "broker_order_id": broker_order_id},
        event_id=event_id,
    )


LOW = uuid.UUID("00000000-0000-4000-8000-000000000001")
HIGH = uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffff01")


async def test_each_voided_event_is_counted_and_replay_goes_on(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """Two rolled-back events are skipped and counted; the committed one after them is written."""
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    gone = [_fill(f"gone-{i}") for i in range(2)]
    for event in gone:
        spool.append_events([event], "x", attempt=f"attempt-{event.id}")
        spool.append_voids([event.id], "rolled back", attempt=f"attempt-{event.id}")
    kept = _fill("kept")
    spool.append_events([kept], "x")
    report = await replay_spool(spool.path, engine)
    assert (report.written, report.voided, report.duplicates) == (1, 2, 0)
    assert report.rejected == [] and report.conflicts == []
    counts = await event_counts(engine, [kept.id, *(event.id for event in gone)])
    assert counts == {kept.id: 1, gone[0].id: 0, gone[1].id: 0}


async def test_a_void_cancels_its_own_attempt_and_a_bare_void_cancels_all(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """A retried unit of work: attempt 1 rolled back (voided), attempt 2 committed.

    The void names attempt 1, so attempt 2 is written: no duplicate, no void
    left over, no problem reported. A void naming no attempt (the first spool
    format's) cancels every attempt of its event, and is not reported either.
    """
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    retried = _fill_with_id(LOW)
    spool.append_events([retried], "x", attempt="first")
    spool.append_voids([retried.id], "rolled back", attempt="first")
    spool.append_events([retried], "x", attempt="second")
    cancelled = _fill_with_id(HIGH)
    spool.append_events([cancelled], "x", attempt="one")
    spool.append_events([cancelled], "x", attempt="two")
    spool.append_voids([cancelled.id], "rolled back")
    report = await replay_spool(spool.path, engine)
    assert (report.written, report.voided, report.duplicates) == (1, 1, 0)
    assert report.rejected == [] and report.conflicts == []
    assert await event_counts(engine, [LOW, HIGH]) == {LOW: 1, HIGH: 0}


async def test_voids_for_events_not_in_the_spool_are_reported_each(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """Voids with no event line (by attempt, or bare) are each reported, after a matched one.

    They mean an event was replayed before its transaction rolled back: the
    stored event must be checked by hand, so each one is named.
    """
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    matched = _fill_with_id(LOW)
    spool.append_events([matched], "x", attempt="a")
    spool.append_voids([matched.id], "rolled back", attempt="a")
    spool.append_voids([HIGH], "rolled back", attempt="b")
    spool.append_voids([HIGH], "rolled back")
    report = await replay_spool(spool.path, engine)
    assert (report.written, report.voided) == (0, 1)
    assert len(report.rejected) == 2
    for problem in report.rejected:
        assert problem.line == 0
        assert problem.raw == ""
        assert problem.event_id == str(HIGH)
        assert problem.reason == (
            "void for an event that is not in this spool (replayed before its transaction "
            "rolled back?); check the stored event"
        )


async def test_lines_of_one_event_conflicts_duplicates_and_bad_lines(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """Of one event id's lines: a bad line is reported and the next one used; the first good
    line is written, equal ones are duplicates, a different one is a conflict naming the
    line that was written; the events after it are written too."""
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    event = _fill_with_id(LOW, "original")
    other = _fill_with_id(LOW, "other")
    after = _fill("after")
    spool.append_events([event], "x")  # line 1: made invalid below
    spool.append_events([event], "x")  # line 2: written
    spool.append_events([other], "x")  # line 3: conflict
    spool.append_events([event], "x")  # line 4: duplicate
    spool.append_events([event], "x")  # line 5: duplicate
    spool.append_events([after], "x")  # line 6: written
    lines = _lines(spool.path)
    lines[0]["event"]["data"]["fill_quantity"] = "NaN"  # type: ignore[index]
    spool.path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    report = await replay_spool(spool.path, engine)
    assert (report.written, report.duplicates) == (2, 2)
    (bad,) = report.rejected
    assert bad.line == 1 and bad.reason.startswith("invalid event: ")
    # Each problem keeps the line itself, for the rejected file.
    assert json.loads(bad.raw)["event"]["data"]["fill_quantity"] == "NaN"
    (conflict,) = report.conflicts
    assert conflict.line == 3
    assert conflict.event_id == str(LOW)
    assert conflict.reason == (
        f"conflict: event_id {LOW} is used by a different event at line 2; "
        "that one is replayed, this one is not"
    )
    assert json.loads(conflict.raw)["event"]["data"]["broker_order_id"] == "other"
    assert await event_counts(engine, [LOW, after.id]) == {LOW: 1, after.id: 1}


async def test_events_are_written_in_the_order_of_the_lines_written(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """seq follows the spool's line order of the lines replayed, not the order ids first appeared.

    The high id's only line (2) comes before the low id's live line (4), whose
    first attempt (line 1) was voided; so the high id is written first.
    """
    _, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")
    early, late = _fill_with_id(LOW, "late"), _fill_with_id(HIGH, "early")
    spool.append_events([early], "x", attempt="first")  # line 1
    spool.append_events([late], "x")  # line 2
    spool.append_voids([early.id], "rolled back", attempt="first")  # line 3
    spool.append_events([early], "x", attempt="second")  # line 4
    report = await replay_spool(spool.path, engine)
    assert report.written == 2
    async with engine.connect() as conn:
        order = (await conn.execute(text("SELECT id FROM audit_events ORDER BY seq"))).scalars()
        assert list(order) == [HIGH, LOW]
