"""Revision 0004: covering trail indexes, matching the models, used by the order trail."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, Base, migrate
from audit_orm.repository import order_trail_statement
from tests.dbutil import scratch_database


async def index_definitions(engine: AsyncEngine) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT c.relname, pg_get_indexdef(c.oid), coalesce(c.reloptions, '{}') "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = 'audit_events'::regclass"
            )
        )
        return {name: f"{ddl} {options}" for name, ddl, options in rows}


async def test_indexes_as_revision_0004_defines_them(engine: AsyncEngine) -> None:
    found = await index_definitions(engine)
    assert "INCLUDE (entity_id, recommendation_id)" in found["ix_audit_events_order_id_seq"]
    assert "WHERE (order_id IS NOT NULL)" in found["ix_audit_events_order_id_seq"]
    assert "INCLUDE (entity_id)" in found["ix_audit_events_recommendation_id_seq"]
    assert "autosummarize=on" in found["ix_audit_events_recorded_at"]
    # The models declare the same.
    indexes = {i.name: i for i in Base.metadata.tables["audit_events"].indexes}
    include = indexes["ix_audit_events_order_id_seq"].dialect_options["postgresql"]["include"]
    assert list(include) == ["entity_id", "recommendation_id"]


async def test_indexes_from_models_equal_indexes_from_migrations(
    engine: AsyncEngine, admin_url: str
) -> None:
    """Autogenerate compares neither INCLUDE nor storage options: compare them here."""
    async with scratch_database(admin_url) as (_url, scratch):
        async with scratch.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        from_models = await index_definitions(scratch)
    assert await index_definitions(engine) == from_models


async def test_downgrade_restores_plain_indexes(admin_url: str) -> None:
    async with scratch_database(admin_url) as (_url, scratch):
        await migrate.upgrade(scratch)
        await migrate.downgrade(scratch, "0003_append_only_sealing")
        found = await index_definitions(scratch)
        assert "INCLUDE" not in found["ix_audit_events_order_id_seq"]
        assert "INCLUDE" not in found["ix_audit_events_recommendation_id_seq"]
        assert "autosummarize" not in found["ix_audit_events_recorded_at"]
        await migrate.upgrade(scratch)
        assert "INCLUDE" in (await index_definitions(scratch))["ix_audit_events_order_id_seq"]


async def test_order_trail_finds_its_chain_in_the_indexes(
    repo: AuditRepository, session: AsyncSession
) -> None:
    """With scans other than index scans discouraged, the chain lookups are index-only."""
    order = uuid.uuid4()
    await repo.order_submitted(order, "ABC", "buy", 1, "limit", "k1", uuid.uuid4())
    await session.execute(text("SET LOCAL enable_seqscan = off"))
    await session.execute(text("SET LOCAL enable_bitmapscan = off"))
    sql = str(
        order_trail_statement(order).compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
        )
    )
    plan = "\n".join((await session.execute(text("EXPLAIN " + sql))).scalars())
    assert "Index Only Scan using ix_audit_events_order_id_seq on audit_events by_order" in plan
    assert (
        "Index Only Scan using ix_audit_events_recommendation_id_seq on audit_events "
        "by_recommendation" in plan
    )
    assert "Index Only Scan using ix_audit_events_order_id_seq on audit_events first_link" in plan
