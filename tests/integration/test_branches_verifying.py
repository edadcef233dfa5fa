"""verify's row branches that ordinary tampering does not reach: a seq shared by two rows,
before and after sealing, and a row whose transaction id was erased.

README, "Tamper evidence": verify reads every row and reports each change it can prove; a row
inserted with a seq already taken, or a row changed so that its hash cannot be computed, is
a problem, and the report is not ok.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, ProblemKind, seal, verify
from tests.dbutil import triggers_disabled

#: Every column of audit_events but ``id``, to copy a row under a new id.
_OTHER_COLUMNS = (
    "seq, event_type, entity_type, entity_id, actor, data, occurred_at, recorded_at, "
    "recommendation_id, order_id, ticker, corrects_id, txid, row_hash"
)


async def _write(engine: AsyncEngine, count: int) -> None:
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(count):
            await repo.order_accepted(uuid.uuid4(), "ACME", "brk")


async def _tamper(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn, triggers_disabled(conn):
        for statement in statements:
            await conn.execute(text(statement))


async def _duplicate_seq(engine: AsyncEngine, seq: int) -> None:
    """Drop seq's uniqueness and copy row ``seq`` under a new id."""
    await _tamper(
        engine,
        "ALTER TABLE audit_events DROP CONSTRAINT uq_audit_events_seq",
        f"INSERT INTO audit_events (id, {_OTHER_COLUMNS}) "
        f"SELECT gen_random_uuid(), {_OTHER_COLUMNS} FROM audit_events WHERE seq = {seq}",
    )


async def test_a_shared_seq_in_unsealed_rows_is_an_inserted_row(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Two unsealed rows share a seq: an INSERTED_ROW problem names it, with no seal."""
    _, engine = fresh_db
    await _write(engine, 3)
    await _duplicate_seq(engine, 2)
    report = await verify(engine)
    assert not report.ok
    shared = [p for p in report.problems if "shares its seq" in p.message]
    assert [(p.kind, p.seq, p.seal_no) for p in shared] == [(ProblemKind.INSERTED_ROW, 2, None)]


async def test_a_shared_seq_in_a_sealed_block_is_an_inserted_row_of_that_seal(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A copy of a sealed row under the same seq: the problem names the seal that covers it."""
    _, engine = fresh_db
    await _write(engine, 3)
    result = await seal(engine, block_size=10)
    assert len(result.seals) == 1
    await _duplicate_seq(engine, 2)
    report = await verify(engine)
    assert not report.ok
    shared = [p for p in report.problems if "shares its seq" in p.message]
    assert [(p.kind, p.seq, p.seal_no) for p in shared] == [(ProblemKind.INSERTED_ROW, 2, 1)]


async def test_a_row_without_its_transaction_id_is_unreadable(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A row whose txid was set to NULL cannot have its hash checked: a CHANGED_ROW problem."""
    _, engine = fresh_db
    await _write(engine, 3)
    await _tamper(
        engine,
        "ALTER TABLE audit_events ALTER COLUMN txid DROP NOT NULL",
        "UPDATE audit_events SET txid = NULL WHERE seq = 2",
    )
    report = await verify(engine)
    assert not report.ok
    changed = [p for p in report.problems if "unreadable (a column the hash covers" in p.message]
    assert [(p.kind, p.seq) for p in changed] == [(ProblemKind.CHANGED_ROW, 2)]
