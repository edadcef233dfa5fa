"""Identifiers: time-ordered UUIDv7 generation and lenient UUID parsing."""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

from audit_orm.errors import InvalidIdError

_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7() -> uuid.UUID:
    """A new RFC 9562 version 7 UUID.

    The leading 48 bits are Unix milliseconds, so ids sort roughly by creation time
    and keep B-tree inserts local. Within one millisecond a 12-bit counter (seeded
    randomly) keeps ids from one process strictly increasing.
    """
    global _last_ms, _counter
    # One read of the OS random source per id: the first two bytes seed the
    # counter when a new millisecond starts, the other eight fill rand_b.
    noise = int.from_bytes(os.urandom(10), "big")
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms > _last_ms:
            _last_ms = ms
            _counter = (noise >> 64) & 0x7FF
        else:
            _counter += 1
            if _counter > 0xFFF:
                # Counter exhausted inside one millisecond: borrow the next one.
                _last_ms += 1
                _counter = 0
            ms = _last_ms
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= _counter << 64
        value |= 0b10 << 62
        value |= noise & ((1 << 62) - 1)
    return uuid.UUID(int=value)


def coerce_uuid(value: Any, field: str) -> uuid.UUID:
    """Accept a :class:`uuid.UUID` or its string form; refuse anything else."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, str):
        # uuid.UUID() parses the digits with int(): it would take Arabic-Indic
        # or fullwidth digits, and a sign, a space, a newline or an underscore
        # in place of a missing digit, silently naming another id.
        text = value.removeprefix("urn:uuid:")
        if text[:1] == "{" and text[-1:] == "}":
            text = text[1:-1]
        digits = text.replace("-", "")
        if len(digits) == 32 and all(c in _HEX_DIGITS for c in digits):
            return uuid.UUID(digits)
    raise InvalidIdError(field, value, "must be a UUID or its string form")


def coerce_optional_uuid(value: Any, field: str) -> uuid.UUID | None:
    """Like :func:`coerce_uuid`, but ``None`` passes through."""
    return None if value is None else coerce_uuid(value, field)
