"""The spool and its side files against a hostile neighbour, a full disk and poisoned lines.

Attacks on "the spool keeps every event, private, and replay always finishes": a
symbolic link put where the spool or a side file goes, a file left with a wide
mode, an append cut short by the file size limit, lines built to crash a parser
or exhaust memory, and a rerun after a replay that crashed half-way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm.errors import AuditSpoolError
from audit_orm.repository import PreparedEvent, prepare_event
from audit_orm.spool import CLAIMED_SUFFIX, REJECTED_SUFFIX, Spool, replay_spool
from tests.faultutil import event_counts


def accepted(broker: str = "B") -> PreparedEvent:
    return prepare_event(
        "order.accepted", "order", uuid.uuid4(), {"ticker": "X", "broker_order_id": broker}
    )


def test_a_symlink_in_place_of_the_spool_is_refused(tmp_path: Path) -> None:
    """README: the spool is opened without following symbolic links.

    Someone who can write the spool's directory puts a link to another file
    there: appending must fail (``AuditSpoolError``) and the target stay as it was.
    """
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (tmp_path / "audit.spool").symlink_to(victim)
    with pytest.raises(AuditSpoolError, match="symbolic link"):
        Spool(tmp_path / "audit.spool").append_event(accepted(), "x")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("suffix", [CLAIMED_SUFFIX, REJECTED_SUFFIX, ".replay-lock"])
async def test_a_symlinked_side_file_is_refused_by_replay(
    engine: AsyncEngine, tmp_path: Path, suffix: str
) -> None:
    """README: the side files (``.replaying``, ``.rejected``, ``.replay-lock``) follow no links.

    A link in place of a side file must make replay fail with
    ``AuditSpoolError`` without writing to (or creating) the link's target.
    """
    spool = Spool(tmp_path / "audit.spool")
    spool.append_event(accepted(), "x")
    with spool.path.open("a") as handle:
        handle.write("not json\n")  # something to reject
    victim = tmp_path / "victim"
    if suffix != ".replay-lock":
        victim.write_text("precious\n")
    spool.path.with_name(spool.path.name + suffix).symlink_to(victim)
    with pytest.raises(AuditSpoolError, match="symbolic link"):
        await replay_spool(spool.path, engine)
    if suffix == ".replay-lock":
        assert not victim.exists()
    else:
        assert victim.read_text() == "precious\n"


async def test_existing_spool_files_are_made_private(engine: AsyncEngine, tmp_path: Path) -> None:
    """README: the spool and its side files are mode 0600, also when they already exist.

    A spool and a rejected file left readable by everyone (created by hand, or
    under another umask) are narrowed to 0600 when they are next written.
    """
    path = tmp_path / "audit.spool"
    path.touch(mode=0o644)
    path.chmod(0o644)
    rejected = path.with_name(path.name + REJECTED_SUFFIX)
    rejected.touch()
    rejected.chmod(0o666)
    spool = Spool(path)
    spool.append_event(accepted(), "x")
    assert path.stat().st_mode & 0o777 == 0o600
    with path.open("a") as handle:
        handle.write("not json\n")
    report = await replay_spool(path, engine)
    assert len(report.rejected) == 1
    assert rejected.stat().st_mode & 0o777 == 0o600


_CUT_SHORT = """
import resource, signal, sys
from audit_orm.repository import prepare_event
from audit_orm.spool import Spool
from audit_orm.errors import AuditSpoolError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = sys.argv[1]
size = len(open(path, "rb").read())
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, resource.RLIM_INFINITY))
event = prepare_event("order.accepted", "order", "7a0d4f27-8d1d-4a4f-9d43-5d7cfb7d1d11",
                      {"ticker": "X", "broker_order_id": "B" * 2000})
try:
    Spool(path).append_event(event, "x")
except AuditSpoolError:
    sys.exit(3)
