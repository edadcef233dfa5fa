"""Adding an event type: the revision the README describes, run on a table with rows.

The revision swaps ``ck_audit_events_event_type``: the new constraint is added
``NOT VALID`` (catalog only) and validated after the swap has committed, under a
lock that lets writers go on. Neither step rewrites the table.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditEventType, migrate
from tests.dbutil import scratch_database

NEW_TYPE = "order.amended"
ROWS = 3000

REVISION = '''"""Event type {new_type}.

Revision ID: 9001_{slug}
Revises: {down_revision}
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "9001_{slug}"
down_revision: str | Sequence[str] | None = {down_revision!r}
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out rather than imported: this revision must keep meaning the same
# step after the enum changes again.
OLD_TYPES = {old_types!r}
NEW_TYPES = (*OLD_TYPES, {new_type!r})
CONSTRAINT = "ck_audit_events_event_type"


def _check(types: Sequence[str]) -> str:
    return "event_type IN (" + ", ".join(f"'{{t}}'" for t in types) + ")"


def upgrade() -> None:
    # Dropping and adding a constraint take an ACCESS EXCLUSIVE lock, briefly:
    # NOT VALID skips the scan. Give up rather than queue behind a long query
    # (everything else would queue behind us).
    op.execute("SET LOCAL lock_timeout = '5s'")
    op.drop_constraint(op.f(CONSTRAINT), "audit_events", type_="check")
    op.create_check_constraint(
        op.f(CONSTRAINT), "audit_events", _check(NEW_TYPES), postgresql_not_valid=True
    )
    # Commit the swap, then scan the existing rows holding only SHARE UPDATE
    # EXCLUSIVE: inserts and reads go on meanwhile.
    with op.get_context().autocommit_block():
        op.execute(f"ALTER TABLE audit_events VALIDATE CONSTRAINT {{CONSTRAINT}}")


def downgrade() -> None:
    # One transaction, validated at once: while rows of the new type exist the
    # ADD fails and nothing changes.
    op.drop_constraint(op.f(CONSTRAINT), "audit_events", type_="check")
    op.create_check_constraint(op.f(CONSTRAINT), "audit_events", _check(OLD_TYPES))
