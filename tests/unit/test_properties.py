"""Property: any valid payload survives exact JSON unchanged, digit for digit."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from hypothesis import given, settings

from audit_orm import AuditEventType, validate_payload
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.payloads import payload_to_data
from tests.strategies import amounts, events, free_text


@settings(max_examples=300, deadline=None)
@given(events)
def test_any_valid_payload_round_trips_through_exact_json(
    event: tuple[AuditEventType, dict[str, Any]],
) -> None:
    kind, data = event
    payload = validate_payload(kind, data)
    text = dumps_exact(payload_to_data(payload))
    back = loads_exact(text)
    again = validate_payload(kind, back)
    assert again == payload
    assert dumps_exact(payload_to_data(again)) == text
    for key, value in data.items():
        if isinstance(value, Decimal):  # every digit and the scale, as given
            # ... but a negative zero becomes the zero PostgreSQL reads back.
            given = value.copy_abs() if value.is_zero() else value
            assert str(Decimal(back[key])) == str(given)
        elif isinstance(value, str):
            assert back[key] == value


@settings(max_examples=300, deadline=None)
@given(amounts())
def test_decimals_keep_every_digit_and_their_scale(value: Decimal) -> None:
    back = loads_exact(dumps_exact({"x": value}))["x"]
    assert back == value
    if value.is_zero():
        # JSON reads "-0" as the integer 0; the sign of a zero is the payload
        # validators' business (they drop it, as PostgreSQL stores none).
        assert str(Decimal(back)).lstrip("-") == str(value).lstrip("-")
    else:
        assert str(Decimal(back)) == str(value)


@settings(max_examples=300, deadline=None)
@given(free_text)
def test_text_survives_including_astral_characters(value: str) -> None:
    text = dumps_exact([value])
    assert loads_exact(text) == [value]
    assert loads_exact(text.encode("utf-8")) == [value]
