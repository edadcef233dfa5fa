"""Verification against a superuser who disables the triggers and edits the tables.

Each test builds the same sealed trail, tampers with it one way, and checks that
:func:`verify` names what was done and where.

Seals after the setup (block size 5, two sealing runs)::

    seal 1: seq 1..5      seal 2: seq 6..12, gap 8..9 (rolled back)
    seal 3: seq 13..15    seal 4: seq 16..20 (second run)
    seq 21, 22: written after the last seal
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditRepository,
    Digest,
    ProblemKind,
    SealInfo,
    SealStatus,
    VerifyReport,
    seal,
    verify,
)
from audit_orm.hashing import merkle_root
from audit_orm.sealing import _seal_from_record
from tests.dbutil import triggers_disabled

HASH_ARGS = (
    "id, seq, event_type, entity_type, entity_id, actor, data, occurred_at, recorded_at, "
    "recommendation_id, order_id, ticker, corrects_id"
)


@dataclass(frozen=True)
class Trail:
    engine: AsyncEngine
    ids: dict[int, uuid.UUID]
    digest: Digest


async def _write(engine: AsyncEngine, count: int, *, rollback: bool = False) -> None:
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(count):
            await repo.order_filled(uuid.uuid4(), "ACME", "buy", 10, "101.50", "brk")
        if rollback:
            await session.rollback()


@pytest.fixture
async def trail(fresh_db: tuple[str, AsyncEngine]) -> Trail:
    _, engine = fresh_db
    await _write(engine, 7)
    await _write(engine, 2, rollback=True)
    await _write(engine, 6)
    assert [s.last_seq for s in (await seal(engine, block_size=5)).seals] == [5, 12, 15]
    await _write(engine, 5)
    result = await seal(engine, block_size=5)
    assert result.status is SealStatus.SEALED and result.head is not None
    await _write(engine, 2)
    async with engine.connect() as conn:
        ids = dict((await conn.execute(text("SELECT seq, id FROM audit_events"))).all())
    assert sorted(ids) == [*range(1, 8), *range(10, 23)]
    report = await verify(engine, digest=result.head.digest)
    assert report.ok and report.digest_matched
    return Trail(engine, ids, result.head.digest)


async def tamper(engine: AsyncEngine, *statements: str, **params: object) -> None:
    """Run ``statements`` as a superuser with the append-only triggers disabled.

    The triggers are put back as they were afterwards: a tamperer who leaves
    them disabled is reported for that too (see tests/adversarial).
    """
    async with engine.begin() as conn, triggers_disabled(conn):
        for statement in statements:
            await conn.execute(text(statement), params)


async def stored_seals(engine: AsyncEngine) -> list[SealInfo]:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        records = await raw.driver_connection.fetch(  # type: ignore[union-attr]
            "SELECT seal_no, first_seq, last_seq, row_count, gaps, merkle_root, prev_hash, "
            "seal_hash, horizon_txid, cut_at, sealed_at FROM audit_seals ORDER BY seal_no"
        )
    return [_seal_from_record(record) for record in records]


async def rewrite_seal(engine: AsyncEngine, info: SealInfo) -> None:
    await tamper(
        engine,
        "UPDATE audit_seals SET merkle_root = :root, prev_hash = :prev, seal_hash = :hash "
        "WHERE seal_no = :no",
        root=info.merkle_root,
        prev=info.prev_hash,
        hash=info.seal_hash,
        no=info.seal_no,
    )


def only(report: VerifyReport) -> None:
    assert not report.ok
    assert report.problem_count == 1, report.problems


async def test_changed_payload_is_named(trail: Trail) -> None:
    await tamper(
        trail.engine,
        "UPDATE audit_events SET data = jsonb_set(data, '{fill_price}', '99.50') WHERE seq = 11",
    )
    report = await verify(trail.engine)
    only(report)
    problem = report.problems[0]
    assert problem.kind is ProblemKind.CHANGED_ROW
    assert (problem.seq, problem.seal_no, problem.event_id) == (11, 2, trail.ids[11])
    assert "seq 11" in str(problem) and str(trail.ids[11]) in str(problem)


@pytest.mark.parametrize(("seq", "seal_no"), [(3, 1), (22, None)])
async def test_changed_actor_is_named(trail: Trail, seq: int, seal_no: int | None) -> None:
    await tamper(trail.engine, f"UPDATE audit_events SET actor = 'someone_else' WHERE seq = {seq}")
    report = await verify(trail.engine)
    only(report)
    problem = report.problems[0]
    assert (problem.kind, problem.seq, problem.seal_no) == (ProblemKind.CHANGED_ROW, seq, seal_no)


async def test_changed_row_with_a_recomputed_hash_breaks_its_block(trail: Trail) -> None:
    await tamper(
        trail.engine,
        "UPDATE audit_events SET actor = 'someone_else' WHERE seq = 14",
        f"UPDATE audit_events SET row_hash = audit_event_row_hash({HASH_ARGS}) WHERE seq = 14",
    )
    report = await verify(trail.engine)
    only(report)
    problem = report.problems[0]
    assert (problem.kind, problem.seal_no) == (ProblemKind.BLOCK_MISMATCH, 3)
    assert "seq 13..15" in problem.message


async def test_deleted_rows_are_named(trail: Trail) -> None:
    await tamper(trail.engine, "DELETE FROM audit_events WHERE seq IN (12, 16, 17)")
    report = await verify(trail.engine)
    assert [(p.kind, p.seq, p.seal_no) for p in report.problems] == [
        (ProblemKind.DELETED_ROW, 12, 2),
        (ProblemKind.DELETED_ROW, 16, 4),
    ]
    assert "16..17 (2 rows)" in report.problems[1].message


async def test_deleted_rows_at_the_end_of_the_chain_are_named(trail: Trail) -> None:
    await tamper(trail.engine, "DELETE FROM audit_events WHERE seq >= 19")
    report = await verify(trail.engine)
    only(report)
    problem = report.problems[0]
    assert (problem.kind, problem.seq, problem.seal_no) == (ProblemKind.DELETED_ROW, 19, 4)
    assert report.unsealed_rows == 0


_BACKDATED = (
    "INSERT INTO audit_events (id, seq, event_type, entity_type, entity_id, actor, data, "
    "occurred_at, recorded_at, txid, row_hash) OVERRIDING SYSTEM VALUE "
    "SELECT :id, n.seq, 'order.filled', 'order', :entity, 'broker_service', CAST(:data AS jsonb), "
    ":when, :when, '1'::xid8, audit_event_row_hash(:id, n.seq, 'order.filled', 'order', :entity, "
    "'broker_service', CAST(:data AS jsonb), :when, :when, NULL, NULL, NULL, NULL) "
    "FROM (SELECT ({seq})::bigint AS seq OFFSET 0) AS n"
)


@pytest.mark.parametrize(
    ("seq", "seal_no", "words"),
    [(8, 2, "recorded no row there"), (0, 1, "before the first sealed range")],
    ids=["into a gap", "before everything"],
)
async def test_back_dated_row_in_a_sealed_range_is_named(
    trail: Trail, seq: int, seal_no: int, words: str
) -> None:
    forged = uuid.uuid4()
    # seq >= 1 is a CHECK constraint: a superuser drops it first.
    await tamper(
        trail.engine,
        "ALTER TABLE audit_events DROP CONSTRAINT ck_audit_events_seq_positive",
        _BACKDATED.format(seq=seq),
        id=forged,
        data='{"ticker": "ACME"}',
        entity=uuid.uuid4(),
        when=datetime(2020, 1, 1, tzinfo=UTC),
    )
    report = await verify(trail.engine)
    only(report)
    problem = report.problems[0]
    assert (problem.kind, problem.seq, problem.seal_no) == (ProblemKind.INSERTED_ROW, seq, seal_no)
    assert problem.event_id == forged
    assert words in problem.message


async def test_back_dated_row_appended_after_the_seals_is_named(trail: Trail) -> None:
    await tamper(
        trail.engine,
        _BACKDATED.format(seq="nextval(pg_get_serial_sequence('audit_events', 'seq'))"),
        id=uuid.uuid4(),
        data='{"ticker": "ACME"}',
        entity=uuid.uuid4(),
        when=datetime(2020, 1, 1, tzinfo=UTC),
    )
    report = await verify(trail.engine)
    only(report)
    problem = report.problems[0]
    assert (problem.kind, problem.seq) == (ProblemKind.BACKDATED_ROW, 23)


async def test_rewritten_seal_is_named(trail: Trail) -> None:
    await tamper(
        trail.engine,
        "UPDATE audit_seals SET gaps = '{[8,11)}', row_count = 4 WHERE seal_no = 2",
    )
    report = await verify(trail.engine)
    first = report.first_problem
    assert first is not None
    assert (first.kind, first.seal_no) == (ProblemKind.REWRITTEN_SEAL, 2)


async def test_rewritten_seal_with_its_own_hash_recomputed_breaks_the_next_link(
    trail: Trail,
) -> None:
    seals = await stored_seals(trail.engine)
    changed = dataclasses.replace(seals[1], merkle_root=b"\x01" + bytes(32))
    await rewrite_seal(
        trail.engine, dataclasses.replace(changed, seal_hash=changed.computed_hash())
    )
    report = await verify(trail.engine)
    # The block no longer matches its (new) root, and the next seal no longer
    # links to the rewritten one.
    assert [(p.kind, p.seal_no) for p in report.problems] == [
        (ProblemKind.BLOCK_MISMATCH, 2),
        (ProblemKind.BROKEN_CHAIN, 3),
    ]


async def test_a_chain_rewritten_end_to_end_only_fails_against_the_digest(trail: Trail) -> None:
    # Change a row, fix its hash, then recompute every seal from its block on.
    await tamper(
        trail.engine,
        "UPDATE audit_events SET actor = 'someone_else' WHERE seq = 4",
        f"UPDATE audit_events SET row_hash = audit_event_row_hash({HASH_ARGS}) WHERE seq = 4",
    )
    async with trail.engine.connect() as conn:
        leaves = list(
            (
                await conn.execute(
                    text("SELECT row_hash FROM audit_events WHERE seq <= 5 ORDER BY seq")
                )
            ).scalars()
        )
    seals = await stored_seals(trail.engine)
    previous: SealInfo | None = None
    for index, info in enumerate(seals):
        info = dataclasses.replace(
            info,
            merkle_root=merkle_root(leaves) if index == 0 else info.merkle_root,
            prev_hash=None if previous is None else previous.seal_hash,
        )
        info = dataclasses.replace(info, seal_hash=info.computed_hash())
        await rewrite_seal(trail.engine, info)
        previous = info

    assert (await verify(trail.engine)).ok
    report = await verify(trail.engine, digest=trail.digest)
    only(report)
    problem = report.problems[0]
    assert (problem.kind, problem.seal_no) == (ProblemKind.REWRITTEN_SEAL, 4)
    assert report.digest_matched is False


async def test_dropped_last_seal_is_named_by_the_digest(trail: Trail) -> None:
    await tamper(trail.engine, "DELETE FROM audit_seals WHERE seal_no = 4")
    # Without a record kept outside, a chain cut short looks whole.
    plain = await verify(trail.engine)
    assert plain.ok and plain.unsealed_rows == 7 and plain.seals_checked == 3
    report = await verify(trail.engine, digest=str(trail.digest))
    only(report)
    problem = report.problems[0]
    assert (problem.kind, problem.seal_no) == (ProblemKind.REMOVED_SEAL, 4)
    assert "chain ends at seal 3" in problem.message
    bare = await verify(trail.engine, digest=trail.digest.seal_hash.hex())
    only(bare)
    assert bare.problems[0].kind is ProblemKind.REMOVED_SEAL


async def test_dropped_middle_seal_is_named(trail: Trail) -> None:
    await tamper(trail.engine, "DELETE FROM audit_seals WHERE seal_no = 2")
    report = await verify(trail.engine)
    first = report.first_problem
    assert first is not None
    assert (first.kind, first.seal_no) == (ProblemKind.REMOVED_SEAL, 2)
    # Its rows are accounted for by that one finding, not reported one by one.
    assert all(p.kind is not ProblemKind.INSERTED_ROW for p in report.problems)


async def test_problems_come_earliest_first_and_all_are_counted(trail: Trail) -> None:
    await tamper(
        trail.engine,
        "DELETE FROM audit_events WHERE seq = 18",
        "UPDATE audit_events SET actor = 'x' WHERE seq IN (2, 21, 22)",
    )
    report = await verify(trail.engine, max_problems=2)
    assert report.problem_count == 4
    assert [(p.kind, p.seq) for p in report.problems] == [
        (ProblemKind.CHANGED_ROW, 2),
        (ProblemKind.DELETED_ROW, 18),
    ]
