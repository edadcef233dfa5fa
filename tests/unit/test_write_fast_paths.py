"""The hot paths of a write: exact JSON text, UUIDv7 ids, batch preparation."""

from __future__ import annotations

import enum
import json
import uuid
from decimal import Decimal
from typing import Any

import pytest

from audit_orm import InvalidInputError, InvalidPayloadError
from audit_orm.ids import uuid7
from audit_orm.jsonb import JSONText, dumps_exact, loads_exact
from audit_orm.repository import prepare_batch, prepare_event


class Side(enum.IntEnum):
    BUY = 1


class Label(str):
    pass


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, "null"),
        (True, "true"),
        (False, "false"),
        ('é"\n', '"é\\"\\n"'),
        (Label("x"), '"x"'),
        (7, "7"),
        (Side.BUY, "1"),
        (Decimal("150.250"), "150.250"),
        (Decimal("1E+400"), "1E+400"),
        (1.5, "1.5"),
        (
            {"a": [1, {"b": Decimal("2.50")}], "c": ("x", None)},
            '{"a":[1,{"b":2.50}],"c":["x",null]}',
        ),
        ({Label("k"): 1}, '{"k":1}'),
    ],
)
def test_dumps_exact(value: Any, text: str) -> None:
    assert dumps_exact(value) == text
    assert loads_exact(text) == json.loads(text, parse_float=Decimal)


@pytest.mark.parametrize(
    "value", [Decimal("NaN"), Decimal("sNaN"), float("inf"), {1: 2}, object(), [Decimal("-Inf")]]
)
def test_dumps_exact_refuses_what_json_cannot_hold(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        dumps_exact(value)


def test_prepared_event_keeps_its_json_text() -> None:
    event = prepare_event(
        "order.filled",
        "order",
        uuid.uuid4(),
        {"ticker": "X", "side": "buy", "fill_quantity": "1.50", "broker_order_id": "b"},
    )
    assert event.data_json == dumps_exact(event.data)
    assert event.json_text() == event.data_json
    assert type(event.row()["data"]) is JSONText


def test_uuid7_ids_increase_and_carry_version_and_variant() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)


def test_prepare_batch_names_the_position_of_a_bad_event() -> None:
    good = {
        "event_type": "approval.expired",
        "entity_type": "approval",
        "entity_id": uuid.uuid4(),
        "data": {"ticker": "X"},
    }
    bad = {**good, "data": {"ticker": "X", "colour": "red"}}
    with pytest.raises(InvalidPayloadError) as caught:
        prepare_batch([good, good, bad])  # type: ignore[list-item]
    assert caught.value.field == "events[2].data.colour"
    assert caught.value.value == "red"


def test_prepare_batch_refuses_a_single_mapping() -> None:
    with pytest.raises(InvalidInputError) as caught:
        prepare_batch({"event_type": "approval.expired"})  # type: ignore[dict-item]
    assert caught.value.field == "events"


@pytest.mark.parametrize(
    "value",
    [
        {"price": Decimal("150.250"), "qty": Decimal("1E+400"), "side": "买", "n": 3},
        {"a": 1.5, "b": True, "c": None, "d": ["x", '"q"'], "e": Decimal("-0.000")},
        {"nul": "\x000", "num": Decimal("2.50")},
        {"nul": "\x00", "plain": 1},
        {"nested": {"a": Decimal("1.0")}, "list": [Decimal("1.10")]},
        {"enum": Side.BUY, "label": Label("k")},
        {},
    ],
)
def test_flat_fast_path_matches_the_general_encoder(value: dict[str, Any]) -> None:
    from audit_orm.jsonb import _dumps_any

    assert dumps_exact(value) == _dumps_any(value)
    assert loads_exact(dumps_exact(value)) == loads_exact(_dumps_any(value))
