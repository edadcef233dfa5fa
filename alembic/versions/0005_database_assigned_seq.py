"""The database assigns seq; rows readers can hold; no rewrite of the audit tables.

* ``seq`` stops being an identity column. ``INSERT ... OVERRIDING SYSTEM VALUE``
  let any role with INSERT choose its own number (fill a rolled-back gap, take
  the next number ahead of everyone, write a negative one). It is now a plain
  ``bigint`` that the BEFORE INSERT row trigger fills from the sequence
  ``audit_events_seq_seq`` whatever the INSERT says. The trigger function is
  ``SECURITY DEFINER`` (owned by the table's owner, ``search_path`` pinned), so
  writers need no privilege on the sequence. The new sequence goes on from where
  the identity stopped, and only ``SELECT`` on the old one (what the sealer
  needs) is carried over.
* The trigger takes the transaction id before it draws ``seq`` (the sealer's
  proof rests on that order); the statement trigger ``audit_events_claim_xid``
  that ensured it for the identity stays, doing the same earlier.
* CHECK constraints on what plain SQL could store and readers could not read:
  ``data`` is a JSON object, its numbers (at any depth) are below 10^1000 in
  magnitude with no non-zero digit past the 1000th decimal place, ``occurred_at`` and
  ``recorded_at`` are finite and in years 1 to 9999 UTC, and ``seq >= 1``.
  Added ``NOT VALID`` (a catalog change), committed, then validated in a
  transaction of their own holding only ``SHARE UPDATE EXCLUSIVE``. Existing
  rows that break one leave that constraint ``NOT VALID`` (it still holds for
  every new row) with a warning naming it, as adopted rows may.
* Event triggers, when the migrating role is a superuser (only a superuser may
  create them): no statement may rewrite ``audit_events`` or ``audit_seals``
  (``ALTER COLUMN ... TYPE ... USING`` rewrote rows and hashes with every
  trigger enabled), and no DDL may leave audit_orm's triggers disabled, missing
  or bound elsewhere, or replace audit_orm's functions. Their functions and the
  list of guarded schemas live in the schema ``audit_orm_guard``, owned by that
  superuser, so the tables' owner can neither replace nor drop them. Without a
  superuser they are skipped with a warning (the README says how a superuser
  adds them later).

No statement rewrites the table. The swap of ``seq`` and the constraint adds
hold ``ACCESS EXCLUSIVE`` only for catalog changes, give up after
``lock_timeout`` (5 s) rather than queue writers behind a long query, and are
safe to rerun: if the process dies after the first commit, upgrading again
repeats the steps. The revision commits part of its work itself when Alembic
owns the transaction (see the README, "Adding an event type"); given a
connection already in a transaction, it does everything in that transaction.

Downgrade restores 0004's schema: the identity (continuing from the sequence),
the statement trigger and the functions as they were. Taking the schema off the
guard's list needs a superuser when it is on it.

Revision ID: 0005_database_assigned_seq
Revises: 0004_trail_indexes
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005_database_assigned_seq"
down_revision: str | Sequence[str] | None = "0004_trail_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Digits a number in ``data`` may have on either side of the point (the same
#: bound as the payload models): ``abs(n) < 10^1000`` and ``scale(n) <= 1000``.
MAX_DIGITS = 1000

# Any depth (``.**``), inline so no function call or search_path is involved:
# a magnitude of 10^1000 or more, or a non-zero digit past the 1000th decimal
# place (the number times 10^1000 is not whole), is refused.
_BOUND = f"1e{MAX_DIGITS}"
_NUMBERS = (
    f'strict $.** ? (@.type() == "number" && (@ >= {_BOUND} || @ <= -{_BOUND} '
    f"|| @ * {_BOUND} % 1 != 0))"
)

_YEARS = "BETWEEN '0001-01-01 00:00:00+00' AND '9999-12-31 23:59:59.999999+00'"

#: name -> CHECK body; the names get the ``ck_audit_events_`` prefix.
CHECKS = {
    "data_object": "jsonb_typeof(data) = 'object'",
    "data_numbers": f"NOT jsonb_path_exists(data, '{_NUMBERS}')",
    "occurred_at_range": f"occurred_at {_YEARS}",
    "recorded_at_range": f"recorded_at {_YEARS}",
    "seq_positive": "seq >= 1",
}

# Every name qualified and search_path pinned: the function runs with its
# owner's rights. The order is the sealer's proof (see audit_orm.sealing): the
# transaction id is taken before seq is drawn, so every row's txid is older
# than its number; and the clock is read after, so a row numbered after a
# seal's range was cut is never recorded before the cut (as with the identity,
# whose default was drawn before row triggers ran).
BEFORE_INSERT_FUNCTION = r"""
DO $do$
BEGIN
EXECUTE pg_catalog.format($f$
CREATE OR REPLACE FUNCTION audit_events_before_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    NEW.txid := pg_catalog.pg_current_xact_id();
    NEW.seq := pg_catalog.nextval(%2$L::pg_catalog.regclass);
    NEW.recorded_at := pg_catalog.clock_timestamp();
    IF NEW.occurred_at IS NULL THEN
        NEW.occurred_at := NEW.recorded_at;
    END IF;
    NEW.row_hash := %1$I.audit_event_row_hash(
        NEW.id, NEW.seq, NEW.event_type, NEW.entity_type, NEW.entity_id, NEW.actor,
        NEW.data, NEW.occurred_at, NEW.recorded_at, NEW.recommendation_id, NEW.order_id,
        NEW.ticker, NEW.corrects_id);
    RETURN NEW;
END
$body$
$f$, current_schema(), pg_catalog.format('%I.audit_events_seq_seq', current_schema()));
EXECUTE pg_catalog.format('ALTER FUNCTION audit_events_before_insert() OWNER TO %s',
    (SELECT relowner::regrole FROM pg_catalog.pg_class
     WHERE oid = 'audit_events'::pg_catalog.regclass));
