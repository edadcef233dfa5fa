"""The spool file, without a database: format, durability rules, torn lines, claims."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from audit_orm import AuditEventType, EntityType, InvalidInputError
from audit_orm.repository import PreparedEvent, prepare_event
from audit_orm.spool import (
    CLAIMED_SUFFIX,
    SPOOL_FORMAT,
    Spool,
    SpooledRecord,
    prepare_spooled,
    read_spool,
)


def fill(price: str = "150.250", order: uuid.UUID | None = None) -> PreparedEvent:
    return prepare_event(
        "order.filled",
        "order",
        order or uuid.uuid4(),
        {
            "ticker": "7203.T",
            "side": "買い",
            "fill_quantity": Decimal("1E-8"),
            "fill_price": Decimal(price),
            "broker_order_id": '注文-🚀\n"quoted"',
        },
    )


def test_an_event_line_is_self_describing_and_exact(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "audit.spool")
    prepared = fill()
    record = spool.append_event(prepared, "recording order.filled failed: boom")

    assert isinstance(record, SpooledRecord)
    assert record.seq == 0
    assert record.spool == str(spool.path)
    assert record.occurred_at == record.recorded_at  # no business time: the spool clock
    raw = spool.path.read_bytes()
    assert raw.endswith(b"\n")
    assert raw.count(b"\n") == 1  # newlines inside strings are escaped
    line = json.loads(raw)
    assert line["spool_format"] == SPOOL_FORMAT
    assert line["kind"] == "event"
    assert line["event_id"] == str(prepared.id)
    assert line["error"] == "recording order.filled failed: boom"
    event = line["event"]
    assert set(event) == {
        "id",
        "event_type",
        "entity_type",
        "entity_id",
        "actor",
        "data",
        "occurred_at",
        "recommendation_id",
        "order_id",
        "ticker",
        "corrects_id",
    }
    assert b'"fill_price":150.250' in raw
    assert b'"fill_quantity":1E-8' in raw
    assert "注文-🚀".encode() in raw  # UTF-8, not \u escapes

    contents = read_spool(spool.path)
    ((line_no, parsed),) = contents.events.values()
    assert line_no == 1
    again = prepare_spooled(parsed, 64 * 1024)
    assert again.id == prepared.id
    assert again.data == prepared.data
    assert str(again.data["fill_price"]) == "150.250"
    assert again.event_type is AuditEventType.ORDER_FILLED
    assert again.entity_type is EntityType.ORDER
    # No business time given: left to the database at replay, as on the direct path.
    assert event["occurred_at"] is None
    assert again.occurred_at is None


def test_spool_file_is_private(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "audit.spool")
    spool.append_event(fill(), "x")
    assert spool.path.stat().st_mode & 0o777 == 0o600


def test_void_lines_are_read_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    first, second = fill(), fill()
    spool.append_event(first, "e")
    spool.append_event(second, "e")
    spool.append_voids([first.id], "rolled back")
    contents = read_spool(spool.path)
    assert set(contents.events) == {first.id, second.id}
    assert contents.voids == {first.id}
    assert contents.records == 3
    assert contents.problems == []


def test_torn_final_line_is_reported_not_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.append_event(fill(), "e")
    whole = spool.path.read_bytes()
    # A crash in the middle of the second append: half a record, no newline.
    spool.path.write_bytes(whole + whole[: len(whole) // 2])
    contents = read_spool(spool.path)
    assert len(contents.events) == 1
    (problem,) = contents.problems
    assert problem.line == 2
    assert "torn final line" in problem.reason
    assert problem.raw == whole[: len(whole) // 2].decode()


def test_append_after_a_torn_line_keeps_both_apart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.append_event(fill(), "e")
    whole = spool.path.read_bytes()
    spool.path.write_bytes(whole + whole[:40])
    later = fill()
    spool.append_event(later, "e")
    contents = read_spool(spool.path)
    # The torn record is now a corrupt middle line; the new one is intact.
    assert later.id in contents.events
    assert len(contents.events) == 2
    (problem,) = contents.problems
    assert problem.line == 2
    assert "corrupt line" in problem.reason


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json at all\n", "corrupt line"),
        (b"[1, 2]\n", "corrupt line"),
        (b'{"spool_format": 99, "kind": "event", "event_id": "x"}\n', "unsupported spool_format"),
        (b'{"spool_format": 1, "kind": "event", "event_id": "nope"}\n', "is not a UUID"),
        (
            b'{"spool_format": 1, "kind": "gossip", "event_id": "'
            + str(uuid.uuid4()).encode()
            + b'"}\n',
            "unknown record kind",
        ),
        (b"\xff\xfe garbage\n", "corrupt line"),
    ],
)
def test_unusable_lines_become_problems(tmp_path: Path, line: bytes, reason: str) -> None:
    path = tmp_path / "s"
    path.write_bytes(line)
    contents = read_spool(path)
    assert contents.events == {}
    (problem,) = contents.problems
    assert reason in problem.reason


def test_tampered_event_is_validated_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    spool.append_event(fill(), "e")
    record = json.loads(spool.path.read_text())
    record["event"]["data"]["fill_price"] = "NaN"
    ((_, parsed),) = read_spool(_write(tmp_path / "t", record)).events.values()
    with pytest.raises(InvalidInputError) as info:
        prepare_spooled(parsed, 64 * 1024)
    assert info.value.field == "data.fill_price"


def _write(path: Path, record: object) -> Path:
    path.write_text(json.dumps(record) + "\n")
    return path


def test_concurrent_appends_never_interleave(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    events = [fill(str(i)) for i in range(200)]

    def worker(part: list[PreparedEvent]) -> None:
        for prepared in part:
            spool.append_event(prepared, "e")

    threads = [threading.Thread(target=worker, args=(events[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    contents = read_spool(spool.path)
    assert contents.problems == []
    assert set(contents.events) == {e.id for e in events}


def _append_many(path: str, count: int) -> None:
    spool = Spool(path)
    for i in range(count):
        spool.append_event(fill(str(i)), "e")


def test_processes_share_a_spool_safely(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(path, 50)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    contents = read_spool(path)
    assert contents.problems == []
    assert len(contents.events) == 150


def test_claim_moves_the_file_and_new_appends_start_a_new_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    assert spool.claim() is None
    first = fill()
    spool.append_event(first, "e")
    claimed = spool.claim()
    assert claimed == tmp_path / ("s" + CLAIMED_SUFFIX)
    assert not spool.path.exists()
    second = fill()
    spool.append_event(second, "e")
    assert set(read_spool(spool.path).events) == {second.id}
    # An interrupted replay left its claimed file: new records join it.
    assert spool.claim() == claimed
    assert not spool.path.exists()
    assert set(read_spool(claimed).events) == {first.id, second.id}


def test_writer_waiting_on_the_lock_follows_the_claim(tmp_path: Path) -> None:
    import fcntl

    spool = Spool(tmp_path / "s")
    spool.append_event(fill(), "e")
    # Hold the lock as a claim would, start a writer, then move the file away.
    fd = os.open(spool.path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    late = fill()
    writer = threading.Thread(target=spool.append_event, args=(late, "e"))
    writer.start()
    writer.join(timeout=0.3)
    assert writer.is_alive()  # blocked on the lock
    claimed = tmp_path / "claimed"
    os.replace(spool.path, claimed)
    os.close(fd)
    writer.join(timeout=10)
    assert not writer.is_alive()
    assert late.id not in read_spool(claimed).events
    assert set(read_spool(spool.path).events) == {late.id}


@pytest.mark.parametrize("path", ["", "a\x00b", 42, None])
def test_bad_spool_path(path: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        Spool(path)
    assert info.value.field == "spool"
