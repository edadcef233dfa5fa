r"""Export audit events for readers outside engineering: JSON Lines or CSV.

Records come out in recorded order (``seq``) with every field, timestamps in
UTC as ISO 8601 (``2026-11-30T14:05:09.123456Z``) and numbers exactly as stored.
The export reads in keyset chunks and writes each chunk before reading the
next, so memory stays constant however many records match.

CSV is laid out for a spreadsheet: one row per event, the record's own columns,
then one ``data.<field>`` column per payload field of the exported event types,
then the whole payload as JSON in ``data`` (nothing is lost, even keys no
payload model knows).

Both formats are opened by people, so neither carries a character that would
act on a terminal or reorder text: JSON writes C1 controls, bidirectional
formatting characters and line separators as ``\uNNNN`` escapes (the JSON
ones: the parsed value is unchanged). CSV text cells show every control
character, newlines and tabs included, as ``\n``, ``\x1b``, ``\u202e``...
(:func:`~audit_orm.display.escape_controls`); the ``data`` column, JSON as
above, keeps the exact text. Text cells that a spreadsheet would run as a
formula (starting with ``=``, ``+``, ``-`` or ``@``) get a leading ``'``.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, TextIO
from uuid import UUID

from sqlalchemy import Select, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from audit_orm.display import escape_controls, escape_json, utc_timestamp
from audit_orm.enums import AuditEventType
from audit_orm.errors import DB_ERRORS, InvalidInputError, translate_db_error
from audit_orm.jsonb import dumps_exact
from audit_orm.models import AuditEvent
from audit_orm.payloads import PAYLOAD_MODELS, coerce_event_type
from audit_orm.records import AuditRecord, record_from_row
from audit_orm.repository import order_trail_statement, search_statement

#: The formats :func:`export_events` writes.
ExportFormat = Literal["jsonl", "csv"]
FORMATS: tuple[ExportFormat, ...] = ("jsonl", "csv")
#: Records read per query.
DEFAULT_CHUNK_SIZE = 1000
#: A callback told the running count after each chunk, and the total when known.
Progress = Callable[[int, int | None], None]

#: The record's own fields, in the order both formats write them.
RECORD_FIELDS = (
    "seq",
    "recorded_at",
    "occurred_at",
    "event_type",
    "entity_type",
    "entity_id",
    "actor",
    "ticker",
    "order_id",
    "recommendation_id",
    "id",
)

# A tab or carriage return cannot start a cell any more: escape_controls() shows them escaped.
_FORMULA_PREFIXES = ("=", "+", "-", "@")


def export_dict(record: AuditRecord) -> dict[str, Any]:
    """One record as exported: :data:`RECORD_FIELDS` then ``data`` (exact numbers)."""
    return {
        "seq": record.seq,
        "recorded_at": utc_timestamp(record.recorded_at),
        "occurred_at": utc_timestamp(record.occurred_at),
        "event_type": record.event_type.value,
        "entity_type": record.entity_type.value,
        "entity_id": str(record.entity_id),
        "actor": record.actor,
        "ticker": record.ticker,
        "order_id": None if record.order_id is None else str(record.order_id),
        "recommendation_id": (
            None if record.recommendation_id is None else str(record.recommendation_id)
        ),
        "id": str(record.id),
        "data": record.data,
    }


def payload_fields(event_types: Iterable[AuditEventType] | None = None) -> list[str]:
    """The payload field names of ``event_types`` (default: all), in declaration order."""
    kinds = list(AuditEventType) if event_types is None else list(event_types)
    names: dict[str, None] = {}
    for kind in kinds:
        for name in PAYLOAD_MODELS[kind].model_fields:
            names.setdefault(name, None)
    return list(names)


def csv_header(event_types: Iterable[AuditEventType] | None = None) -> list[str]:
    """The CSV columns for an export of ``event_types`` (default: all)."""
    return [
        *RECORD_FIELDS,
        *(f"data.{name}" for name in payload_fields(event_types)),
        "data",
    ]


def _text_cell(value: str) -> str:
    shown = escape_controls(value)
    return "'" + shown if shown.startswith(_FORMULA_PREFIXES) else shown


def csv_cell(value: Any) -> str:
    """One spreadsheet cell: exact decimals without exponent, JSON for lists and objects.

    Text is escaped (:func:`~audit_orm.display.escape_controls`: a cell is one
    line, nothing in it drives a terminal or reorders text) and a formula is defused.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _text_cell(value)
    if isinstance(value, (dict, list)):
        return escape_json(dumps_exact(value))
    return _text_cell(str(value))


def csv_row(record: AuditRecord, fields: Sequence[str]) -> list[str]:
    """The CSV cells of ``record`` for the payload columns ``fields``."""
    exported = export_dict(record)
    data = record.data
    return [
        *(csv_cell(exported[name]) for name in RECORD_FIELDS),
        *(csv_cell(data.get(name)) for name in fields),
        escape_json(dumps_exact(data)),
    ]


def _statement(
    *,
    since: datetime | str | None,
    until: datetime | str | None,
    ticker: str | None,
    event_types: Iterable[AuditEventType | str] | None,
    order_id: UUID | str | None,
) -> Select[Any]:
    stmt = search_statement(event_types=event_types, ticker=ticker, since=since, until=until)
    if order_id is not None:
        # The order's whole decision chain, narrowed by the other filters.
        chain = order_trail_statement(order_id).whereclause
        assert chain is not None
        stmt = stmt.where(chain)
    return stmt


