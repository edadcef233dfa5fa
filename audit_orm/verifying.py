"""Verify the audit trail: every row hash, every block's Merkle root, the seal chain.

:func:`verify` reads rows and seals in one read-only snapshot and names the
first thing that does not hold (see :class:`ProblemKind`).

Why verification recomputes hashes in Python
--------------------------------------------
A superuser can replace the SQL function that hashes rows, or the trigger that
calls it, and then rewrite history whose stored hashes agree with that
function. :func:`verify` therefore never calls database-resident code to hash: it
reads the stored values (through PostgreSQL's built-in output functions only)
and recomputes every row hash, every Merkle root and every seal hash in Python,
an implementation of the encoding that lives on the verifier's side. A test
checks both implementations agree on varied rows.

Names verify cannot be fooled by
--------------------------------
Verification pins ``search_path`` to ``pg_catalog, pg_temp`` and names every
table by its schema, so functions, operators and tables a hostile role put on
the connecting role's path are never used. The schema is the one holding the
real ``audit_events`` and ``audit_seals`` tables (views and other objects are
ignored); when several schemas hold them, the caller must name one. A name that
the connecting role's own path resolves to another object is reported.

Every row is read in one pass of one cursor, ordered by ``seq`` only, so a row
sharing a ``seq`` with another (possible once the uniqueness constraint is
dropped) is seen and reported. The safeguards the trail relies on, the
append-only and insert triggers (present, ``ENABLE ALWAYS``, calling the
shipped function) and the uniqueness of ``id``, ``seq``, ``seal_no`` and
``seal_hash``, are checked too.

Clock steps
-----------
``recorded_at`` is the server's clock, read by the insert trigger after the row
drew its ``seq``. The sealer reads the clock (``cut_at``) before it reads the
sequence, so a row numbered after a sealing run's range was recorded after its
cut: a row claiming a time before it either had its time forged or was recorded
while the clock had been stepped back. The ``seq`` order, the gaps and the hashes
do not depend on the clock, so a clock step cannot hide a row inserted into a
sealed range, a changed row or a deleted one. Verify therefore calls a row
dated before the cut that precedes it

* a clock step (a :class:`Notice`; the report stays ok) when it is no more than
  ``clock_tolerance`` seconds before that cut; consecutive such rows form one
  notice naming their ``seq`` range and how far back the clock went;
* a :attr:`ProblemKind.BACKDATED_ROW` when it is further back.

Someone able to forge rows could pass a back-dating within the tolerance off as
a clock step: it is never silent (the notice names the rows), only not called
tampering.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from hashlib import sha256
from typing import Any
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm.errors import InvalidInputError
from audit_orm.hashing import encode_row_raw, merkle_root, micros
from audit_orm.records import unreadable_reason
from audit_orm.sealing import (
    _SEAL_COLUMNS,
    Digest,
    Progress,
    ProgressCallback,
    SealInfo,
    _driver,
    _seal_from_record,
)
from audit_orm.tables import check_schema_name, pin_path, quote_ident, resolve_schema

#: Default cap on the problems :func:`verify` keeps (it counts them all).
DEFAULT_MAX_PROBLEMS = 100
#: Default seconds a row may be dated before a preceding seal's cut and still be
#: called a clock step rather than back-dated.
DEFAULT_CLOCK_TOLERANCE = 60.0
#: The largest ``clock_tolerance`` :func:`verify` accepts (a day).
MAX_CLOCK_TOLERANCE = 86_400.0

_FETCH = 5_000
_V1 = b"\x01"
#: Where problems about the database rather than a row are placed: first.
_SCHEMA_POSITION = -1
#: Where a row without a readable seq is placed: last.
_UNREADABLE_POSITION = 2**63


# ---------------------------------------------------------------- result types


class ProblemKind(StrEnum):
    """The kinds of things :func:`verify` finds."""

    #: A row's content no longer matches its stored hash (or its txid is impossible).
    CHANGED_ROW = "changed_row"
    #: A sealed row is missing.
    DELETED_ROW = "deleted_row"
    #: A row sits in a sealed range that the seal does not hold.
    INSERTED_ROW = "inserted_row"
    #: A row was recorded before a seal that precedes it in ``seq`` order was cut.
    BACKDATED_ROW = "backdated_row"
    #: A block's rows no longer give its Merkle root (a row changed together with its
    #: stored hash, or the root rewritten).
    BLOCK_MISMATCH = "block_mismatch"
    #: A seal's stored hash does not match its content.
    REWRITTEN_SEAL = "rewritten_seal"
    #: Seals do not link up: a previous-hash, number or range does not follow.
    BROKEN_CHAIN = "broken_chain"
    #: A seal is missing from the chain.
    REMOVED_SEAL = "removed_seal"
    #: A safeguard the trail relies on is missing, disabled or altered: an
    #: append-only trigger, the insert triggers, or a uniqueness constraint.
    MISSING_SAFEGUARD = "missing_safeguard"
    #: Under the connecting role's ``search_path`` an audit table's name leads to
    #: another object than the table verified (a shadowing view or table).
    SHADOWED_TABLE = "shadowed_table"
    #: A row whose hash holds but that no reader can read back as a record (see
    #: :class:`~audit_orm.UnreadableRowError`): inserted by plain SQL, or before
    #: a constraint existed.
    UNREADABLE_ROW = "unreadable_row"


class NoticeKind(StrEnum):
    """The kinds of things :func:`verify` reports without calling them tampering."""

    #: Rows recorded, by the server's clock, a little before a seal that precedes
    #: them in ``seq`` order was cut (no more than ``clock_tolerance``): the clock
    #: was stepped back.
    CLOCK_STEP = "clock_step"


@dataclass(frozen=True, slots=True)
class Notice:
    """Something :func:`verify` saw that is not tampering, with its evidence."""

    kind: NoticeKind
    message: str
    #: The rows concerned, in ``seq`` order: the first and the last.
    first_seq: int
    last_seq: int
    #: How many rows.
    rows: int
    #: How far back the clock went, in seconds (the largest amount among the rows).
    seconds: float
    #: The seal whose cut time the rows precede.
    seal_no: int | None = None

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing that does not hold, located as precisely as the evidence allows."""

    kind: ProblemKind
    message: str
    seal_no: int | None = None
    seq: int | None = None
    event_id: UUID | None = None

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.message}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of :func:`verify`."""

    #: What does not hold, earliest in the trail first (at most ``max_problems``).
    problems: tuple[Problem, ...]
    #: How many problems were found in all (may exceed ``len(problems)``).
    problem_count: int
    rows_checked: int
    seals_checked: int
    #: Rows after the last seal (their hashes are checked, their presence cannot be).
    unsealed_rows: int
    #: The latest seal (``None`` if there is none).
    head: SealInfo | None
    #: With a digest: True when its seal is in the chain and nothing up to that
    #: seal was found wrong; ``None`` without a digest.
    digest_matched: bool | None
    elapsed: float
    #: What was seen that is not tampering (clock steps), with its evidence.
    notices: tuple[Notice, ...] = ()
    #: The schema whose tables were verified.
    schema: str | None = None

    @property
    def ok(self) -> bool:
        """True when no problem was found (notices do not count)."""
        return self.problem_count == 0

    @property
    def first_problem(self) -> Problem | None:
        """The earliest problem in the trail, or ``None``."""
        return self.problems[0] if self.problems else None

    @property
    def events_per_second(self) -> float:
        """Verification throughput of this call."""
        return self.rows_checked / self.elapsed if self.elapsed > 0 else 0.0


# --------------------------------------------------------------------- checks


class _Problems:
    """Collects problems up to a cap, counting every one."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.items: list[tuple[int, int, Problem]] = []
        self.count = 0
        #: The earliest position of any problem in the trail (``seq`` order),
        #: counted or not; problems about the schema are not in the trail.
        self.earliest: int | None = None

    def add(self, position: int, problem: Problem) -> None:
        self.count += 1
        if position > _SCHEMA_POSITION and (self.earliest is None or position < self.earliest):
            self.earliest = position
        if len(self.items) < self.cap:
            self.items.append((position, len(self.items), problem))


