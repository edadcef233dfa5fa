"""Seal the audit trail into a hash chain.

Every row carries a hash the database computed at insert (see
:mod:`audit_orm.hashing`). :func:`seal` closes blocks of committed rows: each
seal covers a contiguous range of ``seq`` numbers and records the range, the
numbers in it that hold no row (gaps), a Merkle root over the rows' hashes, the
previous seal's hash and its own. :func:`digest` gives the latest seal's hash
for keeping outside the database; :func:`audit_orm.verifying.verify` recomputes
all of it.

Why a range can be sealed without a global write lock
------------------------------------------------------
Writers commit out of ``seq`` order, so the sealer must only take a range no
transaction can still add to. Two facts make that provable:

1. the insert trigger takes the writer's transaction id before it draws the
   row's ``seq`` from the sequence (ignoring any value the INSERT gives), so
   every row's ``txid`` was assigned before its ``seq`` was drawn (rows record
   it in ``txid``);
2. the sequence hands out numbers in increasing order (the sealer refuses to
   run if the sequence caches values per session).

The sealer reads the sequence's last value ``S``, then takes a transaction id
``X`` of its own. Any row with ``seq <= S`` drew its number before that read, so
its transaction id is older than ``X``; and it was drawn inside an INSERT (or
COPY) into ``audit_events``, whose ``ROW EXCLUSIVE`` lock the transaction holds
from before the draw until it ends. So one read of the lock table, after ``X``
was taken, finds every transaction that may still hold such a row uncommitted:
a transaction older than ``X`` (in the snapshot's running list) holding that
lock. Once each of them has ended, the next statement (a fresh READ COMMITTED
snapshot) sees every row with ``seq <= S`` that will ever exist: the range is
closed. The numbers in it without a row belong to rolled-back or refused
inserts; the seal records them as gaps, so a row appearing there later is
detected as inserted.

Sealing waits only for writers that were already running (normally
milliseconds); an open transaction of a role that cannot insert events (a
reader's, say) does not hold it back. A writer's transaction left open does;
:func:`seal` then returns :attr:`SealStatus.WAITING` naming it.

Concurrent sealers serialize on ``LOCK TABLE audit_seals IN SHARE ROW
EXCLUSIVE MODE``. PostgreSQL grants that mode only to a role with UPDATE,
DELETE or TRUNCATE on the table (or its owner): the sealer role gets UPDATE for
exactly this, and the append-only trigger refuses every UPDATE anyway. Readers
and writers cannot hold it, unlike an advisory lock, which any role that can
connect may take. A sealer waits for the lock within ``max_wait`` and fails
with :class:`~audit_orm.SealingError` naming the holder when kept out longer.
The seal number is also the table's primary key, so two chains can never fork.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm.errors import (
    AuditStorageError,
    InvalidInputError,
    SealingError,
    translate_db_error,
)
from audit_orm.hashing import HASH_LENGTH, merkle_root, micros, seal_hash
from audit_orm.tables import check_schema_name, pin_path, quote_ident, resolve_schema

#: Default number of rows per seal.
DEFAULT_BLOCK_SIZE = 10_000
#: Default seconds :func:`seal` waits, for another sealer and for running writers.
DEFAULT_MAX_WAIT = 30.0
#: The largest ``block_size`` :func:`seal` accepts.
MAX_BLOCK_SIZE = 1_000_000
#: The longest ``max_wait`` :func:`seal` accepts (a day).
MAX_WAIT_LIMIT = 86_400.0
#: The largest seal number (``bigint``).
_MAX_SEAL_NO = 2**63 - 1


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
        """Read a digest printed by :func:`digest` (``N:HEX`` or ``HEX``).

        Only ASCII digits and hex digits are accepted (``int`` would read other
        scripts' digits too), with optional surrounding spaces.

        :raises InvalidInputError: anything else, naming ``digest``.
        """
        if not isinstance(text, str):
            raise InvalidInputError("digest", text, "must be a string like 12:01ab...")
        match = re.fullmatch(r"[ \t\r\n]*(?:([0-9]{1,19}):)?([0-9a-fA-F]+)[ \t\r\n]*", text)
        if match is None or len(match.group(2)) != 2 * HASH_LENGTH:
            raise InvalidInputError(
                "digest",
                text,
                f"must be SEAL_NO:HEX or HEX, with {2 * HASH_LENGTH} hex digits",
            )
        number = None if match.group(1) is None else int(match.group(1))
        if number is not None and not 1 <= number <= _MAX_SEAL_NO:
            raise InvalidInputError("digest", text, "the seal number must be 1 to 2**63-1")
        return cls(bytes.fromhex(match.group(2)), number)

    def check(self) -> Digest:
        """This digest, after checking its fields (it may have been built directly).

        :raises InvalidInputError: a hash of the wrong length or type, or a seal
            number out of range.
        """
        if not isinstance(self.seal_hash, bytes) or len(self.seal_hash) != HASH_LENGTH:
            raise InvalidInputError(
                "digest", self.seal_hash, f"the seal hash must be {HASH_LENGTH} bytes"
            )
        number = self.seal_no
        if number is not None and (
            isinstance(number, bool)
            or not isinstance(number, int)
            or not 1 <= number <= _MAX_SEAL_NO
        ):
            raise InvalidInputError("digest", number, "the seal number must be 1 to 2**63-1")
        return self


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
    #: Kept for compatibility, never returned: a sealer now waits for another
    #: one, and raises :class:`~audit_orm.SealingError` if kept out longer than
    #: its ``max_wait``.
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


@dataclass(frozen=True, slots=True)
class _Tables:
    """The audit tables as found by :func:`~audit_orm.tables.resolve_schema`."""

    schema: str
    events_oid: int
    seals_oid: int

    @property
    def events(self) -> str:
        return f"{quote_ident(self.schema)}.audit_events"

    @property
    def seals(self) -> str:
        return f"{quote_ident(self.schema)}.audit_seals"


async def _pinned(conn: Any, schema: str | None, action: str) -> _Tables:
    """Pin ``search_path`` for the transaction and find the real audit tables.

    From here on every table is named by its schema and every function comes
    from ``pg_catalog``: nothing the connecting role's path leads to is used.
    """
    await pin_path(conn)
    return _Tables(*await resolve_schema(conn, schema, action))


async def _head(conn: Any, tables: _Tables) -> SealInfo | None:
    record = await conn.fetchrow(
        f"SELECT {_SEAL_COLUMNS} FROM {tables.seals} ORDER BY seal_no DESC LIMIT 1"
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


def check_seal_options(
    block_size: object,
    max_wait: object,
    *,
    block_size_name: str = "block_size",
    max_wait_name: str = "max_wait",
) -> tuple[int, float]:
    """``(block_size, max_wait)`` as :func:`seal` takes them, after checking both.

    The names are those the caller knows the options by (the command line
    passes ``--block-size`` and ``--max-wait``).

    :raises InvalidInputError: a block size that is not an integer from 1 to
        :data:`MAX_BLOCK_SIZE`, or a wait that is not a finite number of seconds
        from 0 to :data:`MAX_WAIT_LIMIT` (NaN, infinity and negatives included).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise InvalidInputError(block_size_name, block_size, "must be an integer")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidInputError(block_size_name, block_size, f"must be 1 to {MAX_BLOCK_SIZE}")
    if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)):
        raise InvalidInputError(max_wait_name, max_wait, "must be a number of seconds")
    wait = float(max_wait)
    if not (math.isfinite(wait) and 0 <= wait <= MAX_WAIT_LIMIT):
        raise InvalidInputError(
            max_wait_name,
            max_wait,
            f"must be a finite number of seconds from 0 to {MAX_WAIT_LIMIT:g}",
        )
    return block_size, wait


