"""Payload validation at its edges: the cases a changed validator would get wrong unnoticed.

Each test pins one rule of ``audit_orm.payloads`` exactly at the point where it
turns, from both sides, with raw inputs given straight to the validator (no test
strategy normalises them first), so a mutation of the rule fails a test.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import ValidationError

from audit_orm import AuditEventType, InvalidPayloadError, UnknownEventTypeError, validate_payload
from audit_orm.jsonb import dumps_exact
from audit_orm.payloads import (
    AMOUNT_MAX_DIGITS,
    PAYLOAD_MODELS,
    OrderFilledPayload,
    _describe,
    _finite,
    _finite_float,
    _no_control,
    _no_nul,
    coerce_event_type,
    payload_to_data,
)

FILL: dict[str, Any] = {
    "ticker": "AAPL",
    "side": "buy",
    "fill_quantity": "10",
    "fill_price": "150.25",
    "broker_order_id": "B-1",
}
REC = uuid.UUID("0190f0c4-0000-7000-8000-0000000000a1")


def _fill(**changes: Any) -> OrderFilledPayload:
    payload = validate_payload("order.filled", {**FILL, **changes})
    assert isinstance(payload, OrderFilledPayload)
    return payload


def _refused(field: str, **changes: Any) -> InvalidPayloadError:
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("order.filled", {**FILL, **changes})
    assert info.value.field == f"data.{field}"
    return info.value


# ------------------------------------------------------------------ negative zero


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (Decimal("-0"), "0"),
        (Decimal("-0.00"), "0.00"),
        (Decimal("-0E+3"), "0E+3"),
        (Decimal("-0E-5"), "0.00000"),
        ("-0", "0"),
        ("-0.000", "0.000"),
        (-0.0, "0.0"),
    ],
)
def test_negative_zero_is_stored_as_zero_with_its_scale(given: Any, stored: str) -> None:
    """A raw negative zero (Decimal, text or float) becomes an unsigned zero, never null.

    PostgreSQL's numeric has no negative zero; the validator must store what the
    database reads back, keeping the scale, and must not drop the value.
    """
    payload = _fill(fill_price=given, fill_quantity=given)
    for value in (payload.fill_price, payload.fill_quantity):
        assert isinstance(value, Decimal)
        assert value.is_zero()
        assert not value.is_signed()
        assert str(value) == stored
    text = dumps_exact(payload_to_data(payload))
    assert "-0" not in text
    assert "null" not in text


@pytest.mark.parametrize(
    "given", [Decimal("-10"), Decimal("-0.5"), Decimal("0.5"), Decimal("0"), Decimal("0.00")]
)
def test_other_numbers_keep_their_sign_and_digits(given: Decimal) -> None:
    """Only a negative zero is touched: other values, zero included, are stored as given."""
    payload = _fill(fill_price=given)
    assert payload.fill_price is not None
    assert str(payload.fill_price) == str(given)
    assert payload.fill_price.is_signed() == given.is_signed()


def test_negative_zero_in_every_amount_field() -> None:
    """Position amounts, approval amounts and submitted quantities are normalised too."""
    position = validate_payload(
        "position.closed",
        {
            "ticker": "AAPL",
            "side": "sell",
            "quantity_before": Decimal("-0"),
            "quantity_after": Decimal("-0.0"),
            "avg_entry_before": -0.0,
            "avg_entry_after": "-0",
        },
    )
    approval = validate_payload(
        "approval.requested",
        {"ticker": "AAPL", "side": "buy", "quantity": "-0", "estimated_value": Decimal("-0.00")},
    )
    for payload in (position, approval):
        for value in payload_to_data(payload).values():
            if isinstance(value, Decimal):
                assert value.is_zero() and not value.is_signed()


# ------------------------------------------------------------- the 1000-digit bound


def test_the_bound_is_1000_digits() -> None:
    """The documented bound: 1000 digits on either side of the decimal point."""
    assert AMOUNT_MAX_DIGITS == 1000


@pytest.mark.parametrize(
    "amount",
    [
        Decimal("9" * 1000),  # 1000 digits before the point
        Decimal("-" + "9" * 1000),
        Decimal("1E+999"),  # the same magnitude written with an exponent
        Decimal("0." + "0" * 999 + "1"),  # 1000 digits after the point
        Decimal("1E-1000"),
        Decimal("1." + "0" * 1000),  # trailing zeros count as digits too
        Decimal("9" * 1000 + "." + "9" * 1000),  # both sides at the bound at once
    ],
    ids=["int-1000", "neg-int-1000", "1E+999", "frac-1000", "1E-1000", "zeros-1000", "both"],
)
def test_amounts_at_the_bound_are_accepted_exactly(amount: Decimal) -> None:
    """Exactly 1000 digits on a side is allowed and stored digit for digit."""
    payload = _fill(fill_price=amount)
    assert payload.fill_price == amount
    assert str(payload.fill_price) == str(amount)


@pytest.mark.parametrize(
    "amount",
    [
        Decimal("1" + "0" * 1000),  # 1001 digits before the point
        Decimal("-" + "9" * 1001),
        Decimal("1E+1000"),
        Decimal("0." + "0" * 1000 + "1"),  # 1001 digits after the point
        Decimal("1E-1001"),
        Decimal("1." + "0" * 1001),
        "1E+100000",
    ],
    ids=["int-1001", "neg-int-1001", "1E+1000", "frac-1001", "1E-1001", "zeros-1001", "huge"],
)
def test_amounts_past_the_bound_are_refused(amount: Decimal | str) -> None:
    """One digit more on either side is refused with the field named and the bound stated."""
    error = _refused("fill_price", fill_price=amount)
    assert "at most 1000 digits before and after the decimal point" in str(error)


# ----------------------------------------------------------- mappings other than dict


class _Payload(Mapping[str, Any]):
    """A read-only mapping that is not a dict."""

    def __init__(self, items: dict[str, Any]) -> None:
        self._items = items

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class _Name(str):
    """A str subclass used as a key."""


@pytest.mark.parametrize(
    "data",
    [
        MappingProxyType(dict(FILL)),
        _Payload(dict(FILL)),
        OrderedDict(FILL),
        {_Name(key): value for key, value in FILL.items()},
    ],
    ids=["mappingproxy", "custom-mapping", "dict-subclass", "str-subclass-keys"],
)
def test_any_mapping_is_a_payload(data: Mapping[str, Any]) -> None:
    """The documented input is any mapping: each gives the same payload as a plain dict."""
    assert validate_payload("order.filled", data) == validate_payload("order.filled", FILL)


@pytest.mark.parametrize(
    "data",
    [
        MappingProxyType({**FILL, "extra": 1}),
        _Payload({**FILL, "fill_price": "NaN"}),
        OrderedDict({**FILL, "ticker": ""}),
    ],
    ids=["mappingproxy", "custom-mapping", "dict-subclass"],
)
def test_a_mapping_is_validated_like_a_dict(data: Mapping[str, Any]) -> None:
    """A non-dict mapping does not bypass validation."""
    with pytest.raises(InvalidPayloadError):
        validate_payload("order.filled", data)


@pytest.mark.parametrize(
    "data",
    [
        {**FILL, 1: "x"},
        MappingProxyType({**FILL, b"side": "x"}),
        _Payload({**FILL, None: 1}),  # type: ignore[dict-item]
    ],
    ids=["dict", "mappingproxy", "custom-mapping"],
)
def test_field_names_must_be_strings(data: Mapping[Any, Any]) -> None:
    """A key that is not a string is refused as such, whatever the mapping."""
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("order.filled", data)
    assert info.value.field == "data"
    assert info.value.reason == "field names must be strings"


@pytest.mark.parametrize(
    "data", [None, 5, "ticker", ["ticker", "AAPL"], [("ticker", "AAPL")], {"ticker"}, b"{}"]
)
def test_non_mappings_are_refused(data: Any) -> None:
    """Anything that is neither a mapping nor a payload model is refused by name."""
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("order.filled", data)
    assert info.value.field == "data"
    assert info.value.reason == "must be a mapping or a payload model"
    assert info.value.value == data


def test_a_payload_model_passes_validated_again() -> None:
    """The event type's own model passes, validated again: an equal model comes back.

    Validated again because ``model_construct`` and ``model_copy(update=...)``
    build models no validator has seen (a NaN, a missing field).
    """
    payload = _fill()
    assert validate_payload("order.filled", payload) == payload
    assert validate_payload(AuditEventType.ORDER_FILLED, payload) == payload
    unchecked = payload.model_copy(update={"fill_quantity": Decimal("NaN")})
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("order.filled", unchecked)
    assert info.value.field == "data.fill_quantity"


def test_another_event_types_model_is_refused_by_name() -> None:
    """A model of another event type names both models."""
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("order.cancelled", _fill())
    assert info.value.field == "data"
    assert info.value.value == "OrderFilledPayload"
    assert (
        info.value.reason == "order.cancelled takes OrderCancelledPayload, not OrderFilledPayload"
    )


def test_event_types_sharing_a_model_take_each_others_payloads() -> None:
    """recommendation.generated and .suppressed share one model: no refusal between them."""
    data = {"ticker": "AAPL", "action": "buy", "mode": "paper", "confidence": 0.5}
    generated = validate_payload("recommendation.generated", {**data, "evidence_count": 1})
    assert validate_payload("recommendation.suppressed", generated) == generated


# ------------------------------------------------------------------- event types


def test_event_types_are_accepted_as_enum_or_value() -> None:
    """Each event type is found by its enum member or its exact string value."""
    for kind in AuditEventType:
        assert coerce_event_type(kind) is kind
        assert coerce_event_type(kind.value) is kind


@pytest.mark.parametrize("value", ["order.Filled", "order.filled ", "", None, 5, b"order.filled"])
def test_unknown_event_types_list_the_known_ones(value: Any) -> None:
    """Anything else is an UnknownEventTypeError listing every event type."""
    with pytest.raises(UnknownEventTypeError) as info:
        coerce_event_type(value)
    assert info.value.field == "event_type"
    assert info.value.value == value
    assert info.value.reason == "must be one of " + ", ".join(t.value for t in AuditEventType)


# -------------------------------------------------------------- error descriptions


def test_one_problem_is_described_without_a_count() -> None:
    """The first problem is named with its field and value; no count when it is the only one."""
    error = _refused("fill_quantity", fill_quantity="ten")
    assert error.value == "ten"
    assert error.reason.endswith("for order.filled")
    assert "more problem" not in error.reason


def test_unknown_and_missing_fields_have_plain_messages() -> None:
    """Unknown fields and missing fields say so in words, not pydantic's codes."""
    error = _refused("extra", extra=1)
    assert error.reason == "unknown field for order.filled"
    assert error.value == 1
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("order.filled", {k: v for k, v in FILL.items() if k != "side"})
    assert info.value.field == "data.side"
    assert info.value.reason == "required field is missing for order.filled"


