"""``audit-orm export``: filters, formats, files, the progress bar and failures."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from audit_orm import AuditRepository, migrate
from audit_orm.cli import main
from audit_orm.demo import record_demo_chains
from tests.dbutil import create_database, drop_database, scratch_database


@dataclass
class Demo:
    url: str
    ids: dict[str, uuid.UUID]
    total: int


@pytest.fixture(scope="module")
async def demo(admin_url: str) -> AsyncIterator[Demo]:
    url = await create_database(admin_url, "audit_orm_cli_export")
    engine = create_async_engine(url)
    try:
        await migrate.upgrade(engine)
        ids = await record_demo_chains(engine)
        async with AsyncSession(engine) as session:
            total = len((await AuditRepository(session).search(limit=10_000)).records)
    finally:
        await engine.dispose()
    yield Demo(url, ids, total)
    await drop_database(admin_url, url)


def run(url: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--database-url", url, "export", *argv], out=out)
    return code, out.getvalue()


def lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line, parse_float=Decimal) for line in text.splitlines()]


def test_jsonl_to_stdout_by_default(demo: Demo, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = run(demo.url)
    assert code == 0
    events = lines(text)
    assert len(events) == demo.total
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    # Not a terminal: nothing but data, and no progress on stderr.
    assert capsys.readouterr().err == ""


def test_filters(demo: Demo) -> None:
    _, text = run(demo.url, "--ticker", "AAPL", "--event-type", "order.filled")
    fills = lines(text)
    assert fills
    assert {(e["ticker"], e["event_type"]) for e in fills} == {("AAPL", "order.filled")}

    _, text = run(
        demo.url, "--event-type", "approval.approved", "--event-type", "approval.rejected"
    )
    assert {e["event_type"] for e in lines(text)} <= {"approval.approved", "approval.rejected"}
    assert lines(text)

    _, text = run(demo.url, "--order", str(demo.ids["short"]))
    assert [e["event_type"] for e in lines(text)] == [
        "order.submitted",
        "order.filled",
        "position.opened",
    ]

    # Times without an offset are UTC; a date alone is its midnight.
    code, text = run(demo.url, "--since", "2000-01-01")
    assert (code, len(lines(text))) == (0, demo.total)
    code, text = run(demo.url, "--until", "2000-01-01T00:00:00")
    assert (code, text) == (0, "")
    code, text = run(
        demo.url, "--since", "2000-01-01T00:00:00+02:00", "--until", "2999-01-01T00:00:00Z"
    )
    assert (code, len(lines(text))) == (0, demo.total)


def test_csv_file_for_a_spreadsheet(demo: Demo, tmp_path: Path) -> None:
    target = tmp_path / "audit.csv"
    code, text = run(demo.url, "--format", "csv", "--output", str(target))
    assert code == 0
    assert text == f"exported {demo.total} records to {target}\n"
    raw = target.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # Excel needs the BOM to read UTF-8
    rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    assert len(rows) == demo.total
    fill = next(r for r in rows if r["event_type"] == "order.filled" and r["ticker"] == "AAPL")
    assert fill["data.fill_price"] and "E" not in fill["data.fill_price"]
    assert (
        Decimal(fill["data.fill_price"])
        == json.loads(fill["data"], parse_float=Decimal)["fill_price"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.csv"]


def test_progress_bar_on_a_terminal(
    demo: Demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code, _ = run(demo.url, "--output", str(tmp_path / "audit.jsonl"))
    assert code == 0
    drawn = terminal.getvalue()
    assert drawn.startswith("\r[")
    assert f"100%  {demo.total}/{demo.total} records" in drawn
    assert drawn.endswith("\n")


def test_bad_arguments_exit_2_and_write_nothing(
    demo: Demo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "audit.csv"
    for argv, named in [
        (["--since", "last tuesday"], "--since"),
        (["--order", "12"], "--order"),
        (["--event-type", "order.teleported"], "--event-type"),
    ]:
        code, text = run(demo.url, *argv, "--output", str(target))
        assert (code, text) == (2, "")
        assert named in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


async def test_failed_export_leaves_no_file(admin_url: str, tmp_path: Path) -> None:
    target = tmp_path / "audit.jsonl"
    target.write_text("the previous export\n")
    # A database without the table: the first query fails after the file was opened.
    async with scratch_database(admin_url) as (url, _):
        code, _ = await _run_in_thread(url, "--output", str(target))
    assert code == 2
    assert target.read_text() == "the previous export\n"
    assert _names(tmp_path) == ["audit.jsonl"]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _run_in_thread(url: str, *argv: str) -> tuple[int, str]:
    # main() runs its own event loop, which cannot start inside this test's.
    return await asyncio.to_thread(run, url, *argv)
