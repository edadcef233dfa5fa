"""Fixtures for tests that need a database of their own (sealing, tampering, roles).

Migrating a database takes a while, so one migrated template is made per test
session and every fresh database is a copy of it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit_orm import migrate
from tests.dbutil import create_database, drop_database, with_database


@pytest.fixture(scope="session")
async def migrated_template(admin_url: str) -> AsyncIterator[str]:
    """The name of a database migrated to head, used only as a template."""
    url = await create_database(admin_url, "audit_orm_template")
    engine = create_async_engine(url)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()
    yield str(make_url(url).database)
    await drop_database(admin_url, url)


@pytest.fixture
async def fresh_db(
    admin_url: str, migrated_template: str
) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A migrated, empty database of the test's own, and an engine on it."""
    name = f"audit_orm_fresh_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{migrated_template}"'))
    finally:
        await admin.dispose()
    url = with_database(admin_url, name)
    engine = create_async_engine(url, pool_size=20, max_overflow=5)
    try:
        yield url, engine
    finally:
        await engine.dispose()
        await drop_database(admin_url, url)
