"""Append-only audit tables, row hashes and the seal chain.

* ``txid`` (xid8): the transaction that wrote the row;
* ``row_hash``: a SHA-256 over a canonical, versioned encoding of the row,
  computed by the database at insert (``audit_event_row_hash``), so every insert
  path is covered;
* ``corrects_id``: a correction is a new event that references the one it
  corrects; the original is never changed;
* the BEFORE INSERT trigger of 0002 now also sets ``txid`` and ``row_hash``,
  and a statement trigger takes the transaction id before any row draws its
  ``seq`` (the sealer's proof that a range is closed rests on that order);
* UPDATE, DELETE and TRUNCATE fail on ``audit_events`` and ``audit_seals`` for
  every role, the owner included;
* every trigger is ENABLE ALWAYS, so ``session_replication_role = replica``
  does not skip it;
* ``audit_seals``: the hash chain of sealed blocks.

Existing rows are backfilled: their hash is computed now and their ``txid`` is
this migration's transaction. The backfill rewrites the table once.

Revision ID: 0003_append_only_sealing
Revises: 0002_order_clock_correlation
Create Date: 2026-11-29
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003_append_only_sealing"
down_revision: str | Sequence[str] | None = "0002_order_clock_correlation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


class _Xid8(sa.types.UserDefinedType[int]):
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "XID8"


# A SQL-standard function body is parsed once, here: names and literals are bound
# at creation, so a caller's search_path or string settings cannot change it,
# and the planner can still inline it into the trigger's expression.
ROW_HASH_FUNCTION = r"""
CREATE FUNCTION audit_event_row_hash(
    p_id uuid, p_seq bigint, p_event_type text, p_entity_type text, p_entity_id uuid,
    p_actor text, p_data jsonb, p_occurred_at timestamptz, p_recorded_at timestamptz,
    p_recommendation_id uuid, p_order_id uuid, p_ticker text, p_corrects_id uuid
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE
RETURN '\x01'::bytea || sha256(
    '\x01'::bytea
    || uuid_send(p_id)
    || int8send(p_seq)
    || convert_to(p_event_type, 'UTF8') || '\x00'::bytea
    || convert_to(p_entity_type, 'UTF8') || '\x00'::bytea
    || uuid_send(p_entity_id)
    || convert_to(p_actor, 'UTF8') || '\x00'::bytea
    || convert_to(p_data::text, 'UTF8') || '\x00'::bytea
    || timestamptz_send(p_occurred_at)
    || timestamptz_send(p_recorded_at)
    || CASE WHEN p_recommendation_id IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || uuid_send(p_recommendation_id) END
    || CASE WHEN p_order_id IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || uuid_send(p_order_id) END
    || CASE WHEN p_ticker IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || convert_to(p_ticker, 'UTF8') || '\x00'::bytea END
    || CASE WHEN p_corrects_id IS NULL THEN '\x00'::bytea
            ELSE '\x01'::bytea || uuid_send(p_corrects_id) END
)
"""

# PL/pgSQL bodies are planned at run time under the caller's search_path, so
# every name they use is qualified (the hash function's schema is the one the
# tables live in, resolved when this migration runs).
BEFORE_INSERT_FUNCTION = r"""
DO $do$
BEGIN
EXECUTE format($f$
CREATE OR REPLACE FUNCTION audit_events_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $body$
BEGIN
    NEW.recorded_at := pg_catalog.clock_timestamp();
    IF NEW.occurred_at IS NULL THEN
        NEW.occurred_at := NEW.recorded_at;
    END IF;
    NEW.txid := pg_catalog.pg_current_xact_id();
    NEW.row_hash := %1$I.audit_event_row_hash(
        NEW.id, NEW.seq, NEW.event_type, NEW.entity_type, NEW.entity_id, NEW.actor,
        NEW.data, NEW.occurred_at, NEW.recorded_at, NEW.recommendation_id, NEW.order_id,
        NEW.ticker, NEW.corrects_id);
    RETURN NEW;
END
$body$
$f$, current_schema());
END
$do$
"""

# 0002's body, restored on downgrade (indented as 0002 wrote it, so the
# function's source text is exactly the same again).
BEFORE_INSERT_FUNCTION_0002 = """
        CREATE OR REPLACE FUNCTION audit_events_before_insert() RETURNS trigger
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

# Identity defaults are evaluated before row triggers run but after statement
# triggers, so taking the transaction id here guarantees every row's txid was
# assigned before its seq was drawn. The sealer relies on it.
# An assignment rather than PERFORM: PL/pgSQL evaluates it on its fast path for
# simple expressions, which matters for one-row INSERT statements.
CLAIM_XID_FUNCTION = """
CREATE FUNCTION audit_events_claim_xid() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    claimed xid8;
BEGIN
    claimed := pg_catalog.pg_current_xact_id();
    RETURN NULL;
END
$$
"""

REFUSE_CHANGE_FUNCTION = """
CREATE FUNCTION audit_orm_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'AU001',
        MESSAGE = pg_catalog.format(
            '%s on %I is not allowed: the audit trail is append-only', TG_OP, TG_TABLE_NAME),
        HINT = 'Record a correction: a new event that references the one it corrects.';
END
$$
"""

HASH_CALL_COLUMNS = (
    "id, seq, event_type, entity_type, entity_id, actor, data, occurred_at, recorded_at, "
    "recommendation_id, order_id, ticker, corrects_id"
)


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("txid", _Xid8(), nullable=True))
    op.add_column("audit_events", sa.Column("row_hash", sa.LargeBinary(), nullable=True))
    op.add_column("audit_events", sa.Column("corrects_id", sa.Uuid(), nullable=True))

    op.execute(ROW_HASH_FUNCTION)
    # Backfill by rewriting the table (ALTER ... TYPE ... USING) rather than with
    # an UPDATE: adopted rows may break the NOT VALID actor check, which an
    # UPDATE would enforce on every row it touches, and a rewrite leaves no
    # dead row versions behind.
    op.execute(
        "ALTER TABLE audit_events "
        "ALTER COLUMN txid TYPE xid8 USING pg_current_xact_id(), "
        f"ALTER COLUMN row_hash TYPE bytea USING audit_event_row_hash({HASH_CALL_COLUMNS})"
    )
    op.alter_column(
        "audit_events",
        "txid",
        nullable=False,
        server_default=sa.text("pg_current_xact_id()"),
        existing_type=_Xid8(),
    )
    op.alter_column("audit_events", "row_hash", nullable=False, existing_type=sa.LargeBinary())
    op.create_check_constraint(
        op.f("ck_audit_events_row_hash_length"), "audit_events", "octet_length(row_hash) = 33"
    )
    op.create_foreign_key(
        op.f("fk_audit_events_corrects_id_audit_events"),
        "audit_events",
        "audit_events",
        ["corrects_id"],
        ["id"],
    )
    op.create_index(
        op.f("ix_audit_events_corrects_id"),
        "audit_events",
        ["corrects_id"],
        postgresql_where=sa.text("corrects_id IS NOT NULL"),
    )

    op.execute(BEFORE_INSERT_FUNCTION)
    op.execute("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_before_insert")
    op.execute(CLAIM_XID_FUNCTION)
    op.execute(
        "CREATE TRIGGER audit_events_claim_xid BEFORE INSERT ON audit_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit_events_claim_xid()"
    )
    op.execute("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_claim_xid")
    op.execute(REFUSE_CHANGE_FUNCTION)
    op.execute(
        "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
        "ON audit_events FOR EACH STATEMENT EXECUTE FUNCTION audit_orm_refuse_change()"
    )
    op.execute("ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only")

    op.create_table(
        "audit_seals",
        sa.Column("seal_no", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
        sa.Column(
            "gaps",
            postgresql.INT8MULTIRANGE(),
            nullable=False,
            server_default=sa.text("'{}'::int8multirange"),
        ),
        sa.Column("merkle_root", sa.LargeBinary(), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(), nullable=True),
        sa.Column("seal_hash", sa.LargeBinary(), nullable=False),
        sa.Column("horizon_txid", _Xid8(), nullable=False),
        sa.Column("cut_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sealed_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("seal_no >= 1", name=op.f("ck_audit_seals_seal_no_positive")),
        sa.CheckConstraint(
            "first_seq <= last_seq AND row_count BETWEEN 1 AND last_seq - first_seq + 1",
            name=op.f("ck_audit_seals_range"),
        ),
        sa.CheckConstraint(
            "octet_length(merkle_root) = 33 AND octet_length(seal_hash) = 33 "
            "AND (prev_hash IS NULL) = (seal_no = 1) "
            "AND (prev_hash IS NULL OR octet_length(prev_hash) = 33)",
            name=op.f("ck_audit_seals_hashes"),
        ),
        sa.PrimaryKeyConstraint("seal_no", name=op.f("audit_seals_pkey")),
        sa.UniqueConstraint("seal_hash", name=op.f("uq_audit_seals_seal_hash")),
    )
    op.execute(
        "CREATE TRIGGER audit_seals_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
        "ON audit_seals FOR EACH STATEMENT EXECUTE FUNCTION audit_orm_refuse_change()"
    )
    op.execute("ALTER TABLE audit_seals ENABLE ALWAYS TRIGGER audit_seals_append_only")


def downgrade() -> None:
    op.drop_table("audit_seals")
    op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
    op.execute("DROP TRIGGER audit_events_claim_xid ON audit_events")
    op.execute("DROP FUNCTION audit_orm_refuse_change()")
    op.execute("DROP FUNCTION audit_events_claim_xid()")
    op.execute(BEFORE_INSERT_FUNCTION_0002)
    op.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_before_insert")
    op.execute(
        "DROP FUNCTION audit_event_row_hash(uuid, bigint, text, text, uuid, text, jsonb, "
        "timestamptz, timestamptz, uuid, uuid, text, uuid)"
    )
    op.drop_index(op.f("ix_audit_events_corrects_id"), table_name="audit_events")
    op.drop_constraint(
        op.f("fk_audit_events_corrects_id_audit_events"), "audit_events", type_="foreignkey"
    )
    op.drop_constraint(op.f("ck_audit_events_row_hash_length"), "audit_events", type_="check")
    for column in ("corrects_id", "row_hash", "txid"):
        op.drop_column("audit_events", column)
