"""Revision 0003: rows written before it are hashed and sealable; downgrade removes it all."""

from __future__ import annotations

import uuid
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit_orm import SealStatus, migrate, seal, verify
from audit_orm.models import Base
from tests.dbutil import scratch_database

BEFORE = "0002_order_clock_correlation"


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={
            "compare_type": True,
            "version_table": migrate.VERSION_TABLE,
        },
    )
    return list(compare_metadata(context, Base.metadata))


async def _schema(conn: AsyncConnection) -> dict[str, Any]:
    """What 0003 touches: columns, functions, triggers and their firing mode, tables."""
    columns = (
        await conn.execute(
            text(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'audit_events' ORDER BY ordinal_position"
            )
        )
    ).scalars()
    functions = (
        await conn.execute(
            text(
                "SELECT proname || ':' || md5(prosrc) FROM pg_proc "
                "WHERE pronamespace = 'public'::regnamespace ORDER BY 1"
            )
        )
    ).scalars()
    triggers = (
        await conn.execute(
            text(
                "SELECT tgname || ':' || tgenabled::text FROM pg_trigger "
                "WHERE NOT tgisinternal ORDER BY 1"
            )
        )
    ).scalars()
    tables = (
        await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
    ).scalars()
    constraints = (
        await conn.execute(
            text("SELECT conname FROM pg_constraint WHERE conrelid = 'audit_events'::regclass")
        )
    ).scalars()
    indexes = (
        await conn.execute(
            text("SELECT indexname FROM pg_indexes WHERE tablename = 'audit_events'")
        )
    ).scalars()
    return {
        "columns": list(columns),
        "functions": list(functions),
        "triggers": list(triggers),
        "tables": sorted(tables),
        "constraints": sorted(constraints),
        "indexes": sorted(indexes),
    }


async def _insert_before(engine: AsyncEngine) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(3)]
    async with engine.begin() as conn:
        for event_id in ids:
            await conn.execute(
                text(
                    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, actor, "
                    "data) VALUES (:id, 'order.accepted', 'order', :id, '', "
                    '\'{"ticker": "OLD", "n": 1.50}\')'
                ),
                {"id": event_id},
            )
    return ids


async def test_downgrade_restores_0002_exactly_and_upgrade_again_is_clean(
    admin_url: str,
) -> None:
    async with scratch_database(admin_url) as (_, engine):
        # Rows written before the package, one with an empty actor that only a
        # NOT VALID check lets stay: the backfill must not trip over it.
        await migrate.upgrade(engine, "0001_seed_table")
        ids = await _insert_before(engine)
        await migrate.upgrade(engine, BEFORE)
        async with engine.connect() as conn:
            before = await _schema(conn)

        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            after = await _schema(conn)
            assert await conn.run_sync(_diff) == []
            hashes = (
                await conn.execute(text("SELECT id, row_hash FROM audit_events ORDER BY seq"))
            ).all()
        assert sorted(row.id for row in hashes) == sorted(ids)
        assert all(len(row.row_hash) == 33 for row in hashes)
        assert after["tables"] == sorted([*before["tables"], "audit_seals"])
        assert {"audit_events_claim_xid:A", "audit_events_before_insert:A"} <= set(
            after["triggers"]
        )

        # Adopted rows seal and verify like any other.
        result = await seal(engine)
        assert result.status is SealStatus.SEALED and result.rows_sealed == 3
        assert (await verify(engine)).ok

        await migrate.downgrade(engine, BEFORE)
        async with engine.connect() as conn:
            assert await _schema(conn) == before

        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            assert await _schema(conn) == after
            assert await conn.run_sync(_diff) == []
            again = (
                await conn.execute(text("SELECT id, row_hash FROM audit_events ORDER BY seq"))
            ).all()
        # The same rows hash to the same values: the encoding depends on them alone.
        assert again == hashes
