"""Seal the audit trail into a hash chain, and verify it.

Every row carries a hash the database computed at insert (see
:mod:`audit_orm.hashing`). :func:`seal` closes blocks of committed rows: each
seal covers a contiguous range of ``seq`` numbers and records the range, the
numbers in it that hold no row (gaps), a Merkle root over the rows' hashes, the
previous seal's hash and its own. :func:`verify` recomputes all of it and names
the first thing that does not hold. :func:`digest` gives the latest seal's hash
for keeping outside the database; ``verify(digest=...)`` then proves nothing
sealed up to it has changed, even by someone able to rewrite the whole chain.

Why a range can be sealed without a global write lock
------------------------------------------------------
Writers commit out of ``seq`` order, so the sealer must only take a range no
transaction can still add to. Two facts make that provable:

1. a statement trigger takes the writer's transaction id before the identity
   default draws a row's ``seq``, so every row's ``txid`` was assigned before its
   ``seq`` was drawn (rows record it in ``txid``);
2. the sequence hands out numbers in increasing order (the sealer refuses to
   run if the sequence caches values per session).

The sealer reads the sequence's last value ``S``, then takes a transaction id
``X`` of its own. Any row with ``seq <= S`` drew its number before that read, so
its transaction id is older than ``X``. Once ``pg_snapshot_xmin`` of a fresh
snapshot reaches ``X`` every such transaction has ended, and the next statement
sees every row with ``seq <= S`` that will ever exist: the range is closed. The
numbers in it without a row belong to rolled-back or refused inserts; the seal
records them as gaps, so a row appearing there later is detected as inserted.

Sealing waits only for transactions that were already running (normally
milliseconds). A transaction left open holds sealing back, never writing;
:func:`seal` then returns :attr:`SealStatus.WAITING` naming it.

Concurrent sealers take a transaction-scoped advisory lock: one proceeds, the
others return :attr:`SealStatus.BUSY` at once. The seal number is also the
table's primary key, so two chains can never fork.

Why verification recomputes hashes in Python
--------------------------------------------
A superuser can replace the SQL function that hashes rows, or the trigger that
calls it, and then rewrite history whose stored hashes agree with that
function. :func:`verify` therefore never calls database-resident code to hash: it
reads the stored values (through PostgreSQL's built-in output functions only)
and recomputes every row hash, every Merkle root and every seal hash in Python,
an implementation of the encoding that lives on the verifier's side. A test
checks both implementations agree on varied rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from hashlib import sha256
from typing import Any
from uuid import UUID

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm.errors import InvalidInputError, SealingError, translate_db_error
from audit_orm.hashing import HASH_LENGTH, encode_row_raw, merkle_root, micros, seal_hash

#: The advisory lock that lets one sealer proceed at a time (per database).
SEAL_LOCK_KEY = 0x61756469745F7365  # "audit_se"
#: Default number of rows per seal.
DEFAULT_BLOCK_SIZE = 10_000
#: Default seconds :func:`seal` waits for running writers to end.
DEFAULT_MAX_WAIT = 30.0
#: Default cap on the problems :func:`verify` keeps (it counts them all).
DEFAULT_MAX_PROBLEMS = 100

_MAX_BLOCK_SIZE = 1_000_000
_VERIFY_BATCH = 5_000
_V1 = b"\x01"


# ---------------------------------------------------------------- result types


@dataclass(frozen=True, slots=True)
class Progress:
    """A progress report on a long run, passed to a ``progress`` callback."""

    #: ``"seal"`` or ``"verify"``.
    phase: str
    #: Rows processed so far.
    done: int
    #: An upper estimate of the rows to process, when known.
    total: int | None


#: The type of a ``progress`` callback.
ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True, slots=True)
class Digest:
    """A seal's hash, to keep outside the database.

    Its text form is ``"<seal_no>:<hex>"``; :meth:`parse` also accepts the bare
    hex of the hash.
    """

    seal_hash: bytes
    seal_no: int | None = None

    def __str__(self) -> str:
        text = self.seal_hash.hex()
        return text if self.seal_no is None else f"{self.seal_no}:{text}"

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Read a digest printed by :func:`digest` (``N:HEX`` or ``HEX``)."""
        if not isinstance(text, str):
            raise InvalidInputError("digest", text, "must be a string like 12:01ab...")
        match = re.fullmatch(r"\s*(?:(\d{1,19}):)?([0-9a-fA-F]+)\s*", text)
        if match is None or len(match.group(2)) != 2 * HASH_LENGTH:
            raise InvalidInputError(
                "digest",
                text,
                f"must be SEAL_NO:HEX or HEX, with {2 * HASH_LENGTH} hex digits",
            )
        number = match.group(1)
        return cls(bytes.fromhex(match.group(2)), None if number is None else int(number))


