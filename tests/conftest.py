"""Fixtures: one real PostgreSQL per test session, a rolled-back transaction per test.

Tests that need a database of their own (sealing, tampering, roles) get a copy
of one migrated template (`fresh_db`), since migrating takes a while.

The server is an embedded PostgreSQL started for the session, or the one named
by ``AUDIT_ORM_TEST_DATABASE_URL``. Each session gets a fresh database migrated
to head; each test runs inside a transaction that is rolled back, with the
session joined through savepoints so code under test may commit or roll back
freely (SQLAlchemy's "joining a session into an external transaction" recipe).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import AuditRepository, migrate
from tests.dbutil import create_database, drop_database, server_url, with_database


@pytest.fixture(scope="session")
def admin_url() -> str:
    """Admin URL of the session's PostgreSQL server."""
    # A private folder rather than pytest's tmp_path: pytest prunes old base
    # folders, which can pull the data directory from under a concurrent run.
    root = Path(tempfile.mkdtemp(prefix="audit-orm-tests-"))
    return server_url(root)


@pytest.fixture(scope="session")
async def db_url(admin_url: str) -> AsyncIterator[str]:
    """A fresh database migrated to head, for the whole session."""
    url = await create_database(admin_url)
    engine = create_async_engine(url)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()
    yield url
    await drop_database(admin_url, url)


@pytest.fixture(scope="session")
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """The session's engine on the migrated database."""
    eng = create_async_engine(db_url)
    yield eng
    await eng.dispose()


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    """A session inside a transaction that is rolled back after the test."""
    async with engine.connect() as conn:
        outer = await conn.begin()
        sess = AsyncSession(
            bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False
        )
        try:
            yield sess
        finally:
            await sess.close()
            await outer.rollback()


@pytest.fixture
def repo(session: AsyncSession) -> AuditRepository:
    """A repository on the per-test session."""
    return AuditRepository(session)


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
