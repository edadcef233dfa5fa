"""Text for people: stored values and messages made safe to show on a terminal or a sheet.

Stored text is whatever a writer put there. Shown raw, an ESC or a BEL drives the
terminal (erase a line, move the cursor, forge one), and a bidirectional
override makes a line read in another order than it is stored. Everything
printed for a person goes through this module:

* :func:`escape` renders stored text unambiguously: control characters (C0, DEL,
  C1), bidirectional formatting characters, line and paragraph separators,
  invisible characters (zero-width space and joiners, BOM, soft hyphen) and
  lone surrogates become ``\\xNN`` / ``\\uNNNN``, and a backslash becomes ``\\\\``,
  so an escaped character cannot be confused with text that merely looks like one;
* :func:`escape_controls` does the same without doubling backslashes, for a
  message that already shows its values with ``repr`` (errors) and for
  spreadsheet cells, whose exact text is kept elsewhere;
* :func:`escape_json` makes JSON text safe to print without changing what it
  parses to: the same characters become ``\\uNNNN`` escapes;
* :func:`utc_timestamp` writes a time at one fixed width whatever its year.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

#: Bidirectional formatting characters: the embeddings and overrides (U+202A-U+202E),
#: the isolates (U+2066-U+2069) and the marks (U+200E, U+200F, U+061C).
BIDI_CHARACTERS = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"

#: Characters that show nothing: a soft hyphen, the zero-width space, non-joiner
#: and joiner, the word joiner and invisible operators, the byte order mark. In
#: a name they make two different names look the same.
INVISIBLE_CHARACTERS = "\u00ad\u200b-\u200d\u2060-\u2064\ufeff"

#: What an identifier-like value (an actor, a ticker, a label) may not hold:
#: C0 and C1 control characters, DEL, bidirectional formatting characters, the
#: line and paragraph separators (U+2028, U+2029) and invisible characters.
UNSAFE = f"\x00-\x1f\x7f-\x9f{BIDI_CHARACTERS}\u2028\u2029{INVISIBLE_CHARACTERS}"
UNSAFE_CHARACTERS = re.compile(f"[{UNSAFE}]")

#: What :func:`escape` rewrites: the unsafe characters, lone surrogates and the backslash.
_ESCAPED = re.compile(f"[{UNSAFE}\ud800-\udfff\\\\]")
#: The same without the backslash, for messages and JSON whose backslashes are escapes already.
_ESCAPED_IN_MESSAGE = re.compile(f"[{UNSAFE}\ud800-\udfff]")

_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    code = ord(char)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _json_escaped(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape(text: str) -> str:
    """Stored text as it may be shown: one line, nothing a terminal acts on, reversible."""
    return _ESCAPED.sub(_escaped, text)


def escape_controls(text: str) -> str:
    """Text as it may be shown, backslashes kept as they are (so not reversible).

    Error messages show bad values with ``repr`` already; what is left to
    escape is text they quote raw (a server's own message, say).
    """
    return _ESCAPED_IN_MESSAGE.sub(_escaped, text)


def escape_json(text: str) -> str:
    """JSON text safe to print, parsing to the same value.

    Such characters can only stand inside JSON strings, where ``\\uNNNN``
    means the same character.
    """
    return _ESCAPED_IN_MESSAGE.sub(_json_escaped, text)


def utc_timestamp(value: datetime, *, sep: str = "T", zone: str = "Z") -> str:
    """ISO 8601 in UTC with a four-digit year, microseconds and ``Z``: one width for every year.

    ``sep`` goes between date and time, ``zone`` after the time (a timeline
    writes ``" "`` and nothing).

    ``strftime("%Y")`` does not pad years before 1000 on every platform, and
    ``isoformat()`` drops a zero microsecond part; either would break sorting as text.
    """
    utc = value.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}{sep}"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond:06d}{zone}"
    )