def _check_chain(seals: Sequence[SealInfo], found: _Problems) -> set[int]:
    """Check every seal's hash and links; return the seal numbers whose content is unreliable."""
    suspect: set[int] = set()
    prev: SealInfo | None = None
    for index, current in enumerate(seals):
        expected_no = index + 1 if prev is None else prev.seal_no + 1
        position = current.first_seq
        if current.seal_no != expected_no:
            missing = (
                f"seal {expected_no}"
                if current.seal_no == expected_no + 1
                else f"seals {expected_no} to {current.seal_no - 1}"
            )
            found.add(
                position,
                Problem(
                    ProblemKind.REMOVED_SEAL,
                    f"{missing} missing: the chain jumps to seal {current.seal_no}",
                    seal_no=expected_no,
                ),
            )
        if current.computed_hash() != current.seal_hash:
            suspect.add(current.seal_no)
            found.add(
                position,
                Problem(
                    ProblemKind.REWRITTEN_SEAL,
                    f"seal {current.seal_no} (seq {current.first_seq}..{current.last_seq}) "
                    f"does not match its own hash: it was rewritten",
                    seal_no=current.seal_no,
                ),
            )
        expected_prev = None if prev is None else prev.seal_hash
        if (index > 0 or current.seal_no == 1) and current.prev_hash != expected_prev:
            suspect.add(current.seal_no)
            found.add(
                position,
                Problem(
                    ProblemKind.BROKEN_CHAIN,
                    f"seal {current.seal_no} does not link to the seal before it: "
                    f"seal {current.seal_no - 1} or seal {current.seal_no} was rewritten "
                    f"or replaced",
                    seal_no=current.seal_no,
                ),
            )
        expected_first = 1 if prev is None else prev.last_seq + 1
        if current.first_seq != expected_first and current.seal_no == expected_no:
            suspect.add(current.seal_no)
            found.add(
                position,
                Problem(
                    ProblemKind.BROKEN_CHAIN,
                    f"seal {current.seal_no} starts at seq {current.first_seq}, "
                    f"not {expected_first}",
                    seal_no=current.seal_no,
                ),
            )
        gap_total = 0
        previous_high = current.first_seq - 1
        for low, high in current.gaps:
            if low <= previous_high or high < low or high > current.last_seq:
                suspect.add(current.seal_no)
                found.add(
                    position,
                    Problem(
                        ProblemKind.REWRITTEN_SEAL,
                        f"seal {current.seal_no} (seq {current.first_seq}..{current.last_seq}) "
                        f"lists gap {low}..{high}, which overlaps another, is reversed or lies "
                        f"outside its range: it was rewritten",
                        seal_no=current.seal_no,
                    ),
                )
                break
            gap_total += high - low + 1
            previous_high = high
        span = current.last_seq - current.first_seq + 1
        if span - gap_total != current.row_count and current.seal_no not in suspect:
            suspect.add(current.seal_no)
            found.add(
                position,
                Problem(
                    ProblemKind.REWRITTEN_SEAL,
                    f"seal {current.seal_no}: its row count and gaps disagree",
                    seal_no=current.seal_no,
                ),
            )
        prev = current
    return suspect


