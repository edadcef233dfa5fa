"""Exact JSON (audit_orm.jsonb) at its edges: the exact text written and what is read back.

Payload text is hashed (as PostgreSQL prints it) and compared for idempotent
retries, so the encoder's output must be exactly one thing for one value; and
numbers must round-trip digit for digit. The flat-dict fast path and the general
encoder must agree on every input, including inputs crafted against the fast
path's place-holders.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from decimal import Decimal
from enum import IntEnum, StrEnum
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.dialects import postgresql

from audit_orm.jsonb import (
    ExactJSONB,
    JSONText,
    _c_encoder,
    _dumps_any,
    _dumps_flat,
    _number,
    _refuse,
    dumps_exact,
    loads_exact,
)
from audit_orm.models import AuditEvent


def _reference(value: Any) -> str:
    """The standard library's compact, non-ASCII-keeping JSON (for values without Decimals)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class _Side(StrEnum):
    BUY = "buy"


class _Count(IntEnum):
    THREE = 3


class _Money(Decimal):
    pass


class _Ratio(float):
    pass


class _Name(str):
    pass


# ------------------------------------------------------------------------ numbers


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("150.250"), "150.250"),
        (Decimal("-0.5"), "-0.5"),
        (Decimal("1E+3"), "1E+3"),
        (Decimal("1E-7"), "1E-7"),
        (Decimal("0"), "0"),
        (0.1, "0.1"),
        (1e300, "1e+300"),
        (-2.5, "-2.5"),
        (5e-324, "5e-324"),
    ],
)
def test_numbers_are_written_exactly(value: Decimal | float, text: str) -> None:
    """Decimals as their own digits, floats as their shortest repr: both valid JSON numbers."""
    assert _number(value) == text
    assert dumps_exact(value) == text
    assert dumps_exact({"n": value}) == '{"n":' + text + "}"
    assert dumps_exact({"n": [value]}) == '{"n":[' + text + "]}"


@pytest.mark.parametrize(
    "value",
    [
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        float("nan"),
        float("inf"),
        float("-inf"),
    ],
    ids=str,
)
def test_numbers_json_cannot_hold_are_refused_everywhere(value: Decimal | float) -> None:
    """NaN and infinities are refused with the number named, in every position and path."""
    message = f"^JSON cannot hold the number {value}$"
    with pytest.raises(ValueError, match=message):
        _number(value)
    for data in (value, {"n": value}, {"n": [value]}, [value], {"n": {"m": value}}):
        with pytest.raises(ValueError, match=message):
            dumps_exact(data)


# --------------------------------------------------------------- the flat fast path


def test_flat_dicts_take_the_fast_path_and_match_the_general_encoder() -> None:
    """Every scalar type a flat payload holds, in the caller's key order, compact."""
    value = {
        "z": "text",
        "a": 1,
        "t": True,
        "f": False,
        "n": None,
        "x": 0.5,
        "d": Decimal("1.50"),
        "l": ["p", "q"],
        "e": [],
    }
    text = '{"z":"text","a":1,"t":true,"f":false,"n":null,"x":0.5,"d":1.50,"l":["p","q"],"e":[]}'
    assert _dumps_flat(value) == text
    assert _dumps_any(value) == text
    assert dumps_exact(value) == text


def test_many_decimals_go_back_to_their_places() -> None:
    """Place-holders past the ninth (two-digit indices) are put back in order."""
    value = {f"k{i}": Decimal(f"{i}.{i}0") for i in range(25)}
    text = "{" + ",".join(f'"k{i}":{i}.{i}0' for i in range(25)) + "}"
    assert _dumps_flat(value) == text
    assert dumps_exact(value) == text
    assert loads_exact(text) == value


