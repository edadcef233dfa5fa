"""Run audit_orm's Alembic migrations from Python (no checkout needed).

The revisions ship inside the package; :func:`alembic_config` points Alembic at
them, and :func:`upgrade` runs them on an engine or connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

#: The version table of standalone use, apart from a host application's own.
VERSION_TABLE = "audit_orm_alembic_version"
#: The branch label of audit_orm's revisions, for ``alembic upgrade audit_orm@head``.
BRANCH_LABEL = "audit_orm"


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``.

    In a checkout that is the repository's ``alembic/``; in an installed wheel,
    the copy packaged as ``audit_orm/_migrations``.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("audit_orm's migrations are missing from this installation")


def versions_location() -> Path:
    """The ``versions/`` folder, for a host application's ``version_locations``."""
    return script_location() / "versions"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic :class:`Config` for audit_orm's own migrations."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _run(connection: Connection, revision: str, action: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def upgrade(target: AsyncEngine | AsyncConnection, revision: str = "heads") -> None:
    """Migrate the database of ``target`` to ``revision`` (default: the latest)."""
    await _on(target, revision, "upgrade")


async def downgrade(target: AsyncEngine | AsyncConnection, revision: str) -> None:
    """Migrate the database of ``target`` down to ``revision`` (``base`` removes everything)."""
    await _on(target, revision, "downgrade")


async def _on(target: AsyncEngine | AsyncConnection, revision: str, action: str) -> None:
    if isinstance(target, AsyncEngine):
        async with target.begin() as conn:
            await conn.run_sync(_run, revision, action)
    else:
        await target.run_sync(_run, revision, action)


def current_heads(connection: Connection) -> Any:
    """The revisions the database is at (for diagnostics)."""
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_heads()
