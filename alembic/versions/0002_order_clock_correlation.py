"""Recorded order, database clock, typed columns, correlation columns and indexes.

* ``created_at`` (the client's timestamp) becomes ``occurred_at``, the business time;
* ``recorded_at``: the database clock, forced by a trigger at insert;
* ``seq``: a database identity giving the recorded order, backfilled from the old
  rows in (created_at, id) order;
* ``recommendation_id``, ``order_id``, ``ticker``: real indexed columns instead of
  JSON scans, backfilled from the stored data;
* CHECK constraints on event and entity types (VARCHAR + CHECK, not a native
  enum, so a new event type is a constraint swap, not a table rewrite).

Revision ID: 0002_order_clock_correlation
Revises: 0001_seed_table
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_order_clock_correlation"
down_revision: str | Sequence[str] | None = "0001_seed_table"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_TYPES = (
    "recommendation.generated",
    "recommendation.suppressed",
    "risk.evaluated",
    "risk.rejected",
    "order.submitted",
    "order.accepted",
    "order.filled",
    "order.rejected",
    "order.cancelled",
    "order.duplicate_prevented",
    "position.opened",
    "position.closed",
    "position.updated",
    "trading.mode_changed",
    "approval.requested",
    "approval.approved",
    "approval.rejected",
    "approval.expired",
)
ENTITY_TYPES = (
    "recommendation",
    "risk_evaluation",
    "order",
    "position",
    "approval",
    "risk_config",
)

_UUID_RE = "^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"


def _uuid_from_data(key: str) -> str:
    # Rows written by hand may hold anything; only well-formed ids are linked.
    return f"CASE WHEN data->>'{key}' ~ '{_UUID_RE}' THEN (data->>'{key}')::uuid END"


def _in_list(column: str, values: Sequence[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    op.alter_column(
        "audit_events", "created_at", new_column_name="occurred_at", server_default=None
    )
    op.add_column("audit_events", sa.Column("seq", sa.BigInteger(), nullable=True))
    op.add_column("audit_events", sa.Column("recorded_at", sa.DateTime(timezone=True)))
    op.add_column("audit_events", sa.Column("recommendation_id", sa.Uuid(), nullable=True))
    op.add_column("audit_events", sa.Column("order_id", sa.Uuid(), nullable=True))
    op.add_column("audit_events", sa.Column("ticker", sa.String(32), nullable=True))

    # Backfill: the old rows' only order is their client timestamp; the id breaks ties
    # so the result is deterministic. Their recorded time is the best we know.
    op.execute(
        f"""
        UPDATE audit_events AS e
        SET seq = o.rn,
            recorded_at = e.occurred_at,
            recommendation_id = CASE WHEN e.entity_type = 'recommendation' THEN e.entity_id
                                     ELSE {_uuid_from_data("recommendation_id")} END,
            order_id = CASE WHEN e.entity_type IN ('order', 'position') THEN e.entity_id
                            ELSE {_uuid_from_data("order_id")} END,
            ticker = left(e.data->>'ticker', 32)
        FROM (SELECT id, row_number() OVER (ORDER BY occurred_at, id) AS rn
              FROM audit_events) AS o
        WHERE o.id = e.id
        """
    )
    op.alter_column("audit_events", "seq", nullable=False)
    op.execute("ALTER TABLE audit_events ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY")
    op.execute(
        "SELECT setval(pg_get_serial_sequence('audit_events', 'seq'), "
        "(SELECT coalesce(max(seq), 0) + 1 FROM audit_events), false)"
    )
    op.create_unique_constraint(op.f("uq_audit_events_seq"), "audit_events", ["seq"])
    op.alter_column(
        "audit_events",
        "recorded_at",
        nullable=False,
        server_default=sa.text("clock_timestamp()"),
    )
    # NOT NULL and the defaults are restated, not assumed: a table created by hand
    # before this package may lack them, and after adoption it must be the table
    # a fresh database gets. On a table made by 0001 these change nothing.
    op.alter_column(
        "audit_events", "event_type", type_=sa.String(64), existing_type=sa.Text(), nullable=False
    )
    op.alter_column(
        "audit_events", "entity_type", type_=sa.String(32), existing_type=sa.Text(), nullable=False
    )
    # actor stays TEXT: the original module wrote whatever reviewer name it was
    # given, and adoption must keep every row as written (see the CHECK below).
    op.alter_column(
        "audit_events",
        "actor",
        existing_type=sa.Text(),
        nullable=False,
        server_default=sa.text("'system'"),
    )
    op.alter_column("audit_events", "entity_id", existing_type=sa.Uuid(), nullable=False)
    op.alter_column(
        "audit_events",
        "data",
        existing_type=postgresql.JSONB(astext_type=sa.Text()),
        nullable=False,
        server_default=sa.text("'{}'::jsonb"),
    )
    op.alter_column(
        "audit_events", "occurred_at", existing_type=sa.DateTime(timezone=True), nullable=False
    )
    # Final names (op.f): the naming convention must not be applied a second time,
    # and a host application's metadata may have no convention at all.
    op.create_check_constraint(
        op.f("ck_audit_events_event_type"), "audit_events", _in_list("event_type", EVENT_TYPES)
    )
    op.create_check_constraint(
        op.f("ck_audit_events_entity_type"), "audit_events", _in_list("entity_type", ENTITY_TYPES)
    )
    # NOT VALID: new rows must name an actor of 1 to 128 characters, but rows the
    # original module already wrote (it accepted an empty reviewer) stay as they are.
    op.execute(
        "ALTER TABLE audit_events ADD CONSTRAINT ck_audit_events_actor_length"
        " CHECK (length(actor) BETWEEN 1 AND 128) NOT VALID"
    )

    op.create_index(
        "ix_audit_events_order_id_seq",
        "audit_events",
        ["order_id", "seq"],
        postgresql_where=sa.text("order_id IS NOT NULL"),
    )
    op.create_index(
        "ix_audit_events_recommendation_id_seq",
        "audit_events",
        ["recommendation_id", "seq"],
        postgresql_where=sa.text("recommendation_id IS NOT NULL"),
    )
    op.create_index("ix_audit_events_entity_id_seq", "audit_events", ["entity_id", "seq"])
    op.create_index(
        "ix_audit_events_ticker_seq",
        "audit_events",
        ["ticker", "seq"],
        postgresql_where=sa.text("ticker IS NOT NULL"),
    )
    op.create_index(
        "ix_audit_events_recorded_at", "audit_events", ["recorded_at"], postgresql_using="brin"
    )

    # The database clock is the recorded time whatever a client sends, and the
    # business time defaults to it.
    op.execute(
        """
        CREATE FUNCTION audit_events_before_insert() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.recorded_at := clock_timestamp();
            IF NEW.occurred_at IS NULL THEN
                NEW.occurred_at := NEW.recorded_at;
            END IF;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_events_before_insert BEFORE INSERT ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION audit_events_before_insert()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_events_before_insert ON audit_events")
    op.execute("DROP FUNCTION audit_events_before_insert()")
    for name in (
        "ix_audit_events_recorded_at",
        "ix_audit_events_ticker_seq",
        "ix_audit_events_entity_id_seq",
        "ix_audit_events_recommendation_id_seq",
        "ix_audit_events_order_id_seq",
    ):
        op.drop_index(name, table_name="audit_events")
    for name in ("actor_length", "entity_type", "event_type"):
        op.drop_constraint(op.f(f"ck_audit_events_{name}"), "audit_events", type_="check")
    op.drop_constraint(op.f("uq_audit_events_seq"), "audit_events", type_="unique")
    op.alter_column("audit_events", "entity_type", type_=sa.Text(), existing_nullable=False)
    op.alter_column("audit_events", "event_type", type_=sa.Text(), existing_nullable=False)
    for column in ("ticker", "order_id", "recommendation_id", "recorded_at", "seq"):
        op.drop_column("audit_events", column)
    op.alter_column(
        "audit_events", "occurred_at", new_column_name="created_at", server_default=sa.text("now()")
    )
