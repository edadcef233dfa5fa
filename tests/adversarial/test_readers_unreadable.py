"""Rows that plain SQL can put in the table must not crash the readers.

A writer role may INSERT by hand, and a row may predate a constraint that
would refuse it today. Whatever such a row holds (``data`` that is not a JSON
object, a number of thousands of digits, nesting hundreds of levels deep, an
event or entity type this version does not know, a time that a Python
datetime cannot hold), every reader reports it as an ``UnreadableRowError``
naming the row, never a raw TypeError, AttributeError, ValueError,
KeyError, OverflowError or RecursionError; ``verify`` names it and goes on.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditError, AuditRepository, UnreadableRowError, export_events, verify
from audit_orm.cli import main


@dataclass(frozen=True)
class Bad:
    """One kind of row a reader cannot build a record from."""

    kind: str
    event_type: str = "'order.accepted'"
    entity_type: str = "'order'"
    data: str = """'{"ticker": "ACME", "broker_order_id": "b-1"}'::jsonb"""
    occurred_at: str = "now()"
    #: A word the error's reason must hold.
    reason: str = "data"


BAD_ROWS = [
    Bad("data is an array", data="'[1, 2]'::jsonb"),
    Bad("data is a string", data="""'"filled"'::jsonb"""),
    Bad("data is JSON null", data="'null'::jsonb"),
    Bad("data is a number", data="'42'::jsonb"),
    Bad("a number of 5000 digits", data="""('{"q": 1' || repeat('0', 4999) || '}')::jsonb"""),
    Bad(
        "nesting 150 levels deep",
        data="""('{"a": ' || repeat('[', 150) || repeat(']', 150) || '}')::jsonb""",
        reason="nested",
    ),
    Bad(
        "nesting 5000 levels deep",
        data="""('{"a": ' || repeat('[', 5000) || repeat(']', 5000) || '}')::jsonb""",
        reason="nested",
    ),
    Bad("an unknown event type", event_type="'order.teleported'", reason="event_type"),
    Bad("an unknown entity type", entity_type="'spaceship'", reason="entity_type"),
    Bad(
        "occurred in year 10000",
        occurred_at="'10000-01-01 00:00+00'::timestamptz",
        reason="occurred_at",
    ),
    Bad(
        "occurred in year 0 in UTC",
        occurred_at="'0001-01-01 00:00+14'::timestamptz",
        reason="occurred_at",
    ),
    Bad("occurred at infinity", occurred_at="'infinity'::timestamptz", reason="occurred_at"),
    Bad("occurred at -infinity", occurred_at="'-infinity'::timestamptz", reason="occurred_at"),
]


async def _insert_by_hand(engine: AsyncEngine, bad: Bad) -> tuple[uuid.UUID, uuid.UUID, int]:
    """Insert ``bad`` as plain SQL would; return (order id, event id, seq).

    CHECK constraints on the table (event types, and whatever later
    migrations add against such rows) are dropped in this test's own
    database: the row stands for one written before they existed. The insert
    trigger still stamps the row, so its hash is genuine.
    """
    order_id, event_id = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        checks = await conn.scalars(
            text(
                "SELECT conname FROM pg_constraint "
                "WHERE conrelid = 'audit_events'::regclass AND contype = 'c'"
            )
        )
        for name in list(checks):
            await conn.execute(text(f'ALTER TABLE audit_events DROP CONSTRAINT "{name}"'))
        seq = await conn.scalar(
            text(
                "INSERT INTO audit_events (id, event_type, entity_type, entity_id, actor, data, "
                f"occurred_at, order_id, ticker) VALUES (:id, {bad.event_type}, "
                f"{bad.entity_type}, :order_id, 'by-hand', {bad.data}, {bad.occurred_at}, "
                ":order_id, 'ACME') RETURNING seq"
            ),
            {"id": event_id, "order_id": order_id},
        )
    assert isinstance(seq, int)
    return order_id, event_id, seq


def _names_the_row(exc: BaseException, event_id: uuid.UUID, seq: int, reason: str) -> None:
    assert isinstance(exc, UnreadableRowError), repr(exc)
    assert exc.seq == seq and str(exc.event_id) == str(event_id)
    assert reason in exc.reason
    assert f"seq {seq}" in str(exc)


async def _drain(repo: AuditRepository, order_id: uuid.UUID) -> None:
    async with aclosing(repo.stream(order_id=order_id)) as rows:
        async for _ in rows:
            pass


def _cli(url: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--database-url", url, *argv], out=out)
    return code, out.getvalue()


@pytest.mark.parametrize("bad", BAD_ROWS, ids=[b.kind for b in BAD_ROWS])
async def test_every_reader_names_an_unreadable_row(
    fresh_db: tuple[str, AsyncEngine], bad: Bad
) -> None:
    """get, order_trail, entity_trail, search (filtered and not), stream and export.

    Each raises ``UnreadableRowError`` with the row's seq, id and a reason;
    the session stays usable for the next read.
    """
    _, engine = fresh_db
    order_id, event_id, seq = await _insert_by_hand(engine, bad)
    async with AsyncSession(engine) as session:
        repo = AuditRepository(session)
        readers = {
            "get": lambda: repo.get(event_id),
            "order_trail": lambda: repo.order_trail(order_id),
            "entity_trail": lambda: repo.entity_trail("order", order_id),
            "search": lambda: repo.search(order_id=order_id),
            "search (all)": lambda: repo.search(),
        }
        if bad.reason == "entity_type":  # not an order's row: no order's entity trail has it
            del readers["entity_trail"]
        for read in readers.values():
            with pytest.raises(AuditError) as caught:
                await read()
            _names_the_row(caught.value, event_id, seq, bad.reason)
            await session.rollback()
        async with session.begin():
            with pytest.raises(AuditError) as caught:
                await _drain(repo, order_id)
            _names_the_row(caught.value, event_id, seq, bad.reason)
    for fmt in ("jsonl", "csv"):
        with pytest.raises(AuditError) as caught:
            await export_events(engine, io.StringIO(), format=fmt, order_id=order_id)  # type: ignore[arg-type]
        _names_the_row(caught.value, event_id, seq, bad.reason)


@pytest.mark.parametrize(
    "bad", [BAD_ROWS[0], BAD_ROWS[4], BAD_ROWS[7], BAD_ROWS[9]], ids=lambda b: b.kind
)
async def test_the_cli_names_an_unreadable_row_and_writes_no_file(
    fresh_db: tuple[str, AsyncEngine],
    bad: Bad,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """README "Command line": errors exit 2 with one line, not a traceback.

    ``trail`` (text and JSON) and ``export`` name the row; an export to a file
    leaves no file behind.
    """
    url, engine = fresh_db
    order_id, _, seq = await _insert_by_hand(engine, bad)
    target = tmp_path / "out.csv"
    for argv in (
        ["trail", str(order_id)],
        ["trail", str(order_id), "--json"],
        ["export", "--format", "csv", "-o", str(target)],
    ):
        code, _ = await asyncio.to_thread(_cli, url, *argv)
        err = capfd.readouterr().err
        assert code == 2, err
        assert err.startswith("audit-orm: error: row seq") and f"seq {seq} " in err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert await asyncio.to_thread(lambda: list(tmp_path.iterdir())) == []


async def test_verify_reports_unreadable_rows_and_checks_the_rest(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README "Sealing": verify recomputes every hash and names what does not hold.

    Rows no reader can read are named, one ``unreadable_row`` problem each
    with its seq, rather than crash verify or pass in silence; their hashes,
    stamped by the trigger, still hold (no ``changed_row``), a good row beside
    them is not named, and ``audit-orm verify`` exits 1 listing them.
    """
    url, engine = fresh_db
    seqs = [(await _insert_by_hand(engine, bad))[2] for bad in BAD_ROWS]
    async with AsyncSession(engine) as session, session.begin():
        good = await AuditRepository(session).order_accepted(uuid.uuid4(), "ACME", "b-1")
    report = await verify(engine)
    assert report.rows_checked == len(BAD_ROWS) + 1
    unreadable = [p for p in report.problems if p.kind.value == "unreadable_row"]
    assert [p.seq for p in unreadable] == seqs
    assert all(f"row seq {p.seq} " in p.message for p in unreadable)
    assert not [p for p in report.problems if p.kind.value == "changed_row"]
    assert good.seq not in {p.seq for p in report.problems}
    code, shown = await asyncio.to_thread(_cli, url, "verify")
    assert code == 1
    assert f"unreadable_row: row seq {seqs[0]} " in shown