'''


def write_revision(folder: Path, new_type: str = NEW_TYPE) -> str:
    """Write the revision after audit_orm's current head into ``folder``; return its id."""
    (head,) = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
    slug = new_type.replace(".", "_")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"9001_{slug}.py").write_text(
        REVISION.format(
            new_type=new_type,
            slug=slug,
            down_revision=head,
            old_types=tuple(t.value for t in AuditEventType),
        )
    )
    return f"9001_{slug}"


def config_with(folder: Path) -> Config:
    config = migrate.alembic_config()
    config.set_main_option("path_separator", "newline")
    config.set_main_option("version_locations", f"{migrate.versions_location()}\n{folder}")
    return config


async def run(engine: AsyncEngine, config: Config, action: str, revision: str) -> None:
    """Run an Alembic command on a fresh connection, so Alembic owns the transaction."""

    def go(connection: Connection) -> None:
        config.attributes["connection"] = connection
        getattr(command, action)(config, revision)

    async with engine.connect() as conn:
        await conn.run_sync(go)
        await conn.commit()


async def snapshot(engine: AsyncEngine) -> dict[str, Any]:
    """Storage identity and content of the table, and its event type constraint."""
    async with engine.connect() as conn:
        filenodes = (
            await conn.execute(
                text(
                    "SELECT c.relname, pg_relation_filenode(c.oid) FROM pg_class c "
                    "WHERE c.oid = 'audit_events'::regclass OR c.oid IN "
                    "(SELECT indexrelid FROM pg_index WHERE indrelid = 'audit_events'::regclass) "
                    "ORDER BY 1"
                )
            )
        ).all()
        count, digest = (
            await conn.execute(
                text(
                    "SELECT count(*), md5(string_agg(e::text, '|' ORDER BY seq)) "
                    "FROM audit_events AS e"
                )
            )
        ).one()
        definition, validated = (
            await conn.execute(
                text(
                    "SELECT pg_get_constraintdef(oid), convalidated FROM pg_constraint "
                    "WHERE conrelid = 'audit_events'::regclass "
                    "AND conname = 'ck_audit_events_event_type'"
                )
            )
        ).one()
        version = await conn.run_sync(migrate.current_heads)
    return {
        "filenodes": filenodes,
        "count": count,
        "digest": digest,
        "types": set(re.findall(r"'([^']+)'", definition)),
        "validated": validated,
        "version": version,
    }


@pytest.fixture
async def filled(admin_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated database whose table holds rows of every event type."""
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, data, "
                    "occurred_at, ticker) "
                    "SELECT gen_random_uuid(), (CAST(:types AS text[]))[1 + i % :n], 'order', "
                    "gen_random_uuid(), jsonb_build_object('ticker', 'T' || i % 50, "
                    "'price', 100.25 + i), now(), 'T' || i % 50 "
                    "FROM generate_series(1, :rows) AS i"
                ),
                {
                    "types": [t.value for t in AuditEventType],
                    "n": len(AuditEventType),
                    "rows": ROWS,
                },
            )
        yield engine


async def test_new_event_type_swaps_the_constraint_without_rewriting(
    filled: AsyncEngine, tmp_path: Path
) -> None:
    config = config_with(tmp_path)
    new_revision = write_revision(tmp_path)
    before = await snapshot(filled)
    assert before["count"] == ROWS
    assert before["types"] == {t.value for t in AuditEventType}

    steps: list[str] = []

    def statement(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        steps.append(sql.split(" CHECK ")[0] + (" NOT VALID" if sql.endswith("NOT VALID") else ""))

    def commit(conn: Any) -> None:
        steps.append("COMMIT")

    event.listen(filled.sync_engine, "before_cursor_execute", statement)
    event.listen(filled.sync_engine, "commit", commit)
    try:
        await run(filled, config, "upgrade", "heads")
    finally:
        event.remove(filled.sync_engine, "before_cursor_execute", statement)
        event.remove(filled.sync_engine, "commit", commit)
    # The swap commits before the scan starts: the strong lock is held only for
    # the catalog change.
    add = "ALTER TABLE audit_events ADD CONSTRAINT ck_audit_events_event_type NOT VALID"
    validate = "ALTER TABLE audit_events VALIDATE CONSTRAINT ck_audit_events_event_type"
    assert "COMMIT" in steps[steps.index(add) : steps.index(validate)]

    after = await snapshot(filled)
    assert after["version"] == (new_revision,)
    assert after["types"] == before["types"] | {NEW_TYPE}
    assert after["validated"] is True
    # Same files on disk (no rewrite, no index rebuild), same rows.
    assert after["filenodes"] == before["filenodes"]
    assert (after["count"], after["digest"]) == (before["count"], before["digest"])

    # The database takes the new type now, and still refuses unknown ones.
    async with filled.connect() as conn:
        async with conn.begin() as trans:
            await conn.execute(
                text(
                    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, "
                    "occurred_at) VALUES (gen_random_uuid(), :t, 'order', gen_random_uuid(), "
                    "now())"
                ),
                {"t": NEW_TYPE},
            )
            await trans.rollback()
        with pytest.raises(DBAPIError, match="ck_audit_events_event_type"):
            await conn.execute(
                text(
                    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, "
                    "occurred_at) VALUES (gen_random_uuid(), 'order.teleported', 'order', "
                    "gen_random_uuid(), now())"
                )
            )
        await conn.rollback()

    await run(filled, config, "downgrade", "-1")
    down = await snapshot(filled)
    assert down["version"] == before["version"]
    assert down["types"] == before["types"]
    assert down["validated"] is True
    assert down["filenodes"] == before["filenodes"]
    assert (down["count"], down["digest"]) == (before["count"], before["digest"])


async def test_downgrade_refuses_while_rows_of_the_new_type_exist(
    filled: AsyncEngine, tmp_path: Path
) -> None:
    config = config_with(tmp_path)
    new_revision = write_revision(tmp_path)
    await run(filled, config, "upgrade", "heads")
    before = await snapshot(filled)

    def insert_then_downgrade(connection: Connection) -> None:
        connection.execute(
            text(
                "INSERT INTO audit_events (id, event_type, entity_type, entity_id, occurred_at) "
                "VALUES (gen_random_uuid(), :t, 'order', gen_random_uuid(), now())"
            ),
            {"t": NEW_TYPE},
        )
        config.attributes["connection"] = connection
        command.downgrade(config, "-1")

    # The row and the downgrade share a transaction, so the refused downgrade
    # leaves the table as it was (the row goes with the rollback).
    async with filled.connect() as conn:
        with pytest.raises(DBAPIError, match="ck_audit_events_event_type"):
            await conn.run_sync(insert_then_downgrade)
        await conn.rollback()

    after = await snapshot(filled)
    assert after == before
    assert after["version"] == (new_revision,)
    assert NEW_TYPE in after["types"]
