"""The CLI's seal and grant branches the other CLI tests do not take.

README, "Command line": ``seal`` exits 0 when it sealed or had nothing to seal and 1 when a
writer's open transaction keeps it waiting, sealing nothing; ``grant`` prints the SQL it ran.
"""

from __future__ import annotations

import asyncio
import io
import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditRepository
from audit_orm.cli import main
from audit_orm.database import session_factory


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


async def _seal_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM audit_seals")) or 0)


async def test_seal_of_an_empty_trail_is_up_to_date_without_a_head(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Nothing recorded, nothing sealed: exit 0, "up to date", and no head line (no seal yet)."""
    url, engine = fresh_db
    code, out = await asyncio.to_thread(run, "--database-url", url, "seal")
    assert code == 0
    assert out.startswith("up to date")
    assert "head:" not in out
    assert await _seal_count(engine) == 0


async def test_seal_kept_waiting_by_an_open_writer_exits_1(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A writer's transaction holds a recorded row uncommitted while ``seal`` runs.

    Promise: sealing never seals past a row that may still commit; with no time
    to wait it says which transaction holds it back, exits 1, and writes no seal.
    """
    url, engine = fresh_db
    async with session_factory(engine)() as session:
        await AuditRepository(session).order_accepted(uuid.uuid4(), "X", "B")
        txid = await session.scalar(text("SELECT pg_current_xact_id()::text"))
        pid = await session.scalar(text("SELECT pg_backend_pid()"))
        code, out = await asyncio.to_thread(run, "--database-url", url, "seal", "--max-wait", "0")
        await session.rollback()
    assert code == 1
    assert out.startswith(f"waiting: transaction {txid} (pid {pid}) is still open")
    assert "nothing sealed" in out
    assert await _seal_count(engine) == 0


async def test_grant_prints_the_sql_it_ran(fresh_db: tuple[str, AsyncEngine]) -> None:
    """``grant --reader`` gives the role SELECT only and prints each statement it ran."""
    url, engine = fresh_db
    role = f"audit_reader_{uuid.uuid4().hex[:8]}"
    async with engine.connect() as conn:
        await conn.execute(text(f'CREATE ROLE "{role}"'))
        await conn.commit()
    try:
        code, out = await asyncio.to_thread(run, "--database-url", url, "grant", "--reader", role)
        assert code == 0
        lines = out.splitlines()
        assert lines
        assert all(line.endswith(";") for line in lines)
        assert any(line.startswith("GRANT SELECT") and role in line for line in lines)
        async with engine.connect() as conn:
            can_read, can_insert = (
                await conn.execute(
                    text(
                        "SELECT has_table_privilege(:r, 'audit_events', 'SELECT'), "
                        "has_table_privilege(:r, 'audit_events', 'INSERT')"
                    ),
                    {"r": role},
                )
            ).one()
        assert (can_read, can_insert) == (True, False)
    finally:
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP OWNED BY "{role}"'))
            await conn.execute(text(f'DROP ROLE "{role}"'))
            await conn.commit()