END
$do$
"""

# The identity's sequence gives way to one of the same name, owned by the
# column, continuing where it stopped. Only SELECT grants (the sealer's) move.
SEQ_TO_TRIGGER = """
DO $do$
DECLARE
    old_name text := pg_catalog.pg_get_serial_sequence('audit_events', 'seq');
    owner_name text := (SELECT relowner::regrole::text FROM pg_catalog.pg_class
                        WHERE oid = 'audit_events'::pg_catalog.regclass);
    last_value bigint;
    called boolean;
    readers text[];
BEGIN
    EXECUTE pg_catalog.format('SELECT last_value, is_called FROM %s', old_name)
        INTO last_value, called;
    SELECT pg_catalog.array_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                     ELSE pg_catalog.quote_ident(r.rolname) END)
    INTO readers
    FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) AS a
    LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
    WHERE c.oid = old_name::pg_catalog.regclass AND a.privilege_type = 'SELECT'
      AND a.grantee <> c.relowner;
    ALTER TABLE audit_events ALTER COLUMN seq DROP IDENTITY;
    CREATE SEQUENCE audit_events_seq_seq AS bigint MINVALUE 1 NO CYCLE CACHE 1;
    EXECUTE pg_catalog.format('ALTER SEQUENCE audit_events_seq_seq OWNER TO %s', owner_name);
    ALTER SEQUENCE audit_events_seq_seq OWNED BY audit_events.seq;
    PERFORM pg_catalog.setval('audit_events_seq_seq', last_value, called);
    IF readers IS NOT NULL THEN
        EXECUTE pg_catalog.format('GRANT SELECT ON SEQUENCE audit_events_seq_seq TO %s',
                                  pg_catalog.array_to_string(readers, ', '));
    END IF;
END
$do$
"""

# Downgrade: the identity again, continuing from the sequence, with its grants.
TRIGGER_TO_IDENTITY = """
DO $do$
DECLARE
    last_value bigint;
    called boolean;
    readers text[];
BEGIN
    SELECT s.last_value, s.is_called INTO last_value, called FROM audit_events_seq_seq AS s;
    SELECT pg_catalog.array_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                     ELSE pg_catalog.quote_ident(r.rolname) END)
    INTO readers
    FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) AS a
    LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
    WHERE c.oid = 'audit_events_seq_seq'::pg_catalog.regclass AND a.privilege_type = 'SELECT'
      AND a.grantee <> c.relowner;
    DROP SEQUENCE audit_events_seq_seq;
    ALTER TABLE audit_events ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY;
    PERFORM pg_catalog.setval(pg_catalog.pg_get_serial_sequence('audit_events', 'seq'),
                              last_value, called);
    IF readers IS NOT NULL THEN
        EXECUTE pg_catalog.format('GRANT SELECT ON SEQUENCE %s TO %s',
                                  pg_catalog.pg_get_serial_sequence('audit_events', 'seq'),
                                  pg_catalog.array_to_string(readers, ', '));
    END IF;