def test_further_problems_are_counted() -> None:
    """More than one problem: the first is named, the rest counted (singular and plural)."""
    two = _refused("ticker", ticker="", side="")
    assert two.reason.endswith("for order.filled (and 1 more problem)")
    three = _refused("ticker", ticker="", side="", fill_quantity="x")
    assert three.reason.endswith("for order.filled (and 2 more problems)")


def test_a_nested_problem_names_its_path() -> None:
    """A problem inside a list is located by its dotted path."""
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload(
            "risk.evaluated",
            {
                "ticker": "AAPL",
                "eligible": False,
                "allowed_mode": "paper",
                "check_count": 1,
                "rejection_reasons": ["ok", "bad\x00"],
            },
        )
    assert info.value.field == "data.rejection_reasons.1"
    assert "NUL characters cannot be stored in PostgreSQL text or JSONB" in info.value.reason


# ------------------------------------------------------------------ text and labels


@pytest.mark.parametrize("char", ["\x00", "\x01", "\x1f", "\x7f", "\x80", "\x9f"])
def test_control_characters_are_refused_in_labels_and_tickers(char: str) -> None:
    """C0, DEL and C1 controls, first and last of each range, are refused in symbols."""
    ticker = _refused("ticker", ticker=f"AA{char}PL")
    side = _refused("side", side=f"b{char}")
    if char == "\x00":
        assert "NUL characters" in ticker.reason
    else:
        assert "not allowed in a symbol or label" in ticker.reason
        assert "not allowed in a symbol or label" in side.reason


