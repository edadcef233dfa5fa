"""Exports: JSON Lines and CSV content, filters, order, exact numbers, constant memory."""

from __future__ import annotations

import csv
import io
import json
import re
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditEventType,
    AuditRecord,
    AuditRepository,
    InvalidInputError,
    UnknownEventTypeError,
    export_events,
    migrate,
)
from audit_orm.export import RECORD_FIELDS, csv_header, payload_fields
from tests.dbutil import create_database, drop_database, scratch_database

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
FORMULA = '=HYPERLINK("http://example.invalid","refund")'
NOTE = 'Prüfung ok ✓, "second look"\nby desk 2'


@dataclass
class Dataset:
    """What the module's database holds, for the assertions."""

    url: str
    engine: AsyncEngine
    filled_order: uuid.UUID
    rejected_order: uuid.UUID
    late_order: uuid.UUID
    #: Recorded between the first two chains and the last one.
    mark: datetime
    records: list[AuditRecord] = field(default_factory=list)


async def _record_chains(engine: AsyncEngine) -> Dataset:
    filled, rejected, late = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    rec, evaluation, approval = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        await repo.recommendation_generated(rec, "AAPL", "buy", "live", 0.82, 4)
        await repo.risk_evaluated(evaluation, rec, "AAPL", True, "live", [], 7)
        await repo.approval_requested(
            approval, "AAPL", "buy", Decimal("10.5"), Decimal("1964.8125"), rec
        )
        await repo.approval_reviewed(approval, "AAPL", True, "ops-anna", NOTE)
        await repo.order_submitted(
            filled, "AAPL", "buy", Decimal("10.5"), "limit", "idem-1", rec, evaluation
        )
        await repo.order_accepted(filled, "AAPL", "B-1", "accepted")
        await repo.order_filled(filled, "AAPL", "buy", Decimal("10.5"), Decimal("187.1250"), "B-1")
        await repo.position_change(
            filled, "AAPL", "buy", Decimal("0"), Decimal("10.5"), Decimal("0"), Decimal("187.1250")
        )
        await repo.order_submitted(rejected, "MSFT", "sell", Decimal("3"), "market", "idem-2")
        await repo.order_rejected(rejected, "MSFT", FORMULA)
        mark = await session.scalar(select(func.clock_timestamp()))
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        await repo.order_submitted(late, "MSFT", "buy", Decimal("1E+3"), "market", "idem-3")
        await repo.order_filled(late, "MSFT", "buy", Decimal("1E+3"), Decimal("0.00000001"), "B-3")
        await repo.order_filled(
            late, "MSFT", "buy", Decimal("0"), Decimal("12345678901234567890.123456789"), "B-3"
        )
    assert mark is not None
    return Dataset("", engine, filled, rejected, late, mark)


@pytest.fixture(scope="module")
async def data(admin_url: str) -> AsyncIterator[Dataset]:
    url = await create_database(admin_url, "audit_orm_export")
    engine = create_async_engine(url)
    try:
        await migrate.upgrade(engine)
        dataset = await _record_chains(engine)
        dataset.url = url
        async with AsyncSession(engine) as session:
            dataset.records = (await AuditRepository(session).search(limit=10_000)).records
        yield dataset
    finally:
        await engine.dispose()
        await drop_database(admin_url, url)


async def jsonl(engine: AsyncEngine, **options: Any) -> list[dict[str, Any]]:
    out = io.StringIO()
    count = await export_events(engine, out, **options)
    lines = out.getvalue().splitlines()
    assert count == len(lines)
    return [json.loads(line, parse_float=Decimal) for line in lines]


async def csv_rows(engine: AsyncEngine, **options: Any) -> tuple[list[str], list[dict[str, str]]]:
    out = io.StringIO(newline="")
    count = await export_events(engine, out, format="csv", **options)
    reader = csv.DictReader(io.StringIO(out.getvalue(), newline=""))
    rows = list(reader)
    assert count == len(rows)
    return list(reader.fieldnames or []), rows


async def test_jsonl_has_every_record_with_every_field_in_recorded_order(data: Dataset) -> None:
    exported = await jsonl(data.engine)
    assert [e["seq"] for e in exported] == [r.seq for r in data.records]
    assert [e["seq"] for e in exported] == sorted(e["seq"] for e in exported)
    for line, record in zip(exported, data.records, strict=True):
        assert list(line) == [*RECORD_FIELDS, "data"]
        assert line["id"] == str(record.id)
        assert line["event_type"] == record.event_type.value
        assert line["entity_id"] == str(record.entity_id)
        assert line["actor"] == record.actor
        assert line["ticker"] == record.ticker
        assert line["order_id"] == (record.order_id and str(record.order_id))
        assert line["recommendation_id"] == (
            record.recommendation_id and str(record.recommendation_id)
        )
        assert line["data"] == record.data
        for name in ("recorded_at", "occurred_at"):
            assert ISO_UTC.match(line[name]), line[name]
            parsed = datetime.fromisoformat(line[name])
            assert parsed == getattr(record, name)
            assert parsed.utcoffset() is not None and not parsed.utcoffset()


