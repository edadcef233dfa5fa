"""The repository: write audit events and read trails, inside the caller's transaction.

:class:`AuditRepository` never commits. It executes its statements on the
session it was given, so an audit event commits together with the business
change it describes, and a rollback leaves no audit row.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, Required, TypedDict, Unpack, overload
from uuid import UUID

from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    cast,
    func,
    literal_column,
    select,
    union,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.sql import FromClause

from audit_orm import bulk
from audit_orm.display import UNSAFE_CHARACTERS
from audit_orm.enums import ENTITY_TYPES_BY_VALUE, AuditEventType, EntityType
from audit_orm.errors import (
    DB_ERRORS,
    EventIdConflictError,
    InvalidInputError,
    InvalidPayloadError,
    UnknownEntityTypeError,
    translate_db_error,
)
from audit_orm.ids import coerce_optional_uuid, coerce_uuid, uuid7
from audit_orm.jsonb import JSONText, dumps_exact
from audit_orm.models import ACTOR_MAX_LENGTH, TICKER_MAX_LENGTH, AuditEvent
from audit_orm.payloads import (
    CONTROL_CHARACTERS,
    SURROGATES,
    AuditPayload,
    PositionChangePayload,
    coerce_event_type,
    payload_to_data,
    validate_payload,
)
from audit_orm.records import (
    FIRST_READABLE_TIME,
    LAST_READABLE_TIME,
    AuditPage,
    AuditRecord,
    record_from_row,
)

#: Rows fetched per round trip by :meth:`AuditRepository.stream`.
DEFAULT_STREAM_CHUNK = 1_000
#: Default cap on the stored size of one payload (JSON text, bytes).
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024

_E = AuditEventType
_ORDER_ENTITIES = frozenset({EntityType.ORDER, EntityType.POSITION})


def record_columns(table: FromClause) -> tuple[ColumnElement[Any], ...]:
    """The columns a record is built from, in :class:`AuditRecord` field order.

    ``data`` comes as text, decoded by :func:`~audit_orm.records.record_from_row`
    (which can then name a row it cannot decode), and the times only where a
    Python datetime can hold them (see :func:`~audit_orm.records.readable_time_sql`).
    """
    c = table.c
    return (
        c.id,
        c.seq,
        c.event_type,
        c.entity_type,
        c.entity_id,
        c.actor,
        cast(c.data, Text).label("data"),
        _readable_time(c.occurred_at),
        _readable_time(c.recorded_at),
        c.recommendation_id,
        c.order_id,
        c.ticker,
        c.corrects_id,
    )


_FIRST_TIME: ColumnElement[datetime] = literal_column(FIRST_READABLE_TIME)
_LAST_TIME: ColumnElement[datetime] = literal_column(LAST_READABLE_TIME)


def _readable_time(column: ColumnElement[datetime]) -> ColumnElement[datetime]:
    # NULL where the driver could not decode the value; the record builder
    # refuses such a row by name.
    return case((column.between(_FIRST_TIME, _LAST_TIME), column)).label(column.key)


#: The columns a record is built from (see :func:`record_columns`).
RECORD_COLUMNS = record_columns(AuditEvent.__table__)


class RecordOptions(TypedDict, total=False):
    """Keyword options every stage helper accepts and passes to :meth:`AuditRepository.record`."""

    occurred_at: datetime | None
    event_id: UUID | str | None
    corrects: UUID | str | None


def coerce_entity_type(value: Any) -> EntityType:
    """Accept an :class:`EntityType` or its string value."""
    if isinstance(value, EntityType):
        return value
    if isinstance(value, str):
        kind = ENTITY_TYPES_BY_VALUE.get(value)
        if kind is not None:
            return kind
    raise UnknownEntityTypeError(
        "entity_type", value, "must be one of " + ", ".join(t.value for t in EntityType)
    )


def check_actor(actor: Any) -> str:
    """Validate an actor name: non-empty text without control characters.

    C0 and C1 controls, DEL, bidirectional formatting characters and line
    separators are refused (see :data:`~audit_orm.display.UNSAFE_CHARACTERS`):
    an actor is shown on every line of a trail, and must read as it is stored.
    """
    if not isinstance(actor, str):
        raise InvalidInputError("actor", actor, "must be a string")
    if not actor or actor.isspace():
        raise InvalidInputError("actor", actor, "must not be empty")
    if len(actor) > ACTOR_MAX_LENGTH:
        raise InvalidInputError("actor", actor, f"must be at most {ACTOR_MAX_LENGTH} characters")
    if UNSAFE_CHARACTERS.search(actor):
        raise InvalidInputError(
            "actor", actor, "must not contain control characters or bidirectional formatting"
        )
    if SURROGATES.search(actor):
        raise InvalidInputError("actor", actor, "must not contain lone surrogates (not Unicode)")
    return actor


def check_ticker(ticker: Any) -> str:
    """Validate a ticker filter: what a payload's ticker may be, nothing else."""
    if not isinstance(ticker, str) or not ticker or len(ticker) > TICKER_MAX_LENGTH:
        raise InvalidInputError(
            "ticker", ticker, f"must be a string of 1 to {TICKER_MAX_LENGTH} characters"
        )
    if CONTROL_CHARACTERS.search(ticker):
        raise InvalidInputError("ticker", ticker, "must not contain control characters")
    if SURROGATES.search(ticker):
        raise InvalidInputError("ticker", ticker, "must not contain lone surrogates (not Unicode)")
    return ticker