sys.exit(0)
"""


def test_an_append_cut_short_leaves_no_torn_record(tmp_path: Path) -> None:
    """README: an append that fails midway is cut off again.

    The file size limit lets only part of an append reach the file: the call
    raises ``AuditSpoolError`` and the spool holds exactly what it held before,
    no half record for replay to stumble on.
    """
    spool = Spool(tmp_path / "audit.spool")
    spool.append_event(accepted(), "x")
    before = spool.path.read_bytes()
    done = subprocess.run(
        [sys.executable, "-c", _CUT_SHORT, str(spool.path)], capture_output=True, check=False
    )
    assert done.returncode == 3, done.stderr.decode()
    assert spool.path.read_bytes() == before


async def test_poisoned_lines_are_quarantined_and_replay_goes_on(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """README: no spool line can block replay; it is quarantined, reported, and replay goes on.

    Between two good events: JSON nested a hundred thousand deep, an escaped
    lone surrogate, a 3 MiB line. Both events are written; the three lines are
    in the rejected file (the long one as a 4 KiB excerpt with its size and
    SHA-256). A rerun after a crash that left the claimed file and a torn
    rejected entry does not fail and does not add entries twice.
    """
    spool = Spool(tmp_path / "audit.spool")
    first, last = accepted("first"), accepted("last")
    spool.append_event(first, "x")
    good = json.loads(spool.path.read_text())
    surrogate = json.dumps({**good, "event_id": str(uuid.uuid4())}).replace('"first"', '"\\ud800"')
    huge = '{"pad": "' + "x" * (3 << 20) + '"}'
    with spool.path.open("a") as handle:
        handle.write("[" * 100_000 + "]" * 100_000 + "\n")
        handle.write(surrogate + "\n")
        handle.write(huge + "\n")
    spool.append_event(last, "x")
    kept = spool.path.read_bytes()

    report = await replay_spool(spool.path, engine)
    assert report.written == 2
    assert sorted(p.line for p in report.rejected) == [2, 3, 4]
    assert await event_counts(engine, [first.id, last.id]) == {first.id: 1, last.id: 1}
    rejected = spool.path.with_name(spool.path.name + REJECTED_SUFFIX)
    entries = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert len(entries) == 3
    (long_one,) = [e for e in entries if "size" in e]
    assert long_one["size"] == len(huge) + 1
    assert len(long_one["raw"]) <= 4096
    assert len(long_one["sha256"]) == 64

    # A crash after the rejected file was written, before the claimed file was
    # removed; and a torn entry at the end of the rejected file.
    spool.path.with_name(spool.path.name + CLAIMED_SUFFIX).write_bytes(kept)
    with rejected.open("a") as handle:
        handle.write('{"spool_format": 2, "kind": "rej')
    again = await replay_spool(spool.path, engine)
    assert (again.written, again.already_present) == (0, 2)
    lines = rejected.read_text().splitlines()
    assert len(lines) == 4  # the three entries and the torn one, ended; nothing twice
    assert not spool.path.with_name(spool.path.name + CLAIMED_SUFFIX).exists()


async def test_a_format_1_spool_is_still_replayed(engine: AsyncEngine, tmp_path: Path) -> None:
    """README: spools of format 1 (no attempt tokens) are still read.

    A format 1 spool written before the upgrade: an event, a void of another
    event, that other event. Replay writes the first and skips the voided one.
    """
    kept, voided = accepted("kept"), accepted("voided")
    path = tmp_path / "audit.spool"
    lines = []
    for event in (kept, voided):
        line = json.loads(_line_of(tmp_path, event))
        del line["attempt"]
        line["spool_format"] = 1
        line["event"]["occurred_at"] = "2026-12-01T10:00:00+00:00"
        lines.append(json.dumps(line))
    lines.insert(
        1,
        json.dumps(
            {
                "spool_format": 1,
                "kind": "void",
                "event_id": str(voided.id),
                "spooled_at": "2026-12-01T10:00:01+00:00",
                "reason": "rolled back",
            }
        ),
    )
    path.write_text("".join(line + "\n" for line in lines))
    report = await replay_spool(path, engine)
    assert (report.written, report.voided, report.ok) == (1, 1, True)
    assert await event_counts(engine, [kept.id, voided.id]) == {kept.id: 1, voided.id: 0}


def _line_of(tmp_path: Path, event: PreparedEvent) -> str:
    scratch = Spool(tmp_path / f"scratch-{event.id}")
    scratch.append_event(event, "x")
    return scratch.path.read_text()


def test_a_hard_link_in_place_of_the_spool_is_refused(tmp_path: Path) -> None:
    """README: the spool must be a file of its own.

    Someone who can write the spool's directory hard-links another file of the
    same owner to the spool's name: appending must fail (``AuditSpoolError``)
    and that file stay as it was, mode included.
    """
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    os.link(victim, tmp_path / "audit.spool")
    with pytest.raises(AuditSpoolError, match="hard links"):
        Spool(tmp_path / "audit.spool").append_event(accepted(), "x")
    assert victim.read_text() == "precious\n"
    assert victim.stat().st_mode & 0o777 == 0o644
