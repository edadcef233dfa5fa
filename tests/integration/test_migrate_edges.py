"""Migration entry points at their edges: a caller's transaction, URLs with %, a broken install.

Promise (README, "Migrations"): given a connection already in a transaction,
every revision runs inside it, so the caller decides whether the migration
commits; given an engine, Alembic owns the transaction. These tests take the
connection path and the helpers' error paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncConnection

from audit_orm import migrate
from tests.dbutil import scratch_database


async def _tables(conn: AsyncConnection) -> set[str]:
    return set(await conn.run_sync(lambda sync: inspect(sync).get_table_names()))


async def test_upgrade_inside_the_callers_transaction_commits_or_rolls_back_with_it(
    admin_url: str,
) -> None:
    """Upgrading through a connection in a transaction: nothing stays if the caller rolls back.

    Then the same upgrade committed by the caller leaves the schema at head, and
    a downgrade through a connection in a transaction removes it again.
    """
    async with scratch_database(admin_url) as (_url, engine):
        async with engine.connect() as conn:
            await conn.begin()
            await migrate.upgrade(conn)
            assert "audit_events" in await _tables(conn)
            await conn.rollback()
            assert "audit_events" not in await _tables(conn)
            await conn.rollback()

            await conn.begin()
            await migrate.upgrade(conn)
            await conn.commit()
        async with engine.connect() as conn:
            heads = await conn.run_sync(migrate.current_heads)
            assert set(heads) == _heads()
            await conn.rollback()
            await conn.begin()
            await migrate.downgrade(conn, "base")
            await conn.commit()
        async with engine.connect() as conn:
            assert "audit_events" not in await _tables(conn)
            assert await conn.run_sync(migrate.current_heads) == ()


def _heads() -> set[str]:
    return set(ScriptDirectory.from_config(migrate.alembic_config()).get_heads())


def test_a_url_with_percent_signs_reaches_alembic_unchanged() -> None:
    """Alembic's config file syntax treats % specially; a password holding one must survive."""
    url = "postgresql+asyncpg://auditor:p%40ss%25word@db.internal/audit"
    config = migrate.alembic_config(url)
    assert config.get_main_option("sqlalchemy.url") == url
    assert migrate.alembic_config().get_main_option("sqlalchemy.url") is None


def test_missing_migrations_are_reported_plainly(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An installation without its migration scripts says so instead of failing later."""
    monkeypatch.setattr(migrate, "__file__", str(tmp_path / "audit_orm" / "migrate.py"))
    with pytest.raises(FileNotFoundError, match="migrations are missing"):
        migrate.script_location()


def test_the_versions_folder_holds_every_revision() -> None:
    """versions_location() is where a host application finds the revision files."""
    folder = migrate.versions_location()
    assert folder.is_dir()
    assert folder.parent == migrate.script_location()
    assert len(list(folder.glob("0*.py"))) == len(migrate.revision_ids())


async def test_the_version_table_is_named_for_audit_orm(admin_url: str) -> None:
    """Standalone mode records its revisions in its own table, never the host's."""
    async with scratch_database(admin_url) as (_url, engine):
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            tables = await _tables(conn)
            assert migrate.VERSION_TABLE in tables
            assert "alembic_version" not in tables
            count = await conn.scalar(text(f"SELECT count(*) FROM {migrate.VERSION_TABLE}"))
            assert count == len(_heads())
