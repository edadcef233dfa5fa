"""Exports are opened by people: nothing in them drives a terminal or reorders text.

README "Exports": timestamps have one width for every year; CSV cells are one
line with control and bidi characters escaped, the exact text kept in the
``data`` column; JSON Lines escape C1 and bidi characters and still parse to
the stored values.
"""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, export_events
from audit_orm.export import utc_timestamp

#: Anything a terminal acts on or that reorders a line (the CSV writer's own
#: CRLF row ends are taken off before looking).
RAW = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029]"
)
FIXED = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
REASON = "over limit\x1b[2K\r\x07\u202eperiod\u202c\x85\u2028line\tend\nsecond"


@pytest.mark.parametrize(
    "when",
    [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2026, 12, 6, 9, 30, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1000, 1, 1, 5, tzinfo=timezone(timedelta(hours=14))),
    ],
)
def test_timestamps_have_one_width_for_every_year(when: datetime) -> None:
    """README: "fixed width, so they sort as text" -- for years before 1000 and whole seconds too.

    ``strftime('%Y')`` writes year 1 as ``1`` on Linux, and ``isoformat`` drops
    a zero microsecond part; the export's format must not.
    """
    shown = utc_timestamp(when)
    assert FIXED.match(shown), shown
    assert datetime.fromisoformat(shown) == when


async def _export(engine: AsyncEngine, fmt: str) -> str:
    out = io.StringIO(newline="")
    await export_events(engine, out, format=fmt)  # type: ignore[arg-type]
    return out.getvalue()


async def _record(engine: AsyncEngine) -> uuid.UUID:
    order_id = uuid.uuid4()
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        await repo.order_rejected(
            order_id, "ACME", REASON, "risk", occurred_at=datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)
        )
    return order_id


async def test_csv_cells_escape_controls_and_keep_the_exact_text_in_data(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A rejection reason with ESC, CR, BEL, bidi override, NEL, LS, tab and newline.

    Its cell is one line without a raw control or bidi character (a viewer
    cannot be moved or misled), the ``data`` column parses to the exact reason,
    and the business time of year 999 is written at full width.
    """
    _, engine = fresh_db
    await _record(engine)
    text = await _export(engine, "csv")
    lines = text.split("\r\n")
    assert lines[-1] == "" and len(lines) == 3  # header, one row: no cell spans lines
    assert RAW.search("".join(lines)) is None, repr(text)
    (row,) = csv.DictReader(io.StringIO(text, newline=""))
    assert row["data.reason"] == (
        "over limit\\x1b[2K\\r\\x07\\u202eperiod\\u202c\\x85\\u2028line\\tend\\nsecond"
    )
    assert json.loads(row["data"])["reason"] == REASON
    assert row["occurred_at"] == "0999-01-02T03:04:05.000000Z"
    assert FIXED.match(row["recorded_at"])


async def test_jsonl_escapes_c1_and_bidi_and_parses_back_exactly(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """JSON Lines: one line per event, no raw C1 or bidi character, values exact."""
    _, engine = fresh_db
    await _record(engine)
    text = await _export(engine, "jsonl")
    assert text.count("\n") == 1
    assert RAW.search(text.rstrip("\n")) is None, repr(text)
    (line,) = [json.loads(item, parse_float=Decimal) for item in text.splitlines()]
    assert line["data"]["reason"] == REASON
    assert line["occurred_at"] == "0999-01-02T03:04:05.000000Z"