async def seal(
    engine: AsyncEngine,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_wait: float = DEFAULT_MAX_WAIT,
    progress: ProgressCallback | None = None,
    schema: str | None = None,
) -> SealResult:
    """Seal every row that can no longer change, in blocks of ``block_size`` rows.

    Idempotent: with nothing new it returns :attr:`SealStatus.UP_TO_DATE`. Safe
    to run from several processes: they take turns on the seal lock, and the
    later ones find less (or nothing) left to seal. ``max_wait`` bounds the whole
    wait, for the lock and then for writers that were running when the range
    was cut; if such a writer is still open it returns
    :attr:`SealStatus.WAITING` and seals nothing. Like
    :func:`~audit_orm.verifying.verify` it pins ``search_path`` and names every
    table by its schema (``schema``, or the one schema holding the audit
    tables), so no object on the sealer role's own path is read or written.

    :raises SealingError: the seal lock was held by another session for longer
        than ``max_wait`` (the error names it), the role may not take the seal
        lock, the sequence caches values, or a row in the range carries a
        number the sequence did not hand out in order.
    :raises InvalidInputError: a bad argument, or several schemas hold the audit
        tables and ``schema`` is not given.
    """
    block_size, wait = check_seal_options(block_size, max_wait)
    check_schema_name(schema)
    if progress is not None and not callable(progress):
        # Found out only after the first block otherwise, as a TypeError.
        raise InvalidInputError("progress", progress, "must be callable")
    started = time.monotonic()
    # READ COMMITTED whatever the server default: every statement must see a
    # fresh snapshot, the closure proof depends on it.
    async with _driver(engine, "sealing") as conn, conn.transaction(isolation="read_committed"):
        tables = await _pinned(conn, schema, "sealing")
        await _take_seal_lock(conn, tables, wait)
        return await _seal_locked(conn, tables, block_size, started + wait, progress, started)