@dataclass(frozen=True, slots=True)
class SealInfo:
    """One seal as stored in ``audit_seals``."""

    seal_no: int
    first_seq: int
    last_seq: int
    row_count: int
    #: Inclusive ``(low, high)`` ranges of ``seq`` inside the seal that hold no row.
    gaps: tuple[tuple[int, int], ...]
    merkle_root: bytes
    prev_hash: bytes | None
    seal_hash: bytes
    horizon_txid: int
    cut_at: datetime
    sealed_at: datetime

    @property
    def digest(self) -> Digest:
        """This seal's :class:`Digest`."""
        return Digest(self.seal_hash, self.seal_no)

    def computed_hash(self) -> bytes:
        """The seal hash recomputed from the other fields."""
        return seal_hash(
            self.seal_no,
            self.first_seq,
            self.last_seq,
            self.row_count,
            self.gaps,
            self.merkle_root,
            self.prev_hash,
            self.horizon_txid,
            micros(self.cut_at),
            micros(self.sealed_at),
        )


class SealStatus(StrEnum):
    """What a call to :func:`seal` did."""

    #: New seals were written.
    SEALED = "sealed"
    #: Every closed row is sealed already.
    UP_TO_DATE = "up_to_date"
    #: Another sealer holds the lock; this call did nothing.
    BUSY = "busy"
    #: A transaction that was running is still open; nothing could be closed in time.
    WAITING = "waiting"


@dataclass(frozen=True, slots=True)
class SealResult:
    """The outcome of :func:`seal`."""

    status: SealStatus
    #: The seals written by this call, in chain order.
    seals: tuple[SealInfo, ...]
    #: Rows covered by those seals.
    rows_sealed: int
    #: The latest seal after the call (``None`` if there is none yet).
    head: SealInfo | None
    #: Seconds the call took.
    elapsed: float
    #: With :attr:`SealStatus.WAITING`: the oldest transaction still running.
    blocking_txid: int | None = None
    #: With :attr:`SealStatus.WAITING`: that transaction's backend, if visible.
    blocking_pid: int | None = None

    @property
    def events_per_second(self) -> float:
        """Sealing throughput of this call."""
        return self.rows_sealed / self.elapsed if self.elapsed > 0 else 0.0


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
    #: Whether a digest was given and found in the chain.
    digest_matched: bool | None
    elapsed: float

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return self.problem_count == 0

    @property
    def first_problem(self) -> Problem | None:
        """The earliest problem in the trail, or ``None``."""
        return self.problems[0] if self.problems else None

    @property
    def events_per_second(self) -> float:
        """Verification throughput of this call."""
        return self.rows_checked / self.elapsed if self.elapsed > 0 else 0.0


# --------------------------------------------------------------------- helpers


@asynccontextmanager
async def _driver(engine: AsyncEngine, action: str) -> AsyncIterator[Any]:
    """The asyncpg connection under one of ``engine``'s pooled connections.

    Sealing and verification control their own transactions and stream many
    rows, so they talk to the driver directly. Database failures come out as
    :class:`~audit_orm.AuditStorageError` naming ``action``.
    """
    if not isinstance(engine, AsyncEngine):
        raise InvalidInputError("engine", engine, "must be an AsyncEngine")
    try:
        async with engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            if not isinstance(driver, asyncpg.Connection):
                raise InvalidInputError(
                    "engine", engine, "must use the asyncpg driver (postgresql+asyncpg://...)"
                )
            yield driver
    except (asyncpg.PostgresError, asyncpg.InterfaceError, SQLAlchemyError, OSError) as exc:
        raise translate_db_error(exc, action) from exc


