"""Exact JSON for JSONB columns.

PostgreSQL's JSONB keeps numbers as ``numeric``: arbitrary precision, scale
preserved. Python's default JSON handling would turn them into floats on the way
in or out. This module writes :class:`~decimal.Decimal` as JSON numbers and reads
every non-integer number back as a :class:`~decimal.Decimal`, so ``150.250``
comes back as ``Decimal('150.250')``, whatever JSON settings the host
application's engine has.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from sqlalchemy import Text, cast, type_coerce
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.types import TypeDecorator

#: The C string escaper behind ``json.dumps(..., ensure_ascii=False)``.
_encode_str: Callable[[str], str] = json.encoder.encode_basestring


def _number(value: Decimal | float) -> str:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"JSON cannot hold the number {value}")
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"JSON cannot hold the number {value}")
    return repr(value)


#: Exact types a flat payload holds; such a dict takes the C encoder's fast path.
_SCALAR_TYPES = frozenset({str, int, bool, type(None), float})
#: Where the fast path left a Decimal's place-holder (a NUL and its index).
_MARKER = re.compile(r'"\\u0000(\d+)"')


def _refuse(item: Any) -> Any:
    raise TypeError(f"{type(item).__name__} is not JSON-ready")


def _c_encoder() -> Callable[[Any], str] | None:
    # Built once: json.dumps() would rebuild the C encoder on every call.
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # pragma: no cover - an interpreter without the C accelerator
        return None
    encode = make(
        None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    return lambda value: "".join(encode(value, 0))


_encode_c = _c_encoder()


def _dumps_flat(value: dict[Any, Any]) -> str | None:
    """A flat dict through the C encoder, exact Decimals put back afterwards.

    Returns ``None`` when the dict is not flat (nested containers, odd types)
    or when a caller's string holds a NUL, so the general encoder decides.
    """
    if _encode_c is None:  # pragma: no cover
        return None
    numbers: list[str] = []
    plain: dict[str, Any] = {}
    for key, item in value.items():
        kind = type(item)
        if type(key) is not str:
            return None
        if kind is Decimal:
            numbers.append(_number(item))
            # NUL never occurs in stored text (PostgreSQL refuses it), so a
            # NUL-led string is free to mark where the exact number goes.
            plain[key] = f"\x00{len(numbers) - 1}"
        elif kind in _SCALAR_TYPES:
            if kind is float and not math.isfinite(item):
                raise ValueError(f"JSON cannot hold the number {item}")
            plain[key] = item
        elif kind is list and all(type(element) is str for element in item):
            plain[key] = item
        else:
            return None
    text = _encode_c(plain)
    if not numbers:
        return text
    if text.count("\\u0000") != len(numbers):
        return None
    return _MARKER.sub(lambda match: numbers[int(match.group(1))], text)


def dumps_exact(value: Any) -> str:
    """Serialize JSON-ready Python data; Decimals become exact JSON numbers."""
    if type(value) is dict:
        # Payloads are flat dicts: let the C encoder do the work.
        fast = _dumps_flat(value)
        if fast is not None:
            return fast
    return _dumps_any(value)


def _dumps_any(value: Any) -> str:
    # Exact-type checks first: every payload is written through here, and the
    # common cases (flat dicts of str and Decimal) should not pay for the
    # isinstance() chain that subclasses need.
    kind = type(value)
    if kind is str:
        return _encode_str(value)
    if kind is dict:
        parts = []
        for key, item in value.items():
            if type(key) is not str and not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
            parts.append(_encode_str(key) + ":" + _dumps_any(item))
        return "{" + ",".join(parts) + "}"
    if kind is Decimal:
        return _number(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _encode_str(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, (Decimal, float)):
        return _number(value)
    if isinstance(value, dict):
        return _dumps_any(dict(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join([_dumps_any(item) for item in value]) + "]"
    raise TypeError(f"{type(value).__name__} is not JSON-ready")


class JSONText(str):
    """JSON text already produced by :func:`dumps_exact`, bound as it is.

    Lets a caller that serialized a payload once (to check its size, say) hand
    the same text to the database instead of serializing it again.
    """

    __slots__ = ()


#: One decoder for every call: ``json.loads`` with options builds a new one each time.
_DECODER = json.JSONDecoder(parse_float=Decimal)
#: :func:`loads_exact` for text only, without its per-call type check (hot read paths).
decode_exact: Callable[[str], Any] = _DECODER.decode


def loads_exact(text: str | bytes) -> Any:
    """Parse JSON, reading non-integer numbers as :class:`~decimal.Decimal`."""
    if isinstance(text, (bytes, bytearray)):
        # As json.loads() reads bytes.
        text = text.decode(json.detect_encoding(text), "surrogatepass")
    return _DECODER.decode(text)


class ExactJSONB(TypeDecorator[Any]):
    """A JSONB column whose numbers round-trip exactly.

    Values are bound as JSON text we produce ourselves and selected as ``::text``
    so the driver's own JSON codec (configured per engine by the host) never sees
    them.
    """

    impl = JSONB
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> Any:
        def process(value: Any) -> str | None:
            if value is None:
                return None
            if type(value) is JSONText:
                return str.__str__(value)
            return dumps_exact(value)

        return process

    def column_expression(self, colexpr: ColumnElement[Any]) -> ColumnElement[Any]:
        return type_coerce(cast(colexpr, Text), self)

    def result_processor(self, dialect: Dialect, coltype: object) -> Any:
        def process(value: Any) -> Any:
            if isinstance(value, (str, bytes)):
                return loads_exact(value)
            return value

        return process