END
$do$
"""

# 0003's insert trigger function, restored on downgrade
# (same text, so the catalog reads exactly as before).
BEFORE_INSERT_FUNCTION_0003 = r"""
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

# ------------------------------------------------------------- the guards

#: (table, trigger, function) audit_orm relies on; each must stay ENABLE ALWAYS.
GUARDED_TRIGGERS = (
    ("audit_events", "audit_events_before_insert", "audit_events_before_insert"),
    ("audit_events", "audit_events_append_only", "audit_orm_refuse_change"),
    ("audit_events", "audit_events_claim_xid", "audit_events_claim_xid"),
    ("audit_seals", "audit_seals_append_only", "audit_orm_refuse_change"),
)
#: Functions of a guarded schema no DDL may replace or alter.
GUARDED_FUNCTIONS = (
    "audit_events_before_insert()",
    "audit_orm_refuse_change()",
    "audit_events_claim_xid()",
    "audit_event_row_hash(uuid, bigint, text, text, uuid, text, jsonb, timestamptz, "
    "timestamptz, uuid, uuid, text, uuid)",
)
#: Commands after which the guard checks the triggers and functions.
GUARDED_TAGS = (
    "ALTER TABLE",
    "DROP TABLE",
    "ALTER TRIGGER",
    "DROP TRIGGER",
    "CREATE FUNCTION",
    "ALTER FUNCTION",
    "DROP FUNCTION",
    "ALTER ROUTINE",
    "DROP ROUTINE",
)


def _sql_list(values: Sequence[str]) -> str:
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


_TRIGGER_ROWS = ", ".join(f"('{t}', '{g}', '{f}')" for t, g, f in GUARDED_TRIGGERS)

# The guard lives in a schema of its own, made by a superuser, for the whole
# database: the tables' owner (who may own their schema and drop anything in
# it) can neither replace nor drop its functions, its list of guarded schemas
# or its event triggers. Everyone may read the list, as the functions run with
# the rights of whoever issued the command.
GUARD_FUNCTIONS = rf"""
CREATE SCHEMA IF NOT EXISTS audit_orm_guard;
CREATE TABLE IF NOT EXISTS audit_orm_guard.guarded (schema_name name PRIMARY KEY);
GRANT USAGE ON SCHEMA audit_orm_guard TO PUBLIC;
GRANT SELECT ON audit_orm_guard.guarded TO PUBLIC;

CREATE OR REPLACE FUNCTION audit_orm_guard.refuse_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $body$
BEGIN
    IF pg_event_trigger_table_rewrite_oid() IN (
        SELECT to_regclass(format('%I.%I', g.schema_name, t.name))
        FROM audit_orm_guard.guarded AS g, unnest(ARRAY['audit_events', 'audit_seals']) AS t(name))
    THEN
        RAISE EXCEPTION USING
            ERRCODE = 'AU001',
            MESSAGE = format('rewriting %s is not allowed: the audit trail is append-only',
                             pg_event_trigger_table_rewrite_oid()::regclass),
            HINT = 'Add columns without a volatile default and constraints NOT VALID.';
    END IF;
END
$body$;

CREATE OR REPLACE FUNCTION audit_orm_guard.check_ddl() RETURNS event_trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $body$
DECLARE
    touched text;
    broken text;
BEGIN
    SELECT string_agg(c.object_identity, ', ') INTO touched
    FROM pg_event_trigger_ddl_commands() AS c
    WHERE c.classid = 'pg_proc'::regclass
      AND c.objid IN (
          SELECT to_regprocedure(format('%I.', g.schema_name) || f)
          FROM audit_orm_guard.guarded AS g, unnest(ARRAY[{_sql_list(GUARDED_FUNCTIONS)}]) AS f);
    IF touched IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'AU001',
            MESSAGE = format('changing %s is not allowed: the audit trail depends on it',
                             touched);
    END IF;
    -- A schema dropped whole is skipped: its trail is gone, not altered.
    SELECT string_agg(format('%s on %I.%I', e.trigger_name, g.schema_name, e.table_name), ', ')
    INTO broken
    FROM audit_orm_guard.guarded AS g,
         (VALUES {_TRIGGER_ROWS}) AS e(table_name, trigger_name, function_name)
    WHERE to_regnamespace(quote_ident(g.schema_name)) IS NOT NULL
      AND NOT EXISTS (
        SELECT FROM pg_trigger t
        WHERE t.tgrelid = to_regclass(format('%I.%I', g.schema_name, e.table_name))
          AND t.tgname = e.trigger_name
          AND t.tgenabled = 'A'
          AND t.tgfoid = to_regprocedure(format('%I.%I()', g.schema_name, e.function_name)));
    IF broken IS NOT NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'AU001',
            MESSAGE = format('audit_orm''s triggers must stay in place and ENABLE ALWAYS '
                             '(%s): the audit trail is append-only', broken);
    END IF;
END
$body$;
"""