_SEAL_COLUMNS = (
    "seal_no, first_seq, last_seq, row_count, gaps, merkle_root, prev_hash, seal_hash, "
    "horizon_txid, cut_at, sealed_at"
)


def _gap_pairs(ranges: Sequence[Any]) -> tuple[tuple[int, int], ...]:
    """asyncpg ranges of a canonical int8multirange as inclusive pairs."""
    pairs = []
    for item in ranges:
        low = item.lower if item.lower_inc else item.lower + 1
        high = item.upper - 1 if not item.upper_inc else item.upper
        pairs.append((int(low), int(high)))
    return tuple(pairs)


def _seal_from_record(record: Any) -> SealInfo:
    return SealInfo(
        seal_no=record[0],
        first_seq=record[1],
        last_seq=record[2],
        row_count=record[3],
        gaps=_gap_pairs(record[4]),
        merkle_root=bytes(record[5]),
        prev_hash=None if record[6] is None else bytes(record[6]),
        seal_hash=bytes(record[7]),
        horizon_txid=int(record[8]),
        cut_at=record[9],
        sealed_at=record[10],
    )


async def _head(conn: Any) -> SealInfo | None:
    record = await conn.fetchrow(
        f"SELECT {_SEAL_COLUMNS} FROM audit_seals ORDER BY seal_no DESC LIMIT 1"
    )
    return None if record is None else _seal_from_record(record)


def _gaps_between(seqs: Sequence[int], first: int, last: int) -> list[tuple[int, int]]:
    """Inclusive ranges of ``first..last`` not in the ascending ``seqs``."""
    gaps: list[tuple[int, int]] = []
    expected = first
    for seq in seqs:
        if seq > expected:
            gaps.append((expected, seq - 1))
        expected = seq + 1
    if expected <= last:
        gaps.append((expected, last))
    return gaps


# ------------------------------------------------------------------------ seal


