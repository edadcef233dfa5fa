"""Adversarial review: the tables' owner cannot rewrite rows by changing the table.

README, "Tamper evidence": changing stored rows needs the append-only triggers
out of the way. ``ALTER TABLE ... ALTER COLUMN ... TYPE ... USING`` rewrote
every row, hashes included, with every trigger enabled. Event triggers (made
by a superuser at migration) refuse rewriting the audit tables, disabling or
dropping audit_orm's triggers and replacing its functions; the tables' owner
cannot remove them. Migrations keep working.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import AuditRepository, migrate, seal, verify
from tests.dbutil import scratch_database, with_database

APPEND_ONLY = "AU001"


async def _rows(engine: AsyncEngine) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(text("SELECT * FROM audit_events ORDER BY seq"))
        return [tuple(row) for row in result]


async def _refused(engine: AsyncEngine, statement: str) -> DBAPIError:
    async with engine.connect() as conn:
        with pytest.raises(DBAPIError) as caught:
            await conn.execute(text(statement))
    return caught.value


@pytest.fixture
async def trail(fresh_db: tuple[str, AsyncEngine]) -> AsyncEngine:
    """A migrated database with three unsealed rows."""
    _, engine = fresh_db
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(3):
            await repo.order_accepted(uuid.uuid4(), "ACME", "brk")
    return engine


_REWRITES = [
    # The attack of the review: new actors, and hashes recomputed to match.
    "ALTER TABLE audit_events ALTER COLUMN actor TYPE text USING 'mallory'",
    "ALTER TABLE audit_events ALTER COLUMN row_hash TYPE bytea USING row_hash || ''",
    "ALTER TABLE audit_events ALTER COLUMN data TYPE jsonb USING data || '{\"qty\": 0}'",
    "ALTER TABLE audit_events ADD COLUMN flag float DEFAULT random()",
    "ALTER TABLE audit_seals ALTER COLUMN row_count TYPE bigint USING row_count + 1",
    "ALTER TABLE audit_events SET UNLOGGED",
]

_DISABLES = [
    "ALTER TABLE audit_events DISABLE TRIGGER USER",
    "ALTER TABLE audit_events DISABLE TRIGGER ALL",
    "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
    "ALTER TABLE audit_events ENABLE TRIGGER audit_events_before_insert",
    "ALTER TABLE audit_events ENABLE REPLICA TRIGGER audit_events_append_only",
    "ALTER TABLE audit_seals DISABLE TRIGGER audit_seals_append_only",
    "DROP TRIGGER audit_events_append_only ON audit_events",
    "ALTER TRIGGER audit_events_before_insert ON audit_events RENAME TO spare",
    "DROP FUNCTION audit_orm_refuse_change() CASCADE",
    "DROP TABLE audit_seals",
    "CREATE OR REPLACE FUNCTION audit_orm_refuse_change() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
    "CREATE OR REPLACE FUNCTION audit_events_before_insert() RETURNS trigger "
    "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    "ALTER FUNCTION audit_orm_refuse_change() RENAME TO spare",
    "ALTER ROUTINE audit_events_before_insert() SECURITY INVOKER",
    "ALTER FUNCTION audit_events_before_insert() RESET ALL",
]


@pytest.mark.parametrize("statement", _REWRITES + _DISABLES)
async def test_the_owner_cannot_rewrite_or_unguard_the_tables(
    trail: AsyncEngine, statement: str
) -> None:
    """README, Tamper evidence: rows change only with the triggers out of the way,
    and the triggers stay in place.

    The owner (here a superuser, to whom event triggers apply too) runs a
    statement that would rewrite rows or disable the protection. It is refused
    with SQLSTATE AU001 and nothing changes: same rows, same hashes, verify ok.
    """
    before = await _rows(trail)
    error = await _refused(trail, statement)
    assert getattr(error.orig, "sqlstate", None) == APPEND_ONLY, error
    assert await _rows(trail) == before
    assert (await seal(trail)).rows_sealed == 3
    assert (await verify(trail)).ok


@pytest.fixture
async def owner(fresh_db: tuple[str, AsyncEngine]) -> AsyncIterator[AsyncEngine]:
    """An engine as a role that is not a superuser and owns the tables and their schema."""
    url, admin = fresh_db
    name = f"rewrite_owner_{uuid.uuid4().hex[:8]}"
    async with admin.begin() as conn:
        await conn.execute(text(f'CREATE ROLE "{name}" NOLOGIN'))
        await conn.execute(text(f'ALTER SCHEMA public OWNER TO "{name}"'))
        for table in ("audit_events", "audit_seals"):
            await conn.execute(text(f'ALTER TABLE {table} OWNER TO "{name}"'))
    engine = create_async_engine(url, connect_args={"server_settings": {"role": name}})
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "statement",
    [
        "DROP EVENT TRIGGER audit_orm_check_ddl",
        "ALTER EVENT TRIGGER audit_orm_refuse_rewrite DISABLE",
        "DROP FUNCTION audit_orm_guard.check_ddl() CASCADE",
        "DROP SCHEMA audit_orm_guard CASCADE",
        "DELETE FROM audit_orm_guard.guarded",
        "CREATE OR REPLACE FUNCTION audit_orm_guard.refuse_rewrite() RETURNS event_trigger "
        "LANGUAGE plpgsql AS $$ BEGIN END $$",
        "ALTER TABLE audit_events ALTER COLUMN actor TYPE text USING 'mallory'",
        "ALTER TABLE audit_events DISABLE TRIGGER USER",
    ],
)
async def test_the_owner_cannot_remove_the_guard(
    trail: AsyncEngine, owner: AsyncEngine, statement: str
) -> None:
    """README, Tamper evidence: the owner cannot remove what refuses a rewrite.

    A role that owns the tables and their schema, not a superuser, tries to drop,
    disable or replace the event triggers, their functions or their list of
    guarded schemas, or to rewrite directly. Each is refused; the guard stands.
    """
    await _refused(owner, statement)
    error = await _refused(
        trail, "ALTER TABLE audit_events ALTER COLUMN actor TYPE text USING 'mallory'"
    )
    assert getattr(error.orig, "sqlstate", None) == APPEND_ONLY


async def test_migrations_still_work_under_the_guard(admin_url: str) -> None:
    """README, Migrations: ``audit-orm migrate`` up and down keeps working.

    With the guard in place: adding a column and a NOT VALID constraint (what
    future revisions do) passes; a downgrade to base and an upgrade again pass;
    the guard comes back with the upgrade.
    """
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE audit_events ADD COLUMN note text"))
            await conn.execute(
                text("ALTER TABLE audit_events ADD CONSTRAINT ck_note CHECK (note <> '') NOT VALID")
            )
            await conn.execute(text("ALTER TABLE audit_events VALIDATE CONSTRAINT ck_note"))
            await conn.execute(text("ALTER TABLE audit_events DROP CONSTRAINT ck_note"))
            await conn.execute(text("ALTER TABLE audit_events DROP COLUMN note"))
        await migrate.downgrade(engine, "base")
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM pg_event_trigger")) == 0
            assert await conn.scalar(text("SELECT to_regnamespace('audit_orm_guard')")) is None
        await migrate.upgrade(engine)
        error = await _refused(engine, "ALTER TABLE audit_events DISABLE TRIGGER USER")
        assert getattr(error.orig, "sqlstate", None) == APPEND_ONLY


async def test_a_migration_without_a_superuser_skips_the_guard(admin_url: str) -> None:
    """README, Tamper evidence: the guard needs a superuser; without one it is
    skipped with a warning, and everything else works (the insert trigger
    still assigns seq, though the migrating role is not a superuser)."""
    name = f"migrator_{uuid.uuid4().hex[:8]}"
    database = f"audit_orm_nosuper_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
            await conn.execute(text(f'CREATE DATABASE "{database}" OWNER "{name}"'))
        url = with_database(admin_url, database)
        engine = create_async_engine(url, connect_args={"server_settings": {"role": name}})
        try:
            await migrate.upgrade(engine)
            async with engine.connect() as conn:
                assert await conn.scalar(text("SELECT count(*) FROM pg_event_trigger")) == 0
            async with AsyncSession(engine) as session, session.begin():
                record = await AuditRepository(session).order_accepted(uuid.uuid4(), "A", "b")
            assert record.seq == 1
            await migrate.downgrade(engine, "base")
        finally:
            await engine.dispose()
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
            await conn.execute(text(f'DROP ROLE IF EXISTS "{name}"'))
        await admin.dispose()
