"""Typed read results: :class:`AuditRecord` and :class:`AuditPage`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from audit_orm.enums import (
    ENTITY_TYPES_BY_VALUE,
    EVENT_TYPES_BY_VALUE,
    AuditEventType,
    EntityType,
)
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.payloads import AuditPayload, validate_payload


def _iso(value: UUID | None) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored audit event, as read back or just written.

    ``data`` is the stored JSON with exact decimals; :attr:`payload` gives it back
    as the typed payload model of its event type.
    """

    id: UUID
    seq: int
    event_type: AuditEventType
    entity_type: EntityType
    entity_id: UUID
    actor: str
    data: dict[str, Any]
    occurred_at: datetime
    recorded_at: datetime
    recommendation_id: UUID | None = None
    order_id: UUID | None = None
    ticker: str | None = None
    #: The event this one corrects (see :meth:`~audit_orm.AuditRepository.correct`).
    corrects_id: UUID | None = None

    @property
    def payload(self) -> AuditPayload:
        """The payload as its typed model (validated on access)."""
        return validate_payload(self.event_type, self.data)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict with the original module's keys and shape, plus the new fields.

        Ids are strings and timestamps ISO 8601. ``created_at`` is the business
        time, as the original module stored it; ``recorded_at`` is the database
        clock and ``seq`` the recorded order. Numbers in ``data`` stay exact
        (:class:`~decimal.Decimal`); use :meth:`to_json` for JSON text.
        """
        return {
            "id": str(self.id),
            "event_type": self.event_type.value,
            "entity_type": self.entity_type.value,
            "entity_id": str(self.entity_id),
            "actor": self.actor,
            "data": self.data,
            "created_at": self.occurred_at.isoformat(),
            "seq": self.seq,
            "occurred_at": self.occurred_at.isoformat(),
            "recorded_at": self.recorded_at.isoformat(),
            "recommendation_id": _iso(self.recommendation_id),
            "order_id": _iso(self.order_id),
            "ticker": self.ticker,
            "corrects_id": _iso(self.corrects_id),
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as compact JSON text with exact numbers."""
        return dumps_exact(self.to_dict())


@dataclass(frozen=True, slots=True)
class AuditPage:
    """One page of a search: its records and the cursor of the next page."""

    records: list[AuditRecord]
    #: Pass as ``after=`` to get the next page; ``None`` on the last page.
    next_cursor: str | None


def record_from_row(row: Sequence[Any], *, data_is_text: bool = False) -> AuditRecord:
    """Build an :class:`AuditRecord` from a row in ``RECORD_COLUMNS`` order.

    Rows read through the ORM carry ``data`` already decoded (exactly, by the
    column type); rows read straight from the driver carry it as ``data::text``:
    say so with ``data_is_text``.
    """
    return AuditRecord(
        id=row[0],
        seq=row[1],
        event_type=EVENT_TYPES_BY_VALUE[row[2]],
        entity_type=ENTITY_TYPES_BY_VALUE[row[3]],
        entity_id=row[4],
        actor=row[5],
        data=loads_exact(row[6]) if data_is_text else row[6],
        occurred_at=row[7],
        recorded_at=row[8],
        recommendation_id=row[9],
        order_id=row[10],
        ticker=row[11],
        corrects_id=row[12],
    )