def _check_digest(seals: Sequence[SealInfo], wanted: Digest, found: _Problems) -> SealInfo | None:
    """The digest's seal if it is in the chain; if not, say what happened to it."""
    end = seals[-1].last_seq + 1 if seals else 1
    for item in seals:
        if item.seal_hash == wanted.seal_hash and wanted.seal_no in (None, item.seal_no):
            return item
    chain_end = f"the chain ends at seal {seals[-1].seal_no}" if seals else "there are no seals"
    if wanted.seal_no is None:
        found.add(
            end,
            Problem(
                ProblemKind.REMOVED_SEAL,
                f"no seal has the digest's hash: the seal it names was removed or "
                f"rewritten ({chain_end})",
            ),
        )
        return None
    numbered = [item for item in seals if item.seal_no == wanted.seal_no]
    if not numbered:
        found.add(
            end,
            Problem(
                ProblemKind.REMOVED_SEAL,
                f"seal {wanted.seal_no}, named by the digest, is missing ({chain_end})",
                seal_no=wanted.seal_no,
            ),
        )
    else:
        found.add(
            numbered[0].first_seq,
            Problem(
                ProblemKind.REWRITTEN_SEAL,
                f"seal {wanted.seal_no} no longer has the digest's hash: it or a seal "
                f"before it was rewritten",
                seal_no=wanted.seal_no,
            ),
        )
    return None


_NO_GAP = 2**63


