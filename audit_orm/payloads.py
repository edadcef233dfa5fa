"""Typed payloads: one pydantic model per event type, and the registry.

A payload is validated before anything reaches the database session. The rules
that matter for an audit store:

* unknown fields are refused (a typo must not silently vanish into JSON);
* prices and quantities are :class:`~decimal.Decimal` and round-trip exactly
  (floats are accepted and converted through their shortest decimal form);
* what JSONB cannot hold - NaN or infinite numbers, NUL characters - and naive
  datetimes are refused here with an error naming the field, never discovered
  later as a failed INSERT.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
)

from audit_orm.display import UNSAFE_CHARACTERS
from audit_orm.enums import EVENT_TYPES_BY_VALUE, AuditEventType
from audit_orm.errors import InvalidPayloadError, UnknownEventTypeError

#: Lone UTF-16 surrogates: a Python string may hold them, UTF-8 cannot encode
#: them, so neither the driver nor a spool file could ever write one.
SURROGATES = re.compile("[\ud800-\udfff]")


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL characters cannot be stored in PostgreSQL text or JSONB")
    if SURROGATES.search(value):
        raise ValueError("lone surrogates are not Unicode text and cannot be stored")
    return value


#: C0 and C1 control characters, DEL, bidirectional formatting characters and
#: line separators (one regex search instead of a loop per character: every
#: event has a ticker and labels). A symbol must read as it is stored.
CONTROL_CHARACTERS = UNSAFE_CHARACTERS


def _no_control(value: str) -> str:
    _no_nul(value)
    if CONTROL_CHARACTERS.search(value):
        raise ValueError(
            "control characters and bidirectional formatting are not allowed in a symbol or label"
        )
    return value


#: Digits an amount may have on either side of the decimal point. PostgreSQL's
#: numeric allows more, but stores them written out: ``1E+100000`` would be a
#: 100 kB row from 9 bytes of JSON, and past 16383 decimals an INSERT fails.
AMOUNT_MAX_DIGITS = 1000


def _finite(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError("must be a finite number")
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if -exponent > AMOUNT_MAX_DIGITS or value.adjusted() >= AMOUNT_MAX_DIGITS:
        raise ValueError(
            f"must have at most {AMOUNT_MAX_DIGITS} digits before and after the decimal point"
        )
    if value.is_zero() and value.is_signed():
        # PostgreSQL has no negative zero; store what it will read back.
        value = value.copy_negate()
    return value


#: Largest count a payload holds: PostgreSQL's bigint, and far beyond any real
#: count. Without a bound, an integer of thousands of digits cannot even be
#: written as text by Python.
COUNT_MAX = 2**63 - 1


def _utc_representable(value: datetime) -> datetime:
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None
    return value


def _finite_float(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value == 0:
        # PostgreSQL has no negative zero (-0.0 reads back as 0.0): store what
        # it will read back, as for amounts, so the record returned and the row
        # read back say the same.
        return 0.0
    return value


#: Free text: any Unicode except NUL.
Text = Annotated[str, AfterValidator(_no_nul)]
#: A short label such as a side, a mode or an order type.
Label = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_control)]
#: An instrument symbol.
Ticker = Annotated[str, Field(min_length=1, max_length=32), AfterValidator(_no_control)]
#: An exact, finite decimal amount (price, quantity, value).
Amount = Annotated[Decimal, AfterValidator(_finite)]
#: A finite float (scores such as a confidence).
Score = Annotated[float, AfterValidator(_finite_float)]
#: A number of things: from 0 to :data:`COUNT_MAX`.
Count = Annotated[int, Field(ge=0, le=COUNT_MAX)]
#: A timezone-aware time that exists in UTC (years 1 to 9999 there too).
Moment = Annotated[AwareDatetime, AfterValidator(_utc_representable)]


class AuditPayload(BaseModel):
    """Base class of every event payload."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        strict=False,
        # Audit text is kept as given; trimming would alter the record.
        str_strip_whitespace=False,
    )

    #: Field names that carry correlation ids, read by the repository.
    correlation_fields: ClassVar[tuple[str, ...]] = ()


class RecommendationPayload(AuditPayload):
    """``recommendation.generated`` / ``recommendation.suppressed``."""

    ticker: Ticker
    action: Label
    mode: Label
    confidence: Score
    evidence_count: Count
    suppressed: bool = False


class RiskEvaluationPayload(AuditPayload):
    """``risk.evaluated`` / ``risk.rejected``."""

    recommendation_id: UUID | None = None
    ticker: Ticker
    eligible: bool
    allowed_mode: Label
    rejection_reasons: list[Text] = Field(default_factory=list)
    check_count: Count


class OrderSubmittedPayload(AuditPayload):
    """``order.submitted``."""

    ticker: Ticker
    side: Label
    quantity: Amount
    order_type: Label
    idempotency_key: Text
    recommendation_id: UUID | None = None
    evaluation_id: UUID | None = None


class OrderAcceptedPayload(AuditPayload):
    """``order.accepted``: the broker acknowledged the order."""

    ticker: Ticker
    broker_order_id: Text
    status: Label | None = None


class OrderFilledPayload(AuditPayload):
    """``order.filled`` (a partial or complete fill)."""

    ticker: Ticker
    side: Label
    fill_quantity: Amount
    fill_price: Amount | None = None
    broker_order_id: Text


class OrderRejectedPayload(AuditPayload):
    """``order.rejected`` by the risk engine or the broker."""

    ticker: Ticker
    reason: Text
    rejection_source: Label = "broker"


