"""Typed read results: :class:`AuditRecord` and :class:`AuditPage`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from audit_orm.enums import (
    ENTITY_TYPES_BY_VALUE,
    EVENT_TYPES_BY_VALUE,
    AuditEventType,
    EntityType,
)
from audit_orm.errors import UnreadableRowError
from audit_orm.jsonb import decode_exact, dumps_exact, loads_exact
from audit_orm.payloads import AuditPayload, validate_payload


def _iso(value: UUID | None) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored audit event, as read back or just written.

    ``data`` is the stored JSON with exact decimals; :attr:`payload` gives it back
    as the typed payload model of its event type.
    """

    id: UUID
    seq: int
    event_type: AuditEventType
    entity_type: EntityType
    entity_id: UUID
    actor: str
    data: dict[str, Any]
    occurred_at: datetime
    recorded_at: datetime
    recommendation_id: UUID | None = None
    order_id: UUID | None = None
    ticker: str | None = None
    #: The event this one corrects (see :meth:`~audit_orm.AuditRepository.correct`).
    corrects_id: UUID | None = None

    @property
    def payload(self) -> AuditPayload:
        """The payload as its typed model (validated on access)."""
        return validate_payload(self.event_type, self.data)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict with the original module's keys and shape, plus the new fields.

        Ids are strings and timestamps ISO 8601. ``created_at`` is the business
        time, as the original module stored it; ``recorded_at`` is the database
        clock and ``seq`` the recorded order. Numbers in ``data`` stay exact
        (:class:`~decimal.Decimal`); use :meth:`to_json` for JSON text.
        """
        return {
            "id": str(self.id),
            "event_type": self.event_type.value,
            "entity_type": self.entity_type.value,
            "entity_id": str(self.entity_id),
            "actor": self.actor,
            "data": self.data,
            "created_at": self.occurred_at.isoformat(),
            "seq": self.seq,
            "occurred_at": self.occurred_at.isoformat(),
            "recorded_at": self.recorded_at.isoformat(),
            "recommendation_id": _iso(self.recommendation_id),
            "order_id": _iso(self.order_id),
            "ticker": self.ticker,
            "corrects_id": _iso(self.corrects_id),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON text with exact numbers."""
        return dumps_exact(self.to_dict())


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of a search: its records and the cursor of the next page."""

    records: list[AuditRecord]
    #: Pass as ``after=`` to get the next page; ``None`` on the last page.
    next_cursor: str | None


#: The deepest nesting of arrays and objects a reader accepts in ``data``.
#: Payloads are flat; JSON nested much deeper than this would exhaust Python's
#: recursion limit somewhere downstream (encoding it again, rendering it).
MAX_DATA_DEPTH = 100

#: Times a Python datetime holds (years 1 to 9999 in UTC). Readers select a time
#: outside them (or infinity, which PostgreSQL allows) as NULL, since the driver
#: cannot decode it, and refuse the row by name.
FIRST_READABLE_TIME = "'0001-01-01 00:00:00+00'::timestamptz"
LAST_READABLE_TIME = "'9999-12-31 23:59:59.999999+00'::timestamptz"


def readable_time_sql(column: str) -> str:
    """SQL giving ``column`` where a reader can decode it, NULL elsewhere."""
    return (
        f"CASE WHEN {column} BETWEEN {FIRST_READABLE_TIME} AND {LAST_READABLE_TIME} "
        f"THEN {column} END"
    )


def _too_deep(value: Any, limit: int) -> bool:
    # Iterative, so that the check itself cannot exhaust the stack.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


_UNDECODABLE = object()


def _reason(row: Sequence[Any], data: Any) -> str:
    """Why ``row`` cannot be a record (the slow path: only for such a row)."""
    unknown = _type_reason(row[2], row[3])
    if unknown is not None:
        return unknown
    if row[7] is None or row[8] is None:
        which = "occurred_at" if row[7] is None else "recorded_at"
        return f"{which} is not a time between the years 1 and 9999 (UTC)"
    return _data_reason(row[6], data) or "unreadable"


def _type_reason(event_type: Any, entity_type: Any) -> str | None:
    # The columns are short (VARCHAR(64), VARCHAR(32)): repr shows them whole, escaped.
    if event_type not in EVENT_TYPES_BY_VALUE:
        return f"event_type {event_type!r} is not one this version knows"
    if entity_type not in ENTITY_TYPES_BY_VALUE:
        return f"entity_type {entity_type!r} is not one this version knows"
    return None


def _data_reason(raw: Any, data: Any) -> str | None:
    """Why ``raw`` (decoded as ``data``) is no record's data, or ``None``."""
    if data is _UNDECODABLE:
        try:
            loads_exact(raw)
        except RecursionError:
            return f"data is nested deeper than {MAX_DATA_DEPTH} levels"
        except ValueError as exc:
            return f"data cannot be decoded: {exc}"
    if type(data) is not dict:
        kind = "null" if data is None else type(data).__name__
        return f"data is a JSON {kind}, not an object"
    if not _shallow(raw, data):
        return f"data is nested deeper than {MAX_DATA_DEPTH} levels"
    return None


