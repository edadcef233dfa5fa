"""Adversarial review: the order is the database's, not a writer's.

README, "Guarantees": rows are "in the order the database recorded them" and
``seq`` is assigned by the database. The writer role of ``audit-orm grant`` may
INSERT by plain SQL; these tests try to choose ``seq`` that way.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import AuditRepository, grant, migrate, seal, verify
from tests.dbutil import scratch_database

_FORGED = (
    "INSERT INTO audit_events (id, seq, event_type, entity_type, entity_id, occurred_at) "
    "OVERRIDING SYSTEM VALUE "
    "VALUES (:id, :seq, 'approval.approved', 'approval', :entity, "
    "'2020-01-01 00:00:00+00')"
)


@pytest.fixture
async def writer(fresh_db: tuple[str, AsyncEngine]) -> AsyncIterator[AsyncEngine]:
    """An engine logged in as a writer role made by ``grant``."""
    url, owner = fresh_db
    name = f"order_writer_{uuid.uuid4().hex[:8]}"
    async with owner.begin() as conn:
        await conn.execute(text(f'CREATE ROLE "{name}" NOLOGIN'))
    await grant(owner, writer=name)
    engine = create_async_engine(url, connect_args={"server_settings": {"role": name}})
    try:
        yield engine
    finally:
        await engine.dispose()
        async with owner.begin() as conn:
            await conn.execute(text(f'DROP OWNED BY "{name}"'))
            await conn.execute(text(f'DROP ROLE "{name}"'))


async def _record(engine: AsyncEngine, *, rollback: bool = False) -> int:
    async with AsyncSession(engine) as session, session.begin():
        seq = (await AuditRepository(session).order_accepted(uuid.uuid4(), "ACME", "b")).seq
        if rollback:
            await session.rollback()
    return seq


async def _forge(engine: AsyncEngine, seq: int) -> tuple[uuid.UUID, int]:
    """The writer inserts by plain SQL asking for ``seq``; returns the id and the seq stored."""
    forged = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(text(_FORGED), {"id": forged, "seq": seq, "entity": uuid.uuid4()})
        stored = await conn.scalar(
            text("SELECT seq FROM audit_events WHERE id = :id"), {"id": forged}
        )
    return forged, int(stored)


async def test_a_writer_cannot_fill_a_rolled_back_gap(
    fresh_db: tuple[str, AsyncEngine], writer: AsyncEngine
) -> None:
    """README: seq is the database's recorded order; a sealed gap stays a gap.

    A rolled-back insert leaves a gap; the writer role asks for that number
    with ``OVERRIDING SYSTEM VALUE`` for a back-dated approval. The database
    must give the row the next number instead, and sealing records the gap.
    """
    _, owner = fresh_db
    await _record(owner)
    gap = await _record(owner, rollback=True)
    after = await _record(owner)
    _, stored = await _forge(writer, gap)
    assert stored == after + 1
    assert (await seal(owner)).rows_sealed == 3
    async with owner.connect() as conn:
        gaps = await conn.scalar(text("SELECT gaps::text FROM audit_seals"))
    assert gaps == f"{{[{gap},{gap + 1})}}"
    assert (await verify(owner)).ok


async def test_a_writer_cannot_take_the_next_number_nor_a_negative_one(
    fresh_db: tuple[str, AsyncEngine], writer: AsyncEngine
) -> None:
    """README: seq is assigned by the database; legitimate inserts never fail on it.

    The writer asks for the number the next legitimate insert would draw, and
    for a negative one. Both rows get numbers from the sequence, the next
    legitimate insert succeeds, and seal and verify pass.
    """
    _, owner = fresh_db
    last = await _record(owner)
    _, taken = await _forge(writer, last + 1)
    assert taken == last + 1
    _, negative = await _forge(writer, -5)
    assert negative == last + 2
    assert await _record(owner) == last + 3
    assert (await seal(owner)).rows_sealed == 4
    report = await verify(owner)
    assert report.ok, report.problems


async def test_a_writer_cannot_choose_seq_in_a_batch_or_by_copy(
    fresh_db: tuple[str, AsyncEngine], writer: AsyncEngine
) -> None:
    """README: seq is assigned by the database on every insert path.

    A multi-row INSERT ... SELECT and a COPY naming ``seq`` both get numbers
    from the sequence, in the order the rows arrive.
    """
    _, owner = fresh_db
    last = await _record(owner)
    async with writer.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO audit_events (id, seq, event_type, entity_type, entity_id, "
                "occurred_at) OVERRIDING SYSTEM VALUE "
                "SELECT gen_random_uuid(), 1000 - n, 'order.accepted', 'order', "
                "gen_random_uuid(), now() FROM generate_series(1, 3) AS n ORDER BY n"
            )
        )
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.copy_records_to_table(
            "audit_events",
            records=[(uuid.uuid4(), 1, "order.accepted", "order", uuid.uuid4())],
            columns=["id", "seq", "event_type", "entity_type", "entity_id"],
        )
        seqs = list(
            await conn.scalars(
                text("SELECT seq FROM audit_events WHERE seq > :s ORDER BY seq"), {"s": last}
            )
        )
    assert seqs == [last + 1, last + 2, last + 3, last + 4]


async def test_the_sequence_goes_on_where_the_identity_stopped(admin_url: str) -> None:
    """README, Migrations: upgrading keeps every row and the order goes on.

    A table at 0004 with rows and a rolled-back number is upgraded: the next
    row continues after the highest number ever drawn (no reuse of the gap),
    and a downgrade back to the identity continues the same way.
    """
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine, "0004_trail_indexes")
        async with engine.begin() as conn:
            for _ in range(3):
                await conn.execute(
                    text(
                        "INSERT INTO audit_events (id, event_type, entity_type, entity_id, "
                        "occurred_at) VALUES (gen_random_uuid(), 'order.accepted', 'order', "
                        "gen_random_uuid(), now())"
                    )
                )
        burnt = await _record_raw(engine, rollback=True)
        assert burnt == 4
        await migrate.upgrade(engine)
        assert await _record(engine) == 5
        await migrate.downgrade(engine, "0004_trail_indexes")
        assert await _record_raw(engine) == 6
        await migrate.upgrade(engine)
        assert await _record(engine) == 7
        async with engine.connect() as conn:
            identity = await conn.scalar(
                text(
                    "SELECT is_identity FROM information_schema.columns "
                    "WHERE table_name = 'audit_events' AND column_name = 'seq'"
                )
            )
        assert identity == "NO"


async def _record_raw(engine: AsyncEngine, *, rollback: bool = False) -> int:
    """One row by plain SQL (the schema of any revision); its seq."""
    conn = await engine.connect()
    try:
        trans = await conn.begin()
        seq = await conn.scalar(
            text(
                "INSERT INTO audit_events (id, event_type, entity_type, entity_id, occurred_at) "
                "VALUES (gen_random_uuid(), 'order.accepted', 'order', gen_random_uuid(), now()) "
                "RETURNING seq"
            )
        )
        await (trans.rollback() if rollback else trans.commit())
    finally:
        await conn.close()
    return int(seq)


async def test_the_insert_trigger_takes_txid_then_seq_then_the_clock(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README, Sealing: a range is closed once older writers end; a row numbered after a
    seal's cut is never recorded before it (verify's clock-step rule).

    Both rest on the order inside the insert trigger, which no race in a test
    reliably shows: the transaction id before ``nextval``, and the clock after.
    The trigger runs with its owner's rights and a pinned search_path, so a
    writer needs nothing on the sequence and cannot redirect a name.
    """
    _, engine = fresh_db
    async with engine.connect() as conn:
        body, definer, config = (
            await conn.execute(
                text(
                    "SELECT prosrc, prosecdef, proconfig FROM pg_proc "
                    "WHERE oid = 'audit_events_before_insert'::regproc"
                )
            )
        ).one()
    xid = body.index("NEW.txid := pg_catalog.pg_current_xact_id()")
    seq = body.index("NEW.seq := pg_catalog.nextval(")
    clock = body.index("NEW.recorded_at := pg_catalog.clock_timestamp()")
    hashed = body.index("NEW.row_hash :=")
    assert xid < seq < clock < hashed
    assert definer is True
    assert config == ["search_path=pg_catalog, pg_temp"]
