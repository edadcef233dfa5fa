"""Human-readable rendering of a trail, for terminals and operators."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from audit_orm.display import escape, utc_timestamp
from audit_orm.errors import AuditError
from audit_orm.records import AuditRecord


def _value(value: Any) -> str:
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return escape(str(value))


#: Links already expressed by the trail itself; left out to keep lines short.
_LINK_FIELDS = frozenset({"recommendation_id", "evaluation_id"})


def summarize(record: AuditRecord) -> str:
    """One line of the payload's fields in their declared order, ``key=value``.

    Empty values and the correlation links are left out.
    """
    try:
        fields = record.payload.model_dump()
    except AuditError:  # a stored row that no longer fits its model: show it raw
        fields = dict(record.data)
    return " ".join(
        f"{escape(key)}={_value(value)}"
        for key, value in fields.items()
        if value not in (None, "", []) and key not in _LINK_FIELDS
    )


def render_timeline(records: Iterable[AuditRecord]) -> str:
    """A trail as aligned text: recorded order, database time (UTC), event, actor, details.

    One line per record: every stored text is escaped, times have one width
    whatever their year.
    """
    lines = []
    for record in records:
        when = utc_timestamp(record.recorded_at, sep=" ", zone="")
        line = (
            f"#{record.seq:<6} {when}  {record.event_type.value:<26} "
            f"{escape(record.actor):<22} {summarize(record)}"
        )
        # The business time matters when it is not the recording time (a broker's fill).
        if abs(record.occurred_at - record.recorded_at) > timedelta(milliseconds=1):
            line += f" occurred_at={utc_timestamp(record.occurred_at)}"
        lines.append(line)
    return "\n".join(lines)
