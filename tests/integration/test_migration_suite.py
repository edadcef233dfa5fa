"""The migration suite, in the spirit of pytest-alembic, beyond ``test_migrations.py``.

``test_migrations.py`` already checks the single head, the up/down/up round
trip from base, every revision stepping down and up (by version), autogenerate
against the models and the ``alembic`` command line. This file adds what those
cannot see:

* every downgrade restores the schema exactly, catalog entry for catalog entry,
  and every upgrade rebuilds it identically;
* the CHECK constraints agree with the enums (autogenerate does not compare them);
* the server defaults agree with the models;
* revisions are frozen history: they import nothing from the package;
* offline mode (``alembic upgrade head --sql``) renders the whole history.
"""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditEventType, EntityType, migrate
from audit_orm.models import Base
from tests.dbutil import scratch_database

#: Catalog queries whose rows describe the schema; ``:v`` is the version table.
CATALOG = {
    "tables": "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
    "AND tablename <> :v ORDER BY 1",
    # Column order by rank, not attnum: a dropped column keeps its number, so a
    # column added again after a downgrade gets a new one with the same place.
    "columns": "SELECT table_name, column_name, row_number() OVER (PARTITION BY "
    "table_name ORDER BY ordinal_position), data_type, character_maximum_length, "
    "numeric_precision, is_nullable, column_default, is_identity, identity_generation "
    "FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name <> :v ORDER BY 1, 3",
    # NOT NULL constraints (listed from PostgreSQL 18) are covered by the
    # columns' nullability; their names follow a column's first name.
    "constraints": "SELECT conrelid::regclass::text, conname, contype, "
    "pg_get_constraintdef(oid), convalidated FROM pg_constraint "
    "WHERE connamespace = current_schema()::regnamespace AND contype <> 'n' "
    "AND conrelid::regclass::text <> :v ORDER BY 1, 2",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
    "WHERE schemaname = current_schema() AND tablename <> :v ORDER BY 1, 2",
    "triggers": "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) "
    "FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2",
    "functions": "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p "
    "WHERE p.pronamespace = current_schema()::regnamespace ORDER BY 1",
    "sequences": "SELECT sequencename, data_type, start_value, increment_by, cycle "
    "FROM pg_sequences WHERE schemaname = current_schema() ORDER BY 1",
}


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(migrate.alembic_config())


def _chain() -> list[str]:
    """Revision ids from the first to the head."""
    return [r.revision for r in reversed(list(_script().walk_revisions("base", "heads")))]


async def schema(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """The catalog's description of everything the migrations manage."""
    async with engine.connect() as conn:
        return {
            name: [
                tuple(row) for row in await conn.execute(text(sql), {"v": migrate.VERSION_TABLE})
            ]
            for name, sql in CATALOG.items()
        }


async def test_each_downgrade_restores_the_schema_exactly(admin_url: str) -> None:
    chain = _chain()
    async with scratch_database(admin_url) as (_, engine):
        below = await schema(engine)
        assert below["tables"] == []
        previous = "base"
        for revision in chain:
            await migrate.upgrade(engine, revision)
            above = await schema(engine)
            assert above != below, f"{revision} changes nothing"

            await migrate.downgrade(engine, previous)
            assert await schema(engine) == below, f"downgrade of {revision} leaves a trace"

            await migrate.upgrade(engine, revision)
            assert await schema(engine) == above, f"{revision} does not rebuild identically"
            below, previous = above, revision


def _check_values(definition: str) -> set[str]:
    return set(re.findall(r"'([^']*)'", definition))


async def test_check_constraints_agree_with_the_enums(engine: AsyncEngine) -> None:
    """Autogenerate is blind to CHECK bodies: a new enum member without its
    revision would pass it, and fail here."""
    async with engine.connect() as conn:
        rows = dict(
            (
                await conn.execute(
                    text(
                        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                        "WHERE conrelid = 'audit_events'::regclass AND contype = 'c'"
                    )
                )
            ).all()
        )
    assert _check_values(rows["ck_audit_events_event_type"]) == {t.value for t in AuditEventType}
    assert _check_values(rows["ck_audit_events_entity_type"]) == {t.value for t in EntityType}
    assert "length" in rows["ck_audit_events_actor_length"]
    # And the model declares exactly the constraints the database has.
    declared = {
        c.name
        for c in Base.metadata.tables["audit_events"].constraints
        if c.__class__.__name__ == "CheckConstraint"
    }
    assert declared == set(rows)


def _defaults_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": True,
            "version_table": migrate.VERSION_TABLE,
            "target_metadata": Base.metadata,
        },
    )
    return list(compare_metadata(context, Base.metadata))


async def test_server_defaults_agree_with_the_models(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        assert await conn.run_sync(_defaults_diff) == []


def test_revisions_are_frozen_history() -> None:
    """A revision describes one step forever: it may not import the package,
    whose enums and models move on. Each is named after its id and documented."""
    folder = migrate.versions_location()
    files = sorted(folder.glob("*.py"))
    assert [f.stem for f in files] == _chain()
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        assert ast.get_docstring(tree), f"{path.name} has no docstring"
        imported = [
            node.module if isinstance(node, ast.ImportFrom) else alias.name
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for alias in node.names
        ]
        assert not [m for m in imported if m and m.split(".")[0] == "audit_orm"], path.name
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"upgrade", "downgrade"} <= functions, path.name


def test_offline_mode_renders_the_whole_history() -> None:
    buffer = io.StringIO()
    config = Config(output_buffer=buffer)
    config.set_main_option("script_location", str(migrate.script_location()))
    config.set_main_option("sqlalchemy.url", "postgresql://offline@localhost/offline")
    command.upgrade(config, "heads", sql=True)
    sql = buffer.getvalue()
    assert "CREATE TABLE audit_events" in sql
    assert f"CREATE TABLE {migrate.VERSION_TABLE}" in sql
    assert "CREATE TRIGGER audit_events_before_insert" in sql
    for revision in _chain():
        assert f"'{revision}'" in sql, revision
    assert sql.rstrip().endswith("COMMIT;")


def test_revision_files_follow_the_layout() -> None:
    """The folder a host lists in ``version_locations`` holds revisions and nothing else."""
    folder = migrate.versions_location()
    assert folder == Path(migrate.script_location()) / "versions"
    stray = [p.name for p in folder.iterdir() if p.suffix != ".py" and p.name != "__pycache__"]
    assert stray == []