async def seal(
    engine: AsyncEngine,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_wait: float = DEFAULT_MAX_WAIT,
    progress: ProgressCallback | None = None,
) -> SealResult:
    """Seal every row that can no longer change, in blocks of ``block_size`` rows.

    Idempotent: with nothing new it returns :attr:`SealStatus.UP_TO_DATE`. Safe
    to run from several processes: one proceeds, the others return
    :attr:`SealStatus.BUSY`. It waits up to ``max_wait`` seconds for writers
    that were running when it started; if one is still open it returns
    :attr:`SealStatus.WAITING` and seals nothing.

    :raises SealingError: the sequence caches values, or a row in the range
        carries a number the sequence did not hand out in order.
    :raises InvalidInputError: a bad argument.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise InvalidInputError("block_size", block_size, "must be an integer")
    if not 1 <= block_size <= _MAX_BLOCK_SIZE:
        raise InvalidInputError("block_size", block_size, f"must be 1 to {_MAX_BLOCK_SIZE}")
    if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or max_wait < 0:
        raise InvalidInputError("max_wait", max_wait, "must be a number of seconds >= 0")
    started = time.monotonic()
    # READ COMMITTED whatever the server default: every statement must see a
    # fresh snapshot, the closure proof depends on it.
    async with _driver(engine, "sealing") as conn, conn.transaction(isolation="read_committed"):
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SEAL_LOCK_KEY):
            return SealResult(SealStatus.BUSY, (), 0, await _head(conn), time.monotonic() - started)
        return await _seal_locked(conn, block_size, float(max_wait), progress, started)


async def _sequence_name(conn: Any) -> str:
    name = await conn.fetchval("SELECT pg_get_serial_sequence('audit_events', 'seq')")
    if name is None:
        raise SealingError("audit_events.seq has no sequence: is the database migrated?")
    cache = await conn.fetchval(
        "SELECT seqcache FROM pg_sequence WHERE seqrelid = $1::regclass", name
    )
    if cache != 1:
        raise SealingError(
            f"sequence {name} caches {cache} values per session, so numbers are not "
            f"handed out in order and a sealed range could still grow: "
            f"ALTER SEQUENCE {name} CACHE 1"
        )
    return str(name)


async def _seal_locked(
    conn: Any,
    block_size: int,
    max_wait: float,
    progress: ProgressCallback | None,
    started: float,
) -> SealResult:
    head = await _head(conn)
    sequence = await _sequence_name(conn)
    # Order matters: the cut time, then the sequence, then our transaction id,
    # each in its own statement (see the module notes).
    cut_at = await conn.fetchval("SELECT clock_timestamp()")
    last_value, is_called = await conn.fetchrow(f"SELECT last_value, is_called FROM {sequence}")
    upper = int(last_value) if is_called else int(last_value) - 1
    first = 1 if head is None else head.last_seq + 1
    if upper < first:
        return SealResult(SealStatus.UP_TO_DATE, (), 0, head, time.monotonic() - started)
    horizon = int(await conn.fetchval("SELECT pg_current_xact_id()"))

    deadline = time.monotonic() + max_wait
    delay = 0.001
    while True:
        # Our own id counts in xmin, so xmin == horizon once every older one ended.
        xmin = int(await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())"))
        if xmin >= horizon:
            break
        if time.monotonic() >= deadline:
            pid = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE backend_xid = xid($1::xid8) LIMIT 1",
                xmin,
            )
            return SealResult(
                SealStatus.WAITING,
                (),
                0,
                head,
                time.monotonic() - started,
                blocking_txid=xmin,
                blocking_pid=pid,
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)

    sealed_at = await conn.fetchval("SELECT clock_timestamp()")
    written: list[SealInfo] = []
    rows_sealed = 0
    prev = head
    covered = first - 1
    while True:
        rows = await conn.fetch(
            "SELECT seq, row_hash, txid FROM audit_events "
            "WHERE seq > $1 AND seq <= $2 ORDER BY seq LIMIT $3",
            covered,
            upper,
            block_size + 1,
        )
        if not rows:
            break
        more = len(rows) > block_size
        block = rows[:block_size]
        last = block[-1][0] if more else upper
        for row in block:
            if int(row[2]) >= horizon:
                raise SealingError(
                    f"row seq={row[0]} was written by transaction {row[2]}, which began "
                    f"after this range was cut: its number was not drawn from the "
                    f"sequence (INSERT ... OVERRIDING SYSTEM VALUE?); sealing stops here"
                )
        seqs = [row[0] for row in block]
        info = _make_seal(
            prev,
            first=covered + 1,
            last=last,
            seqs=seqs,
            leaves=[bytes(row[1]) for row in block],
            horizon=horizon,
            cut_at=cut_at,
            sealed_at=sealed_at,
        )
        await conn.execute(
            f"INSERT INTO audit_seals ({_SEAL_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            info.seal_no,
            info.first_seq,
            info.last_seq,
            info.row_count,
            [asyncpg.Range(low, high + 1) for low, high in info.gaps],
            info.merkle_root,
            info.prev_hash,
            info.seal_hash,
            info.horizon_txid,
            info.cut_at,
            info.sealed_at,
        )
        written.append(info)
        rows_sealed += info.row_count
        prev = info
        covered = last
        if progress is not None:
            progress(Progress("seal", rows_sealed, rows_sealed + max(0, upper - covered)))
        if not more:
            break
    status = SealStatus.SEALED if written else SealStatus.UP_TO_DATE
    return SealResult(status, tuple(written), rows_sealed, prev, time.monotonic() - started)


def _make_seal(
    prev: SealInfo | None,
    *,
    first: int,
    last: int,
    seqs: Sequence[int],
    leaves: Sequence[bytes],
    horizon: int,
    cut_at: datetime,
    sealed_at: datetime,
) -> SealInfo:
    gaps = tuple(_gaps_between(seqs, first, last))
    root = merkle_root(leaves)
    seal_no = 1 if prev is None else prev.seal_no + 1
    prev_hash = None if prev is None else prev.seal_hash
    own = seal_hash(
        seal_no,
        first,
        last,
        len(seqs),
        gaps,
        root,
        prev_hash,
        horizon,
        micros(cut_at),
        micros(sealed_at),
    )
    return SealInfo(
        seal_no=seal_no,
        first_seq=first,
        last_seq=last,
        row_count=len(seqs),
        gaps=gaps,
        merkle_root=root,
        prev_hash=prev_hash,
        seal_hash=own,
        horizon_txid=horizon,
        cut_at=cut_at,
        sealed_at=sealed_at,
    )


# ---------------------------------------------------------------------- digest


async def digest(engine: AsyncEngine) -> Digest | None:
    """The latest seal's :class:`Digest`, or ``None`` before the first seal.

    Keep it somewhere the database's administrators cannot write (a ticket, a
    signed e-mail, a WORM bucket); ``verify(digest=...)`` then proves that
    nothing sealed up to that seal has changed since.
    """
    async with _driver(engine, "reading the digest") as conn:
        head = await _head(conn)
    return None if head is None else head.digest


# ---------------------------------------------------------------------- verify


class _Problems:
    """Collects problems up to a cap, counting every one."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.items: list[tuple[int, int, Problem]] = []
        self.count = 0

    def add(self, position: int, problem: Problem) -> None:
        self.count += 1
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


