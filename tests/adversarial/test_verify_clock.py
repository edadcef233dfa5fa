"""Adversarial: a server clock stepped back is a notice with evidence, never hidden tampering.

README, Sealing ("Clock steps"): a row dated no more than the clock tolerance
before the cut of a sealing run that precedes it is a ``clock_step`` notice (the
report stays ok, sealed or not); further back it is ``backdated_row``; a clock
step hides no inserted, changed or deleted row.

The step is simulated by the insert trigger itself: for a while it stamps
``recorded_at`` a fixed two seconds before the last seal's cut (plus one
microsecond per ``seq``, so time still moves forward), exactly the readings a
clock stepped back would give, through the normal insert path and hash.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditRepository,
    InvalidInputError,
    NoticeKind,
    ProblemKind,
    SealStatus,
    VerifyReport,
    seal,
    verify,
)
from audit_orm.cli import main
from tests.dbutil import GUARDS_OFF, GUARDS_ON, triggers_disabled

HASH_ARGS = (
    "id, seq, event_type, entity_type, entity_id, actor, data, occurred_at, recorded_at, "
    "recommendation_id, order_id, ticker, corrects_id"
)
STAMP = "NEW.recorded_at := pg_catalog.clock_timestamp();"


async def _write(engine: AsyncEngine, count: int, *, rollback: bool = False) -> None:
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(count):
            await repo.order_accepted(uuid.uuid4(), "ACME", "brk")
        if rollback:
            await session.rollback()


async def _last_cut(engine: AsyncEngine) -> datetime:
    async with engine.connect() as conn:
        cut = await conn.scalar(text("SELECT max(cut_at) FROM audit_seals"))
    assert isinstance(cut, datetime)
    return cut


@asynccontextmanager
async def clock_stepped_back(engine: AsyncEngine, behind: timedelta) -> AsyncIterator[None]:
    """Inserts inside the block are stamped ``behind`` before the last seal's cut."""
    base = await _last_cut(engine) - behind
    async with engine.begin() as conn:
        original = await conn.scalar(
            text("SELECT pg_get_functiondef('audit_events_before_insert'::regproc)")
        )
        assert isinstance(original, str) and STAMP in original
        for statement in GUARDS_OFF:  # they refuse replacing the function
            await conn.execute(text(statement))
        stepped = original.replace(
            STAMP,
            f"NEW.recorded_at := TIMESTAMPTZ '{base.isoformat()}' "
            "+ NEW.seq * INTERVAL '1 microsecond';",
        )
        await conn.execute(text(stepped))
    try:
        yield
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(original))
            for statement in GUARDS_ON:
                await conn.execute(text(statement))


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


@dataclass(frozen=True)
class Stepped:
    url: str
    engine: AsyncEngine


@pytest.fixture
async def stepped(fresh_db: tuple[str, AsyncEngine]) -> Stepped:
    """seq 1..5 and a rolled-back 6 sealed (seal 1, gap 6); then the clock steps back 2 s
    for seq 7..9; then it is right again for seq 10..11. Nothing after seal 1 is sealed."""
    url, engine = fresh_db
    await _write(engine, 5)
    await _write(engine, 1, rollback=True)
    first = await seal(engine)
    assert first.status is SealStatus.SEALED and first.head is not None
    assert (first.head.last_seq, first.head.gaps) == (6, ((6, 6),))
    async with clock_stepped_back(engine, timedelta(seconds=2)):
        await _write(engine, 3)
    await _write(engine, 2)
    return Stepped(url, engine)


def _one_step(report: VerifyReport) -> None:
    assert [(n.kind, n.first_seq, n.last_seq, n.rows, n.seal_no) for n in report.notices] == [
        (NoticeKind.CLOCK_STEP, 7, 9, 3, 1)
    ]
    assert 1.99 < report.notices[0].seconds <= 2.0
    assert "seq 7..9 (3 rows)" in str(report.notices[0])