@pytest.mark.parametrize(
    "value",
    [
        {"a": "\x00", "d": Decimal("1.5")},  # a NUL string next to a Decimal
        {"a": "\x000", "d": Decimal("1.5")},  # a string that looks like a place-holder
        {"\x000": Decimal("2"), "d": Decimal("1.5")},  # ... as a key
        {"a": ["\x001"], "d": Decimal("1.5")},  # ... inside a list
        {"a": "\x00"},  # a NUL string and no Decimal at all
    ],
    ids=["nul", "marker-value", "marker-key", "marker-in-list", "nul-only"],
)
def test_strings_that_look_like_place_holders_are_kept(value: dict[str, Any]) -> None:
    """A caller's text can never be replaced by a number: the general encoder decides."""
    expected = _dumps_any(value)
    assert dumps_exact(value) == expected
    assert loads_exact(expected) == value
    if any(type(item) is Decimal for item in value.values()):
        assert _dumps_flat(value) is None


@pytest.mark.parametrize(
    "value",
    [
        {"a": {"b": 1}},
        {"a": [1, 2]},
        {"a": ("x",)},
        {"a": _Side.BUY},
        {1: "x"},
        {_Name("k"): "x"},
        {"a": _Money("1.5")},
    ],
    ids=["nested", "list-of-ints", "tuple", "str-enum", "int-key", "str-subclass-key", "sub"],
)
def test_other_dicts_leave_the_fast_path(value: dict[Any, Any]) -> None:
    """Nested containers, subclasses and odd keys are not flat: the general encoder decides."""
    assert _dumps_flat(value) is None


def test_the_c_encoder_is_compact_ordered_and_refuses_other_types() -> None:
    """The encoder built for the fast path writes what json.dumps would, and nothing else."""
    encode = _c_encoder()
    assert encode is not None
    value = {"b": 'é\n"\\\x01\x7f', "a": [1, None, True], "c": 1.5}
    assert encode(value) == _reference(value)
    assert encode(value) == '{"b":"é\\n\\"\\\\\\u0001\x7f","a":[1,null,true],"c":1.5}'
    with pytest.raises(TypeError, match=r"^set is not JSON-ready$"):
        encode({"a": {1}})
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        encode({"a": float("nan")})


def test_refuse_names_the_type() -> None:
    """The fast path's fallback for unknown types raises, naming the type."""
    with pytest.raises(TypeError, match=r"^object is not JSON-ready$"):
        _refuse(object())


# ----------------------------------------------------------- the general encoder


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("plain", '"plain"'),
        ("é€🚫", '"é€🚫"'),
        ('q"b\\', '"q\\"b\\\\"'),
        ("\n\t\r\b\f\x01\x1f", '"\\n\\t\\r\\b\\f\\u0001\\u001f"'),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (0, "0"),
        (-(10**30), "-" + "1" + "0" * 30),
        ([], "[]"),
        ({}, "{}"),
        ([1, "a", None, [True]], '[1,"a",null,[true]]'),
        (("a", 1), '["a",1]'),
        ({"b": {"a": [Decimal("1.0")]}}, '{"b":{"a":[1.0]}}'),
        (_Side.BUY, '"buy"'),
        (_Count.THREE, "3"),
        (_Money("2.50"), "2.50"),
        (_Ratio(0.25), "0.25"),
        (OrderedDict([("b", 1), ("a", 2)]), '{"b":1,"a":2}'),
        ({_Name("k"): _Name("v")}, '{"k":"v"}'),
        ({"n": {_Name("k"): 1}}, '{"n":{"k":1}}'),
    ],
)
def test_general_encoder_output(value: Any, text: str) -> None:
    """Exact text for every kind of JSON-ready value, subclasses written as their base type."""
    assert dumps_exact(value) == text
    assert _dumps_any(value) == text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({1: "x"}, "^JSON object keys must be strings, not int$"),
        ({"a": {None: 1}}, "^JSON object keys must be strings, not NoneType$"),
        ({"a": {1, 2}}, "^set is not JSON-ready$"),
        ([b"x"], "^bytes is not JSON-ready$"),
        (object(), "^object is not JSON-ready$"),
        ({"a": object()}, "^object is not JSON-ready$"),
    ],
)
def test_what_json_cannot_hold_is_refused_by_type(value: Any, message: str) -> None:
    """Keys that are not strings and values of other types raise TypeError naming the type."""
    with pytest.raises(TypeError, match=message):
        dumps_exact(value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_without_decimals_the_text_is_the_standard_librarys(value: Any) -> None:
    """For values without Decimals, both paths write exactly what compact json.dumps writes."""
    assert dumps_exact(value) == _reference(value)
    assert loads_exact(dumps_exact(value)) == json.loads(_reference(value), parse_float=Decimal)


@given(
    st.dictionaries(
        st.text(),
        st.decimals(allow_nan=False, allow_infinity=False)
        | st.text()
        | st.lists(st.text(), max_size=3),
        max_size=6,
    )
)
def test_fast_and_general_paths_agree_on_flat_dicts(value: dict[str, Any]) -> None:
    """The fast path, when it answers, gives the general encoder's text."""
    fast = _dumps_flat(value)
    if fast is not None:
        assert fast == _dumps_any(value)
    assert loads_exact(dumps_exact(value)) == value


# ------------------------------------------------------------------------ reading


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1.50", Decimal("1.50")),
        ("1e3", Decimal("1E+3")),
        ("-0.0", Decimal("-0.0")),
        ("12", 12),
        ('{"a":[1.0,2]}', {"a": [Decimal("1.0"), 2]}),
        ('"\\ud83d\\udeab"', "🚫"),
    ],
)
def test_reading_keeps_numbers_exact(text: str, value: Any) -> None:
    """Non-integer numbers come back as Decimals with their digits; integers as int."""
    back = loads_exact(text)
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, Decimal):
        assert str(back) == str(value)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-32"])