class OrderCancelledPayload(AuditPayload):
    """``order.cancelled``."""

    ticker: Ticker
    broker_order_id: Text


class DuplicatePreventedPayload(AuditPayload):
    """``order.duplicate_prevented``."""

    ticker: Ticker
    idempotency_key: Text
    detected_via: Label


class PositionChangePayload(AuditPayload):
    """``position.opened`` / ``position.closed`` / ``position.updated``.

    Quantities are signed: negative means short.
    """

    ticker: Ticker
    side: Label
    quantity_before: Amount
    quantity_after: Amount
    avg_entry_before: Amount
    avg_entry_after: Amount


class ApprovalRequestedPayload(AuditPayload):
    """``approval.requested``: a live order waits for an operator."""

    ticker: Ticker
    side: Label
    quantity: Amount
    estimated_value: Amount
    recommendation_id: UUID | None = None
    expires_at: Moment | None = None


class ApprovalReviewedPayload(AuditPayload):
    """``approval.approved`` / ``approval.rejected``."""

    ticker: Ticker
    approved: bool
    # Free text, not a label: the original module accepted any reviewer name.
    reviewed_by: Text
    review_note: Text = ""


class ApprovalExpiredPayload(AuditPayload):
    """``approval.expired``."""

    ticker: Ticker


class TradingModeChangedPayload(AuditPayload):
    """``trading.mode_changed``."""

    old_mode: Label
    new_mode: Label


E = AuditEventType

#: The payload model of every event type.
PAYLOAD_MODELS: Mapping[AuditEventType, type[AuditPayload]] = {
    E.RECOMMENDATION_GENERATED: RecommendationPayload,
    E.RECOMMENDATION_SUPPRESSED: RecommendationPayload,
    E.RISK_EVALUATED: RiskEvaluationPayload,
    E.RISK_REJECTED: RiskEvaluationPayload,
    E.ORDER_SUBMITTED: OrderSubmittedPayload,
    E.ORDER_ACCEPTED: OrderAcceptedPayload,
    E.ORDER_FILLED: OrderFilledPayload,
    E.ORDER_REJECTED: OrderRejectedPayload,
    E.ORDER_CANCELLED: OrderCancelledPayload,
    E.ORDER_DUPLICATE: DuplicatePreventedPayload,
    E.POSITION_OPENED: PositionChangePayload,
    E.POSITION_CLOSED: PositionChangePayload,
    E.POSITION_UPDATED: PositionChangePayload,
    E.TRADING_MODE_CHANGED: TradingModeChangedPayload,
    E.APPROVAL_REQUESTED: ApprovalRequestedPayload,
    E.APPROVAL_APPROVED: ApprovalReviewedPayload,
    E.APPROVAL_REJECTED: ApprovalReviewedPayload,
    E.APPROVAL_EXPIRED: ApprovalExpiredPayload,
}


def coerce_event_type(value: Any) -> AuditEventType:
    """Accept an :class:`AuditEventType` or its string value."""
    if isinstance(value, AuditEventType):
        return value
    if isinstance(value, str):
        kind = EVENT_TYPES_BY_VALUE.get(value)
        if kind is not None:
            return kind
    raise UnknownEventTypeError(
        "event_type", value, "must be one of " + ", ".join(t.value for t in AuditEventType)
    )


def _describe(error: ValidationError, event_type: AuditEventType) -> InvalidPayloadError:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"]) or "data"
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "required field is missing"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return InvalidPayloadError(
        f"data.{loc}", first.get("input"), f"{message} for {event_type.value}{suffix}"
    )


def validate_payload(event_type: AuditEventType | str, data: Any) -> AuditPayload:
    """Validate ``data`` (a mapping or a payload model) for ``event_type``.

    Returns the typed payload; raises :class:`InvalidPayloadError` naming the
    first bad field and its value.
    """
    kind = coerce_event_type(event_type)
    model = PAYLOAD_MODELS[kind]
    if type(data) is not dict:
        # Plain dicts, the common case, skip the abstract-class checks below.
        data = _as_dict(kind, model, data)
    for key in data:
        if type(key) is not str and not isinstance(key, str):
            raise InvalidPayloadError("data", key, "field names must be strings")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _describe(exc, kind) from exc


def _as_dict(kind: AuditEventType, model: type[AuditPayload], data: Any) -> dict[Any, Any]:
    """``data`` as a plain dict of field values, to be validated.

    A payload model is validated again from its fields: ``model_construct``
    and ``model_copy(update=...)`` build models that no validator has seen.
    """
    if isinstance(data, model):
        return dict(data.__dict__)
    if isinstance(data, AuditPayload):
        raise InvalidPayloadError(
            "data",
            type(data).__name__,
            f"{kind.value} takes {model.__name__}, not {type(data).__name__}",
        )
    if not isinstance(data, Mapping):
        raise InvalidPayloadError("data", data, "must be a mapping or a payload model")
    return dict(data)


def payload_to_data(payload: AuditPayload) -> dict[str, Any]:
    """The JSON-ready dict stored for ``payload``.

    Decimals stay :class:`~decimal.Decimal` (written as exact JSON numbers), UUIDs
    and datetimes become strings as the original module stored them.
    """
    out: dict[str, Any] = payload.model_dump(mode="python")
    for name, value in out.items():
        if isinstance(value, (UUID, datetime)):
            out[name] = value.isoformat() if isinstance(value, datetime) else str(value)
    return out