async def test_a_clock_stepped_back_two_seconds_is_a_notice_before_and_after_sealing(
    stepped: Stepped,
) -> None:
    """Attack (an unlucky operator): NTP steps the server clock back by two seconds.

    Before, verify reported every row written in those two seconds as
    ``backdated_row``, and once sealed the alarm was permanent. Now the report
    is ok with one notice naming the rows, the seal and how far back; sealing
    them changes nothing; the command line exits 0 and prints the notice.
    """
    report = await verify(stepped.engine)
    assert report.ok, report.problems
    _one_step(report)

    assert (await seal(stepped.engine)).status is SealStatus.SEALED
    report = await verify(stepped.engine)
    assert report.ok, report.problems
    assert report.unsealed_rows == 0
    _one_step(report)

    code, out = await asyncio.to_thread(_run, "--database-url", stepped.url, "verify")
    assert code == 0 and out.startswith("ok:")
    assert "notice: clock_step: rows seq 7..9 (3 rows)" in out


_INTO_GAP = (
    "INSERT INTO audit_events (id, seq, event_type, entity_type, entity_id, actor, data, "
    "occurred_at, recorded_at, txid, row_hash) OVERRIDING SYSTEM VALUE "
    "SELECT :id, 6, 'order.accepted', 'order', :id, 'broker_service', "
    '\'{"ticker": "ACME", "broker_order_id": "b"}\'::jsonb, r, r, \'1\'::xid8, '
    "audit_event_row_hash(:id, 6, 'order.accepted', 'order', :id, 'broker_service', "
    '\'{"ticker": "ACME", "broker_order_id": "b"}\'::jsonb, r, r, NULL, NULL, NULL, NULL) '
    "FROM (SELECT recorded_at AS r FROM audit_events WHERE seq = 5) AS t"
)


@pytest.mark.parametrize(
    ("statements", "kind", "seq"),
    [
        ([_INTO_GAP], ProblemKind.INSERTED_ROW, 6),
        (["UPDATE audit_events SET actor = 'mallory' WHERE seq = 8"], ProblemKind.CHANGED_ROW, 8),
        (["DELETE FROM audit_events WHERE seq = 8"], ProblemKind.DELETED_ROW, 8),
        (
            [
                "UPDATE audit_events SET recorded_at = recorded_at - INTERVAL '1 second' "
                "WHERE seq = 8",
                f"UPDATE audit_events SET row_hash = audit_event_row_hash({HASH_ARGS}) "
                "WHERE seq = 8",
            ],
            ProblemKind.BLOCK_MISMATCH,
            None,
        ),
    ],
    ids=["inserted into a sealed gap", "changed", "deleted", "re-dated with its hash"],
)
async def test_a_clock_step_hides_no_tampering(
    stepped: Stepped, statements: list[str], kind: ProblemKind, seq: int | None
) -> None:
    """Under a clock step, rows inserted into a sealed gap (with the time of their
    neighbours), changed, deleted, or re-dated within the tolerance with their hash
    recomputed are each still found: none of those checks depends on the clock."""
    assert (await seal(stepped.engine)).status is SealStatus.SEALED
    async with stepped.engine.begin() as conn, triggers_disabled(conn):
        for statement in statements:
            await conn.execute(text(statement), {"id": uuid.uuid4()})
    report = await verify(stepped.engine)
    assert not report.ok
    assert (kind, seq) in {(p.kind, p.seq) for p in report.problems}, report.problems


