"""The declarative models: :class:`Base` and :class:`AuditEvent`.

The table is append-only by design. Order is given by ``seq``, a database
identity that no client can set, never by a client clock; ``recorded_at`` is the
database clock at insert (set by a trigger, so no client can forge it), and
``occurred_at`` is the business time the caller reports.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Identity,
    Index,
    MetaData,
    String,
    Uuid,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from audit_orm.enums import AuditEventType, EntityType
from audit_orm.jsonb import ExactJSONB

#: Constraint and index names. ``pk`` follows PostgreSQL's own default so a table
#: created by hand before this package (``audit_events_pkey``) matches exactly.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "%(table_name)s_pkey",
}

#: Longest accepted actor name.
ACTOR_MAX_LENGTH = 128
#: Longest accepted ticker.
TICKER_MAX_LENGTH = 32


def _in_list(column: str, values: list[str]) -> str:
    quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})"


#: The CHECK constraint bodies; a new event type is a constraint swap (see README).
EVENT_TYPE_CHECK = _in_list("event_type", [t.value for t in AuditEventType])
ENTITY_TYPE_CHECK = _in_list("entity_type", [t.value for t in EntityType])


class Base(DeclarativeBase):
    """Declarative base of audit_orm's tables (its own metadata, named constraints)."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AuditEvent(Base):
    """One immutable audit event."""

    __tablename__ = "audit_events"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, Identity(always=True), nullable=False, unique=True)
    event_type: Mapped[str] = mapped_column(String(64), nullable=False)
    entity_type: Mapped[str] = mapped_column(String(32), nullable=False)
    entity_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    actor: Mapped[str] = mapped_column(
        String(ACTOR_MAX_LENGTH), nullable=False, server_default=text("'system'")
    )
    data: Mapped[dict[str, Any]] = mapped_column(
        ExactJSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    recommendation_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    order_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, nullable=True)
    ticker: Mapped[str | None] = mapped_column(String(TICKER_MAX_LENGTH), nullable=True)

    __table_args__ = (
        CheckConstraint(EVENT_TYPE_CHECK, name="event_type"),
        CheckConstraint(ENTITY_TYPE_CHECK, name="entity_type"),
        CheckConstraint("length(actor) > 0", name="actor_not_empty"),
        # The indexes, each for a query that needs it; every one is paid for on
        # every insert, so the set is kept small (see alembic 0004).
        #
        # Order trail, first hop: the order's events. Partial (only rows that
        # carry an order id), and covering: entity_id and recommendation_id
        # ride along so the trail finds the chain's entities and its
        # recommendation without reading the table.
        Index(
            "ix_audit_events_order_id_seq",
            "order_id",
            "seq",
            postgresql_include=["entity_id", "recommendation_id"],
            postgresql_where=text("order_id IS NOT NULL"),
        ),
        # Order trail, second hop: everything linked to the recommendation.
        # Partial and covering (entity_id) for the same reason.
        Index(
            "ix_audit_events_recommendation_id_seq",
            "recommendation_id",
            "seq",
            postgresql_include=["entity_id"],
            postgresql_where=text("recommendation_id IS NOT NULL"),
        ),
        # Entity trails, and the last hop of the order trail (the rows it
        # returns, which must be read from the table anyway for their data).
        Index("ix_audit_events_entity_id_seq", "entity_id", "seq"),
        # search(ticker=...), in recorded order; partial.
        Index(
            "ix_audit_events_ticker_seq",
            "ticker",
            "seq",
            postgresql_where=text("ticker IS NOT NULL"),
        ),
        # Time ranges. Rows arrive in time order, so BRIN answers them at a tiny
        # fraction of a B-tree's size and write cost; autosummarize keeps the
        # newest ranges summarized without waiting for a VACUUM.
        Index(
            "ix_audit_events_recorded_at",
            "recorded_at",
            postgresql_using="brin",
            postgresql_with={"autosummarize": "on"},
        ),
    )

    def __repr__(self) -> str:
        return (
            f"AuditEvent(seq={self.seq!r}, event_type={self.event_type!r}, "
            f"entity_type={self.entity_type!r}, entity_id={self.entity_id!r})"
        )
