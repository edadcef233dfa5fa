"""Hypothesis strategies: any valid payload of any event type, and exactness checks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from audit_orm import AuditEventType
from audit_orm.jsonb import dumps_exact
from audit_orm.payloads import AMOUNT_MAX_DIGITS, COUNT_MAX

E = AuditEventType

#: Any Unicode scalar except NUL (astral planes included); surrogates are not text.
free_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40
)
#: Text for symbols and labels: no control, format (bidi, zero-width) or
#: line-separator characters, which they refuse.
_printable = st.characters(exclude_categories=("Cs", "Cc", "Cf", "Zl", "Zp"))
labels = st.text(_printable, min_size=1, max_size=64)
tickers = st.text(_printable, min_size=1, max_size=32)


@st.composite
def amounts(draw: st.DrawFn) -> Decimal:
    """Finite decimals: any sign, trailing zeros, tiny and huge exponents."""
    digits = draw(st.lists(st.integers(0, 9), min_size=1, max_size=40))
    extreme = draw(st.booleans())
    if extreme:
        exponent = draw(st.sampled_from([-AMOUNT_MAX_DIGITS, AMOUNT_MAX_DIGITS - len(digits)]))
    else:
        exponent = draw(st.integers(-40, 40))
    # Negative zero included: the payload validators, not the strategy, must
    # turn it into the zero PostgreSQL reads back.
    return Decimal((draw(st.integers(0, 1)), tuple(digits), exponent))


scores = st.floats(allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=COUNT_MAX)
#: Aware times that exist in UTC too (a day from either end of datetime's range).
aware = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.sampled_from(
        [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]
    ),
)
maybe_uuid = st.none() | st.uuids().map(str)

_recommendation = st.fixed_dictionaries(
    {
        "ticker": tickers,
        "action": labels,
        "mode": labels,
        "confidence": scores,
        "evidence_count": counts,
        "suppressed": st.booleans(),
    }
)
_risk = st.fixed_dictionaries(
    {
        "recommendation_id": maybe_uuid,
        "ticker": tickers,
        "eligible": st.booleans(),
        "allowed_mode": labels,
        "rejection_reasons": st.lists(free_text, max_size=4),
        "check_count": counts,
    }
)
_position = st.fixed_dictionaries(
    {
        "ticker": tickers,
        "side": labels,
        "quantity_before": amounts(),
        "quantity_after": amounts(),
        "avg_entry_before": amounts(),
        "avg_entry_after": amounts(),
    }
)
_reviewed = st.fixed_dictionaries(
    {"ticker": tickers, "approved": st.booleans(), "reviewed_by": free_text.filter(bool)},
    optional={"review_note": free_text},
)

PAYLOADS: dict[AuditEventType, st.SearchStrategy[dict[str, Any]]] = {
    E.RECOMMENDATION_GENERATED: _recommendation,
    E.RECOMMENDATION_SUPPRESSED: _recommendation,
    E.RISK_EVALUATED: _risk,
    E.RISK_REJECTED: _risk,
    E.ORDER_SUBMITTED: st.fixed_dictionaries(
        {
            "ticker": tickers,
            "side": labels,
            "quantity": amounts(),
            "order_type": labels,
            "idempotency_key": free_text,
        },
        optional={"recommendation_id": maybe_uuid, "evaluation_id": maybe_uuid},
    ),
    E.ORDER_ACCEPTED: st.fixed_dictionaries(
        {"ticker": tickers, "broker_order_id": free_text}, optional={"status": labels}
    ),
    E.ORDER_FILLED: st.fixed_dictionaries(
        {
            "ticker": tickers,
            "side": labels,
            "fill_quantity": amounts(),
            "fill_price": st.none() | amounts(),
            "broker_order_id": free_text,
        }
    ),
    E.ORDER_REJECTED: st.fixed_dictionaries(
        {"ticker": tickers, "reason": free_text}, optional={"rejection_source": labels}
    ),
    E.ORDER_CANCELLED: st.fixed_dictionaries({"ticker": tickers, "broker_order_id": free_text}),
    E.ORDER_DUPLICATE: st.fixed_dictionaries(
        {"ticker": tickers, "idempotency_key": free_text, "detected_via": labels}
    ),
    E.POSITION_OPENED: _position,
    E.POSITION_CLOSED: _position,
    E.POSITION_UPDATED: _position,
    E.TRADING_MODE_CHANGED: st.fixed_dictionaries({"old_mode": labels, "new_mode": labels}),
    E.APPROVAL_REQUESTED: st.fixed_dictionaries(
        {
            "ticker": tickers,
            "side": labels,
            "quantity": amounts(),
            "estimated_value": amounts(),
        },
        optional={"recommendation_id": maybe_uuid, "expires_at": st.none() | aware},
    ),
    E.APPROVAL_APPROVED: _reviewed,
    E.APPROVAL_REJECTED: _reviewed,
    E.APPROVAL_EXPIRED: st.fixed_dictionaries({"ticker": tickers}),
}
assert set(PAYLOADS) == set(AuditEventType)

#: An event type and a valid payload for it.
events = st.sampled_from(sorted(AuditEventType)).flatmap(
    lambda kind: st.tuples(st.just(kind), PAYLOADS[kind])
)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal) and value.as_tuple().exponent > 0:  # type: ignore[operator]
        # PostgreSQL writes 1.5E+3 out as 1500: the same number, the same (zero) scale.
        return Decimal(int(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def exact_text(data: dict[str, Any]) -> str:
    """JSON text of stored data in which numbers keep every digit and their scale."""
    return dumps_exact(_plain(data))