async def test_jsonl_numbers_are_exact(data: Dataset) -> None:
    out = io.StringIO()
    await export_events(data.engine, out, event_types=["order.filled"])
    text_out = out.getvalue()
    # As written, digit for digit: no float, no rounding.
    assert '"fill_price":187.1250' in text_out
    assert '"fill_price":12345678901234567890.123456789' in text_out
    prices = [
        e["data"]["fill_price"] for e in await jsonl(data.engine, event_types=["order.filled"])
    ]
    assert prices == [
        Decimal("187.1250"),
        Decimal("0.00000001"),
        Decimal("12345678901234567890.123456789"),
    ]


async def test_csv_is_spreadsheet_ready(data: Dataset) -> None:
    header, rows = await csv_rows(data.engine)
    assert header == csv_header()
    assert header[: len(RECORD_FIELDS)] == list(RECORD_FIELDS)
    assert header[-1] == "data"
    assert [int(r["seq"]) for r in rows] == [r.seq for r in data.records]
    by_type: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_type.setdefault(row["event_type"], []).append(row)
        assert ISO_UTC.match(row["recorded_at"]) and ISO_UTC.match(row["occurred_at"])

    fills = by_type["order.filled"]
    # Exact decimals, never in exponent form (a spreadsheet shows them as written).
    assert [f["data.fill_price"] for f in fills] == [
        "187.1250",
        "0.00000001",
        "12345678901234567890.123456789",
    ]
    assert [f["data.fill_quantity"] for f in fills] == ["10.5", "1000", "0"]
    # Cells of other event types' fields stay empty.
    assert fills[0]["data.reason"] == ""
    # The whole payload, exact, in the last column.
    for row, record in zip(rows, data.records, strict=True):
        assert json.loads(row["data"], parse_float=Decimal) == record.data

    (reviewed,) = by_type["approval.approved"]
    assert reviewed["data.approved"] == "true"
    # Commas, quotes and Unicode as they are; the newline shown as an escape (one
    # line per cell), the exact note in the data column.
    assert reviewed["data.review_note"] == NOTE.replace("\n", "\\n")
    assert json.loads(reviewed["data"])["review_note"] == NOTE
    assert reviewed["actor"] == "ops-anna"
    (risk,) = by_type["risk.evaluated"]
    assert risk["data.rejection_reasons"] == "[]"
    assert risk["data.confidence"] == ""  # a recommendation's field
    (recommendation,) = by_type["recommendation.generated"]
    assert recommendation["data.confidence"] == "0.82"

    # A text cell that would run as a formula is defused; the JSON keeps it as is.
    (rejection,) = by_type["order.rejected"]
    assert rejection["data.reason"] == "'" + FORMULA
    assert json.loads(rejection["data"])["reason"] == FORMULA


async def test_csv_columns_follow_the_event_types(data: Dataset) -> None:
    header, rows = await csv_rows(data.engine, event_types=["order.rejected", "order.cancelled"])
    assert header == [
        *RECORD_FIELDS,
        "data.ticker",
        "data.reason",
        "data.rejection_source",
        "data.broker_order_id",
        "data",
    ]
    assert [r["event_type"] for r in rows] == ["order.rejected"]
    assert payload_fields([AuditEventType.ORDER_ACCEPTED]) == [
        "ticker",
        "broker_order_id",
        "status",
    ]


async def test_filters(data: Dataset) -> None:
    def seqs(records: list[AuditRecord]) -> list[int]:
        return [r.seq for r in records]

    def exported(lines: list[dict[str, Any]]) -> list[int]:
        return [e["seq"] for e in lines]

    msft = [r for r in data.records if r.ticker == "MSFT"]
    assert exported(await jsonl(data.engine, ticker="MSFT")) == seqs(msft)

    kinds = {"order.submitted", "order.filled"}
    assert exported(await jsonl(data.engine, event_types=sorted(kinds))) == seqs(
        [r for r in data.records if r.event_type in kinds]
    )

    late = [r for r in data.records if r.recorded_at >= data.mark]
    early = [r for r in data.records if r.recorded_at < data.mark]
    assert late and early
    assert exported(await jsonl(data.engine, since=data.mark)) == seqs(late)
    assert exported(await jsonl(data.engine, until=data.mark)) == seqs(early)
    assert exported(await jsonl(data.engine, since=data.mark.isoformat())) == seqs(late)

    # An order's decision chain: recommendation, risk, approval and the order itself.
    async with AsyncSession(data.engine) as session:
        trail = await AuditRepository(session).order_trail(data.filled_order)
    chain = await jsonl(data.engine, order_id=data.filled_order)
    assert exported(chain) == seqs(trail)
    assert {e["event_type"] for e in chain} >= {
        "recommendation.generated",
        "risk.evaluated",
        "approval.requested",
        "approval.approved",
        "order.filled",
        "position.opened",
    }
    # Filters combine.
    only_fills = await jsonl(data.engine, order_id=str(data.late_order), event_types="order.filled")
    assert [e["data"]["broker_order_id"] for e in only_fills] == ["B-3", "B-3"]
    assert await jsonl(data.engine, order_id=data.late_order, ticker="AAPL") == []


