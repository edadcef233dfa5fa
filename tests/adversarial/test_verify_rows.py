"""Adversarial: verify sees every row that exists, in the real tables, with their safeguards.

README, Sealing: verify pins ``search_path``, names every table by its schema,
reads every row in one pass, checks the triggers and uniqueness constraints it
relies on, and pins the chain's links and gaps at their edges.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditRepository,
    InvalidInputError,
    ProblemKind,
    SealInfo,
    VerifyReport,
    seal,
    verify,
)
from audit_orm.sealing import _seal_from_record
from audit_orm.verifying import _check_chain, _Problems
from tests.dbutil import GUARDS_OFF, triggers_disabled

HASH_ARGS = (
    "id, seq, event_type, entity_type, entity_id, actor, data, occurred_at, recorded_at, "
    "recommendation_id, order_id, ticker, corrects_id"
)
COLUMNS = (
    "id, seq, event_type, entity_type, entity_id, actor, data, occurred_at, recorded_at, "
    "recommendation_id, order_id, ticker, corrects_id, txid, row_hash"
)


async def _write(engine: AsyncEngine, count: int, *, rollback: bool = False) -> None:
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(count):
            await repo.order_accepted(uuid.uuid4(), "ACME", "brk")
        if rollback:
            await session.rollback()


async def _tamper(engine: AsyncEngine, *statements: str, **params: object) -> None:
    async with engine.begin() as conn, triggers_disabled(conn):
        for statement in statements:
            await conn.execute(text(statement), params)


async def _seals(engine: AsyncEngine) -> list[SealInfo]:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        records = await raw.driver_connection.fetch(  # type: ignore[union-attr]
            "SELECT seal_no, first_seq, last_seq, row_count, gaps, merkle_root, prev_hash, "
            "seal_hash, horizon_txid, cut_at, sealed_at FROM audit_seals ORDER BY seal_no"
        )
    return [_seal_from_record(record) for record in records]


async def _rewrite_chain(engine: AsyncEngine, changes: dict[int, dict[str, object]]) -> None:
    """Change seals, then recompute every seal hash and link as a thorough forger would."""
    previous: SealInfo | None = None
    # Read before the tables are locked for the rewrite, on another connection.
    stored = await _seals(engine)
    async with engine.begin() as conn, triggers_disabled(conn):
        await conn.execute(text("ALTER TABLE audit_seals DROP CONSTRAINT ck_audit_seals_hashes"))
        for info in stored:
            info = dataclasses.replace(info, **changes.get(info.seal_no, {}))  # type: ignore[arg-type]
            if "prev_hash" not in changes.get(info.seal_no, {}):
                info = dataclasses.replace(
                    info, prev_hash=None if previous is None else previous.seal_hash
                )
            info = dataclasses.replace(info, seal_hash=info.computed_hash())
            gaps = "{" + ",".join(f"[{low},{high + 1})" for low, high in info.gaps) + "}"
            await conn.execute(
                text(
                    "UPDATE audit_seals SET first_seq = :first, row_count = :count, "
                    "gaps = CAST(CAST(:gaps AS text) AS int8multirange), prev_hash = :prev, "
                    "seal_hash = :hash WHERE seal_no = :no"
                ),
                {
                    "first": info.first_seq,
                    "count": info.row_count,
                    "gaps": gaps,
                    "prev": info.prev_hash,
                    "hash": info.computed_hash(),
                    "no": info.seal_no,
                },
            )
            previous = info


def _kinds(report: VerifyReport) -> list[tuple[ProblemKind, int | None, int | None]]:
    return [(p.kind, p.seq, p.seal_no) for p in report.problems]


# ------------------------------------------------------------ every row, once


async def test_a_forged_row_sharing_a_sealed_seq_is_seen(fresh_db: tuple[str, AsyncEngine]) -> None:
    """Attack: a superuser drops the seq uniqueness and inserts a forged copy of sealed row 3
    with another actor and its hash recomputed.

    Before, rows were paged by ``seq > last``, the forged row was never read and
    ``verify --digest`` passed. Now the row is read and reported, the missing
    constraint is reported, and the digest (whose seals cover seq 3) does not match.
    """
    _, engine = fresh_db
    await _write(engine, 5)
    head = (await seal(engine, block_size=2)).head
    assert head is not None
    await _tamper(
        engine,
        "ALTER TABLE audit_events DROP CONSTRAINT uq_audit_events_seq",
        f"INSERT INTO audit_events ({COLUMNS}) OVERRIDING SYSTEM VALUE "
        "SELECT CAST(:forged AS uuid), seq, event_type, entity_type, entity_id, 'mallory', data, "
        "occurred_at, recorded_at, recommendation_id, order_id, ticker, corrects_id, txid, "
        "audit_event_row_hash(CAST(:forged AS uuid), seq, event_type, entity_type, entity_id, "
        "'mallory', data, occurred_at, recorded_at, recommendation_id, order_id, ticker, "
        "corrects_id) FROM audit_events WHERE seq = 3",
        forged=uuid.uuid4(),
    )
    report = await verify(engine, digest=head.digest)
    assert (ProblemKind.INSERTED_ROW, 3, 2) in _kinds(report)
    assert any(
        p.kind is ProblemKind.MISSING_SAFEGUARD and "audit_events.seq" in p.message
        for p in report.problems
    )
    assert report.digest_matched is False
    assert report.rows_checked == 6


# ----------------------------------------------------------- names and schemas


_SHADOW_VIEW = (
    "CREATE VIEW shadow.audit_events AS SELECT id, seq, event_type, entity_type, entity_id, "
    "CASE WHEN seq = 2 THEN (SELECT actor FROM public.audit_events WHERE seq = 1) "
    "ELSE actor END AS actor, data, occurred_at, recorded_at, recommendation_id, order_id, "
    "ticker, corrects_id, txid, row_hash FROM public.audit_events"
)


async def test_a_shadowing_view_does_not_hide_a_changed_row(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Attack: row 2's actor is changed, and a view ``shadow.audit_events`` that shows the
    old actor is put first on the auditor's ``search_path``.

    Before, verify read the view and found nothing. Now it reads the one real
    table, reports the changed row, and reports that the auditor's path leads
    ``audit_events`` to the view.
    """
    url, engine = fresh_db
    await _write(engine, 3)
    await seal(engine)
    await _tamper(engine, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE SCHEMA shadow"))
        await conn.execute(text(_SHADOW_VIEW))
    auditor = create_async_engine(
        url, connect_args={"server_settings": {"search_path": "shadow, public"}}
    )
    try:
        async with auditor.connect() as conn:
            shown = await conn.scalar(text("SELECT actor FROM audit_events WHERE seq = 2"))
        assert shown != "mallory"  # the view does fool a plain reader
        report = await verify(auditor)
    finally:
        await auditor.dispose()
    assert report.schema == "public"
    assert (ProblemKind.CHANGED_ROW, 2, 1) in _kinds(report)
    shadowed = [p for p in report.problems if p.kind is ProblemKind.SHADOWED_TABLE]
    assert len(shadowed) == 1 and "shadow.audit_events" in shadowed[0].message


async def test_two_schemas_with_audit_tables_must_be_told_apart(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A copy of the tables in another schema (a forged twin) is never silently chosen:
    without ``schema=`` verify refuses, naming both; with it, it verifies that one."""
    _, engine = fresh_db
    await _write(engine, 2)
    await seal(engine)
    async with engine.begin() as conn:
        await conn.execute(text("CREATE SCHEMA twin"))
        await conn.execute(text("CREATE TABLE twin.audit_events (LIKE public.audit_events)"))
        await conn.execute(text("CREATE TABLE twin.audit_seals (LIKE public.audit_seals)"))
    with pytest.raises(InvalidInputError, match="public, twin") as caught:
        await verify(engine)
    assert caught.value.field == "schema"
    report = await verify(engine, schema="public")
    assert report.ok and report.rows_checked == 2 and report.schema == "public"
    with pytest.raises(InvalidInputError, match="schema"):
        await verify(engine, schema="nowhere")


# ----------------------------------------------------------------- safeguards


@pytest.mark.parametrize(
    ("statement", "words"),
    [
        (
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only",
            "audit_events_append_only on public.audit_events is disabled",
        ),
        (
            "ALTER TABLE audit_seals ENABLE TRIGGER audit_seals_append_only",
            "audit_seals_append_only on public.audit_seals is enabled only outside replication",
        ),
        ("DROP TRIGGER audit_seals_append_only ON audit_seals", "audit_seals_append_only"),
        (
            "ALTER TABLE audit_events DISABLE TRIGGER audit_events_before_insert",
            "audit_events_before_insert",
        ),
        ("DROP TRIGGER audit_events_claim_xid ON audit_events", "audit_events_claim_xid"),
        (
            "CREATE OR REPLACE FUNCTION audit_orm_refuse_change() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
            "function was changed",
        ),
        ("ALTER TABLE audit_seals DROP CONSTRAINT uq_audit_seals_seal_hash", "seal_hash"),
    ],
    ids=[
        "events trigger disabled",
        "seals trigger not ALWAYS",
        "seals trigger dropped",
        "insert trigger disabled",
        "xid trigger dropped",
        "refusal made a no-op",
        "seal hash not unique",
    ],
)
async def test_a_missing_safeguard_is_reported(
    fresh_db: tuple[str, AsyncEngine], statement: str, words: str
) -> None:
    """Attack: a superuser turns the event triggers off (they refuse this to the owner),
    switches a safeguard off and leaves it off (no row touched yet).

    Before, verify said ok. Now it reports ``missing_safeguard`` naming it.
    """
    _, engine = fresh_db
    await _write(engine, 2)
    await seal(engine)
    async with engine.begin() as conn:
        for guard in GUARDS_OFF:
            await conn.execute(text(guard))
        await conn.execute(text(statement))
    report = await verify(engine)
    # One finding per trigger affected (a shared function changed affects two).
    assert {p.kind for p in report.problems} == {ProblemKind.MISSING_SAFEGUARD}
    assert words in report.problems[0].message


# ------------------------------------------------ the chain's links and edges


async def test_the_first_and_a_resumed_seal_link_where_they_must(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Seal 1 starts at seq 1 with no previous hash; the first seal of a later run
    continues the number, the range and the hash of the head it found."""
    _, engine = fresh_db
    await _write(engine, 3)
    first = (await seal(engine, block_size=2)).seals
    assert [(s.seal_no, s.first_seq, s.last_seq, s.prev_hash) for s in first[:1]] == [
        (1, 1, 2, None)
    ]
    assert first[1].prev_hash == first[0].seal_hash
    await _write(engine, 2)
    resumed = (await seal(engine, block_size=2)).seals
    assert (resumed[0].seal_no, resumed[0].first_seq) == (3, 4)
    assert resumed[0].prev_hash == first[-1].seal_hash


async def test_a_first_seal_given_a_previous_hash_breaks_the_chain(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Attack: seal 1 is given a previous hash and the whole chain recomputed (the check
    constraint that forbids it dropped). Only the first seal's link check can tell."""
    _, engine = fresh_db
    await _write(engine, 4)
    await seal(engine, block_size=2)
    await _rewrite_chain(engine, {1: {"prev_hash": b"\x01" + bytes(32)}})
    report = await verify(engine)
    assert _kinds(report) == [(ProblemKind.BROKEN_CHAIN, None, 1)]


async def test_a_resumed_seal_that_skips_a_seq_breaks_the_chain(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Attack: the first seal of a second run is made to start one seq later (its row
    count and the chain recomputed): the range no longer follows the seal before."""
    _, engine = fresh_db
    await _write(engine, 2)
    await seal(engine)
    await _write(engine, 3)
    await seal(engine)
    await _rewrite_chain(engine, {2: {"first_seq": 4, "row_count": 2}})
    report = await verify(engine)
    assert _kinds(report)[0] == (ProblemKind.BROKEN_CHAIN, None, 2)
    assert "starts at seq 4, not 3" in report.problems[0].message


@pytest.mark.parametrize(
    ("gaps", "row_count"),
    [(((7, 7),), 3), (((2, 2),), 2)],
    ids=["gap after the range", "gap before the range"],
)
async def test_a_gap_outside_its_seal_is_reported(
    fresh_db: tuple[str, AsyncEngine], gaps: tuple[tuple[int, int], ...], row_count: int
) -> None:
    """Attack: seal 2 (seq 4..6) is rewritten with a gap outside its range, hashes and
    chain recomputed. Before, such a seal was quietly distrusted and nothing reported."""
    _, engine = fresh_db
    await _write(engine, 3)
    await seal(engine)
    await _write(engine, 3)
    await seal(engine)
    await _rewrite_chain(engine, {2: {"gaps": gaps, "row_count": row_count}})
    report = await verify(engine)
    assert (ProblemKind.REWRITTEN_SEAL, None, 2) in _kinds(report)
    assert any("lists gap" in p.message for p in report.problems)


def _seal(gaps: Sequence[tuple[int, int]], row_count: int) -> SealInfo:
    info = SealInfo(
        seal_no=1,
        first_seq=1,
        last_seq=10,
        row_count=row_count,
        gaps=tuple(gaps),
        merkle_root=b"\x01" * 33,
        prev_hash=None,
        seal_hash=b"",
        horizon_txid=100,
        cut_at=datetime(2026, 1, 1, tzinfo=UTC),
        sealed_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return dataclasses.replace(info, seal_hash=info.computed_hash())


@pytest.mark.parametrize(
    ("gaps", "row_count", "valid"),
    [
        (((1, 1), (10, 10)), 8, True),  # gaps at both edges of the range
        (((2, 3), (5, 6)), 6, True),
        (((2, 3), (4, 6)), 5, True),  # adjacent, not overlapping
        (((2, 4), (4, 6)), 5, False),  # overlapping by one
        (((5, 6), (2, 3)), 6, False),  # out of order
        (((4, 3),), 8, False),  # reversed
        (((0, 1),), 8, False),  # starts before the range
        (((10, 11),), 8, False),  # ends after the range
    ],
)
def test_gap_lists_are_validated_at_their_edges(
    gaps: tuple[tuple[int, int], ...], row_count: int, valid: bool
) -> None:
    """The gap-list check accepts exactly the lists a sealer can write: inside the range
    (its first and last seq included), ascending, not overlapping."""
    found = _Problems(10)
    suspect = _check_chain([_seal(gaps, row_count)], found)
    assert (suspect == set() and found.count == 0) is valid
    if not valid:
        assert [p.kind for _, _, p in found.items] == [ProblemKind.REWRITTEN_SEAL]


async def test_rows_at_the_edges_of_gaps_are_pinned(fresh_db: tuple[str, AsyncEngine]) -> None:
    """A seal whose first and last seq are gaps: rows inserted at exactly those seqs are
    ``inserted_row`` and the rows right next to them, deleted, are ``deleted_row``,
    each at exactly its seq."""
    _, engine = fresh_db
    await _write(engine, 1, rollback=True)  # seq 1
    await _write(engine, 3)  # seq 2..4
    await _write(engine, 2, rollback=True)  # seq 5..6
    await _write(engine, 2)  # seq 7..8
    await _write(engine, 1, rollback=True)  # seq 9
    head = (await seal(engine)).head
    assert head is not None and (head.first_seq, head.last_seq) == (1, 9)
    assert head.gaps == ((1, 1), (5, 6), (9, 9))
    copy = (
        f"INSERT INTO audit_events ({COLUMNS}) OVERRIDING SYSTEM VALUE "
        "SELECT gen_random_uuid(), {seq}, event_type, entity_type, entity_id, actor, data, "
        "occurred_at, recorded_at, recommendation_id, order_id, ticker, corrects_id, txid, "
        "row_hash FROM audit_events WHERE seq = 3"
    )
    await _tamper(
        engine,
        *(copy.replace("{seq}", str(seq)) for seq in (1, 5, 6, 9)),
        f"UPDATE audit_events SET row_hash = audit_event_row_hash({HASH_ARGS}) "
        "WHERE seq IN (1, 5, 6, 9)",
        "DELETE FROM audit_events WHERE seq IN (2, 4, 7, 8)",
    )
    report = await verify(engine)
    assert _kinds(report) == [
        (ProblemKind.INSERTED_ROW, 1, 1),
        (ProblemKind.DELETED_ROW, 2, 1),
        (ProblemKind.DELETED_ROW, 4, 1),
        (ProblemKind.INSERTED_ROW, 5, 1),
        (ProblemKind.INSERTED_ROW, 6, 1),
        (ProblemKind.DELETED_ROW, 7, 1),
        (ProblemKind.INSERTED_ROW, 9, 1),
    ]
    assert "seq 7..8 (2 rows)" in report.problems[5].message