def check_timestamp(value: Any, field: str) -> datetime:
    """Accept a timezone-aware :class:`datetime`, or an ISO 8601 string with an offset."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidInputError(field, value, "is not an ISO 8601 timestamp") from None
    if not isinstance(value, datetime):
        raise InvalidInputError(field, value, "must be a datetime")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(
            field, value, "must be timezone-aware (naive datetimes are ambiguous)"
        )
    try:
        # The driver sends UTC: a time that has none (year 1 at +14:00) would
        # fail there, after other events of a batch or group were sent.
        utc = value.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        raise InvalidInputError(field, value, "is out of range once converted to UTC") from None
    # The driver sends these two instants as -infinity and infinity, which the
    # table refuses: caught here, they fail their own caller alone.
    if utc in (datetime.min, datetime.max):
        raise InvalidInputError(
            field, value, "is the driver's infinity (the first or last instant)"
        )
    return value


def check_max_payload_bytes(value: Any) -> int:
    """Validate a payload size cap: a positive integer number of bytes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError("max_payload_bytes", value, "must be a positive integer")
    return value


@dataclass(frozen=True, slots=True)
class PreparedEvent:
    """A validated event, ready to insert: the column values of one row."""

    id: UUID
    event_type: AuditEventType
    entity_type: EntityType
    entity_id: UUID
    actor: str
    data: dict[str, Any]
    occurred_at: datetime | None
    recommendation_id: UUID | None
    order_id: UUID | None
    ticker: str | None
    corrects_id: UUID | None = None
    #: ``data`` as stored JSON text; filled by :func:`prepare_event`, derived when empty.
    data_json: str = field(default="", repr=False, compare=False)
    #: Whether the caller chose ``id`` (a retry may find it stored). ``False``
    #: for a fresh UUIDv7, which bulk writes need not look up beforehand.
    id_supplied: bool = field(default=True, repr=False, compare=False)

    def json_text(self) -> str:
        """``data`` as the exact JSON text that is stored."""
        return self.data_json or dumps_exact(self.data)

    def row(self) -> dict[str, Any]:
        """The insert parameters (enum members as their string values)."""
        return {
            "id": self.id,
            "event_type": self.event_type.value,
            "entity_type": self.entity_type.value,
            "entity_id": self.entity_id,
            "actor": self.actor,
            "data": JSONText(self.json_text()),
            "occurred_at": self.occurred_at,
            "recommendation_id": self.recommendation_id,
            "order_id": self.order_id,
            "ticker": self.ticker,
            "corrects_id": self.corrects_id,
        }


