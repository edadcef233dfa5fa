"""Sealing: closed ranges only, contiguous chain, gaps, idempotence, sealers take turns."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditRepository,
    Digest,
    InvalidInputError,
    SealingError,
    SealStatus,
    digest,
    seal,
    verify,
)
from audit_orm.hashing import merkle_root
from audit_orm.sealing import Progress, SealInfo
from tests.dbutil import GUARDS_OFF

Fresh = tuple[str, AsyncEngine]


async def write(engine: AsyncEngine, count: int, *, rollback: bool = False) -> list[int]:
    """Record ``count`` events in one transaction; return their seqs."""
    seqs: list[int] = []
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(count):
            seqs.append((await repo.order_accepted(uuid.uuid4(), "ACME", "brk")).seq)
        if rollback:
            await session.rollback()
    return seqs


async def seals_of(engine: AsyncEngine) -> list[tuple[int, int, int, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT seal_no, first_seq, last_seq, row_count FROM audit_seals ORDER BY 1")
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def assert_contiguous(seals: Sequence[tuple[int, int, int, int]]) -> None:
    expected_first = 1
    for number, (seal_no, first, last, _) in enumerate(seals, start=1):
        assert seal_no == number
        assert first == expected_first
        assert last >= first
        expected_first = last + 1


async def test_an_empty_trail_is_up_to_date(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    result = await seal(engine)
    assert result.status is SealStatus.UP_TO_DATE
    assert result.seals == () and result.head is None
    assert await digest(engine) is None
    report = await verify(engine)
    assert report.ok and report.rows_checked == 0 and report.seals_checked == 0


async def test_seals_blocks_chains_them_and_verifies(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    await write(engine, 25)
    reports: list[Progress] = []
    result = await seal(engine, block_size=10, progress=reports.append)
    assert result.status is SealStatus.SEALED
    assert [s.row_count for s in result.seals] == [10, 10, 5]
    assert result.rows_sealed == 25
    assert [r.done for r in reports] == [10, 20, 25]
    stored = await seals_of(engine)
    assert_contiguous(stored)
    assert stored[-1][2] == 25
    assert result.head == result.seals[-1]
    first, second, third = result.seals
    assert first.prev_hash is None
    assert second.prev_hash == first.seal_hash and third.prev_hash == second.seal_hash
    assert all(s.computed_hash() == s.seal_hash for s in result.seals)
    assert all(s.horizon_txid == first.horizon_txid for s in result.seals)

    found = await digest(engine)
    assert found == Digest(third.seal_hash, 3)
    report = await verify(engine, digest=str(found))
    assert report.ok, report.problems
    assert (report.rows_checked, report.seals_checked, report.unsealed_rows) == (25, 3, 0)
    assert report.digest_matched is True


async def test_sealing_is_idempotent_and_continues_the_chain(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    await write(engine, 3)
    first = await seal(engine)
    assert first.status is SealStatus.SEALED
    again = await seal(engine)
    assert again.status is SealStatus.UP_TO_DATE
    assert again.seals == () and again.head == first.head
    await write(engine, 4)
    later = await seal(engine)
    assert later.status is SealStatus.SEALED
    (added,) = later.seals
    assert first.head is not None
    assert (added.seal_no, added.first_seq, added.row_count) == (2, first.head.last_seq + 1, 4)
    assert added.prev_hash == first.head.seal_hash
    assert added.cut_at > first.head.cut_at
    assert (await verify(engine)).ok


async def test_rolled_back_numbers_become_gaps(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    kept = await write(engine, 2)
    lost = await write(engine, 3, rollback=True)
    kept += await write(engine, 2)
    # Only rolled-back numbers after the last row: the range still closes.
    lost += await write(engine, 2, rollback=True)
    result = await seal(engine)
    (only,) = result.seals
    assert only.first_seq == 1 and only.last_seq == lost[-1]
    assert only.row_count == 4
    assert only.gaps == ((lost[0], lost[2]), (lost[3], lost[4]))
    async with engine.connect() as conn:
        hashes = (
            await conn.execute(text("SELECT row_hash FROM audit_events ORDER BY seq"))
        ).scalars()
        assert merkle_root(list(hashes)) == only.merkle_root
    assert (await verify(engine)).ok
    # Nothing new but burnt numbers: nothing to seal, and the next seal picks up.
    await write(engine, 1, rollback=True)
    assert (await seal(engine)).status is SealStatus.UP_TO_DATE
    await write(engine, 1)
    (next_seal,) = (await seal(engine)).seals
    assert next_seal.first_seq == only.last_seq + 1
    assert next_seal.gaps == ((next_seal.first_seq, next_seal.first_seq),)
    assert (await verify(engine)).ok


async def _xid_and_pid(session: AsyncSession) -> tuple[int, int]:
    row = (await session.execute(text("SELECT pg_current_xact_id()::text, pg_backend_pid()"))).one()
    return int(row[0]), int(row[1])


async def test_an_open_writer_holds_sealing_back_and_is_named(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    await write(engine, 2)
    async with AsyncSession(engine) as writer, writer.begin():
        pending = await AuditRepository(writer).order_accepted(uuid.uuid4(), "ACME", "b")
        xid, pid = await _xid_and_pid(writer)
        result = await seal(engine, max_wait=0.2)
        assert result.status is SealStatus.WAITING
        assert (result.blocking_txid, result.blocking_pid) == (xid, pid)
        assert result.seals == () and await seals_of(engine) == []
    result = await seal(engine)
    assert result.status is SealStatus.SEALED
    assert result.head is not None and result.head.last_seq == pending.seq
    assert result.rows_sealed == 3


async def _sealer_is_waiting(engine: AsyncEngine) -> None:
    """Until a backend holds the seal lock and a transaction id (it is waiting for writers)."""
    for _ in range(500):
        async with engine.connect() as conn:
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                    "WHERE l.locktype = 'relation' AND l.relation = 'audit_seals'::regclass "
                    "AND l.mode = 'ShareRowExclusiveLock' AND l.granted "
                    "AND a.backend_xid IS NOT NULL"
                )
            )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the sealer never started waiting")


async def test_concurrent_sealers_take_turns(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    await write(engine, 5)
    async with AsyncSession(engine) as writer, writer.begin():
        late = await AuditRepository(writer).order_accepted(uuid.uuid4(), "ACME", "b")
        first = asyncio.create_task(seal(engine, max_wait=30))
        await _sealer_is_waiting(engine)
        others = asyncio.gather(*(seal(engine, max_wait=30) for _ in range(3)))
        assert not first.done()
    # The others queued on the seal lock behind the first and found nothing left.
    assert [r.status for r in await others] == [SealStatus.UP_TO_DATE] * 3
    result = await first
    assert result.status is SealStatus.SEALED
    assert result.head is not None and result.head.last_seq == late.seq
    assert result.rows_sealed == 6
    assert_contiguous(await seals_of(engine))


async def test_a_number_not_drawn_in_order_stops_sealing(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    burnt = await write(engine, 1, rollback=True)
    await write(engine, 2)
    # No writer can take a number out of order (the insert trigger draws seq
    # whatever the INSERT says); a superuser who turns the guards and the
    # insert trigger off can.
    async with engine.begin() as conn:
        for statement in GUARDS_OFF:
            await conn.execute(text(statement))
        await conn.execute(
            text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_before_insert")
        )
    async with engine.connect() as writer, writer.begin():
        # A writer's open transaction, as the sealer sees one: an id and an
        # INSERT's lock on the table.
        await writer.execute(text("LOCK TABLE audit_events IN ROW EXCLUSIVE MODE"))
        await writer.execute(text("SELECT pg_current_xact_id()"))
        sealer = asyncio.create_task(seal(engine, max_wait=30))
        await _sealer_is_waiting(engine)
        # A transaction newer than the sealer's horizon takes a number that
        # was handed out long ago.
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO audit_events "
                    "(id, seq, event_type, entity_type, entity_id, occurred_at, row_hash) "
                    "VALUES (:id, :seq, 'order.accepted', 'order', :entity, now(), "
                    "'\\x01'::bytea || sha256(''))"
                ),
                {"id": uuid.uuid4(), "seq": burnt[0], "entity": uuid.uuid4()},
            )
    with pytest.raises(SealingError, match=f"seq={burnt[0]}"):
        await sealer
    assert await seals_of(engine) == []


async def test_a_caching_sequence_is_refused(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    await write(engine, 1)
    async with engine.begin() as conn:
        await conn.execute(text("ALTER SEQUENCE audit_events_seq_seq CACHE 20"))
    with pytest.raises(SealingError, match="CACHE 1"):
        await seal(engine)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"max_wait": -1}, "max_wait"),
    ],
)
async def test_bad_seal_arguments(fresh_db: Fresh, options: dict[str, object], field: str) -> None:
    _, engine = fresh_db
    with pytest.raises(InvalidInputError, match=field):
        await seal(engine, **options)  # type: ignore[arg-type]


async def test_bad_verify_arguments(fresh_db: Fresh) -> None:
    _, engine = fresh_db
    with pytest.raises(InvalidInputError, match="digest"):
        await verify(engine, digest="nope")
    with pytest.raises(InvalidInputError, match="max_problems"):
        await verify(engine, max_problems=0)


def test_seal_info_digest() -> None:
    info = SealInfo(
        seal_no=4,
        first_seq=1,
        last_seq=1,
        row_count=1,
        gaps=(),
        merkle_root=b"\x01" * 33,
        prev_hash=None,
        seal_hash=b"\x02" * 33,
        horizon_txid=1,
        cut_at=None,  # type: ignore[arg-type]
        sealed_at=None,  # type: ignore[arg-type]
    )
    assert str(info.digest) == "4:" + "02" * 33
