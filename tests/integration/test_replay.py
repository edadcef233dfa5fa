"""Replaying a spool: same ids, no duplicates, safe to rerun after a crash, nothing dropped."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit_orm import AuditRepository
from audit_orm import spool as spool_module
from audit_orm.cli import main
from audit_orm.database import session_factory
from audit_orm.errors import AuditSpoolError, InvalidInputError
from audit_orm.repository import PreparedEvent, prepare_event
from audit_orm.retry import RetryPolicy
from audit_orm.spool import (
    CLAIMED_SUFFIX,
    REJECTED_SUFFIX,
    ReplayInterruptedError,
    Spool,
    replay_spool,
)
from tests.faultutil import business_database, event_counts, unreachable_url


@pytest.fixture(scope="module")
async def db_and_url(admin_url: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    async with business_database(admin_url) as (url, eng):
        yield eng, url


@pytest.fixture
def db(db_and_url: tuple[AsyncEngine, str]) -> AsyncEngine:
    return db_and_url[0]


def fills(count: int, order: uuid.UUID | None = None) -> list[PreparedEvent]:
    order = order or uuid.uuid4()
    return [
        prepare_event(
            "order.filled",
            "order",
            order,
            {
                "ticker": "X",
                "side": "buy",
                "fill_quantity": i + 1,
                "fill_price": Decimal("10.10") + i,
                "broker_order_id": f"B{i}",
            },
        )
        for i in range(count)
    ]


def spooled(path: Path, events: list[PreparedEvent]) -> Spool:
    spool = Spool(path)
    for prepared in events:
        spool.append_event(prepared, "database unreachable")
    return spool


async def test_replay_writes_each_event_once_and_rerun_is_a_no_op(
    db: AsyncEngine, tmp_path: Path
) -> None:
    events = fills(7)
    path = tmp_path / "s"
    spooled(path, events)
    copy = tmp_path / "copy"
    shutil.copy(path, copy)

    report = await replay_spool(path, db, chunk_size=3)
    assert (report.records, report.written, report.already_present) == (7, 7, 0)
    assert report.ok
    assert not path.exists()
    assert not path.with_name(path.name + CLAIMED_SUFFIX).exists()

    # Nothing left: a second run does nothing.
    again = await replay_spool(path, db)
    assert (again.records, again.written) == (0, 0)
    # The same records once more (a copy restored by hand): no duplicates.
    shutil.copy(copy, path)
    third = await replay_spool(path, db)
    assert (third.written, third.already_present) == (0, 7)
    counts = await event_counts(db, [e.id for e in events])
    assert set(counts.values()) == {1}

    # Same ids, same order as spooled: the order trail is the spool order.
    async with session_factory(db)() as session:
        trail = await AuditRepository(session).order_trail(events[0].entity_id)
    assert [r.id for r in trail] == [e.id for e in events]
    assert [r.data["fill_price"] for r in trail] == [Decimal("10.10") + i for i in range(7)]


async def test_crash_after_some_chunks_then_rerun(
    db: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = fills(10)
    path = tmp_path / "s"
    spooled(path, events)
    real = spool_module._write_chunk
    calls = 0

    async def dies_after_two_chunks(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt  # the process is stopped mid-replay
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_module, "_write_chunk", dies_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        await replay_spool(path, db, chunk_size=3)
    monkeypatch.undo()
    claimed = path.with_name(path.name + CLAIMED_SUFFIX)
    assert claimed.exists()
    counts = await event_counts(db, [e.id for e in events])
    assert sum(counts.values()) == 6  # two chunks committed

    # Meanwhile the service spools more.
    later = fills(2)
    spooled(path, later)
    report = await replay_spool(path, db, chunk_size=3)
    assert (report.written, report.already_present) == (6, 6)
    assert report.ok
    counts = await event_counts(db, [e.id for e in events + later])
    assert set(counts.values()) == {1}
    assert not claimed.exists()


async def test_unavailable_database_interrupts_with_logged_retries_then_rerun_finishes(
    db: AsyncEngine,
    db_and_url: tuple[AsyncEngine, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = fills(3)
    path = tmp_path / "s"
    spooled(path, events)
    url = db_and_url[1]
    dead = create_async_engine(unreachable_url(url))
    policy = RetryPolicy(attempts=3, first_delay=0.01)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="audit_orm.retry"),
            pytest.raises(ReplayInterruptedError) as info,
        ):
            await replay_spool(path, dead, retry=policy)
    finally:
        await dead.dispose()
    assert "run the replay again" in str(info.value)
    assert info.value.report.written == 0
    retries = [r for r in caplog.records if r.name == "audit_orm.retry"]
    assert [r.levelname for r in retries] == ["WARNING", "WARNING", "ERROR"]
    assert "attempt 1 of 3" in retries[0].getMessage()
    assert "giving up" in retries[-1].getMessage()
    assert path.with_name(path.name + CLAIMED_SUFFIX).exists()

    report = await replay_spool(path, db)
    assert report.written == 3


async def test_unusable_lines_are_kept_and_reported(db: AsyncEngine, tmp_path: Path) -> None:
    good = fills(2)
    path = tmp_path / "s"
    spool = spooled(path, good)
    # An event whose id was recorded before with other content.
    taken = fills(1)[0]
    async with session_factory(db)() as session, session.begin():
        await AuditRepository(session).insert_prepared(taken)
    clash = prepare_event(
        "order.accepted",
        "order",
        uuid.uuid4(),
        {"ticker": "X", "broker_order_id": "B"},
        event_id=taken.id,
    )
    spool.append_event(clash, "x")
    # A hand-edited record with a payload that cannot be stored.
    record = json.loads(path.read_text().splitlines()[0])
    record["event_id"] = record["event"]["id"] = str(uuid.uuid4())
    record["event"]["data"]["fill_price"] = "NaN"
    # A correction of an event that was never recorded.
    spool.append_event(
        prepare_event(
            "order.accepted",
            "order",
            uuid.uuid4(),
            {"ticker": "X", "broker_order_id": "B"},
            corrects=uuid.uuid4(),
        ),
        "x",
    )
    # A void for an event that is not in the spool, then a torn last line.
    orphan = uuid.uuid4()
    spool.append_voids([orphan], "rolled back")
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.write('{"spool_format": 1, "kind": "event", "event_id": "')

    report = await replay_spool(path, db)
    assert report.written == 2
    assert not report.ok
    reasons = sorted(p.reason.split(":")[0] for p in report.rejected)
    assert len(reasons) == 4, reasons
    (conflict,) = report.conflicts
    assert conflict.event_id == str(taken.id)
    assert "already recorded with different content" in conflict.reason
    text = " | ".join(p.reason for p in report.rejected)
    assert "data.fill_price" in text
    assert "torn final line" in text
    assert "void for an event that is not in this spool" in text
    assert "corrects: no event" in text
    rejected_file = path.with_name(path.name + REJECTED_SUFFIX)
    assert report.rejected_file == str(rejected_file)
    kept = [json.loads(line) for line in rejected_file.read_text().splitlines()]
    assert len(kept) == 5
    assert {k["event_id"] for k in kept} >= {str(taken.id), str(orphan), record["event_id"]}
    assert any(k["raw"].startswith('{"spool_format": 1, "kind": "event"') for k in kept)
    assert not path.exists()
    assert (await event_counts(db, [taken.id]))[taken.id] == 1


async def test_one_replay_at_a_time(db: AsyncEngine, tmp_path: Path) -> None:
    path = tmp_path / "s"
    spooled(path, fills(1))
    fd = os.open(path.with_name("s.replay-lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(AuditSpoolError, match="another replay is running"):
            await replay_spool(path, db)
    finally:
        os.close(fd)
    assert path.exists()  # untouched
    assert (await replay_spool(path, db)).written == 1


@pytest.mark.parametrize("chunk_size", [0, -1, 10**6, True, "5"])
async def test_bad_chunk_size(db: AsyncEngine, tmp_path: Path, chunk_size: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        await replay_spool(tmp_path / "s", db, chunk_size=chunk_size)  # type: ignore[arg-type]
    assert info.value.field == "chunk_size"


def run_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


async def test_cli_replay(db_and_url: tuple[AsyncEngine, str], tmp_path: Path) -> None:
    db, url = db_and_url
    path = tmp_path / "s"
    events = fills(4)
    spooled(path, events)

    code, out = await asyncio.to_thread(run_cli, "--database-url", url, "replay", str(path))
    assert code == 0, out
    assert "4 records, 4 written, 0 already present, 0 voided" in out
    assert set((await event_counts(db, [e.id for e in events])).values()) == {1}

    code, out = await asyncio.to_thread(run_cli, "--database-url", url, "replay", str(path))
    assert (code, out.strip()) == (0, f"nothing to replay in {path}")

    # A torn line: the rest is written, the line is reported, exit status 1.
    more = fills(1)
    spooled(path, more)
    with path.open("a") as handle:
        handle.write('{"spool_for')
    code, out = await asyncio.to_thread(
        run_cli, "--database-url", url, "replay", str(path), "--chunk-size", "1"
    )
    assert code == 1
    assert "1 written" in out
    assert "rejected line 2: torn final line" in out
    assert (await event_counts(db, [more[0].id]))[more[0].id] == 1
