"""Sixteen writers and the sealer at once: every committed row sealed exactly once."""

from __future__ import annotations

import asyncio
import random
import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, SealResult, SealStatus, seal, verify

WRITERS = 16
TRANSACTIONS = 20


class _Abort(Exception):
    pass


async def _writer(
    engine: AsyncEngine, rng: random.Random, committed: set[uuid.UUID], lost: dict[uuid.UUID, int]
) -> None:
    for _ in range(TRANSACTIONS):
        mode = rng.choice(["commit", "commit", "rollback", "savepoint"])
        written: list[tuple[uuid.UUID, int]] = []
        try:
            async with AsyncSession(engine) as session, session.begin():
                repo = AuditRepository(session)
                for _ in range(rng.randint(1, 3)):
                    record = await repo.order_accepted(uuid.uuid4(), "ACME", "brk")
                    written.append((record.id, record.seq))
                if mode == "savepoint":
                    # Part of a transaction undone, the rest committed.
                    savepoint = await session.begin_nested()
                    dropped = await repo.order_cancelled(uuid.uuid4(), "ACME", "brk")
                    await savepoint.rollback()
                    lost[dropped.id] = dropped.seq
                # Transactions overlap, and the sealer gets many turns while they run.
                await asyncio.sleep(rng.random() / 50)
                if mode == "rollback":
                    raise _Abort
        except _Abort:
            lost.update(written)
        else:
            committed.update(event_id for event_id, _ in written)


async def test_sixteen_writers_and_the_sealer(fresh_db: tuple[str, AsyncEngine]) -> None:
    _, engine = fresh_db
    committed: set[uuid.UUID] = set()
    lost: dict[uuid.UUID, int] = {}
    writers = [
        asyncio.create_task(_writer(engine, random.Random(n), committed, lost))
        for n in range(WRITERS)
    ]
    results: list[SealResult] = []
    while not all(task.done() for task in writers):
        results.append(await seal(engine, block_size=16, max_wait=10))
        await asyncio.sleep(0.01)
    await asyncio.gather(*writers)
    results.append(await seal(engine, block_size=16, max_wait=10))

    sealed_while_writing = [r for r in results[:-1] if r.status is SealStatus.SEALED]
    assert len(sealed_while_writing) >= 3
    assert all(r.status is not SealStatus.WAITING for r in results)
    assert lost, "some transactions must have rolled back"

    async with engine.connect() as conn:
        rows = dict((await conn.execute(text("SELECT id, seq FROM audit_events"))).all())
        seals = (
            await conn.execute(
                text(
                    "SELECT seal_no, first_seq, last_seq, row_count, "
                    "array(SELECT ARRAY[lower(r), upper(r) - 1] FROM unnest(gaps) r) "
                    "FROM audit_seals ORDER BY seal_no"
                )
            )
        ).all()
        next_free = await conn.scalar(
            text("SELECT last_value FROM audit_events_seq_seq")  # nothing is drawn any more
        )

    assert set(rows) == committed
    assert not set(lost) & set(rows)
    # The chain covers 1..the last number drawn, each number exactly once.
    covering: dict[int, int] = {}
    expected_first = 1
    for number, (seal_no, first, last, count, gaps) in enumerate(seals, start=1):
        assert (seal_no, first) == (number, expected_first)
        gap_seqs = {seq for low, high in gaps for seq in range(low, high + 1)}
        present = {seq for seq in rows.values() if first <= seq <= last}
        assert len(present) == count
        assert present | gap_seqs == set(range(first, last + 1))
        assert not present & gap_seqs
        for seq in range(first, last + 1):
            covering[seq] = seal_no
        expected_first = last + 1
    # A seal holds at least one row, so numbers drawn after the last row by
    # transactions that rolled back wait for the next row to be sealed: the
    # chain reaches the last number drawn, or stops short only at such numbers.
    trailing = set(range(expected_first, next_free + 1))
    assert trailing <= set(lost.values())
    assert all(seq in covering for seq in rows.values())
    # Every other rolled-back number is a recorded gap, not a hole.
    assert all(seq in covering for seq in set(lost.values()) - trailing)

    report = await verify(engine)
    assert report.ok, report.problems
    assert report.rows_checked == len(committed) and report.unsealed_rows == 0