@dataclass
class _Block:
    """Verification state of the seal whose range the row walk is in."""

    info: SealInfo
    trusted: bool
    #: The cut of the previous sealing run: rows here were recorded after it.
    floor: _Floor | None
    horizon: int
    gaps: list[tuple[int, int]]
    #: Where the range of the seal before this one ended (+1); ``None`` when unknown.
    hole_from: int | None
    gap_index: int = 0
    expected: int = 0
    #: Where the next gap starts (beyond any seq when there is none): the fast
    #: path of the walk only looks at gaps when it reaches one.
    next_gap_low: int = _NO_GAP
    leaves: list[bytes] = field(default_factory=list)
    row_problem: bool = False

    def skip_gaps(self, seq: int) -> int:
        """The first seq at or after ``seq`` that the seal says holds a row."""
        gaps = self.gaps
        while self.gap_index < len(gaps) and gaps[self.gap_index][1] < seq:
            self.gap_index += 1
        while self.gap_index < len(gaps) and gaps[self.gap_index][0] <= seq:
            seq = gaps[self.gap_index][1] + 1
            self.gap_index += 1
        self.next_gap_low = gaps[self.gap_index][0] if self.gap_index < len(gaps) else _NO_GAP
        return seq

    def next_gap(self) -> int | None:
        """Where the next gap after :attr:`expected` starts."""
        return self.gaps[self.gap_index][0] if self.gap_index < len(self.gaps) else None

    def in_gap(self, seq: int) -> bool:
        """Whether the seal recorded ``seq`` as holding no row."""
        index = self.gap_index
        while index < len(self.gaps) and self.gaps[index][1] < seq:
            index += 1
        return index < len(self.gaps) and self.gaps[index][0] <= seq


@dataclass(frozen=True, slots=True)
class _Floor:
    """The cut of the sealing run before a seal's own: rows of the seal came after it."""

    cut_us: int
    #: The last seal of that run (the one named in findings).
    seal_no: int


def _floors(seals: Sequence[SealInfo]) -> dict[int, _Floor | None]:
    """For each seal, the cut of the sealing run before its own (``None`` for the first run)."""
    floors: dict[int, _Floor | None] = {}
    previous_run: _Floor | None = None
    current_run: _Floor | None = None
    for item in seals:
        cut = micros(item.cut_at)
        if current_run is None or cut != current_run.cut_us:
            previous_run = current_run
        current_run = _Floor(cut, item.seal_no)
        floors[item.seal_no] = previous_run
    return floors


@dataclass
class _ClockSteps:
    """Rows dated before the cut that precedes them, within the tolerance: clock steps."""

    cap: int
    notices: list[Notice] = field(default_factory=list)
    count: int = 0
    #: The open run: first seq, last seq, rows, largest lag (µs), the floor's seal.
    run: list[int] | None = None

    def add(self, seq: int, lag_us: int, floor_seal: int) -> None:
        run = self.run
        if run is not None and run[4] == floor_seal:
            run[1] = seq
            run[2] += 1
            run[3] = max(run[3], lag_us)
            return
        self.close()
        self.run = [seq, seq, 1, lag_us, floor_seal]

    def close(self) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        first, last, rows, lag_us, floor_seal = run
        self.count += 1
        if len(self.notices) >= self.cap:
            return
        seconds = lag_us / 1e6
        where = f"row seq {first}" if rows == 1 else f"rows seq {first}..{last} ({rows} rows)"
        self.notices.append(
            Notice(
                NoticeKind.CLOCK_STEP,
                f"{where} came after seal {floor_seal} in seq order but "
                f"{'was' if rows == 1 else 'were'} recorded up to {seconds:.6f} s before it "
                f"was cut: the server's clock was stepped back (within the clock tolerance)",
                first_seq=first,
                last_seq=last,
                rows=rows,
                seconds=seconds,
                seal_no=floor_seal,
            )
        )


# ------------------------------------------------------------ schema and safeguards


async def _check_path(
    conn: Any, resolved: dict[str, int | None], schema: str, oids: dict[str, int], found: _Problems
) -> None:
    """Report a table name the caller's own search_path leads elsewhere."""
    for name, oid in oids.items():
        seen = resolved[name]
        if seen is None or seen == oid:
            continue
        record = await conn.fetchrow(
            "SELECT n.nspname, c.relname, c.relkind::pg_catalog.text FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            seen,
        )
        kinds = {"v": "a view", "m": "a materialized view", "r": "a table", "f": "a foreign table"}
        what = (
            "an object gone since"
            if record is None
            else f"{record[0]}.{record[1]} ({kinds.get(record[2], 'relkind ' + record[2])})"
        )
        found.add(
            _SCHEMA_POSITION,
            Problem(
                ProblemKind.SHADOWED_TABLE,
                f"under this role's search_path, {name} names {what}, not the table verified "
                f"({schema}.{name}): anything else run as this role reads the wrong object",
            ),
        )


#: The append-only function's body as migration 0003 installs it, words only.
_REFUSE_SOURCE = """
BEGIN
    RAISE EXCEPTION USING
        ERRCODE = 'AU001',
        MESSAGE = pg_catalog.format(
            '%s on %I is not allowed: the audit trail is append-only', TG_OP, TG_TABLE_NAME),
        HINT = 'Record a correction: a new event that references the one it corrects.';
END
"""
_REFUSE_BODY = " ".join(_REFUSE_SOURCE.split())