_LOCK_NOT_AVAILABLE = "55P03"
_INSUFFICIENT_PRIVILEGE = "42501"


async def _take_seal_lock(conn: Any, tables: _Tables, max_wait: float) -> None:
    """Wait up to ``max_wait`` seconds for the lock that serializes sealers."""
    # lock_timeout 0 would mean "wait forever": never ask for less than 1 ms.
    timeout_ms = max(1, math.ceil(max_wait * 1000))
    await conn.execute(f"SET LOCAL lock_timeout = {timeout_ms}")
    try:
        # A savepoint, so that a refused lock leaves the transaction usable for
        # naming who holds it.
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {tables.seals} IN SHARE ROW EXCLUSIVE MODE")
    except asyncpg.PostgresError as exc:
        state = getattr(exc, "sqlstate", None)
        if state == _INSUFFICIENT_PRIVILEGE:
            raise AuditStorageError(
                "sealing failed: permission denied to take the seal lock (LOCK TABLE "
                "audit_seals IN SHARE ROW EXCLUSIVE MODE needs UPDATE on audit_seals; "
                "audit-orm grant --sealer ROLE gives it)"
            ) from exc
        if state != _LOCK_NOT_AVAILABLE:
            raise
        holders = await conn.fetch(
            "SELECT DISTINCT l.pid, a.usename FROM pg_catalog.pg_locks l "
            "LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'relation' AND l.granted "
            "AND l.relation = $1::pg_catalog.oid AND l.pid <> pg_catalog.pg_backend_pid() "
            "AND l.mode IN ('ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock', "
            "'ShareLock', 'ShareUpdateExclusiveLock', 'RowExclusiveLock') ORDER BY l.pid",
            tables.seals_oid,
        )
        named = ", ".join(f"pid {pid} (role {user})" for pid, user in holders) or "another session"
        raise SealingError(
            f"the seal lock on audit_seals was held by {named} for more than "
            f"max_wait={max_wait:g} s: nothing sealed"
        ) from exc
    await conn.execute("SET LOCAL lock_timeout TO DEFAULT")


async def _sequence_name(conn: Any, tables: _Tables) -> str:
    name = await conn.fetchval("SELECT pg_get_serial_sequence($1, 'seq')", tables.events)
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


