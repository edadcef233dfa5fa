"""The repository: write audit events and read trails, inside the caller's transaction.

:class:`AuditRepository` never commits. It executes its statements on the
session it was given, so an audit event commits together with the business
change it describes, and a rollback leaves no audit row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, TypedDict, Unpack
from uuid import UUID

from sqlalchemy import ColumnElement, Select, and_, any_, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from audit_orm.enums import AuditEventType, EntityType
from audit_orm.errors import (
    DB_ERRORS,
    EventIdConflictError,
    InvalidInputError,
    InvalidPayloadError,
    UnknownEntityTypeError,
    translate_db_error,
)
from audit_orm.ids import coerce_optional_uuid, coerce_uuid, uuid7
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.models import ACTOR_MAX_LENGTH, TICKER_MAX_LENGTH, AuditEvent
from audit_orm.payloads import (
    AuditPayload,
    PositionChangePayload,
    coerce_event_type,
    payload_to_data,
    validate_payload,
)
from audit_orm.records import AuditPage, AuditRecord

#: Default cap on the stored size of one payload (JSON text, bytes).
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024

_E = AuditEventType
_ORDER_ENTITIES = frozenset({EntityType.ORDER, EntityType.POSITION})

#: The columns a record is built from, in :class:`AuditRecord` field order.
RECORD_COLUMNS = (
    AuditEvent.id,
    AuditEvent.seq,
    AuditEvent.event_type,
    AuditEvent.entity_type,
    AuditEvent.entity_id,
    AuditEvent.actor,
    AuditEvent.data,
    AuditEvent.occurred_at,
    AuditEvent.recorded_at,
    AuditEvent.recommendation_id,
    AuditEvent.order_id,
    AuditEvent.ticker,
    AuditEvent.corrects_id,
)


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
        try:
            return EntityType(value)
        except ValueError:
            pass
    raise UnknownEntityTypeError(
        "entity_type", value, "must be one of " + ", ".join(t.value for t in EntityType)
    )


def check_actor(actor: Any) -> str:
    """Validate an actor name: non-empty text without control characters."""
    if not isinstance(actor, str):
        raise InvalidInputError("actor", actor, "must be a string")
    if not actor or actor.isspace():
        raise InvalidInputError("actor", actor, "must not be empty")
    if len(actor) > ACTOR_MAX_LENGTH:
        raise InvalidInputError("actor", actor, f"must be at most {ACTOR_MAX_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in actor):
        raise InvalidInputError("actor", actor, "must not contain control characters")
    return actor


def check_ticker(ticker: Any) -> str:
    """Validate a ticker filter: what a payload's ticker may be, nothing else."""
    if not isinstance(ticker, str) or not ticker or len(ticker) > TICKER_MAX_LENGTH:
        raise InvalidInputError(
            "ticker", ticker, f"must be a string of 1 to {TICKER_MAX_LENGTH} characters"
        )
    if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in ticker):
        raise InvalidInputError("ticker", ticker, "must not contain control characters")
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

    def row(self) -> dict[str, Any]:
        """The insert parameters (enum members as their string values)."""
        return {
            "id": self.id,
            "event_type": self.event_type.value,
            "entity_type": self.entity_type.value,
            "entity_id": self.entity_id,
            "actor": self.actor,
            "data": self.data,
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
    kind = coerce_event_type(event_type)
    entity = coerce_entity_type(entity_type)
    entity_uuid = coerce_uuid(entity_id, "entity_id")
    payload = validate_payload(kind, data)
    stored = payload_to_data(payload)
    size = len(dumps_exact(stored).encode("utf-8"))
    if size > max_payload_bytes:
        raise InvalidPayloadError(
            "data", f"<{size} bytes>", f"payload is larger than the {max_payload_bytes}-byte cap"
        )
    rec_id = coerce_optional_uuid(getattr(payload, "recommendation_id", None), "recommendation_id")
    if rec_id is None:
        rec_id = coerce_optional_uuid(recommendation_id, "recommendation_id")
    if rec_id is None and entity is EntityType.RECOMMENDATION:
        rec_id = entity_uuid
    ord_id = entity_uuid if entity in _ORDER_ENTITIES else None
    if ord_id is None:
        ord_id = coerce_optional_uuid(order_id, "order_id")
    ticker = getattr(payload, "ticker", None)
    new_id = uuid7() if event_id is None else coerce_uuid(event_id, "event_id")
    corrects_id = coerce_optional_uuid(corrects, "corrects")
    if corrects_id == new_id:
        raise InvalidInputError("corrects", corrects, "an event cannot correct itself")
    return PreparedEvent(
        id=new_id,
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
    )


def record_from_row(row: Sequence[Any]) -> AuditRecord:
    """Build an :class:`AuditRecord` from a row selected with :data:`RECORD_COLUMNS`."""
    return AuditRecord(
        id=row[0],
        seq=row[1],
        event_type=AuditEventType(row[2]),
        entity_type=EntityType(row[3]),
        entity_id=row[4],
        actor=row[5],
        data=row[6],
        occurred_at=row[7],
        recorded_at=row[8],
        recommendation_id=row[9],
        order_id=row[10],
        ticker=row[11],
        corrects_id=row[12],
    )


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
    if value < 0:
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


def order_trail_statement(
    order_id: UUID | str, recommendation_id: UUID | str | None = None
) -> Select[Any]:
    """The SELECT behind :meth:`AuditRepository.order_trail`.

    The chain is: every event of the order (its lifecycle, fills, position
    changes); every event linked to its recommendation (the recommendation
    itself, risk evaluations, approval requests); and every other event about an
    entity already in the chain (an approval's decision, say). Each branch is an
    index lookup, so the cost follows the trail, not the table.
    """
    oid = coerce_uuid(order_id, "order_id")
    rid: Any = coerce_optional_uuid(recommendation_id, "recommendation_id")
    if rid is None:
        rid = (
            select(AuditEvent.recommendation_id)
            .where(AuditEvent.order_id == oid, AuditEvent.recommendation_id.is_not(None))
            .order_by(AuditEvent.seq)
            .limit(1)
            .scalar_subquery()
        )
    in_chain = or_(AuditEvent.order_id == oid, AuditEvent.recommendation_id == rid)
    chain_entities = func.array(select(AuditEvent.entity_id).where(in_chain).scalar_subquery())
    return (
        select(*RECORD_COLUMNS)
        .where(or_(in_chain, AuditEvent.entity_id == any_(chain_entities)))
        .order_by(AuditEvent.seq)
    )


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
        self.session = session
        self.max_payload_bytes = max_payload_bytes

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
        original = await self.get(original_event_id)
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
        stmt = (
            pg_insert(AuditEvent)
            .on_conflict_do_nothing(index_elements=[AuditEvent.id])
            .returning(AuditEvent.seq, AuditEvent.occurred_at, AuditEvent.recorded_at)
        )
        try:
            result = await self.session.execute(stmt, prepared.row())
            inserted = result.first()
        except DB_ERRORS as exc:
            raise translate_db_error(exc, f"recording {prepared.event_type.value}") from exc
        if inserted is None:
            return await self._existing(prepared)
        return AuditRecord(
            id=prepared.id,
            seq=inserted[0],
            event_type=prepared.event_type,
            entity_type=prepared.entity_type,
            entity_id=prepared.entity_id,
            actor=prepared.actor,
            data=prepared.data,
            occurred_at=inserted[1],
            recorded_at=inserted[2],
            recommendation_id=prepared.recommendation_id,
            order_id=prepared.order_id,
            ticker=prepared.ticker,
            corrects_id=prepared.corrects_id,
        )

    async def _existing(self, prepared: PreparedEvent) -> AuditRecord:
        stored = await self.get(prepared.id)
        if stored is None:  # pragma: no cover - conflict on id means the row exists
            raise EventIdConflictError(prepared.id)
        same = (
            stored.event_type is prepared.event_type
            and stored.entity_type is prepared.entity_type
            and stored.entity_id == prepared.entity_id
            and stored.actor == prepared.actor
            # Compare as the database returns it: a float such as a confidence
            # of 0.9 reads back as Decimal('0.9'), which != 0.9 in Python.
            and stored.data == loads_exact(dumps_exact(prepared.data))
            and stored.corrects_id == prepared.corrects_id
            and (prepared.occurred_at is None or stored.occurred_at == prepared.occurred_at)
        )
        if not same:
            raise EventIdConflictError(prepared.id)
        return stored

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
        return await self._fetch(order_trail_statement(order_id, recommendation_id), "order trail")

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

    async def _fetch(self, stmt: Select[Any], action: str) -> list[AuditRecord]:
        try:
            result = await self.session.execute(stmt)
            return [record_from_row(row) for row in result.all()]
        except DB_ERRORS as exc:
            raise translate_db_error(exc, action) from exc