async def _chunks(
    executor: AsyncSession | AsyncConnection, stmt: Select[Any], chunk_size: int
) -> AsyncIterator[list[AuditRecord]]:
    last: int | None = None
    while True:
        page = stmt if last is None else stmt.where(AuditEvent.seq > last)
        rows = (await executor.execute(page.limit(chunk_size))).all()
        if not rows:
            return
        yield [record_from_row(row) for row in rows]
        if len(rows) < chunk_size:
            return
        last = rows[-1][1]


async def _write(
    executor: AsyncSession | AsyncConnection,
    stmt: Select[Any],
    out: TextIO,
    fmt: ExportFormat,
    kinds: list[AuditEventType] | None,
    chunk_size: int,
    progress: Progress | None,
) -> int:
    total: int | None = None
    if progress is not None:
        total = await executor.scalar(select(func.count()).select_from(stmt.subquery()))
        progress(0, total)
    fields = payload_fields(kinds)
    writer = csv.writer(out) if fmt == "csv" else None
    if writer is not None:
        writer.writerow(csv_header(kinds))
    written = 0
    async for chunk in _chunks(executor, stmt, chunk_size):
        if writer is not None:
            writer.writerows(csv_row(record, fields) for record in chunk)
        else:
            out.writelines(escape_json(dumps_exact(export_dict(record))) + "\n" for record in chunk)
        written += len(chunk)
        if progress is not None:
            progress(written, total)
    return written


async def export_events(
    source: AsyncSession | AsyncConnection | AsyncEngine,
    out: TextIO,
    *,
    format: ExportFormat = "jsonl",
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    ticker: str | None = None,
    event_types: Iterable[AuditEventType | str] | None = None,
    order_id: UUID | str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> int:
    """Write the matching events to ``out`` in recorded order; return how many.

    :param source: an engine (the export then reads one consistent snapshot in a
        read-only transaction of its own), or a session or connection whose
        transaction it reads in.
    :param out: a text stream. For a CSV file meant for Excel, open it with
        ``encoding="utf-8-sig", newline=""``.
    :param format: ``"jsonl"`` (one JSON object per line) or ``"csv"``.
    :param since: recorded at or after (timezone-aware).
    :param until: recorded before (timezone-aware).
    :param ticker: only this instrument's events.
    :param event_types: only these event types (CSV then has only their payload columns).
    :param order_id: only this order's decision chain, as :meth:`AuditRepository.order_trail`.
    :param chunk_size: records read per query; memory follows it, not the export's size.
    :param progress: called with the running count after each chunk (and with the
        total, counted first, in the same snapshot).
    :raises InvalidInputError: a bad argument, before anything is written.
    :raises AuditStorageError: the database failed a query.
    """
    if format not in FORMATS:
        raise InvalidInputError("format", format, "must be one of " + ", ".join(FORMATS))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InvalidInputError("chunk_size", chunk_size, "must be a positive integer")
    if not isinstance(source, (AsyncSession, AsyncConnection, AsyncEngine)):
        raise InvalidInputError(
            "source", source, "must be an AsyncEngine, an AsyncSession or an AsyncConnection"
        )
    if not callable(getattr(out, "write", None)):
        raise InvalidInputError("out", out, "must be a writable text stream")
    if progress is not None and not callable(progress):
        raise InvalidInputError("progress", progress, "must be callable")
    if isinstance(event_types, (str, AuditEventType)):
        event_types = [event_types]
    elif event_types is not None and (
        isinstance(event_types, (bytes, Mapping)) or not isinstance(event_types, Iterable)
    ):
        raise InvalidInputError(
            "event_types", event_types, "must be an event type or an iterable of them"
        )
    kinds = None if event_types is None else [coerce_event_type(t) for t in event_types]
    stmt = _statement(since=since, until=until, ticker=ticker, event_types=kinds, order_id=order_id)
    try:
        if isinstance(source, AsyncEngine):
            conn = source.connect()
            try:
                await conn.start()
            except DB_ERRORS as exc:
                # Only the connect is translated this broadly: an OSError later on
                # may come from writing ``out`` (a full disk), not from the database.
                raise translate_db_error(exc, "export") from exc
            try:
                # One snapshot for the count and every chunk: rows committed
                # meanwhile neither appear halfway nor shift the chunks.
                conn = await conn.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
                async with conn.begin():
                    return await _write(conn, stmt, out, format, kinds, chunk_size, progress)
            finally:
                await conn.close()
        return await _write(source, stmt, out, format, kinds, chunk_size, progress)
    except SQLAlchemyError as exc:
        raise translate_db_error(exc, "export") from exc


class TerminalProgress:
    """A one-line progress bar for a terminal, redrawn in place.

    :param stream: where to draw (a terminal; the export's own output goes elsewhere).
    :param width: the bar's width in characters.
    """

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width

    def __call__(self, done: int, total: int | None) -> None:
        """Redraw the line for ``done`` of ``total`` records."""
        if total:
            share = min(done / total, 1.0)
            filled = round(self.width * share)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"[{bar}] {share:4.0%}  {done:,}/{total:,} records"
        else:
            line = f"{done:,} records"
        self.stream.write("\r" + line)
        self.stream.flush()

    def finish(self) -> None:
        """End the line so later output starts on a fresh one."""
        self.stream.write("\n")
        self.stream.flush()