#: The transactions older than the sealer's own (``$1``, which ``age`` counts
#: from) that hold the lock an INSERT or COPY into audit_events (OID ``$2``) takes, as of one
#: read of the lock table; as full (64-bit) transaction ids. Every transaction
#: holds a lock on its own id until it ends (a prepared one, until it is
#: committed or rolled back), which links the two.
_WRITERS_RUNNING = (
    "SELECT ARRAY(SELECT DISTINCT $1::pg_catalog.int8 - pg_catalog.age(t.transactionid) "
    "FROM pg_catalog.pg_locks t JOIN pg_catalog.pg_locks r "
    "ON r.virtualtransaction = t.virtualtransaction "
    "WHERE t.locktype = 'transactionid' AND pg_catalog.age(t.transactionid) > 0 "
    "AND r.locktype = 'relation' AND r.relation = $2::pg_catalog.oid "
    "AND r.mode = 'RowExclusiveLock' AND r.granted)"
)
#: The oldest of ``$1`` still running, and its backend (``$2``: the sealer's id).
_OLDEST_STILL_RUNNING = (
    "SELECT $2::pg_catalog.int8 - pg_catalog.age(t.transactionid) AS x, t.pid "
    "FROM pg_catalog.pg_locks t WHERE t.locktype = 'transactionid' "
    "AND $2::pg_catalog.int8 - pg_catalog.age(t.transactionid) "
    "= ANY ($1::pg_catalog.int8[]) ORDER BY x LIMIT 1"
)


async def _seal_locked(
    conn: Any,
    tables: _Tables,
    block_size: int,
    deadline: float,
    progress: ProgressCallback | None,
    started: float,
) -> SealResult:
    head = await _head(conn, tables)
    sequence = await _sequence_name(conn, tables)
    # Order matters: the cut time, then the sequence, then our transaction id,
    # each in its own statement (see the module notes).
    cut_at = await conn.fetchval("SELECT clock_timestamp()")
    last_value, is_called = await conn.fetchrow(f"SELECT last_value, is_called FROM {sequence}")
    upper = int(last_value) if is_called else int(last_value) - 1
    first = 1 if head is None else head.last_seq + 1
    if upper < first:
        return SealResult(SealStatus.UP_TO_DATE, (), 0, head, time.monotonic() - started)
    horizon = int(await conn.fetchval("SELECT pg_current_xact_id()"))

    # Only writers can hold a row numbered up to S uncommitted: wait for them,
    # not for every transaction of any role (see the module notes).
    writers = [int(x) for x in await conn.fetchval(_WRITERS_RUNNING, horizon, tables.events_oid)]
    delay = 0.001
    while writers:
        oldest = await conn.fetchrow(_OLDEST_STILL_RUNNING, writers, horizon)
        if oldest is None:
            break
        if time.monotonic() >= deadline:
            return SealResult(
                SealStatus.WAITING,
                (),
                0,
                head,
                time.monotonic() - started,
                blocking_txid=int(oldest[0]),
                blocking_pid=oldest[1],
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
            f"SELECT seq, row_hash, txid FROM {tables.events} "
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
                    f"sequence (inserted with the insert trigger disabled?); sealing stops here"
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
            f"INSERT INTO {tables.seals} ({_SEAL_COLUMNS}) "
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


async def digest(engine: AsyncEngine, *, schema: str | None = None) -> Digest | None:
    """The latest seal's :class:`Digest`, or ``None`` before the first seal.

    Read with ``search_path`` pinned from ``schema``'s ``audit_seals`` (by
    default, the one schema holding the audit tables), as :func:`seal` writes it.

    Keep it somewhere the database's administrators cannot write (a ticket, a
    signed e-mail, a WORM bucket); ``verify(digest=...)`` then proves that
    nothing sealed up to that seal has changed since.

    :raises InvalidInputError: a bad ``schema``, or several schemas hold the
        audit tables and ``schema`` is not given.
    """
    check_schema_name(schema)
    async with (
        _driver(engine, "reading the digest") as conn,
        conn.transaction(readonly=True),
    ):
        tables = await _pinned(conn, schema, "reading the digest")
        head = await _head(conn, tables)
    return None if head is None else head.digest