def _check_digest(seals: Sequence[SealInfo], wanted: Digest, found: _Problems) -> bool:
    """Whether the digest's seal is in the chain; if not, say what happened to it."""
    end = seals[-1].last_seq + 1 if seals else 1
    for item in seals:
        if item.seal_hash == wanted.seal_hash and wanted.seal_no in (None, item.seal_no):
            return True
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
        return False
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
    return False


_NO_GAP = 2**63


@dataclass
class _Block:
    """Verification state of the seal whose range the row walk is in."""

    info: SealInfo
    trusted: bool
    #: Cut time of the previous sealing run: rows here were recorded after it.
    floor_us: int | None
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


def _floors(seals: Sequence[SealInfo]) -> dict[int, int | None]:
    """For each seal, the cut time (µs) of the sealing run before its own."""
    floors: dict[int, int | None] = {}
    previous_run: int | None = None
    current_run: int | None = None
    for item in seals:
        cut = micros(item.cut_at)
        if current_run is None or cut != current_run:
            previous_run = current_run
            current_run = cut
        floors[item.seal_no] = previous_run
    return floors


# Only built-in output functions: uuid_send and timestamptz_send give the bytes
# the encoding uses as they stand (see audit_orm.hashing).
_VERIFY_QUERY = (
    "SELECT uuid_send(id), seq, event_type, entity_type, uuid_send(entity_id), actor, "
    "data::text, timestamptz_send(occurred_at), timestamptz_send(recorded_at), "
    "uuid_send(recommendation_id), uuid_send(order_id), ticker, uuid_send(corrects_id), "
    "row_hash, txid FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2"
)


