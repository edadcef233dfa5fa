"""The host application's Alembic environment (async, asyncpg).

It is the ordinary async template plus two lines for audit_orm: nothing here
names audit_orm's revisions (``version_locations`` brings them in), and
``include_name`` keeps audit_orm's tables out of the host's autogenerate. The
default version table, ``alembic_version``, records the host's revisions and
audit_orm's alike.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from audit_orm import migrate
from tests.hostapp.models import HostBase

config = context.config
target_metadata = HostBase.metadata

#: Where the command line finds the database.
URL_ENV = "HOSTAPP_DATABASE_URL"


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # audit_orm's tables are migrated by audit_orm's revisions, never by
        # the host's autogenerate.
        include_name=migrate.include_name,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure)
            await connection.commit()
    finally:
        await engine.dispose()


def run_online() -> None:
    """Run on the connection handed over by the caller, or on the configured URL."""
    given = config.attributes.get("connection")
    if given is not None:
        _configure(given)
    else:
        asyncio.run(_run_async(config.get_main_option("sqlalchemy.url") or os.environ[URL_ENV]))


run_online()