@pytest.mark.parametrize("char", [" ", "~", "\xa0", "é", "€"])
def test_characters_next_to_the_control_ranges_are_allowed(char: str) -> None:
    """Space, tilde, NBSP and the rest of Unicode stay allowed in symbols, kept as given."""
    payload = _fill(ticker=f"{char}AAPL{char}", side=f"buy{char}")
    assert payload.ticker == f"{char}AAPL{char}"
    assert payload.side == f"buy{char}"


def test_free_text_takes_controls_but_not_nul() -> None:
    """Free text (reasons, ids, notes) keeps tabs and newlines; only NUL is refused."""
    payload = _fill(broker_order_id="B\t1\n\x1f\x7f")
    assert payload.broker_order_id == "B\t1\n\x1f\x7f"
    error = _refused("broker_order_id", broker_order_id="B\x001")
    assert "NUL characters cannot be stored" in error.reason


@pytest.mark.parametrize(
    ("field", "limit"), [("ticker", 32), ("side", 64)], ids=["ticker", "label"]
)
def test_symbol_and_label_lengths_at_their_limits(field: str, limit: int) -> None:
    """One character and the limit are accepted; empty and one past the limit are refused."""
    assert getattr(_fill(**{field: "x"}), field) == "x"
    assert getattr(_fill(**{field: "x" * limit}), field) == "x" * limit
    _refused(field, **{field: ""})
    _refused(field, **{field: "x" * (limit + 1)})