# pg_trigger.tgtype bits (PostgreSQL's trigger.h).
_ROW, _BEFORE, _INSERT, _DELETE, _UPDATE, _TRUNCATE = 1, 2, 4, 8, 16, 32
_REFUSE = _BEFORE | _DELETE | _UPDATE | _TRUNCATE
#: (table, trigger) -> (tgtype bits it must have, bits it must not have, function).
_TRIGGERS: dict[tuple[str, str], tuple[int, int, str | None]] = {
    ("audit_events", "audit_events_append_only"): (_REFUSE, _ROW, "audit_orm_refuse_change"),
    ("audit_seals", "audit_seals_append_only"): (_REFUSE, _ROW, "audit_orm_refuse_change"),
    ("audit_events", "audit_events_before_insert"): (_ROW | _BEFORE | _INSERT, 0, None),
    ("audit_events", "audit_events_claim_xid"): (_BEFORE | _INSERT, _ROW, None),
}
#: (table, column) whose values must be unique, by a valid unique index on it alone.
_UNIQUE = (
    ("audit_events", "id"),
    ("audit_events", "seq"),
    ("audit_seals", "seal_no"),
    ("audit_seals", "seal_hash"),
)
_ENABLED = {
    "A": "enabled always",
    "O": "enabled only outside replication",
    "R": "enabled only for replication",
    "D": "disabled",
}


async def _check_safeguards(conn: Any, schema: str, oids: dict[str, int], found: _Problems) -> None:
    """Report a missing, disabled or altered trigger or uniqueness constraint."""

    def missing(text: str) -> None:
        found.add(_SCHEMA_POSITION, Problem(ProblemKind.MISSING_SAFEGUARD, text))

    triggers = await conn.fetch(
        "SELECT t.tgrelid, t.tgname, t.tgenabled, t.tgtype, p.proname, n.nspname, p.prosrc "
        "FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
        "WHERE t.tgrelid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[]) AND NOT t.tgisinternal",
        list(oids.values()),
    )
    names = {oid: name for name, oid in oids.items()}
    present = {
        (names[rel], name): (enabled, kind, proname, nsp, src)
        for rel, name, enabled, kind, proname, nsp, src in triggers
    }
    for (table, name), (must, must_not, function) in _TRIGGERS.items():
        got = present.get((table, name))
        if got is None:
            missing(f"trigger {name} on {schema}.{table} is missing")
            continue
        enabled, kind, proname, nsp, src = got
        enabled = enabled.decode() if isinstance(enabled, bytes) else str(enabled)
        if enabled != "A":
            missing(
                f"trigger {name} on {schema}.{table} is {_ENABLED.get(enabled, enabled)}, "
                f"not ENABLE ALWAYS"
            )
        if kind & must != must or kind & must_not:
            missing(f"trigger {name} on {schema}.{table} no longer fires when it must")
        if function is not None and (
            proname != function or nsp != schema or " ".join(str(src).split()) != _REFUSE_BODY
        ):
            missing(
                f"trigger {name} on {schema}.{table} calls {nsp}.{proname}, not the shipped "
                f"{schema}.{function}, or that function was changed"
            )
    indexes = await conn.fetch(
        "SELECT i.indrelid, a.attname FROM pg_catalog.pg_index i "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid "
        "AND a.attnum OPERATOR(pg_catalog.=) i.indkey[0] "
        "WHERE i.indrelid OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.oid[]) AND i.indisunique "
        "AND i.indisvalid AND i.indimmediate AND i.indnkeyatts OPERATOR(pg_catalog.=) 1 "
        "AND i.indpred IS NULL AND i.indexprs IS NULL",
        list(oids.values()),
    )
    unique = {(names[rel], column) for rel, column in indexes}
    for table, column in _UNIQUE:
        if (table, column) not in unique:
            missing(f"{schema}.{table}.{column} is no longer kept unique (its constraint is gone)")


# ---------------------------------------------------------------------- verify


def check_clock_tolerance(clock_tolerance: object) -> float:
    """``clock_tolerance`` in seconds, after checking it.

    :raises InvalidInputError: not a finite number of seconds from 0 to
        :data:`MAX_CLOCK_TOLERANCE` (NaN, infinity and negatives included).
    """
    if isinstance(clock_tolerance, bool) or not isinstance(clock_tolerance, (int, float)):
        raise InvalidInputError("clock_tolerance", clock_tolerance, "must be a number of seconds")
    tolerance = float(clock_tolerance)
    if not (math.isfinite(tolerance) and 0 <= tolerance <= MAX_CLOCK_TOLERANCE):
        raise InvalidInputError(
            "clock_tolerance",
            clock_tolerance,
            f"must be a finite number of seconds from 0 to {MAX_CLOCK_TOLERANCE:g}",
        )
    return tolerance


