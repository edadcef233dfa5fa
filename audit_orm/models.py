"""The declarative models: :class:`Base`, :class:`AuditEvent` and :class:`AuditSeal`.

The tables are append-only, enforced by the database: UPDATE, DELETE and
TRUNCATE fail for every role (migration ``0003_append_only_sealing``). Order is
given by ``seq``, drawn from a sequence by the insert trigger whatever the INSERT
says (no client can choose it), never by a client clock; ``recorded_at`` is the
database clock at insert (set by a trigger, so no client can forge it), and
``occurred_at`` is the business time the caller reports. The same trigger stamps
``txid`` and ``row_hash``; the seals chain blocks of rows together (see
:mod:`audit_orm.sealing`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    FetchedValue,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import INT8MULTIRANGE, Range
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from audit_orm.enums import AuditEventType, EntityType
from audit_orm.jsonb import ExactJSONB
from audit_orm.xid8 import XID8

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


#: The range of timestamps the table accepts: years 1 to 9999 in UTC.
_YEARS = "BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'"

#: Numbers in ``data``, at any depth: below 10^1000 in magnitude, and no non-zero
#: digit past the 1000th decimal place (the payload models refuse more digits).
DATA_NUMBERS_CHECK = (
    'NOT jsonb_path_exists(data, \'strict $.** ? (@.type() == "number" && '
    "(@ >= 1e1000 || @ <= -1e1000 || @ * 1e1000 % 1 != 0))')"
)

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
    #: Drawn from ``audit_events_seq_seq`` by the insert trigger, which ignores any
    #: value an INSERT supplies (migration ``0005``).
    seq: Mapped[int] = mapped_column(
        BigInteger, server_default=FetchedValue(), nullable=False, unique=True
    )
    event_type: Mapped[str] = mapped_column(String(64), nullable=False)
    entity_type: Mapped[str] = mapped_column(String(32), nullable=False)
    entity_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    actor: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'system'"))
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
    #: The transaction that wrote the row (set by the insert trigger).
    txid: Mapped[int] = mapped_column(
        XID8, nullable=False, server_default=text("pg_current_xact_id()")
    )
    #: Version byte + SHA-256 of the row's canonical encoding (see :mod:`audit_orm.hashing`),
    #: computed by the insert trigger.
    row_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    #: The event this one corrects; the corrected event itself is never changed.
    corrects_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("audit_events.id"), nullable=True
    )

    __table_args__ = (
        CheckConstraint(EVENT_TYPE_CHECK, name="event_type"),
        CheckConstraint(ENTITY_TYPE_CHECK, name="entity_type"),
        # Created NOT VALID by the migration: rows adopted from before the package
        # keep the actor they were written with; every new row is checked.
        CheckConstraint(f"length(actor) BETWEEN 1 AND {ACTOR_MAX_LENGTH}", name="actor_length"),
        CheckConstraint("octet_length(row_hash) = 33", name="row_hash_length"),
        # What a reader can hold, whoever inserts (migration 0005): a JSON object,
        # bounded numbers at any depth, times a Python datetime can represent.
        CheckConstraint("jsonb_typeof(data) = 'object'", name="data_object"),
        CheckConstraint(DATA_NUMBERS_CHECK, name="data_numbers"),
        CheckConstraint(f"occurred_at {_YEARS}", name="occurred_at_range"),
        CheckConstraint(f"recorded_at {_YEARS}", name="recorded_at_range"),
        CheckConstraint("seq >= 1", name="seq_positive"),
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
        # Corrections of an event (repository.corrections); partial, as few rows are.
        Index(
            "ix_audit_events_corrects_id",
            "corrects_id",
            postgresql_where=text("corrects_id IS NOT NULL"),
        ),
    )

    def __repr__(self) -> str:
        return (
            f"AuditEvent(seq={self.seq!r}, event_type={self.event_type!r}, "
            f"entity_type={self.entity_type!r}, entity_id={self.entity_id!r})"
        )


class AuditSeal(Base):
    """One sealed block of audit rows, a link in the seal chain.

    A seal covers every ``seq`` from ``first_seq`` to ``last_seq``: the rows
    there, and the ``gaps`` (numbers no committed row holds: rolled-back or
    refused inserts). ``merkle_root`` is taken over the rows' hashes in ``seq``
    order, ``prev_hash`` is the previous seal's ``seal_hash`` and ``seal_hash``
    covers all of it (see :mod:`audit_orm.hashing`). ``horizon_txid`` is the
    transaction-id watermark that proved the range closed: every row in it was
    written by an older transaction. ``cut_at`` is the database clock just
    before the range was chosen, ``sealed_at`` when it was sealed.
    """

    __tablename__ = "audit_seals"

    seal_no: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    first_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    row_count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    gaps: Mapped[list[Range[int]]] = mapped_column(
        INT8MULTIRANGE, nullable=False, server_default=text("'{}'::int8multirange")
    )
    merkle_root: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    prev_hash: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    seal_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    horizon_txid: Mapped[int] = mapped_column(XID8, nullable=False)
    cut_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    sealed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (
        CheckConstraint("seal_no >= 1", name="seal_no_positive"),
        CheckConstraint(
            "first_seq <= last_seq AND row_count BETWEEN 1 AND last_seq - first_seq + 1",
            name="range",
        ),
        CheckConstraint(
            "octet_length(merkle_root) = 33 AND octet_length(seal_hash) = 33 "
            "AND (prev_hash IS NULL) = (seal_no = 1) "
            "AND (prev_hash IS NULL OR octet_length(prev_hash) = 33)",
            name="hashes",
        ),
        UniqueConstraint("seal_hash"),
    )

    def __repr__(self) -> str:
        return (
            f"AuditSeal(seal_no={self.seal_no!r}, first_seq={self.first_seq!r}, "
            f"last_seq={self.last_seq!r}, row_count={self.row_count!r})"
        )