@pytest.mark.parametrize("chunk_size", [1, 3, 13, 1000])
async def test_chunk_size_does_not_change_the_output(data: Dataset, chunk_size: int) -> None:
    reference = io.StringIO()
    await export_events(data.engine, reference, format="csv")
    out = io.StringIO()
    await export_events(data.engine, out, format="csv", chunk_size=chunk_size)
    assert out.getvalue() == reference.getvalue()


async def test_reads_in_the_callers_session(data: Dataset, session: AsyncSession) -> None:
    """A session's own uncommitted events are part of its export."""
    order = uuid.uuid4()
    await AuditRepository(session).order_submitted(order, "NVDA", "buy", 1, "market", "k")
    out = io.StringIO()
    assert await export_events(session, out, order_id=order) == 1
    assert '"ticker":"NVDA"' in out.getvalue()


async def test_progress_is_told_the_running_count_and_total(data: Dataset) -> None:
    calls: list[tuple[int, int | None]] = []
    count = await export_events(
        data.engine, io.StringIO(), chunk_size=4, progress=lambda n, t: calls.append((n, t))
    )
    total = len(data.records)
    assert count == total
    assert calls[0] == (0, total)
    assert calls[-1] == (total, total)
    assert [n for n, _ in calls] == sorted({n for n, _ in calls})


@pytest.mark.parametrize(
    ("options", "error", "field_name"),
    [
        ({"format": "xlsx"}, InvalidInputError, "format"),
        ({"chunk_size": 0}, InvalidInputError, "chunk_size"),
        ({"event_types": ["order.teleported"]}, UnknownEventTypeError, "event_type"),
        ({"event_types": []}, InvalidInputError, "event_types"),
        ({"order_id": "not-an-id"}, InvalidInputError, "order_id"),
        ({"since": "2026-01-01T00:00:00"}, InvalidInputError, "since"),
        (
            {"since": "2026-02-01T00:00:00+00:00", "until": "2026-01-01T00:00:00+00:00"},
            InvalidInputError,
            "until",
        ),
    ],
)
async def test_bad_arguments_are_refused_before_writing(
    data: Dataset, options: dict[str, Any], error: type[Exception], field_name: str
) -> None:
    out = io.StringIO()
    with pytest.raises(error) as caught:
        await export_events(data.engine, out, **options)
    assert getattr(caught.value, "field", None) == field_name
    assert out.getvalue() == ""


class _Sink(io.TextIOBase):
    """Counts what is written and keeps nothing."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, s: str) -> int:
        self.size += len(s)
        return len(s)


async def _peak(engine: AsyncEngine, **options: Any) -> tuple[int, int]:
    sink = _Sink()
    tracemalloc.start()
    try:
        await export_events(engine, sink, **options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, sink.size


async def test_memory_does_not_grow_with_the_export(admin_url: str) -> None:
    """Ten times the rows, about the same peak: only one chunk is ever held."""
    small, big, chunk = 300, 3000, 100
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, data, "
                    "occurred_at, ticker) SELECT gen_random_uuid(), "
                    "CASE WHEN i <= :small THEN 'order.filled' ELSE 'order.accepted' END, "
                    "'order', gen_random_uuid(), jsonb_build_object('ticker', 'TCK', 'side', "
                    "'buy', 'fill_quantity', 10.5, 'fill_price', 100.125 + i, "
                    "'broker_order_id', repeat('x', 200)), now(), 'TCK' "
                    "FROM generate_series(1, :big) AS i"
                ),
                {"small": small, "big": big},
            )
        for fmt in ("jsonl", "csv"):
            # Warm up: statement caches and imports are not the export's memory.
            await _peak(engine, format=fmt, chunk_size=chunk, event_types=["order.filled"])
            small_peak, small_size = await _peak(
                engine, format=fmt, chunk_size=chunk, event_types=["order.filled"]
            )
            big_peak, big_size = await _peak(engine, format=fmt, chunk_size=chunk)
            assert big_size > 9 * small_size
            # Holding every record would cost at least the text it produces;
            # streaming costs about what the small export costs.
            assert big_peak < 2 * small_peak, (fmt, small_peak, big_peak)
            assert big_peak < big_size / 2, (fmt, big_peak, big_size)