def test_reading_bytes_detects_the_encoding(encoding: str) -> None:
    """Bytes are decoded as json.loads would (UTF-8, -16 or -32, told from the first bytes)."""
    text = '{"p":1.50,"t":"é🚫"}'
    assert loads_exact(text.encode(encoding)) == {"p": Decimal("1.50"), "t": "é🚫"}
    assert loads_exact(bytearray(text.encode(encoding))) == {"p": Decimal("1.50"), "t": "é🚫"}


def test_reading_bytes_keeps_a_lone_surrogate_as_json_would() -> None:
    """Encoded lone surrogates in bytes are read, not refused (as json.loads reads them)."""
    assert loads_exact(b'"\xed\xa0\x80"') == "\ud800"
    assert loads_exact(b'"\xed\xa0\x80"') == json.loads(b'"\xed\xa0\x80"')


# ----------------------------------------------------------------- the column type


def test_bind_sends_json_text_as_it_is() -> None:
    """Text already serialized is bound unchanged (as plain str); anything else is encoded."""
    process = ExactJSONB().bind_processor(postgresql.dialect())
    ready = JSONText('{"b":1,"a":2.50}')
    bound = process(ready)
    assert bound == '{"b":1,"a":2.50}'
    assert type(bound) is str
    assert process(None) is None
    assert process({"a": Decimal("2.50")}) == '{"a":2.50}'
    # A plain string is a JSON string value, not JSON text.
    assert process('{"a":1}') == '"{\\"a\\":1}"'
    assert process(_Name("x")) == '"x"'


def test_result_reads_text_and_passes_decoded_values_through() -> None:
    """Selected text is parsed exactly; a value a driver already decoded is returned as is."""
    process = ExactJSONB().result_processor(postgresql.dialect(), None)
    assert process('{"a":2.50}') == {"a": Decimal("2.50")}
    assert process(b'{"a":2.50}') == {"a": Decimal("2.50")}
    decoded = {"a": 1}
    assert process(decoded) is decoded
    assert process(None) is None


def test_the_column_is_selected_as_text() -> None:
    """The driver's own JSON codec never sees the column: it is cast to text in the SELECT."""
    sql = str(select(AuditEvent.data).compile(dialect=postgresql.dialect()))
    assert "CAST(audit_events.data AS TEXT)" in sql
    # The text keeps the column's type, so rows are read through result_processor.
    column = AuditEvent.__table__.c.data
    assert isinstance(column.type, ExactJSONB)
    assert isinstance(column.type.column_expression(column).type, ExactJSONB)
    assert ExactJSONB.cache_ok is True
    assert isinstance(ExactJSONB().impl_instance, postgresql.JSONB)