def prepare_event(
    event_type: AuditEventType | str,
    entity_type: EntityType | str,
    entity_id: UUID | str,
    data: AuditPayload | Mapping[str, Any],
    *,
    actor: str = "system",
    occurred_at: datetime | str | None = None,
    event_id: UUID | str | None = None,
    recommendation_id: UUID | str | None = None,
    order_id: UUID | str | None = None,
    corrects: UUID | str | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> PreparedEvent:
    """Validate everything about one event without touching the database.

    Correlation columns are derived from the payload and the entity: an order or
    position event belongs to its order, a recommendation event to itself, and a
    payload's ``recommendation_id`` links risk evaluations, orders and approvals to
    their recommendation. Explicit ``recommendation_id``/``order_id`` fill gaps.
    """
    if type(max_payload_bytes) is not int or max_payload_bytes < 1:
        check_max_payload_bytes(max_payload_bytes)
    kind = coerce_event_type(event_type)
    entity = coerce_entity_type(entity_type)
    entity_uuid = coerce_uuid(entity_id, "entity_id")
    payload = validate_payload(kind, data)
    stored = payload_to_data(payload)
    try:
        text = dumps_exact(stored)
    except (ValueError, TypeError, RecursionError) as exc:
        # Validation should have caught it; if not, it is still the caller's input.
        raise InvalidPayloadError("data", stored, f"cannot be written as JSON: {exc}") from exc
    # A UTF-8 character takes at most four bytes: short texts skip the encoding.
    if len(text) * 4 > max_payload_bytes:
        size = len(text.encode("utf-8"))
        if size > max_payload_bytes:
            raise InvalidPayloadError(
                "data",
                f"<{size} bytes>",
                f"payload is larger than the {max_payload_bytes}-byte cap",
            )
    # Read fields from the model's __dict__: pydantic's __getattr__ is slow for
    # names a payload type does not have, and this runs for every event.
    fields = payload.__dict__
    rec_id = coerce_optional_uuid(fields.get("recommendation_id"), "recommendation_id")
    if rec_id is None:
        rec_id = coerce_optional_uuid(recommendation_id, "recommendation_id")
    if rec_id is None and entity is EntityType.RECOMMENDATION:
        rec_id = entity_uuid
    ord_id = entity_uuid if entity in _ORDER_ENTITIES else None
    if ord_id is None:
        ord_id = coerce_optional_uuid(order_id, "order_id")
    ticker = fields.get("ticker")
    new_id = uuid7() if event_id is None else coerce_uuid(event_id, "event_id")
    corrects_id = None if corrects is None else coerce_uuid(corrects, "corrects")
    if corrects_id == new_id:
        raise InvalidInputError("corrects", corrects, "an event cannot correct itself")
    return PreparedEvent(
        id=new_id,
        id_supplied=event_id is not None,
        event_type=kind,
        entity_type=entity,
        entity_id=entity_uuid,
        actor=check_actor(actor),
        data=stored,
        occurred_at=None if occurred_at is None else check_timestamp(occurred_at, "occurred_at"),
        recommendation_id=rec_id,
        order_id=ord_id,
        ticker=ticker if isinstance(ticker, str) else None,
        corrects_id=corrects_id,
        data_json=text,
    )


class EventSpec(TypedDict, total=False):
    """One event of :meth:`AuditRepository.record_many`: the arguments of ``record``."""

    event_type: Required[AuditEventType | str]
    entity_type: Required[EntityType | str]
    entity_id: Required[UUID | str]
    data: Required[AuditPayload | Mapping[str, Any]]
    actor: str
    occurred_at: datetime | str | None
    event_id: UUID | str | None
    recommendation_id: UUID | str | None
    order_id: UUID | str | None
    corrects: UUID | str | None


_SPEC_FIELDS = tuple(EventSpec.__annotations__)
_SPEC_KEYS = frozenset(_SPEC_FIELDS)
_SPEC_REQUIRED = ("event_type", "entity_type", "entity_id", "data")


def check_prepared(event: PreparedEvent) -> PreparedEvent:
    """Check what the driver would trip on in a :class:`PreparedEvent` built by hand.

    :func:`prepare_event` guarantees all of it; a dataclass built directly
    guarantees nothing. Cheap checks only (the payload is not validated again):
    the actor, the business time, and stored text that UTF-8 cannot encode.
    The database's own constraints refuse the rest.
    """
    check_actor(event.actor)
    if event.occurred_at is not None:
        check_timestamp(event.occurred_at, "occurred_at")
    if event.ticker is not None:
        check_ticker(event.ticker)
    text = event.json_text()
    if not text.isascii() and SURROGATES.search(text):
        raise InvalidPayloadError("data", text, "must not contain lone surrogates (not Unicode)")
    return event


def _prepare_spec(event: Any, max_payload_bytes: int) -> PreparedEvent:
    if isinstance(event, PreparedEvent):
        return check_prepared(event)
    if not isinstance(event, Mapping):
        raise InvalidInputError(
            "event", event, "must be a mapping of record() arguments or a PreparedEvent"
        )
    for key in event:
        if key not in _SPEC_KEYS:
            raise InvalidInputError(
                str(key), event[key], "is not an argument of record(): " + ", ".join(_SPEC_FIELDS)
            )
    for key in _SPEC_REQUIRED:
        if key not in event:
            raise InvalidInputError(key, None, "is required")
    return prepare_event(
        event["event_type"],
        event["entity_type"],
        event["entity_id"],
        event["data"],
        actor=event.get("actor", "system"),
        occurred_at=event.get("occurred_at"),
        event_id=event.get("event_id"),
        recommendation_id=event.get("recommendation_id"),
        order_id=event.get("order_id"),
        corrects=event.get("corrects"),
        max_payload_bytes=max_payload_bytes,
    )


def prepare_batch(
    events: Iterable[EventSpec | PreparedEvent],
    *,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> list[PreparedEvent]:
    """Validate every event of a batch, or refuse the batch at the first bad one.

    The error is of the same class as :func:`prepare_event` raises, with the
    position in front of the field: ``events[3].data.quantity``.
    """
    if isinstance(events, (str, bytes, Mapping)) or not isinstance(events, Iterable):
        raise InvalidInputError("events", events, "must be an iterable of events")
    prepared: list[PreparedEvent] = []
    for index, event in enumerate(events):
        try:
            prepared.append(_prepare_spec(event, max_payload_bytes))
        except InvalidInputError as exc:
            raise type(exc)(f"events[{index}].{exc.field}", exc.value, exc.reason) from exc
    return prepared


async def _check_corrections(conn: AsyncConnection, prepared: Sequence[PreparedEvent]) -> None:
    """Refuse a batch whose corrections name events neither stored nor earlier in the batch.

    A correction follows what it corrects, as with :meth:`AuditRepository.record`:
    one naming an event placed after it in the batch (and not stored yet) would
    be recorded first, and two events correcting each other would form a cycle.
    """
    position: dict[UUID, int] = {}
    for index, event in enumerate(prepared):
        position.setdefault(event.id, index)
    first_use: dict[UUID, int] = {}
    for index, event in enumerate(prepared):
        target = event.corrects_id
        if target is not None and position.get(target, index) >= index:
            first_use.setdefault(target, index)
    if not first_use:
        return
    found = await bulk.existing_ids(conn, list(first_use))
    for target, index in first_use.items():
        if target in found:
            continue
        if target in position:
            raise InvalidInputError(
                f"events[{index}].corrects",
                target,
                f"names events[{position[target]}], later in the batch; "
                "a correction must follow the event it corrects",
            )
        raise InvalidInputError(
            f"events[{index}].corrects", target, "no event with this id was recorded"
        )


async def _write_prepared(
    conn: AsyncConnection, prepared: Sequence[PreparedEvent], returning: bool
) -> list[AuditRecord] | int:
    """Write a validated batch; raise its first id conflict (which undoes its savepoint)."""
    if not returning:
        return await bulk.write_many(conn, prepared)
    records: list[AuditRecord] = []
    for outcome in await bulk.insert_many(conn, prepared):
        if isinstance(outcome, EventIdConflictError):
            raise outcome
        records.append(outcome)
    return records


#: The largest ``seq`` (a bigint): a cursor past it would overflow in the query.
_SEQ_MAX = 2**63 - 1


def _cursor_value(after: str | int | None) -> int | None:
    if after is None:
        return None
    if isinstance(after, bool):
        raise InvalidInputError("after", after, "is not a cursor returned by search()")
    if isinstance(after, int):
        value = after
    elif isinstance(after, str) and after.isascii() and after.isdigit() and len(after) <= 19:
        value = int(after)
    else:
        raise InvalidInputError("after", after, "is not a cursor returned by search()")
    if not 0 <= value <= _SEQ_MAX:
        raise InvalidInputError("after", after, "is not a cursor returned by search()")
    return value


def _search_filters(
    *,
    event_types: Iterable[AuditEventType | str] | None,
    entity_type: EntityType | str | None,
    entity_id: UUID | str | None,
    actor: str | None,
    ticker: str | None,
    order_id: UUID | str | None,
    recommendation_id: UUID | str | None,
    since: datetime | str | None,
    until: datetime | str | None,
) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if event_types is not None:
        if isinstance(event_types, (str, AuditEventType)):
            event_types = [event_types]
        elif isinstance(event_types, (bytes, Mapping)) or not isinstance(event_types, Iterable):
            raise InvalidInputError(
                "event_types", event_types, "must be an event type or an iterable of them"
            )
        kinds = [coerce_event_type(t).value for t in event_types]
        if not kinds:
            raise InvalidInputError("event_types", event_types, "must not be empty")
        filters.append(AuditEvent.event_type.in_(kinds))
    if entity_type is not None:
        filters.append(AuditEvent.entity_type == coerce_entity_type(entity_type).value)
    if entity_id is not None:
        filters.append(AuditEvent.entity_id == coerce_uuid(entity_id, "entity_id"))
    if actor is not None:
        filters.append(AuditEvent.actor == check_actor(actor))
    if ticker is not None:
        filters.append(AuditEvent.ticker == check_ticker(ticker))
    if order_id is not None:
        filters.append(AuditEvent.order_id == coerce_uuid(order_id, "order_id"))
    if recommendation_id is not None:
        filters.append(
            AuditEvent.recommendation_id == coerce_uuid(recommendation_id, "recommendation_id")
        )
    start = None if since is None else check_timestamp(since, "since")
    end = None if until is None else check_timestamp(until, "until")
    if start is not None and end is not None and end < start:
        raise InvalidInputError("until", until, "is before since")
    if start is not None:
        filters.append(AuditEvent.recorded_at >= start)
    if end is not None:
        filters.append(AuditEvent.recorded_at < end)
    return filters


def search_statement(
    *,
    event_types: Iterable[AuditEventType | str] | None = None,
    entity_type: EntityType | str | None = None,
    entity_id: UUID | str | None = None,
    actor: str | None = None,
    ticker: str | None = None,
    order_id: UUID | str | None = None,
    recommendation_id: UUID | str | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    after: str | int | None = None,
) -> Select[Any]:
    """The validated SELECT behind :meth:`AuditRepository.search`, in recorded order."""
    filters = _search_filters(
        event_types=event_types,
        entity_type=entity_type,
        entity_id=entity_id,
        actor=actor,
        ticker=ticker,
        order_id=order_id,
        recommendation_id=recommendation_id,
        since=since,
        until=until,
    )
    cursor = _cursor_value(after)
    if cursor is not None:
        filters.append(AuditEvent.seq > cursor)
    return select(*RECORD_COLUMNS).where(and_(True, *filters)).order_by(AuditEvent.seq)


def _order_trail_select(
    *, given_recommendation: bool, values: tuple[UUID, UUID | None] | None = None
) -> Select[Any]:
    """The order trail as one parameterized statement (with ``values``, bound).

    Built once per shape: SQLAlchemy then reuses its cache key and compiled
    form, and the driver its prepared statement, so a trail costs one round
    trip and little Python. The chain's entities are collected from the two
    covering indexes (order id, recommendation id: see the model) without
    touching the table; the heap is read only for the rows returned, found by
    entity id. Without ``given_recommendation`` the recommendation is the
    first one the order's own events name.
    """
    table = AuditEvent.__table__
    order_value, recommendation_value = values if values is not None else (None, None)
    if values is not None:
        order_id = bindparam("order_id", order_value, type_=Uuid())
    else:
        order_id = bindparam("order_id", type_=Uuid())
    recommendation: Any
    if given_recommendation:
        if values is not None:
            recommendation = bindparam("recommendation_id", recommendation_value, type_=Uuid())
        else:
            recommendation = bindparam("recommendation_id", type_=Uuid())
    else:
        first = table.alias("first_link")
        recommendation = (
            select(first.c.recommendation_id)
            .where(first.c.order_id == order_id, first.c.recommendation_id.is_not(None))
            .order_by(first.c.seq)
            .limit(1)
            .scalar_subquery()
        )
    by_order = table.alias("by_order")
    by_recommendation = table.alias("by_recommendation")
    # A UNION rather than OR: each branch stays an index-only scan.
    chain_entities = union(
        select(by_order.c.entity_id).where(by_order.c.order_id == order_id),
        select(by_recommendation.c.entity_id).where(
            by_recommendation.c.recommendation_id == recommendation
        ),
    ).scalar_subquery()
    return (
        select(*record_columns(table))
        .where(table.c.entity_id == any_(func.array(chain_entities)))
        .order_by(table.c.seq)
    )


#: The statement behind :meth:`AuditRepository.order_trail` given only the
#: order (parameter ``order_id``) ...
ORDER_TRAIL = _order_trail_select(given_recommendation=False)
#: ... and given the recommendation too (``order_id``, ``recommendation_id``).
ORDER_TRAIL_WITH_RECOMMENDATION = _order_trail_select(given_recommendation=True)


class _DriverStatement:
    """A constant statement compiled once (for the engine's dialect), for the driver shortcut."""

    def __init__(self, statement: Select[Any]) -> None:
        self._statement = statement
        self._compiled: tuple[Dialect, str, tuple[str, ...], dict[str, Any]] | None = None

    def render(self, dialect: Dialect, values: Mapping[str, Any]) -> tuple[str, list[Any]]:
        """SQL text and positional arguments (literals keep their compiled value)."""
        if self._compiled is None or self._compiled[0] is not dialect:
            compiled = self._statement.compile(dialect=dialect)
            names = tuple(compiled.positiontup or ())
            self._compiled = (dialect, str(compiled), names, dict(compiled.params))
        _, sql, names, defaults = self._compiled
        return sql, [values[n] if n in values else defaults[n] for n in names]


_ORDER_TRAIL_DRIVER = {
    False: _DriverStatement(ORDER_TRAIL),
    True: _DriverStatement(ORDER_TRAIL_WITH_RECOMMENDATION),
}


def order_trail_statement(
    order_id: UUID | str, recommendation_id: UUID | str | None = None
) -> Select[Any]:
    """The SELECT behind :meth:`AuditRepository.order_trail`, with its values bound.

    The chain is: every event of the order (its lifecycle, fills, position
    changes); every event linked to its recommendation (the recommendation
    itself, risk evaluations, approval requests); and every other event about an
    entity already in the chain (an approval's decision, say). Without
    ``recommendation_id`` the recommendation is the first one the order's own
    events name. Each part is an index lookup, so the cost follows the trail,
    not the table.
    """
    oid = coerce_uuid(order_id, "order_id")
    rid = coerce_optional_uuid(recommendation_id, "recommendation_id")
    # Built anew with the values bound, rather than ORDER_TRAIL.params(): its
    # WHERE clause must carry the values when composed into another statement.
    return _order_trail_select(given_recommendation=rid is not None, values=(oid, rid))


def entity_trail_statement(entity_type: EntityType | str, entity_id: UUID | str) -> Select[Any]:
    """The SELECT behind :meth:`AuditRepository.entity_trail` (one index range scan)."""
    return (
        select(*RECORD_COLUMNS)
        .where(
            AuditEvent.entity_id == coerce_uuid(entity_id, "entity_id"),
            AuditEvent.entity_type == coerce_entity_type(entity_type).value,
        )
        .order_by(AuditEvent.seq)
    )


class AuditRepository:
    """Write and read audit events on the caller's :class:`AsyncSession`.

    Cheap to build: make one per unit of work and pass it to handlers. It
    executes and flushes, never commits; the caller's ``session.begin()`` block
    decides whether the events persist together with the business change.

    :param session: the session whose transaction the events join.
    :param max_payload_bytes: refuse payloads whose stored JSON is larger.
    """

    def __init__(
        self, session: AsyncSession, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    ) -> None:
        if not isinstance(session, AsyncSession) and not callable(
            getattr(session, "connection", None)
        ):
            # An engine or a URL passed by mistake would fail only at the first write.
            raise InvalidInputError("session", session, "must be an AsyncSession")
        self.session = session
        self.max_payload_bytes = check_max_payload_bytes(max_payload_bytes)

    # ------------------------------------------------------------------ writes

    async def record(
        self,
        event_type: AuditEventType | str,
        entity_type: EntityType | str,
        entity_id: UUID | str,
        data: AuditPayload | Mapping[str, Any],
        *,
        actor: str = "system",
        occurred_at: datetime | str | None = None,
        event_id: UUID | str | None = None,
        recommendation_id: UUID | str | None = None,
        order_id: UUID | str | None = None,
        corrects: UUID | str | None = None,
    ) -> AuditRecord:
        """Validate and write one event; return it as stored.

        :param event_type: an :class:`AuditEventType` or its string value.
        :param entity_type: an :class:`EntityType` or its string value.
        :param entity_id: the UUID of the entity the event is about.
        :param data: the payload model of ``event_type``, or a mapping validated against it.
        :param actor: who or what caused the event.
        :param occurred_at: business time (timezone-aware); defaults to the recorded time.
        :param event_id: supply the id for idempotent retries: recording the same
            event again returns the stored one instead of adding a row.
        :param recommendation_id: link to a recommendation when the payload has none.
        :param order_id: link to an order when the entity is not the order.
        :param corrects: the id of an earlier event this one corrects (see :meth:`correct`).
        :raises InvalidInputError: (or a subclass) before anything reaches the session,
            including when ``corrects`` names no recorded event.
        :raises EventIdConflictError: ``event_id`` exists with different content.
        :raises AuditStorageError: the database failed the statement.
        """
        prepared = prepare_event(
            event_type,
            entity_type,
            entity_id,
            data,
            actor=actor,
            occurred_at=occurred_at,
            event_id=event_id,
            recommendation_id=recommendation_id,
            order_id=order_id,
            corrects=corrects,
            max_payload_bytes=self.max_payload_bytes,
        )
        if prepared.corrects_id is not None and await self.get(prepared.corrects_id) is None:
            raise InvalidInputError("corrects", corrects, "no event with this id was recorded")
        return await self.insert_prepared(prepared)

    async def correct(
        self,
        original_event_id: UUID | str,
        data: AuditPayload | Mapping[str, Any],
        *,
        actor: str = "system",
        event_type: AuditEventType | str | None = None,
        occurred_at: datetime | str | None = None,
        event_id: UUID | str | None = None,
    ) -> AuditRecord:
        """Record a correction of an earlier event; the original stays as it was.

        Audit rows are never changed (the database refuses UPDATE and DELETE).
        A correction is a new event that references the one it corrects through
        ``corrects_id``, so both stay readable and the trail shows who corrected
        what, and when. It is about the same entity and has the original's event
        type unless ``event_type`` says otherwise (a fill recorded as a
        rejection, say); ``data`` is the corrected payload, validated as usual.
        A correction may itself be corrected.

        :param original_event_id: the event being corrected.
        :raises InvalidInputError: ``original_event_id`` names no recorded event,
            or the payload is invalid.
        """
        original = await self.get(coerce_uuid(original_event_id, "original_event_id"))
        if original is None:
            raise InvalidInputError(
                "original_event_id", original_event_id, "no event with this id was recorded"
            )
        prepared = prepare_event(
            original.event_type if event_type is None else event_type,
            original.entity_type,
            original.entity_id,
            data,
            actor=actor,
            occurred_at=occurred_at,
            event_id=event_id,
            recommendation_id=original.recommendation_id,
            order_id=original.order_id,
            corrects=original.id,
            max_payload_bytes=self.max_payload_bytes,
        )
        return await self.insert_prepared(prepared)

    async def corrections(self, event_id: UUID | str) -> list[AuditRecord]:
        """The events that correct ``event_id`` directly, in recorded order."""
        eid = coerce_uuid(event_id, "event_id")
        stmt = select(*RECORD_COLUMNS).where(AuditEvent.corrects_id == eid).order_by(AuditEvent.seq)
        return await self._fetch(stmt, "corrections")

    async def insert_prepared(self, prepared: PreparedEvent) -> AuditRecord:
        """Insert an event validated by :func:`prepare_event` (idempotent by id)."""
        try:
            conn = await self.session.connection()
            inserted = await bulk.insert_one(conn, prepared)
            if inserted is not None:
                return inserted
            stored = (await bulk.fetch_stored(conn, [prepared.id])).get(prepared.id)
        except DB_ERRORS as exc:
            raise translate_db_error(exc, f"recording {prepared.event_type.value}") from exc
        if stored is None or not bulk.same_event(stored, prepared):
            raise EventIdConflictError(prepared.id)
        return stored

    @overload
    async def record_many(
        self, events: Iterable[EventSpec | PreparedEvent], *, returning: Literal[True] = ...
    ) -> list[AuditRecord]: ...

    @overload
    async def record_many(
        self, events: Iterable[EventSpec | PreparedEvent], *, returning: Literal[False]
    ) -> int: ...

    async def record_many(
        self, events: Iterable[EventSpec | PreparedEvent], *, returning: bool = True
    ) -> list[AuditRecord] | int:
        """Validate and write a batch of events in the session's transaction, in order.

        Each event is a mapping of :meth:`record`'s arguments (see
        :class:`EventSpec`) or a :class:`PreparedEvent`. The whole batch is
        validated before anything is sent; a bad event refuses the batch with
        an error whose field names its position (``events[3].data.quantity``).

        Small batches are one ``INSERT`` of arrays (one round trip); large ones
        go through ``COPY`` on the session's own connection (see
        :mod:`audit_orm.bulk`). The batch runs in a savepoint, so on any
        failure nothing of it stays and the caller's transaction remains usable.

        Idempotent by event id, like :meth:`record`: an event already stored
        with the same content comes back as stored (nothing is added); a
        repeated id with different content, stored or earlier in the batch,
        refuses the whole batch with :class:`EventIdConflictError`.

        :param returning: ``False`` skips reading the new rows back (their
            ``seq`` and recorded times) and returns the number of rows added:
            the faster choice for imports that do not need the records.
        :returns: one record per event, in the order given (``seq`` follows
            that order); or, with ``returning=False``, the number of rows added.
        :raises InvalidInputError: (or a subclass) before anything is written,
            including when a ``corrects`` names an event neither stored nor
            earlier in the batch.
        :raises EventIdConflictError: an event id is taken by a different event.
        :raises AuditStorageError: the database failed; the batch left nothing behind.
        """
        prepared = prepare_batch(events, max_payload_bytes=self.max_payload_bytes)
        if not prepared:
            return [] if returning else 0
        try:
            conn = await self.session.connection()
            await _check_corrections(conn, prepared)
            if await bulk.is_autocommit(conn):
                # No transaction block to hold a savepoint, and each statement
                # would commit on its own: the batch gets a transaction of its
                # own, so a refusal half-way leaves nothing behind.
                async with bulk.transaction_block(conn):
                    return await _write_prepared(conn, prepared, returning)
            async with self.session.begin_nested():
                # Asking the session for its connection inside the block is what
                # emits the SAVEPOINT (the session creates it lazily).
                conn = await self.session.connection()
                return await _write_prepared(conn, prepared, returning)
        except Exception as exc:
            if bulk.from_database(exc):
                raise translate_db_error(exc, f"recording {len(prepared)} events") from exc
            raise

    # ---------------------------------------------------------- stage helpers

    async def recommendation_generated(
        self,
        recommendation_id: UUID | str,
        ticker: str,
        action: str,
        mode: str,
        confidence: float,
        evidence_count: int,
        suppressed: bool = False,
        *,
        actor: str = "recommendation_worker",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """A recommendation was generated (or suppressed, with ``suppressed=True``)."""
        payload = dict(
            ticker=ticker,
            action=action,
            mode=mode,
            confidence=confidence,
            evidence_count=evidence_count,
            suppressed=suppressed,
        )
        kind = _E.RECOMMENDATION_SUPPRESSED if suppressed else _E.RECOMMENDATION_GENERATED
        return await self.record(
            kind, EntityType.RECOMMENDATION, recommendation_id, payload, actor=actor, **options
        )

    async def risk_evaluated(
        self,
        evaluation_id: UUID | str,
        recommendation_id: UUID | str | None,
        ticker: str,
        eligible: bool,
        allowed_mode: str,
        rejection_reasons: list[str],
        check_count: int,
        *,
        actor: str = "risk_engine",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """A risk evaluation finished: ``risk.evaluated``, or ``risk.rejected`` if not eligible."""
        payload = dict(
            recommendation_id=recommendation_id,
            ticker=ticker,
            eligible=eligible,
            allowed_mode=allowed_mode,
            rejection_reasons=rejection_reasons,
            check_count=check_count,
        )
        kind = _E.RISK_EVALUATED if eligible else _E.RISK_REJECTED
        return await self.record(
            kind, EntityType.RISK_EVALUATION, evaluation_id, payload, actor=actor, **options
        )

    async def order_submitted(
        self,
        order_id: UUID | str,
        ticker: str,
        side: str,
        quantity: Decimal | float | int | str,
        order_type: str,
        idempotency_key: str,
        recommendation_id: UUID | str | None = None,
        evaluation_id: UUID | str | None = None,
        *,
        actor: str = "broker_service",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """An order was submitted to the broker."""
        payload = dict(
            ticker=ticker,
            side=side,
            quantity=quantity,
            order_type=order_type,
            idempotency_key=idempotency_key,
            recommendation_id=recommendation_id,
            evaluation_id=evaluation_id,
        )
        return await self.record(
            _E.ORDER_SUBMITTED, EntityType.ORDER, order_id, payload, actor=actor, **options
        )

    async def order_accepted(
        self,
        order_id: UUID | str,
        ticker: str,
        broker_order_id: str,
        status: str | None = None,
        *,
        actor: str = "broker_service",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """The broker acknowledged the order."""
        payload = dict(ticker=ticker, broker_order_id=broker_order_id, status=status)
        return await self.record(
            _E.ORDER_ACCEPTED, EntityType.ORDER, order_id, payload, actor=actor, **options
        )

    async def order_filled(
        self,
        order_id: UUID | str,
        ticker: str,
        side: str,
        fill_quantity: Decimal | float | int | str,
        fill_price: Decimal | float | int | str | None,
        broker_order_id: str,
        *,
        actor: str = "broker_service",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """The broker filled (part of) the order. Pass the broker's fill time as ``occurred_at``."""
        payload = dict(
            ticker=ticker,
            side=side,
            fill_quantity=fill_quantity,
            fill_price=fill_price,
            broker_order_id=broker_order_id,
        )
        return await self.record(
            _E.ORDER_FILLED, EntityType.ORDER, order_id, payload, actor=actor, **options
        )

    async def order_rejected(
        self,
        order_id: UUID | str,
        ticker: str,
        reason: str,
        source: str = "broker",
        *,
        actor: str = "broker_service",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """The order was rejected by the risk engine or the broker."""
        payload = dict(ticker=ticker, reason=reason, rejection_source=source)
        return await self.record(
            _E.ORDER_REJECTED, EntityType.ORDER, order_id, payload, actor=actor, **options
        )

    async def order_cancelled(
        self,
        order_id: UUID | str,
        ticker: str,
        broker_order_id: str,
        *,
        actor: str = "broker_service",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """The order was cancelled."""
        payload = dict(ticker=ticker, broker_order_id=broker_order_id)
        return await self.record(
            _E.ORDER_CANCELLED, EntityType.ORDER, order_id, payload, actor=actor, **options
        )

    async def duplicate_prevented(
        self,
        order_id: UUID | str,
        ticker: str,
        idempotency_key: str,
        detected_via: str,
        *,
        actor: str = "broker_service",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """A duplicate submission of the order was stopped."""
        payload = dict(
            ticker=ticker,
            idempotency_key=idempotency_key,
            detected_via=detected_via,
        )
        return await self.record(
            _E.ORDER_DUPLICATE, EntityType.ORDER, order_id, payload, actor=actor, **options
        )

    async def position_change(
        self,
        order_id: UUID | str,
        ticker: str,
        side: str,
        quantity_before: Decimal | float | int | str,
        quantity_after: Decimal | float | int | str,
        avg_entry_before: Decimal | float | int | str,
        avg_entry_after: Decimal | float | int | str,
        *,
        actor: str = "broker_service",
        **options: Unpack[RecordOptions],
    ) -> list[AuditRecord]:
        """A fill changed a position; quantities are signed (negative = short).

        From flat to non-zero opens (long or short), to zero closes, any other
        change on the same side updates. A fill that crosses zero (10 -> -5) is
        two events in one call: ``position.closed`` (10 -> 0) then
        ``position.opened`` (0 -> -5). Returns the events written, in order.
        """
        payload = validate_payload(
            _E.POSITION_UPDATED,
            dict(
                ticker=ticker,
                side=side,
                quantity_before=quantity_before,
                quantity_after=quantity_after,
                avg_entry_before=avg_entry_before,
                avg_entry_after=avg_entry_after,
            ),
        )
        assert isinstance(payload, PositionChangePayload)
        before, after = payload.quantity_before, payload.quantity_after
        if before == 0 and after == 0:
            raise InvalidPayloadError(
                "data.quantity_after",
                quantity_after,
                "a position change from 0 to 0 changes nothing",
            )
        steps: list[tuple[AuditEventType, PositionChangePayload]]
        if before == 0:
            steps = [(_E.POSITION_OPENED, payload)]
        elif after == 0:
            steps = [(_E.POSITION_CLOSED, payload)]
        elif (before > 0) != (after > 0):
            zero = Decimal(0)
            closing = payload.model_copy(update={"quantity_after": zero, "avg_entry_after": zero})
            opening = payload.model_copy(update={"quantity_before": zero, "avg_entry_before": zero})
            steps = [(_E.POSITION_CLOSED, closing), (_E.POSITION_OPENED, opening)]
        else:
            steps = [(_E.POSITION_UPDATED, payload)]
        if len(steps) > 1 and options.get("event_id") is not None:
            raise InvalidInputError(
                "event_id", options["event_id"], "a position reversal writes two events; omit it"
            )
        return [
            await self.record(kind, EntityType.POSITION, order_id, step, actor=actor, **options)
            for kind, step in steps
        ]

    async def approval_requested(
        self,
        approval_id: UUID | str,
        ticker: str,
        side: str,
        quantity: Decimal | float | int | str,
        estimated_value: Decimal | float | int | str,
        recommendation_id: UUID | str | None = None,
        expires_at: datetime | str | None = None,
        *,
        actor: str = "broker_service",
        order_id: UUID | str | None = None,
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """An operator approval was requested for a live order."""
        payload = dict(
            ticker=ticker,
            side=side,
            quantity=quantity,
            estimated_value=estimated_value,
            recommendation_id=recommendation_id,
            expires_at=expires_at,
        )
        return await self.record(
            _E.APPROVAL_REQUESTED,
            EntityType.APPROVAL,
            approval_id,
            payload,
            actor=actor,
            order_id=order_id,
            **options,
        )

    async def approval_reviewed(
        self,
        approval_id: UUID | str,
        ticker: str,
        approved: bool,
        reviewed_by: str = "operator",
        review_note: str = "",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """An operator approved or rejected a request; the reviewer is the actor."""
        payload = dict(
            ticker=ticker,
            approved=approved,
            reviewed_by=reviewed_by,
            review_note=review_note,
        )
        kind = _E.APPROVAL_APPROVED if approved else _E.APPROVAL_REJECTED
        return await self.record(
            kind, EntityType.APPROVAL, approval_id, payload, actor=reviewed_by, **options
        )

    async def approval_expired(
        self,
        approval_id: UUID | str,
        ticker: str,
        *,
        actor: str = "system",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """An approval request expired without review."""
        payload = dict(ticker=ticker)
        return await self.record(
            _E.APPROVAL_EXPIRED, EntityType.APPROVAL, approval_id, payload, actor=actor, **options
        )

    async def trading_mode_changed(
        self,
        config_id: UUID | str,
        old_mode: str,
        new_mode: str,
        actor: str = "operator",
        **options: Unpack[RecordOptions],
    ) -> AuditRecord:
        """The trading mode changed (for instance paper to live)."""
        payload = dict(old_mode=old_mode, new_mode=new_mode)
        return await self.record(
            _E.TRADING_MODE_CHANGED,
            EntityType.RISK_CONFIG,
            config_id,
            payload,
            actor=actor,
            **options,
        )

    # ------------------------------------------------------------------- reads

    async def get(self, event_id: UUID | str) -> AuditRecord | None:
        """The event with this id, or ``None``."""
        eid = coerce_uuid(event_id, "event_id")
        rows = await self._fetch(select(*RECORD_COLUMNS).where(AuditEvent.id == eid), "get")
        return rows[0] if rows else None

    async def order_trail(
        self, order_id: UUID | str, recommendation_id: UUID | str | None = None
    ) -> list[AuditRecord]:
        """The whole decision chain of an order, in recorded order.

        Recommendation, risk evaluations, approval request and decision, the
        order's lifecycle, fills and position changes. Without
        ``recommendation_id`` the recommendation is found through the order's
        own events.
        """
        params: dict[str, UUID] = {"order_id": coerce_uuid(order_id, "order_id")}
        rid = coerce_optional_uuid(recommendation_id, "recommendation_id")
        if rid is not None:
            params["recommendation_id"] = rid
        try:
            conn = await self.session.connection()
            driver = await bulk.direct_driver(conn)
            if driver is not None:
                # The transaction has begun (or there is none): straight to the
                # driver, as the bulk module does, a trail being a hot path.
                sql, args = _ORDER_TRAIL_DRIVER[rid is not None].render(conn.dialect, params)
                rows = await bulk.driver_fetch(conn, driver, sql, *args)
                return [record_from_row(row) for row in rows]
            # On the session's connection: the statement is plain Core, and the
            # ORM layer of session.execute() would only add per-call overhead.
            stmt = ORDER_TRAIL if rid is None else ORDER_TRAIL_WITH_RECOMMENDATION
            result = await conn.execute(stmt, params)
            return [record_from_row(row) for row in result.all()]
        except DB_ERRORS as exc:
            raise translate_db_error(exc, "order trail") from exc
        except Exception as exc:
            if bulk.from_database(exc):
                raise translate_db_error(exc, "order trail") from exc
            raise

    async def entity_trail(
        self, entity_type: EntityType | str, entity_id: UUID | str
    ) -> list[AuditRecord]:
        """Every event about one entity, in recorded order."""
        return await self._fetch(entity_trail_statement(entity_type, entity_id), "entity trail")

    async def search(
        self,
        *,
        event_types: Iterable[AuditEventType | str] | None = None,
        entity_type: EntityType | str | None = None,
        entity_id: UUID | str | None = None,
        actor: str | None = None,
        ticker: str | None = None,
        order_id: UUID | str | None = None,
        recommendation_id: UUID | str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> AuditPage:
        """Filter events, one page at a time, in recorded order.

        ``since`` is inclusive and ``until`` exclusive, on the recorded time.
        Pagination is by keyset: pass the returned ``next_cursor`` as ``after``;
        pages stay fast however deep, and concurrent inserts never shift them.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise InvalidInputError("limit", limit, "must be an integer from 1 to 10000")
        stmt = search_statement(
            event_types=event_types,
            entity_type=entity_type,
            entity_id=entity_id,
            actor=actor,
            ticker=ticker,
            order_id=order_id,
            recommendation_id=recommendation_id,
            since=since,
            until=until,
            after=after,
        ).limit(limit + 1)
        records = await self._fetch(stmt, "search")
        if len(records) > limit:
            records = records[:limit]
            return AuditPage(records, str(records[-1].seq))
        return AuditPage(records, None)

    def stream(
        self,
        *,
        event_types: Iterable[AuditEventType | str] | None = None,
        entity_type: EntityType | str | None = None,
        entity_id: UUID | str | None = None,
        actor: str | None = None,
        ticker: str | None = None,
        order_id: UUID | str | None = None,
        recommendation_id: UUID | str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        after: str | None = None,
        chunk_size: int = DEFAULT_STREAM_CHUNK,
    ) -> AsyncGenerator[AuditRecord, None]:
        """Every event a :meth:`search` with these filters would page through, one by one.

        Rows come from a server-side cursor, ``chunk_size`` at a time, so an
        export of millions of events holds one chunk in memory. The cursor
        lives in the session's transaction (so not on an ``AUTOCOMMIT``
        session), sees the table as it was when it opened (events committed
        later are not included) and is released by the server when that
        transaction ends. Filters are validated here, before the first row is
        asked for. When stopping early, close the iterator
        (``contextlib.aclosing``) so its result is closed at once.
        """
        if (
            isinstance(chunk_size, bool)
            or not isinstance(chunk_size, int)
            or not 1 <= chunk_size <= 100_000
        ):
            raise InvalidInputError("chunk_size", chunk_size, "must be an integer from 1 to 100000")
        stmt = search_statement(
            event_types=event_types,
            entity_type=entity_type,
            entity_id=entity_id,
            actor=actor,
            ticker=ticker,
            order_id=order_id,
            recommendation_id=recommendation_id,
            since=since,
            until=until,
            after=after,
        )
        return self._stream(stmt.execution_options(yield_per=chunk_size))

    async def _stream(self, stmt: Select[Any]) -> AsyncGenerator[AuditRecord, None]:
        try:
            result = await self.session.stream(stmt)
        except DB_ERRORS as exc:
            raise translate_db_error(exc, "stream") from exc
        try:
            async for chunk in result.partitions():
                for row in chunk:
                    yield record_from_row(row)
        except DB_ERRORS as exc:
            raise translate_db_error(exc, "stream") from exc
        finally:
            await result.close()

    async def _fetch(self, stmt: Select[Any], action: str) -> list[AuditRecord]:
        try:
            result = await self.session.execute(stmt)
            return [record_from_row(row) for row in result.all()]
        except DB_ERRORS as exc:
            raise translate_db_error(exc, action) from exc