# ------------------------------------------------------------------ other fields


def test_counts_are_zero_or_more() -> None:
    """evidence_count and check_count: 0 is accepted, -1 refused."""
    rec = {"ticker": "AAPL", "action": "buy", "mode": "paper", "confidence": 0.5}
    assert validate_payload("recommendation.generated", {**rec, "evidence_count": 0})
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("recommendation.generated", {**rec, "evidence_count": -1})
    assert info.value.field == "data.evidence_count"
    risk = {"ticker": "AAPL", "eligible": True, "allowed_mode": "paper"}
    assert validate_payload("risk.evaluated", {**risk, "check_count": 0})
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("risk.evaluated", {**risk, "check_count": -1})
    assert info.value.field == "data.check_count"


@pytest.mark.parametrize("score", [float("nan"), float("inf"), float("-inf"), "NaN", "inf"])
def test_scores_must_be_finite(score: Any) -> None:
    """A confidence that JSON cannot hold is refused."""
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload(
            "recommendation.generated",
            {"ticker": "A", "action": "b", "mode": "m", "confidence": score, "evidence_count": 0},
        )
    assert info.value.field == "data.confidence"


@pytest.mark.parametrize("score", [0.0, -0.0, 1e308, -1e-308, 5e-324])
def test_finite_scores_are_kept(score: float) -> None:
    """Every finite float is a valid score, kept as given."""
    payload = validate_payload(
        "recommendation.generated",
        {"ticker": "A", "action": "b", "mode": "m", "confidence": score, "evidence_count": 0},
    )
    assert payload_to_data(payload)["confidence"] == score


#: The smallest valid payload of each model, and every field it stores (defaults filled in).
MINIMAL: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "recommendation.generated",
        {"ticker": "A", "action": "buy", "mode": "paper", "confidence": 1, "evidence_count": 0},
        {"suppressed": False},
    ),
    (
        "risk.evaluated",
        {"ticker": "A", "eligible": True, "allowed_mode": "paper", "check_count": 0},
        {"recommendation_id": None, "rejection_reasons": []},
    ),
    (
        "order.submitted",
        {
            "ticker": "A",
            "side": "buy",
            "quantity": 1,
            "order_type": "market",
            "idempotency_key": "",
        },
        {"recommendation_id": None, "evaluation_id": None},
    ),
    ("order.accepted", {"ticker": "A", "broker_order_id": "B"}, {"status": None}),
    (
        "order.filled",
        {"ticker": "A", "side": "buy", "fill_quantity": 1, "broker_order_id": "B"},
        {"fill_price": None},
    ),
    ("order.rejected", {"ticker": "A", "reason": ""}, {"rejection_source": "broker"}),
    ("order.cancelled", {"ticker": "A", "broker_order_id": "B"}, {}),
    (
        "order.duplicate_prevented",
        {"ticker": "A", "idempotency_key": "k", "detected_via": "db"},
        {},
    ),
    (
        "position.updated",
        {
            "ticker": "A",
            "side": "buy",
            "quantity_before": 1,
            "quantity_after": 2,
            "avg_entry_before": 1,
            "avg_entry_after": 1,
        },
        {},
    ),
    (
        "approval.requested",
        {"ticker": "A", "side": "buy", "quantity": 1, "estimated_value": 1},
        {"recommendation_id": None, "expires_at": None},
    ),
    (
        "approval.approved",
        {"ticker": "A", "approved": True, "reviewed_by": "op"},
        {"review_note": ""},
    ),
    ("approval.expired", {"ticker": "A"}, {}),
    ("trading.mode_changed", {"old_mode": "paper", "new_mode": "live"}, {}),
]


