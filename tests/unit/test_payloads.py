"""Payload validation and exact JSON, without a database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from audit_orm import (
    PAYLOAD_MODELS,
    AuditError,
    AuditEventType,
    EntityType,
    InvalidIdError,
    InvalidInputError,
    InvalidPayloadError,
    UnknownEntityTypeError,
    UnknownEventTypeError,
    validate_payload,
)
from audit_orm.ids import uuid7
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.payloads import OrderFilledPayload, payload_to_data
from audit_orm.repository import prepare_event

SEED_EVENT_TYPES = {
    "recommendation.generated",
    "recommendation.suppressed",
    "risk.evaluated",
    "risk.rejected",
    "order.submitted",
    "order.accepted",
    "order.filled",
    "order.rejected",
    "order.cancelled",
    "order.duplicate_prevented",
    "position.opened",
    "position.closed",
    "position.updated",
    "trading.mode_changed",
    "approval.requested",
    "approval.approved",
    "approval.rejected",
    "approval.expired",
}

FILL = {
    "ticker": "AAPL",
    "side": "buy",
    "fill_quantity": 10,
    "fill_price": "150.25",
    "broker_order_id": "B-1",
}


def test_event_types_are_the_seed_strings() -> None:
    assert {t.value for t in AuditEventType} == SEED_EVENT_TYPES
    assert set(PAYLOAD_MODELS) == set(AuditEventType)
    assert {t.value for t in EntityType} == {
        "recommendation",
        "risk_evaluation",
        "order",
        "position",
        "approval",
        "risk_config",
    }


def test_floats_become_exact_decimals() -> None:
    payload = validate_payload("order.filled", {**FILL, "fill_price": 0.1})
    assert isinstance(payload, OrderFilledPayload)
    assert payload.fill_price == Decimal("0.1")
    assert payload.fill_quantity == Decimal(10)


def test_decimal_json_round_trip_is_exact() -> None:
    data = payload_to_data(validate_payload("order.filled", {**FILL, "fill_price": "150.250"}))
    text = dumps_exact(data)
    assert '"fill_price":150.250' in text
    back = loads_exact(text)
    assert back["fill_price"] == Decimal("150.250")
    assert str(back["fill_price"]) == "150.250"


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**FILL, "extra": 1}, "data.extra"),
        ({k: v for k, v in FILL.items() if k != "side"}, "data.side"),
        ({**FILL, "fill_price": "NaN"}, "data.fill_price"),
        ({**FILL, "fill_price": float("inf")}, "data.fill_price"),
        ({**FILL, "fill_quantity": "Infinity"}, "data.fill_quantity"),
        ({**FILL, "broker_order_id": "B\x00"}, "data.broker_order_id"),
        ({**FILL, "ticker": ""}, "data.ticker"),
        ({**FILL, "fill_quantity": "ten"}, "data.fill_quantity"),
    ],
)
def test_bad_payloads_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload(AuditEventType.ORDER_FILLED, data)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, AuditError)


def test_naive_datetime_refused() -> None:
    data = {
        "ticker": "AAPL",
        "side": "buy",
        "quantity": 1,
        "estimated_value": 1,
        "expires_at": datetime(2026, 1, 1, 12, 0),
    }
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("approval.requested", data)
    assert info.value.field == "data.expires_at"
    aware = validate_payload(
        "approval.requested", {**data, "expires_at": datetime(2026, 1, 1, tzinfo=UTC)}
    )
    assert payload_to_data(aware)["expires_at"] == "2026-01-01T00:00:00+00:00"


def test_wrong_payload_model_refused() -> None:
    fill = validate_payload("order.filled", FILL)
    with pytest.raises(InvalidPayloadError, match="OrderCancelledPayload"):
        validate_payload("order.cancelled", fill)
    with pytest.raises(InvalidPayloadError):
        validate_payload("order.cancelled", ["not", "a", "mapping"])


def test_unknown_types_and_bad_ids() -> None:
    with pytest.raises(UnknownEventTypeError, match=r"order\.exploded"):
        validate_payload("order.exploded", {})
    with pytest.raises(UnknownEntityTypeError, match="portfolio"):
        prepare_event("order.filled", "portfolio", uuid.uuid4(), FILL)
    with pytest.raises(InvalidIdError, match="not-a-uuid"):
        prepare_event("order.filled", "order", "not-a-uuid", FILL)
    with pytest.raises(InvalidIdError):
        prepare_event("order.filled", "order", 42, FILL)


@pytest.mark.parametrize("actor", ["", "   ", "x" * 129, "bad\nactor", 7])
def test_bad_actor(actor: object) -> None:
    with pytest.raises(InvalidInputError) as info:
        prepare_event("order.filled", "order", uuid.uuid4(), FILL, actor=actor)  # type: ignore[arg-type]
    assert info.value.field == "actor"


def test_prepare_derives_correlation() -> None:
    order, rec = uuid.uuid4(), uuid.uuid4()
    submitted = prepare_event(
        "order.submitted",
        "order",
        str(order),
        {
            "ticker": "MSFT",
            "side": "buy",
            "quantity": 1,
            "order_type": "market",
            "idempotency_key": "k",
            "recommendation_id": str(rec),
        },
    )
    assert submitted.order_id == order
    assert submitted.recommendation_id == rec
    assert submitted.ticker == "MSFT"
    generated = prepare_event(
        "recommendation.generated",
        "recommendation",
        rec,
        {
            "ticker": "MSFT",
            "action": "buy",
            "mode": "paper",
            "confidence": 0.5,
            "evidence_count": 1,
        },
    )
    assert generated.recommendation_id == rec
    assert generated.order_id is None


def test_payload_cap() -> None:
    big = {"old_mode": "paper", "new_mode": "live"}
    prepare_event("trading.mode_changed", "risk_config", uuid.uuid4(), big, max_payload_bytes=100)
    with pytest.raises(InvalidPayloadError, match="cap"):
        prepare_event(
            "trading.mode_changed", "risk_config", uuid.uuid4(), big, max_payload_bytes=10
        )


def test_naive_occurred_at_refused() -> None:
    with pytest.raises(InvalidInputError) as info:
        prepare_event("order.filled", "order", uuid.uuid4(), FILL, occurred_at=datetime(2026, 1, 1))
    assert info.value.field == "occurred_at"
    with pytest.raises(InvalidInputError):
        prepare_event("order.filled", "order", uuid.uuid4(), FILL, occurred_at="yesterday")


def test_uuid7_is_time_ordered_and_unique() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert all(i.version == 7 for i in ids)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
