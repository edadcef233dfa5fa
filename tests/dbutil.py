"""Test support: throwaway databases on one real PostgreSQL server."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from audit_orm.database import asyncpg_url, start_embedded

TEST_URL_ENV = "AUDIT_ORM_TEST_DATABASE_URL"

#: What a superuser runs before tampering: audit_orm's event triggers refuse
#: disabling the tables' triggers and rewriting the tables, so they go first.
GUARDS_OFF = (
    "ALTER EVENT TRIGGER audit_orm_check_ddl DISABLE",
    "ALTER EVENT TRIGGER audit_orm_refuse_rewrite DISABLE",
)
#: And what puts them back.
GUARDS_ON = (
    "ALTER EVENT TRIGGER audit_orm_check_ddl ENABLE ALWAYS",
    "ALTER EVENT TRIGGER audit_orm_refuse_rewrite ENABLE ALWAYS",
)


def server_url(tmp_root: Path) -> str:
    """The admin URL of the test server: the configured one, or a fresh embedded one."""
    configured = os.environ.get(TEST_URL_ENV)
    if configured:
        return asyncpg_url(configured)
    return start_embedded(tmp_root / "pgdata", keep_data=False)


def with_database(url: str, name: str) -> str:
    """``url`` pointing at database ``name``."""
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def asyncpg_dsn(url: str) -> dict[str, object]:
    """Keyword arguments for :func:`asyncpg.connect` from a SQLAlchemy URL."""
    parsed = make_url(url)
    kwargs: dict[str, object] = {
        "user": parsed.username,
        "password": parsed.password,
        "database": parsed.database,
        "host": parsed.query.get("host") or parsed.host,
        "port": int(parsed.query.get("port") or parsed.port or 5432),  # type: ignore[arg-type]
    }
    return {k: v for k, v in kwargs.items() if v is not None}


async def connect_raw(url: str) -> asyncpg.Connection:
    """A plain asyncpg connection (for legacy code and tampering)."""
    return await asyncpg.connect(**asyncpg_dsn(url))  # type: ignore[arg-type]


async def create_database(admin_url: str, prefix: str = "audit_orm_test") -> str:
    """Create an empty database and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, url: str) -> None:
    """Drop a database made by :func:`create_database`."""
    name = make_url(url).database
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@asynccontextmanager
async def scratch_database(admin_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """An empty database and an engine on it, dropped afterwards."""
    url = await create_database(admin_url, "audit_orm_scratch")
    engine = create_async_engine(url)
    try:
        yield url, engine
    finally:
        await engine.dispose()
        await drop_database(admin_url, url)


@asynccontextmanager
async def triggers_disabled(conn: AsyncConnection) -> AsyncIterator[None]:
    """The audit tables' user triggers disabled inside the block, restored as they were after.

    For tests that tamper as a superuser and then check what verification
    finds in the rows, not that the triggers were left off.
    """
    states = (
        await conn.execute(
            text(
                "SELECT c.relname, t.tgname, t.tgenabled::text FROM pg_trigger t "
                "JOIN pg_class c ON c.oid = t.tgrelid "
                "WHERE c.oid IN ('audit_events'::regclass, 'audit_seals'::regclass) "
                "AND NOT t.tgisinternal"
            )
        )
    ).all()
    for statement in GUARDS_OFF:
        await conn.execute(text(statement))
    await conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER USER"))
    await conn.execute(text("ALTER TABLE audit_seals DISABLE TRIGGER USER"))
    yield
    modes = {"A": "ENABLE ALWAYS", "O": "ENABLE", "R": "ENABLE REPLICA", "D": "DISABLE"}
    for table, trigger, state in states:
        await conn.execute(text(f'ALTER TABLE {table} {modes[state]} TRIGGER "{trigger}"'))
    for statement in GUARDS_ON:
        await conn.execute(text(statement))