def test_every_model_is_in_the_minimal_table() -> None:
    """The table below covers one event type of every payload model."""
    assert {PAYLOAD_MODELS[AuditEventType(kind)] for kind, _, _ in MINIMAL} == set(
        PAYLOAD_MODELS.values()
    )


@pytest.mark.parametrize(("kind", "given", "defaults"), MINIMAL, ids=[row[0] for row in MINIMAL])
def test_defaults_are_stored_as_documented(
    kind: str, given: dict[str, Any], defaults: dict[str, Any]
) -> None:
    """Optional fields left out are stored with their documented defaults, nothing else added."""
    data = payload_to_data(validate_payload(kind, given))
    assert set(data) == set(given) | set(defaults)
    for name, value in defaults.items():
        assert data[name] == value
        assert type(data[name]) is type(value)


def test_payloads_are_frozen_and_keep_text_as_given() -> None:
    """A validated payload cannot be changed afterwards; text is never trimmed."""
    payload = _fill(broker_order_id="  B-1  ", ticker=" AAPL")
    assert payload.broker_order_id == "  B-1  "
    assert payload.ticker == " AAPL"
    with pytest.raises(ValidationError):
        payload.ticker = "MSFT"  # type: ignore[misc]


def test_stored_data_turns_ids_and_times_into_text() -> None:
    """UUIDs and datetimes become strings as the original module stored them; amounts stay exact."""
    expires = datetime(2026, 12, 6, 18, 0, 0, 5, tzinfo=timezone(timedelta(hours=1)))
    data = payload_to_data(
        validate_payload(
            "approval.requested",
            {
                "ticker": "A",
                "side": "buy",
                "quantity": "1.50",
                "estimated_value": 3,
                "recommendation_id": str(REC).upper(),
                "expires_at": expires,
            },
        )
    )
    assert data == {
        "ticker": "A",
        "side": "buy",
        "quantity": Decimal("1.50"),
        "estimated_value": Decimal(3),
        "recommendation_id": str(REC),
        "expires_at": "2026-12-06T18:00:00.000005+01:00",
    }
    assert type(data["quantity"]) is Decimal


def test_naive_and_aware_datetimes() -> None:
    """A naive expiry is refused; an aware one in UTC is kept with its offset."""
    base = {"ticker": "A", "side": "buy", "quantity": 1, "estimated_value": 1}
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("approval.requested", {**base, "expires_at": datetime(2026, 1, 1)})
    assert info.value.field == "data.expires_at"
    aware = validate_payload(
        "approval.requested", {**base, "expires_at": datetime(2026, 1, 1, tzinfo=UTC)}
    )
    assert payload_to_data(aware)["expires_at"] == "2026-01-01T00:00:00+00:00"


# ---------------------------------------------------------------- defence in depth