#: ``timestamptz_send`` gives microseconds since 2000-01-01 UTC; the readable range in them.
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_FIRST_MICROS = (datetime(1, 1, 1, tzinfo=UTC) - _PG_EPOCH) // timedelta(microseconds=1)
_LAST_MICROS = (datetime.max.replace(tzinfo=UTC) - _PG_EPOCH) // timedelta(microseconds=1)
#: Python refuses integers longer than this (``sys.get_int_max_str_digits``'s default).
_INT_DIGITS = 4300


def unreadable_reason(
    event_type: str, entity_type: str, data_text: str, occurred_us: int, recorded_us: int
) -> str | None:
    """Why a row, as :func:`~audit_orm.verify` reads it, is one no reader can read; or ``None``.

    The same rules as :func:`record_from_row`, on the raw values (times as
    ``timestamptz_send`` microseconds), cheap for a readable row: its data is
    decoded only when it could hold a too-long number or too deep a nesting.
    """
    unknown = _type_reason(event_type, entity_type)
    if unknown is not None:
        return unknown
    for name, micros in (("occurred_at", occurred_us), ("recorded_at", recorded_us)):
        if not _FIRST_MICROS <= micros <= _LAST_MICROS:
            return f"{name} is not a time between the years 1 and 9999 (UTC)"
    size = len(data_text)
    if not data_text.startswith("{") or (
        size > 2 * MAX_DATA_DEPTH
        and (size > _INT_DIGITS or data_text.count("[") + data_text.count("{") > MAX_DATA_DEPTH)
    ):
        try:
            data = decode_exact(data_text)
        except (ValueError, RecursionError):
            data = _UNDECODABLE
        return _data_reason(data_text, data)
    return None


def _shallow(raw: Any, data: dict[str, Any]) -> bool:
    # A JSON text nests at most half its length deep, and counting brackets is
    # cheap: only a long row with many of them is walked.
    if type(raw) is str and (
        len(raw) <= 2 * MAX_DATA_DEPTH or raw.count("[") + raw.count("{") <= MAX_DATA_DEPTH
    ):
        return True
    return not _too_deep(data, MAX_DATA_DEPTH)


def record_from_row(row: Sequence[Any]) -> AuditRecord:
    """Build an :class:`AuditRecord` from a row in ``RECORD_COLUMNS`` order.

    ``data`` comes as JSON text (``data::text``: the driver's own JSON codec,
    set by the host application, never sees it) and is decoded exactly here;
    already decoded data is taken as it is. Times come through
    :func:`readable_time_sql`.

    :raises UnreadableRowError: the row holds what no record can (see the error).
    """
    event_type = EVENT_TYPES_BY_VALUE.get(row[2])
    entity_type = ENTITY_TYPES_BY_VALUE.get(row[3])
    data = row[6]
    if type(data) is str:
        try:
            data = decode_exact(data)
        except (ValueError, RecursionError):
            # Python refuses integers of more than 4300 digits, and nesting past
            # its recursion limit; _reason() tells which.
            data = _UNDECODABLE
    if (
        event_type is None
        or entity_type is None
        or row[7] is None
        or row[8] is None
        or type(data) is not dict
        or not _shallow(row[6], data)
    ):
        raise UnreadableRowError(row[1], row[0], _reason(row, data))
    return AuditRecord(
        id=row[0],
        seq=row[1],
        event_type=event_type,
        entity_type=entity_type,
        entity_id=row[4],
        actor=row[5],
        data=data,
        occurred_at=row[7],
        recorded_at=row[8],
        recommendation_id=row[9],
        order_id=row[10],
        ticker=row[11],
        corrects_id=row[12],
    )
