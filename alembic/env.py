"""Alembic environment for audit_orm (async, asyncpg).

Three ways in:
* ``alembic upgrade head`` from a checkout: the URL comes from
  ``AUDIT_ORM_DATABASE_URL`` (or ``sqlalchemy.url`` / ``-x url=...``);
* :func:`audit_orm.migrate.upgrade`: the caller hands over a connection in
  ``config.attributes["connection"]``;
* a host application's own environment includes ``versions/`` through
  ``version_locations`` and never runs this file.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from alembic.util import CommandError
from sqlalchemy import pool
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine

from audit_orm.database import DATABASE_URL_ENV, asyncpg_url
from audit_orm.migrate import VERSION_TABLE, migration_lock
from audit_orm.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get(DATABASE_URL_ENV)
    )
    if not url:
        raise CommandError(
            f"no database URL: set {DATABASE_URL_ENV}, for example "
            f"{DATABASE_URL_ENV}=postgresql://user:password@localhost:5432/trading"
        )
    try:
        return asyncpg_url(url)
    except Exception as exc:
        raise CommandError(f"{DATABASE_URL_ENV} is not a usable PostgreSQL URL: {exc}") from exc


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        compare_server_default=False,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


def _where(url: str) -> str:
    parsed = make_url(url)
    host = parsed.host or parsed.query.get("host") or "localhost"
    port = parsed.port or parsed.query.get("port") or 5432
    return f"database {parsed.database!r} on {host} port {port}"


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        # Only the connect is guarded: an error inside a migration keeps its
        # full traceback, since that is what its author needs.
        try:
            connection = await engine.connect().start()
        except (TimeoutError, OSError) as exc:
            raise CommandError(
                f"cannot reach the database server ({_where(url)}): {exc}; "
                f"check {DATABASE_URL_ENV} and that PostgreSQL is running"
            ) from exc
        except DBAPIError as exc:
            raise CommandError(
                f"cannot connect to the database ({_where(url)}): {exc.orig}; "
                f"check {DATABASE_URL_ENV}"
            ) from exc
        try:
            # One migration of a database at a time, whoever runs it.
            async with migration_lock(connection):
                await connection.run_sync(_configure)
                await connection.commit()
        finally:
            await connection.close()
    finally:
        await engine.dispose()


def run_offline() -> None:
    """Emit SQL instead of running it (``alembic upgrade head --sql``)."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Run against a live database."""
    given = config.attributes.get("connection")
    if given is not None:
        _configure(given)
        return
    asyncio.run(_run_async(_url()))


if context.is_offline_mode():
    run_offline()
else:
    run_online()