async def verify(
    engine: AsyncEngine,
    *,
    digest: Digest | str | None = None,
    progress: ProgressCallback | None = None,
    max_problems: int = DEFAULT_MAX_PROBLEMS,
) -> VerifyReport:
    """Recompute every row hash, every block's Merkle root and the seal chain.

    Runs in one read-only REPEATABLE READ transaction, so rows and seals are
    seen as of one instant while writers carry on. With ``digest`` (from
    :func:`digest`, kept outside the database) it also proves the chain up to
    that seal is the one that was sealed: rewriting or removing seals, even
    with every hash recomputed, cannot pass.

    :returns: a :class:`VerifyReport`; ``report.ok`` is true when nothing was
        found, ``report.first_problem`` names the earliest thing that does not hold.
    """
    wanted = Digest.parse(digest) if isinstance(digest, str) else digest
    if wanted is not None and not isinstance(wanted, Digest):
        raise InvalidInputError("digest", digest, "must be a Digest or its text")
    if isinstance(max_problems, bool) or not isinstance(max_problems, int) or max_problems < 1:
        raise InvalidInputError("max_problems", max_problems, "must be a positive integer")
    started = time.monotonic()
    found = _Problems(max_problems)
    async with (
        _driver(engine, "verifying") as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        records = await conn.fetch(f"SELECT {_SEAL_COLUMNS} FROM audit_seals ORDER BY seal_no")
        seals = [_seal_from_record(record) for record in records]
        suspect = _check_chain(seals, found)
        matched: bool | None = None
        if wanted is not None:
            matched = _check_digest(seals, wanted, found)
        total = await conn.fetchval("SELECT max(seq) FROM audit_events")
        rows_checked, unsealed = await _walk_rows(conn, seals, suspect, found, progress, total)
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
    )


async def _walk_rows(
    conn: Any,
    seals: Sequence[SealInfo],
    suspect: set[int],
    found: _Problems,
    progress: ProgressCallback | None,
    total: int | None,
) -> tuple[int, int]:
    floors = _floors(seals)
    last_cut = micros(seals[-1].cut_at) if seals else None
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
            floor_us=floors[info.seal_no],
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
        event_id = UUID(bytes=row[0])
        found.add(
            row[1],
            Problem(
                kind,
                f"row seq {row[1]} (id {event_id}) {text}",
                seal_no=seal_no,
                seq=row[1],
                event_id=event_id,
            ),
        )

    if seals:
        block = open_block(0)
    rows_checked = 0
    unsealed = 0
    pending = asyncio.ensure_future(conn.fetch(_VERIFY_QUERY, -(2**63), _VERIFY_BATCH))
    try:
        while True:
            batch = await pending
            if not batch:
                break
            # Ask for the next batch before hashing this one: the server reads and
            # sends it while Python works.
            pending = asyncio.ensure_future(conn.fetch(_VERIFY_QUERY, batch[-1][1], _VERIFY_BATCH))
            rows_checked += len(batch)
            for row in batch:
                seq = row[1]
                stored = row[13]
                # Advance to the seal whose range holds this row.
                while block is not None and seq > block.info.last_seq:
                    close_block(block)
                    seal_index += 1
                    block = open_block(seal_index) if seal_index < len(seals) else None
                computed = (
                    _V1
                    + sha256(
                        encode_row_raw(
                            row[0],
                            seq,
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
                if computed != stored:
                    row_problem(
                        ProblemKind.CHANGED_ROW,
                        row,
                        "does not match its stored hash: it was changed",
                        None if block is None else block.info.seal_no,
                    )
                    if block is not None:
                        block.row_problem = True
                recorded_us = int.from_bytes(row[8], "big", signed=True)
                if block is None:
                    unsealed += 1
                    if last_cut is not None and recorded_us < last_cut:
                        row_problem(
                            ProblemKind.BACKDATED_ROW,
                            row,
                            "comes after the last seal but claims to be recorded before it was cut",
                            None,
                        )
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
                if row[14] >= block.horizon:
                    block.row_problem = True
                    row_problem(
                        ProblemKind.CHANGED_ROW,
                        row,
                        f"names transaction {row[14]}, which had not ended when seal "
                        f"{block.info.seal_no} was made",
                        block.info.seal_no,
                    )
                if block.floor_us is not None and recorded_us < block.floor_us:
                    row_problem(
                        ProblemKind.BACKDATED_ROW,
                        row,
                        "claims to be recorded before the sealing run that preceded its seal",
                        block.info.seal_no,
                    )
            if progress is not None:
                progress(Progress("verify", rows_checked, total))
    finally:
        if not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending
    while block is not None:
        close_block(block)
        seal_index += 1
        block = open_block(seal_index) if seal_index < len(seals) else None
    return rows_checked, unsealed