def _check_verify_options(
    digest: Digest | str | None, max_problems: object, clock_tolerance: object, schema: object
) -> tuple[Digest | None, int, int]:
    """The digest, the problem cap and the tolerance in µs, after checking them."""
    wanted = Digest.parse(digest) if isinstance(digest, str) else digest
    if wanted is not None:
        if not isinstance(wanted, Digest):
            raise InvalidInputError("digest", digest, "must be a Digest or its text")
        wanted.check()
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1:
        raise InvalidInputError("max_problems", max_problems, "must be a positive integer")
    tolerance = check_clock_tolerance(clock_tolerance)
    check_schema_name(schema)
    return wanted, max_problems, round(tolerance * 1_000_000)


async def verify(
    engine: AsyncEngine,
    *,
    digest: Digest | str | None = None,
    progress: ProgressCallback | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
    clock_tolerance: float = DEFAULT_CLOCK_TOLERANCE,
    schema: str | None = None,
) -> VerifyReport:
    """Recompute every row hash, every block's Merkle root and the seal chain.

    Runs in one read-only REPEATABLE READ transaction, so rows and seals are
    seen as of one instant while writers carry on, with ``search_path`` pinned
    and every table named by its schema (``schema``, or the one schema holding
    the audit tables). With ``digest`` (from :func:`~audit_orm.digest`, kept
    outside the database) it also proves the chain up to that seal is the one
    that was sealed: rewriting or removing seals, even with every hash
    recomputed, cannot pass. Rows dated no more than ``clock_tolerance`` seconds
    before a seal that precedes them are reported as clock steps (notices), not
    back-dated (see the module notes).

    :returns: a :class:`VerifyReport`; ``report.ok`` is true when nothing was
        found, ``report.first_problem`` names the earliest thing that does not hold.
    :raises InvalidInputError: a bad argument, or several schemas hold the audit
        tables and ``schema`` is not given.
    """
    wanted, cap, tolerance_us = _check_verify_options(digest, max_problems, clock_tolerance, schema)
    if progress is not None and not callable(progress):
        raise InvalidInputError("progress", progress, "must be callable")
    started = time.monotonic()
    found = _Problems(cap)
    steps = _ClockSteps(cap)
    async with (
        _driver(engine, "verifying") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        # What the caller's own path resolves the names to, asked with every
        # name qualified; then the path is pinned for everything that follows.
        resolved_row = await conn.fetchrow(
            "SELECT pg_catalog.to_regclass('audit_events'::pg_catalog.text)::pg_catalog.oid, "
            "pg_catalog.to_regclass('audit_seals'::pg_catalog.text)::pg_catalog.oid"
        )
        await pin_path(conn)
        chosen, events_oid, seals_oid = await resolve_schema(conn, schema, "verifying")
        oids = {"audit_events": events_oid, "audit_seals": seals_oid}
        resolved = {
            "audit_events": None if resolved_row[0] is None else int(resolved_row[0]),
            "audit_seals": None if resolved_row[1] is None else int(resolved_row[1]),
        }
        await _check_path(conn, resolved, chosen, oids, found)
        await _check_safeguards(conn, chosen, oids, found)
        qualified = quote_ident(chosen)
        records = await conn.fetch(
            f"SELECT {_SEAL_COLUMNS} FROM {qualified}.audit_seals ORDER BY seal_no"
        )
        seals = [_seal_from_record(record) for record in records]
        suspect = _check_chain(seals, found)
        vouched: SealInfo | None = None
        if wanted is not None:
            vouched = _check_digest(seals, wanted, found)
        total = await conn.fetchval(f"SELECT pg_catalog.max(seq) FROM {qualified}.audit_events")
        rows_checked, unsealed = await _walk_rows(
            conn, qualified, seals, suspect, found, steps, tolerance_us, progress, total
        )
    steps.close()
    matched: bool | None = None
    if wanted is not None:
        # The digest vouches for everything up to its seal: it matches only when
        # nothing there was found wrong.
        matched = vouched is not None and (
            found.earliest is None or found.earliest > vouched.last_seq
        )
    problems = tuple(problem for _, _, problem in sorted(found.items, key=lambda t: t[:2]))
    return VerifyReport(
        problems=problems,
        problem_count=found.count,
        rows_checked=rows_checked,
        seals_checked=len(seals),
        unsealed_rows=unsealed,
        head=seals[-1] if seals else None,
        digest_matched=matched,
        elapsed=time.monotonic() - started,
        notices=tuple(steps.notices),
        schema=chosen,
    )


# Only built-in output functions: uuid_send and timestamptz_send give the bytes
# the encoding uses as they stand (see audit_orm.hashing). Ordered by seq alone
# and read through one cursor: every row, duplicates of a seq included.
_VERIFY_COLUMNS = (
    "pg_catalog.uuid_send(id), seq, event_type, entity_type, pg_catalog.uuid_send(entity_id), "
    "actor, data::pg_catalog.text, pg_catalog.timestamptz_send(occurred_at), "
    "pg_catalog.timestamptz_send(recorded_at), pg_catalog.uuid_send(recommendation_id), "
    "pg_catalog.uuid_send(order_id), ticker, pg_catalog.uuid_send(corrects_id), row_hash, txid"
)


def _row_hash(row: Any) -> bytes:
    return (
        _V1
        + sha256(
            encode_row_raw(
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                row[6],
                row[7],
                row[8],
                row[9],
                row[10],
                row[11],
                row[12],
            )
        ).digest()
    )


async def _walk_rows(
    conn: Any,
    qualified: str,
    seals: Sequence[SealInfo],
    suspect: set[int],
    found: _Problems,
    steps: _ClockSteps,
    tolerance_us: int,
    progress: ProgressCallback | None,
    total: int | None,
) -> tuple[int, int]:
    floors = _floors(seals)
    last_run = _Floor(micros(seals[-1].cut_at), seals[-1].seal_no) if seals else None
    seal_index = 0
    block: _Block | None = None

    def open_block(index: int) -> _Block:
        info = seals[index]
        if index > 0:
            hole_from: int | None = seals[index - 1].last_seq + 1
        else:
            hole_from = 1 if info.seal_no == 1 else None
        opened = _Block(
            info=info,
            trusted=info.seal_no not in suspect,
            floor=floors[info.seal_no],
            horizon=info.horizon_txid,
            gaps=list(info.gaps),
            hole_from=hole_from,
        )
        opened.expected = opened.skip_gaps(info.first_seq)
        return opened

    def report_missing(current: _Block, upto: int) -> None:
        # Every number from current.expected up to (not including) upto that is
        # not a gap should have held a row: report each run of them once.
        while current.expected < upto:
            start = current.expected
            gap = current.next_gap()
            end = upto - 1 if gap is None else min(upto - 1, gap - 1)
            count = end - start + 1
            current.expected = current.skip_gaps(end + 1)
            current.row_problem = True
            where = f"seq {start}" if count == 1 else f"seq {start}..{end} ({count} rows)"
            found.add(
                start,
                Problem(
                    ProblemKind.DELETED_ROW,
                    f"{where} sealed by seal {current.info.seal_no} "
                    f"{'is' if count == 1 else 'are'} missing: deleted",
                    seal_no=current.info.seal_no,
                    seq=start,
                ),
            )

    def close_block(current: _Block) -> None:
        report_missing(current, current.info.last_seq + 1)
        if (
            current.trusted
            and not current.row_problem
            and (not current.leaves or merkle_root(current.leaves) != current.info.merkle_root)
        ):
            found.add(
                current.info.first_seq,
                Problem(
                    ProblemKind.BLOCK_MISMATCH,
                    f"the rows of seal {current.info.seal_no} (seq "
                    f"{current.info.first_seq}..{current.info.last_seq}) no longer give "
                    f"its Merkle root: a row there was changed together with its stored hash, "
                    f"or the seal's root was rewritten",
                    seal_no=current.info.seal_no,
                ),
            )

    def row_problem(kind: ProblemKind, row: Any, text: str, seal_no: int | None) -> None:
        seq = row[1]
        try:
            event_id: UUID | None = UUID(bytes=row[0])
        except (TypeError, ValueError):
            event_id = None
        found.add(
            _UNREADABLE_POSITION if seq is None else seq,
            Problem(
                kind,
                f"row seq {seq} (id {event_id}) {text}",
                seal_no=seal_no,
                seq=seq,
                event_id=event_id,
            ),
        )

    def check_time(row: Any, floor: _Floor | None, seal_no: int | None) -> None:
        if floor is None:
            steps.close()
            return
        lag = floor.cut_us - int.from_bytes(row[8], "big", signed=True)
        if lag <= 0:
            steps.close()
        elif lag <= tolerance_us:
            steps.add(row[1], lag, floor.seal_no)
        else:
            steps.close()
            row_problem(
                ProblemKind.BACKDATED_ROW,
                row,
                f"comes after seal {floor.seal_no} in seq order but claims to be recorded "
                f"{lag / 1e6:.6f} s before it was cut, more than a clock step "
                f"({tolerance_us / 1e6:g} s): back-dated",
                seal_no,
            )

    if seals:
        block = open_block(0)
    rows_checked = 0
    unsealed = 0
    previous: int | None = None
    cursor = await conn.cursor(
        f"SELECT {_VERIFY_COLUMNS} FROM {qualified}.audit_events ORDER BY seq"
    )
    while True:
        batch = await cursor.fetch(_FETCH)
        if not batch:
            break
        rows_checked += len(batch)
        for row in batch:
            seq = row[1]
            stored = row[13]
            try:
                readable = (
                    isinstance(seq, int)
                    and isinstance(stored, bytes)
                    and isinstance(row[8], bytes)
                    and row[14] is not None
                )
                computed = _row_hash(row) if readable else None
            except (TypeError, ValueError, AttributeError, UnicodeError):
                computed = None
            if computed is None:
                row_problem(
                    ProblemKind.CHANGED_ROW,
                    row,
                    "is unreadable (a column the hash covers is missing or malformed): "
                    "it was changed",
                    None if block is None else block.info.seal_no,
                )
                if block is not None:
                    block.row_problem = True
                continue
            if seq == previous:
                if block is not None and block.info.first_seq <= seq:
                    block.row_problem = True
                row_problem(
                    ProblemKind.INSERTED_ROW,
                    row,
                    "shares its seq with another row: seq was made non-unique and a row inserted",
                    None if block is None or seq < block.info.first_seq else block.info.seal_no,
                )
                continue
            previous = seq
            # Advance to the seal whose range holds this row.
            while block is not None and seq > block.info.last_seq:
                close_block(block)
                seal_index += 1
                block = open_block(seal_index) if seal_index < len(seals) else None
            if computed != stored:
                row_problem(
                    ProblemKind.CHANGED_ROW,
                    row,
                    "does not match its stored hash: it was changed",
                    None if block is None else block.info.seal_no,
                )
                if block is not None:
                    block.row_problem = True
            unreadable = unreadable_reason(
                row[2],
                row[3],
                row[6],
                int.from_bytes(row[7], "big", signed=True),
                int.from_bytes(row[8], "big", signed=True),
            )
            if unreadable is not None:
                # Not tampering (the hash holds), but every reader would refuse the row.
                row_problem(
                    ProblemKind.UNREADABLE_ROW,
                    row,
                    f"cannot be read back: {unreadable}",
                    None if block is None else block.info.seal_no,
                )
            if block is None:
                unsealed += 1
                check_time(row, last_run, None)
                continue
            if seq == block.expected:
                # The common case: the next row the seal holds.
                following = seq + 1
                block.expected = (
                    following if following < block.next_gap_low else block.skip_gaps(following)
                )
            elif seq < block.info.first_seq:
                # Rows between two seals that do not link up belong to a removed
                # seal, already reported; only rows before seal 1 are out of place.
                if block.hole_from is not None and seq < block.hole_from:
                    row_problem(
                        ProblemKind.INSERTED_ROW,
                        row,
                        f"lies before the first sealed range (seal {block.info.seal_no} "
                        f"starts at seq {block.info.first_seq}): inserted afterwards",
                        block.info.seal_no,
                    )
                continue
            elif seq < block.expected or block.in_gap(seq):
                block.row_problem = True
                row_problem(
                    ProblemKind.INSERTED_ROW,
                    row,
                    f"lies in the range of seal {block.info.seal_no}, which recorded no row "
                    f"there: inserted afterwards",
                    block.info.seal_no,
                )
                continue
            else:
                report_missing(block, seq)
                block.expected = block.skip_gaps(seq + 1)
            block.leaves.append(stored)
            if int(row[14]) >= block.horizon:
                block.row_problem = True
                row_problem(
                    ProblemKind.CHANGED_ROW,
                    row,
                    f"names transaction {row[14]}, which had not ended when seal "
                    f"{block.info.seal_no} was made",
                    block.info.seal_no,
                )
            check_time(row, block.floor, block.info.seal_no)
        if progress is not None:
            progress(Progress("verify", rows_checked, total))
    while block is not None:
        close_block(block)
        seal_index += 1
        block = open_block(seal_index) if seal_index < len(seals) else None
    return rows_checked, unsealed
