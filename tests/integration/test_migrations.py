"""The migrations: up, down, up again; step by step; autogenerate; the ``alembic`` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, migrate
from audit_orm.database import DATABASE_URL_ENV
from audit_orm.models import Base
from tests.dbutil import scratch_database, with_database

REPO_ROOT = Path(__file__).resolve().parents[2]


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(migrate.alembic_config())


def _head() -> str:
    heads = _script().get_heads()
    assert len(heads) == 1, heads
    return heads[0]


async def _state(engine: AsyncEngine) -> dict[str, Any]:
    """What the migrations leave behind: tables, functions, triggers, version rows."""
    async with engine.connect() as conn:
        tables = set(
            (
                await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            ).scalars()
        )
        functions = set(
            (
                await conn.execute(
                    text(
                        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n "
                        "ON n.oid = p.pronamespace WHERE n.nspname = 'public'"
                    )
                )
            ).scalars()
        )
        sequences = set(
            (
                await conn.execute(
                    text("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'")
                )
            ).scalars()
        )
        versions: list[str] = []
        if migrate.VERSION_TABLE in tables:
            versions = list(
                (
                    await conn.execute(text(f"SELECT version_num FROM {migrate.VERSION_TABLE}"))
                ).scalars()
            )
    return {
        "tables": tables - {migrate.VERSION_TABLE},
        "functions": functions,
        "sequences": sequences,
        "versions": versions,
    }


async def _record_and_read(engine: AsyncEngine) -> None:
    """A migrated database takes an event and gives it back with a seq."""
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        rec_id = uuid.uuid4()
        written = await repo.recommendation_generated(rec_id, "AAPL", "buy", "paper", 0.8, 3)
        trail = await repo.entity_trail("recommendation", rec_id)
    assert [r.id for r in trail] == [written.id]
    assert written.seq >= 1


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "compare_server_default": False,
            "version_table": migrate.VERSION_TABLE,
            "target_metadata": Base.metadata,
        },
    )
    return list(compare_metadata(context, Base.metadata))


def test_single_head_with_branch_label() -> None:
    script = _script()
    assert len(script.get_heads()) == 1
    base = script.get_revision("0001_seed_table")
    assert base is not None
    assert migrate.BRANCH_LABEL in base.branch_labels
    # Every revision is reachable from the head in one straight line.
    walked = [r.revision for r in script.walk_revisions("base", "heads")]
    assert walked[-1] == "0001_seed_table"
    assert walked[0] == _head()


async def test_upgrade_downgrade_upgrade(admin_url: str) -> None:
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine)
        state = await _state(engine)
        assert state["tables"] == {"audit_events", "audit_seals"}
        assert "audit_events_before_insert" in state["functions"]
        assert state["versions"] == [_head()]

        await migrate.downgrade(engine, "base")
        state = await _state(engine)
        assert state["tables"] == set()
        assert state["functions"] == set()
        assert state["sequences"] == set()
        assert state["versions"] == []

        await migrate.upgrade(engine)
        assert (await _state(engine))["versions"] == [_head()]
        await _record_and_read(engine)


async def test_every_revision_steps_down_and_up(admin_url: str) -> None:
    script = _script()
    # From head to base, oldest last.
    chain = [r.revision for r in script.walk_revisions("base", "heads")]
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine)
        await _record_and_read(engine)
        for i, revision in enumerate(chain):
            below = chain[i + 1] if i + 1 < len(chain) else "base"
            await migrate.downgrade(engine, below)
            expected = [] if below == "base" else [below]
            assert (await _state(engine))["versions"] == expected, revision
        assert (await _state(engine))["tables"] == set()
        for revision in reversed(chain):
            await migrate.upgrade(engine, revision)
            assert (await _state(engine))["versions"] == [revision]
        await _record_and_read(engine)


async def test_autogenerate_finds_no_difference(admin_url: str) -> None:
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
    assert diff == []


async def test_autogenerate_sees_a_real_difference(admin_url: str) -> None:
    """The comparison is live: a dropped index is reported, so an empty diff means something."""
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(text("DROP INDEX ix_audit_events_ticker_seq"))
        async with engine.connect() as conn:
            diff = await conn.run_sync(_diff)
    assert [(d[0], d[1].name) for d in diff] == [("add_index", "ix_audit_events_ticker_seq")]


def _alembic(*args: str, url: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != DATABASE_URL_ENV}
    if url is not None:
        env[DATABASE_URL_ENV] = url
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_alembic_command_line_uses_the_environment_url(admin_url: str) -> None:
    async with scratch_database(admin_url) as (url, engine):
        done = _alembic("upgrade", "head", url=url)
        assert done.returncode == 0, done.stderr
        assert (await _state(engine))["versions"] == [_head()]
        current = _alembic("current", url=url)
        assert current.returncode == 0, current.stderr
        assert _head() in current.stdout
        down = _alembic("downgrade", "base", url=url)
        assert down.returncode == 0, down.stderr
        assert (await _state(engine))["tables"] == set()


def test_alembic_command_line_without_url_says_what_to_set() -> None:
    done = _alembic("upgrade", "head", url=None)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert DATABASE_URL_ENV in output
    assert "Traceback" not in output


def test_alembic_command_line_with_unreachable_server(tmp_path: Path) -> None:
    # A socket directory with no server in it: the connection is refused at once.
    url = f"postgresql://postgres@/postgres?host={tmp_path}&port=5432"
    done = _alembic("upgrade", "head", url=url)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "cannot reach the database server" in output
    assert str(tmp_path) in output
    assert "Traceback" not in output


async def test_alembic_command_line_with_missing_database(admin_url: str) -> None:
    """The server answers but refuses the connection: still one clear line."""
    url = with_database(admin_url, f"no_such_db_{uuid.uuid4().hex[:8]}")
    done = _alembic("upgrade", "head", url=url)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "cannot connect to the database" in output
    assert "does not exist" in output
    assert "Traceback" not in output