async def _forge_after_last_seal(engine: AsyncEngine, behind: timedelta) -> int:
    """Append a row (triggers off, hash recomputed) dated ``behind`` the last cut."""
    when = await _last_cut(engine) - behind
    forged = uuid.uuid4()
    async with engine.begin() as conn, triggers_disabled(conn):
        seq = await conn.scalar(
            text("SELECT nextval(pg_get_serial_sequence('audit_events', 'seq'))")
        )
        await conn.execute(
            text(
                "INSERT INTO audit_events (id, seq, event_type, entity_type, entity_id, actor, "
                "data, occurred_at, recorded_at, row_hash) OVERRIDING SYSTEM VALUE "
                "VALUES (:id, :seq, 'order.accepted', 'order', :id, 'approver', "
                '\'{"ticker": "ACME", "broker_order_id": "b"}\'::jsonb, :when, :when, '
                "audit_event_row_hash(:id, :seq, 'order.accepted', 'order', :id, 'approver', "
                '\'{"ticker": "ACME", "broker_order_id": "b"}\'::jsonb, :when, :when, '
                "NULL, NULL, NULL, NULL))"
            ),
            {"id": forged, "seq": seq, "when": when},
        )
    assert isinstance(seq, int)
    return seq


async def test_a_row_back_dated_beyond_the_tolerance_is_found_before_and_after_sealing(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Attack: a superuser appends an approval dated an hour before the last seal's cut.

    It is ``backdated_row`` while unsealed and, once a later run seals it, still
    ``backdated_row`` naming its own seal (the floor of every sealed block is the
    cut of the run before it; switching that check off must fail this test).
    """
    _, engine = fresh_db
    await _write(engine, 3)
    await seal(engine)
    seq = await _forge_after_last_seal(engine, timedelta(hours=1))
    await _write(engine, 1)
    report = await verify(engine)
    assert [(p.kind, p.seq, p.seal_no) for p in report.problems] == [
        (ProblemKind.BACKDATED_ROW, seq, None)
    ]
    assert "3600.000000 s before it was cut" in report.problems[0].message

    second = await seal(engine)
    assert second.head is not None and second.head.seal_no == 2
    report = await verify(engine)
    assert [(p.kind, p.seq, p.seal_no) for p in report.problems] == [
        (ProblemKind.BACKDATED_ROW, seq, 2)
    ]
    assert report.notices == ()
    # The operator decides how large a step is plausible: within it, a notice.
    lenient = await verify(engine, clock_tolerance=7200)
    assert lenient.ok and [n.first_seq for n in lenient.notices] == [seq]


@pytest.mark.parametrize(
    ("tolerance", "is_notice"), [(10.0, True), (9.999999, False), (0, False), (10.000001, True)]
)
async def test_the_tolerance_is_inclusive_to_the_microsecond(
    fresh_db: tuple[str, AsyncEngine], tolerance: float, is_notice: bool
) -> None:
    """A row exactly ``clock_tolerance`` behind the cut is a clock step; one microsecond
    more is back-dated (pins the edge of the rule)."""
    _, engine = fresh_db
    await _write(engine, 1)
    await seal(engine)
    seq = await _forge_after_last_seal(engine, timedelta(seconds=10))
    report = await verify(engine, clock_tolerance=tolerance)
    if is_notice:
        assert report.ok and [(n.first_seq, n.seconds) for n in report.notices] == [(seq, 10.0)]
    else:
        assert [(p.kind, p.seq) for p in report.problems] == [(ProblemKind.BACKDATED_ROW, seq)]
        assert report.notices == ()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 86_401, True, "5"])
async def test_a_bad_clock_tolerance_is_refused(
    fresh_db: tuple[str, AsyncEngine], value: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """``clock_tolerance`` must be a finite number of seconds from 0 to a day."""
    url, engine = fresh_db
    with pytest.raises(InvalidInputError) as caught:
        await verify(engine, clock_tolerance=value)  # type: ignore[arg-type]
    assert caught.value.field == "clock_tolerance"
    if isinstance(value, float):
        code, _ = await asyncio.to_thread(
            _run, "--database-url", url, "verify", "--clock-tolerance", str(value)
        )
        assert code == 2 and "error: --clock-tolerance:" in capsys.readouterr().err