GUARD_EVENT_TRIGGERS = f"""
CREATE EVENT TRIGGER audit_orm_refuse_rewrite ON table_rewrite
    EXECUTE FUNCTION audit_orm_guard.refuse_rewrite();
ALTER EVENT TRIGGER audit_orm_refuse_rewrite ENABLE ALWAYS;
CREATE EVENT TRIGGER audit_orm_check_ddl ON ddl_command_end
    WHEN TAG IN ({_sql_list(GUARDED_TAGS)})
    EXECUTE FUNCTION audit_orm_guard.check_ddl();
ALTER EVENT TRIGGER audit_orm_check_ddl ENABLE ALWAYS;
"""

#: The statements a superuser runs to guard a schema migrated without one
#: (also in the README); each is safe to repeat.
GUARD = f"""
DO $do$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RAISE WARNING USING
            MESSAGE = 'audit_orm: not a superuser, so the event triggers that refuse rewriting '
                'the audit tables or disabling their triggers were not created',
            HINT = 'A superuser can add them later: see the README, "Tamper evidence".';
        RETURN;
    END IF;
    EXECUTE $sql${GUARD_FUNCTIONS}$sql$;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger
                   WHERE evtname = 'audit_orm_refuse_rewrite') THEN
        EXECUTE $sql${GUARD_EVENT_TRIGGERS}$sql$;
    END IF;
    INSERT INTO audit_orm_guard.guarded VALUES (current_schema()) ON CONFLICT DO NOTHING;
END
$do$
"""

# The schema leaves the list (which only a superuser may change); the guard
# goes when no schema is left in it.
UNGUARD = """
DO $do$
BEGIN
    IF pg_catalog.to_regclass('audit_orm_guard.guarded') IS NULL THEN
        RETURN;
    END IF;
    DELETE FROM audit_orm_guard.guarded WHERE schema_name = current_schema();
    IF NOT EXISTS (SELECT FROM audit_orm_guard.guarded) THEN
        DROP EVENT TRIGGER IF EXISTS audit_orm_check_ddl;
        DROP EVENT TRIGGER IF EXISTS audit_orm_refuse_rewrite;
        DROP SCHEMA audit_orm_guard CASCADE;
    END IF;
END
$do$
"""


def upgrade() -> None:
    # Everything in this first transaction is a catalog change, and it is
    # repeatable: a rerun after a crash past the commit below starts over.
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(
        "ALTER TABLE audit_events "
        + ", ".join(
            f"DROP CONSTRAINT IF EXISTS ck_audit_events_{name}, "
            f"ADD CONSTRAINT ck_audit_events_{name} CHECK ({body}) NOT VALID"
            for name, body in CHECKS.items()
        )
    )
    # Commit the constraints, then check the existing rows holding only SHARE
    # UPDATE EXCLUSIVE: inserts and reads go on meanwhile. A caller who hands
    # over a connection in a transaction of its own asked for one transaction:
    # the rows are checked in it.
    validate = [
        "DO $do$ BEGIN "
        f"ALTER TABLE audit_events VALIDATE CONSTRAINT ck_audit_events_{name}; "
        "EXCEPTION WHEN check_violation THEN RAISE WARNING "
        f"'audit_orm: existing rows break ck_audit_events_{name}; it stays NOT VALID, "
        "enforced for new rows only'; END $do$"
        for name in CHECKS
    ]
    context = op.get_context()
    if context.as_sql or not getattr(context, "_in_external_transaction", False):
        with context.autocommit_block():
            for statement in validate:
                op.execute(statement)
    else:
        for statement in validate:
            op.execute(statement)
    # The swap of seq, atomic with the version stamp that follows.
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
    op.execute(SEQ_TO_TRIGGER)
    op.execute(BEFORE_INSERT_FUNCTION)
    op.execute(GUARD)


def downgrade() -> None:
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.execute(UNGUARD)
    op.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
    op.execute(BEFORE_INSERT_FUNCTION_0003)
    op.execute(TRIGGER_TO_IDENTITY)
    op.execute(
        "ALTER TABLE audit_events "
        + ", ".join(f"DROP CONSTRAINT ck_audit_events_{name}" for name in CHECKS)
    )