@pytest.mark.parametrize("value", [Decimal("NaN"), Decimal("sNaN"), Decimal("-Infinity")])
def test_the_amount_validator_refuses_non_finite_numbers_itself(value: Decimal) -> None:
    """pydantic refuses NaN first (allow_inf_nan=False); the validator does too, on its own.

    So turning that model option off, or a pydantic that lets a non-finite Decimal
    through, still cannot put a number JSON cannot hold into a payload.
    """
    with pytest.raises(ValueError, match=r"^must be a finite number$"):
        _finite(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_score_validator_refuses_non_finite_numbers_itself(value: float) -> None:
    """As for amounts: the score validator does not rely on the model option alone."""
    with pytest.raises(ValueError, match=r"^must be a finite number$"):
        _finite_float(value)


def test_validator_messages_are_exact() -> None:
    """The reasons a caller reads are the validators' words, whole."""
    nul = _refused("broker_order_id", broker_order_id="B\x00")
    assert nul.reason == (
        "Value error, NUL characters cannot be stored in PostgreSQL text or JSONB for order.filled"
    )
    digits = _refused("fill_price", fill_price=Decimal("1E+1000"))
    assert digits.reason == (
        "Value error, must have at most 1000 digits before and after the decimal point "
        "for order.filled"
    )
    control = _refused("side", side="b\x01")
    assert control.reason.startswith("Value error, control characters ")
    assert control.reason.endswith(" are not allowed in a symbol or label for order.filled")


def test_a_key_that_is_not_a_string_is_named_in_the_error() -> None:
    """The refused key is the error's value, so the caller sees which one it was."""
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("order.filled", {**FILL, 7: "x"})
    assert info.value.value == 7


def test_a_problem_with_the_whole_payload_is_about_data() -> None:
    """A problem located nowhere inside the payload is reported as ``data`` itself."""
    with pytest.raises(ValidationError) as raised:
        OrderFilledPayload.model_validate("not a mapping")
    error = _describe(raised.value, AuditEventType.ORDER_FILLED)
    # Unreachable through validate_payload (it hands pydantic a dict), hence the
    # doubled name the fallback gives; what matters is that it names the payload.
    assert error.field in {"data", "data.data"}
    assert error.value == "not a mapping"


# ----------------------------------------------------- surrogates and times in UTC


@pytest.mark.parametrize("code", [0xD800, 0xDBFF, 0xDC00, 0xDFFF], ids=hex)
def test_lone_surrogates_are_refused_in_text_and_labels(code: int) -> None:
    """Both ends of the surrogate range are refused in free text and in a label.

    pydantic refuses them first (it cannot read them as a string); the text
    validator refuses them on its own too, with its own reason.
    """
    char = chr(code)
    _refused("broker_order_id", broker_order_id=f"B{char}")
    _refused("side", side=f"b{char}")
    with pytest.raises(
        ValueError, match=r"^lone surrogates are not Unicode text and cannot be stored$"
    ):
        _no_nul(f"B{char}")
    with pytest.raises(
        ValueError, match=r"^lone surrogates are not Unicode text and cannot be stored$"
    ):
        _no_control(f"b{char}")


@pytest.mark.parametrize("char", ["\ud7ff", "\ue000", "\U0001f6ab"])
def test_characters_next_to_the_surrogates_are_text(char: str) -> None:
    """The code points just outside the surrogate range, and a real astral character, pass."""
    assert _fill(broker_order_id=f"B{char}").broker_order_id == f"B{char}"


PLUS_14 = timezone(timedelta(hours=14))
MINUS_14 = timezone(timedelta(hours=-14))


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1, 1, 1, 13, 59, tzinfo=PLUS_14),
        datetime.max.replace(tzinfo=MINUS_14),
        datetime(9999, 12, 31, 10, 0, tzinfo=MINUS_14),
    ],
    ids=["year-1-at-plus-14", "max-at-minus-14", "last-day-at-minus-14"],
)
def test_times_that_do_not_exist_in_utc_are_refused(moment: datetime) -> None:
    """An aware time whose UTC instant falls outside years 1-9999 is bad input, named."""
    base = {"ticker": "A", "side": "buy", "quantity": 1, "estimated_value": 1}
    with pytest.raises(InvalidPayloadError) as info:
        validate_payload("approval.requested", {**base, "expires_at": moment})
    assert info.value.field == "data.expires_at"
    assert info.value.reason == (
        "Value error, is out of range once converted to UTC for approval.requested"
    )


@pytest.mark.parametrize(
    "moment",
    [
        datetime(1, 1, 1, 14, 0, tzinfo=PLUS_14),
        datetime(9999, 12, 31, 9, 59, 59, 999999, tzinfo=MINUS_14),
    ],
    ids=["first-instant", "last-instant"],
)
def test_the_first_and_last_instants_in_utc_are_accepted(moment: datetime) -> None:
    """Exactly 0001-01-01T00:00Z and 9999-12-31T23:59:59.999999Z are kept as given."""
    base = {"ticker": "A", "side": "buy", "quantity": 1, "estimated_value": 1}
    data = payload_to_data(validate_payload("approval.requested", {**base, "expires_at": moment}))
    assert data["expires_at"] == moment.isoformat()


def test_times_are_checked_in_utc_not_the_machines_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine at UTC+14, times valid in UTC stay valid and invalid ones stay refused.

    The last hour of year 9999 in UTC does not exist in the machine's zone; it
    must be accepted all the same, and a time before year 1 in UTC refused.
    """
    monkeypatch.setenv("TZ", "Etc/GMT-14")
    time.tzset()
    try:
        base = {"ticker": "A", "side": "buy", "quantity": 1, "estimated_value": 1}
        late = datetime(9999, 12, 31, 23, 0, tzinfo=UTC)
        data = payload_to_data(validate_payload("approval.requested", {**base, "expires_at": late}))
        assert data["expires_at"] == late.isoformat()
        early = datetime(1, 1, 1, 13, 0, tzinfo=PLUS_14)
        with pytest.raises(InvalidPayloadError):
            validate_payload("approval.requested", {**base, "expires_at": early})
    finally:
        monkeypatch.undo()
        time.tzset()
