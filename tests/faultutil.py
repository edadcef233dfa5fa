"""Test support for faults: a committed-to database with a business table, lock holders."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Uuid,
    event,
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import AuditEvent, migrate
from tests.dbutil import create_database, drop_database

#: The business table of the tests: what a trading service changes next to its audit events.
business = MetaData()
positions = Table(
    "positions",
    business,
    Column("order_id", Uuid, primary_key=True),
    Column("ticker", String(32), nullable=False),
    Column("quantity", Numeric, nullable=False),
    Column("version", Integer, nullable=False, server_default=text("1")),
)


@asynccontextmanager
async def business_database(admin_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A fresh database migrated to head, plus the business table; dropped afterwards."""
    url = await create_database(admin_url, "audit_orm_fault")
    engine = create_async_engine(url)
    try:
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(business.create_all)
        yield url, engine
    finally:
        await engine.dispose()
        await drop_database(admin_url, url)


@asynccontextmanager
async def audit_table_locked(engine: AsyncEngine, mode: str = "SHARE") -> AsyncIterator[None]:
    """Another connection holds a lock on audit_events: SHARE blocks every INSERT,
    ACCESS EXCLUSIVE every read too."""
    assert mode in {"SHARE", "ACCESS EXCLUSIVE"}
    async with engine.connect() as conn:
        await conn.execute(text(f"LOCK TABLE audit_events IN {mode} MODE"))
        try:
            yield
        finally:
            await conn.rollback()


async def set_timeout(session: AsyncSession, setting: str, value: str) -> None:
    """``SET LOCAL`` a timeout for the rest of the session's transaction."""
    assert setting in {"lock_timeout", "statement_timeout"}
    await session.execute(text(f"SET LOCAL {setting} = '{value}'"))


async def event_counts(engine: AsyncEngine, ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, int]:
    """How many rows each event id has (0 if absent), read on a fresh connection."""
    wanted = list(ids)
    counts = dict.fromkeys(wanted, 0)
    async with engine.connect() as conn:
        for start in range(0, len(wanted), 5000):
            rows = await conn.execute(
                select(AuditEvent.id, func.count())
                .where(AuditEvent.id.in_(wanted[start : start + 5000]))
                .group_by(AuditEvent.id)
            )
            counts.update({row[0]: row[1] for row in rows})
    return counts


async def total_events(engine: AsyncEngine) -> int:
    """Rows in audit_events."""
    async with engine.connect() as conn:
        value: Any = await conn.scalar(select(func.count()).select_from(AuditEvent))
    return int(value)


async def position_of(engine: AsyncEngine, order_id: uuid.UUID) -> Any:
    """The committed business row of an order, or ``None``."""
    async with engine.connect() as conn:
        return (
            await conn.execute(select(positions).where(positions.c.order_id == order_id))
        ).first()


def unreachable_url(url: str) -> str:
    """``url`` pointed at a socket directory that does not exist: connecting fails at once."""
    parsed = make_url(url)
    query = {**parsed.query, "host": "/nonexistent/audit-orm-test-socket"}
    return parsed.set(host=None, port=None, query=query).render_as_string(hide_password=False)


async def kill_backend(session: AsyncSession, engine: AsyncEngine) -> None:
    """Terminate the server process behind ``session`` from another connection."""
    pid = await session.scalar(text("SELECT pg_backend_pid()"))
    async with engine.connect() as other:
        killed = await other.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        await other.commit()
    assert killed is True


@contextmanager
def failing_statements(engine: AsyncEngine, prefix: str) -> Iterator[list[str]]:
    """Statements of ``engine`` starting with ``prefix`` fail on the server.

    Each is replaced by a division by zero, so the server reports an error and
    aborts the transaction while the connection stays up: what a SAVEPOINT
    does behind a pooler that moved the transaction to another server
    connection, or any failure of the savepoint statement itself. Yields the
    statements that were made to fail.
    """
    hits: list[str] = []

    def swap(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> tuple[str, Any]:
        if statement.lstrip().upper().startswith(prefix):
            hits.append(statement)
            return "SELECT 1/0", parameters
        return statement, parameters

    event.listen(engine.sync_engine, "before_cursor_execute", swap, retval=True)
    try:
        yield hits
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", swap)
