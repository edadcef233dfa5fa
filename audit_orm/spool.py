"""The local spool: where best-effort recording keeps events the database refused.

A spool is a text file of JSON Lines, one self-describing record per line::

    {"spool_format":2,"kind":"event","event_id":"…","attempt":"…","spooled_at":"…",
     "error":"recording order.filled failed: …","event":{…every column…}}
    {"spool_format":2,"kind":"void","event_id":"…","attempt":"…","spooled_at":"…",
     "reason":"…"}

An ``event`` record carries every prepared column of the event (numbers as exact
JSON numbers; ``occurred_at`` is ``null`` when the caller gave none, so the
database fills it at replay as it would have at the first write) and the error
that kept it out of the database. Each write call spools under an ``attempt``
token of its own. A ``void`` record says that the transaction which carried
that attempt rolled back afterwards, so that attempt describes nothing that
happened; it cancels only the attempt it names, so a unit of work retried under
the same event id (one attempt rolled back, the next committed) is still
replayed. A void without an ``attempt`` (and every void of format 1, whose
records carry no attempt and are still read) cancels every attempt of its event.

Each append is one ``write`` of whole lines followed by ``fsync`` under an
exclusive ``flock``, so concurrent writers (threads or processes) never
interleave, and a record is on disk before the call returns. A crash in the
middle of an append can leave a torn last line; the next append first ends that
line, and :func:`replay_spool` reports it instead of guessing.

:func:`replay_spool` (and ``audit-orm replay SPOOL``) writes the spooled events
to the database under their original event ids; see its docstring for the
protocol that makes it safe to rerun after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import math
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from uuid import UUID, uuid4

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit_orm.bulk import same_event
from audit_orm.errors import (
    DB_ERRORS,
    AuditSpoolError,
    AuditStorageError,
    AuditUnavailableError,
    EventIdConflictError,
    InvalidInputError,
    sqlstate_of,
    translate_db_error,
)
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.models import AuditEvent
from audit_orm.records import AuditRecord
from audit_orm.repository import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    AuditRepository,
    PreparedEvent,
    check_max_payload_bytes,
    prepare_event,
)
from audit_orm.retry import RetryPolicy, call_with_retries

try:  # POSIX; elsewhere the in-process lock alone serializes appends.
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("audit_orm.spool")

#: The version written in every record's ``spool_format`` field.
SPOOL_FORMAT = 2
#: The versions replay reads: format 1 lines (no attempt tokens) are still replayed.
READABLE_FORMATS = (1, 2)
#: Suffix of the file a running (or interrupted) replay works on.
CLAIMED_SUFFIX = ".replaying"
#: Suffix of the file that keeps what replay could not write.
REJECTED_SUFFIX = ".rejected"


@dataclass(frozen=True, slots=True)
class SpooledRecord(AuditRecord):
    """What best-effort recording returns for an event that went to the spool.

    It has every field of the event, but the database has not seen it: ``seq``
    is 0 (the database numbers from 1) and ``recorded_at`` is the local clock at
    spooling. ``error`` says why the write failed and ``spool`` where it went.
    """

    error: str = ""
    spool: str = ""
    #: The token of the write attempt that spooled the event (see the module docs).
    attempt: str = ""


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _text(value: UUID | None) -> str | None:
    return None if value is None else str(value)


def event_fields(prepared: PreparedEvent) -> dict[str, Any]:
    """The columns of a prepared event as JSON-ready values (exact numbers kept)."""
    return {
        "id": str(prepared.id),
        "event_type": prepared.event_type.value,
        "entity_type": prepared.entity_type.value,
        "entity_id": str(prepared.entity_id),
        "actor": prepared.actor,
        "data": prepared.data,
        "occurred_at": _iso(prepared.occurred_at),
        "recommendation_id": _text(prepared.recommendation_id),
        "order_id": _text(prepared.order_id),
        "ticker": prepared.ticker,
        "corrects_id": _text(prepared.corrects_id),
    }


#: Flags of every open of a spool or side file: never through a symbolic link
#: (another user could point it at a file of theirs or ours), never blocking on
#: a FIFO put in its place.
_OPEN_FLAGS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | os.O_NONBLOCK


def _open_private(path: Path, flags: int, *, create: bool = False) -> int:
    """Open a spool or side file: no symlink, a regular file, mode 0600 enforced.

    A file that exists with a wider mode (created by hand, or under another
    umask) is narrowed to 0600, since it holds audit data.
    """
    try:
        fd = os.open(path, flags | _OPEN_FLAGS | (os.O_CREAT if create else 0), 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(exc.errno, "is a symbolic link, which a spool file must not be") from exc
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "is not a regular file")
        if info.st_nlink > 1:
            # A hard link made by someone who can write the directory would
            # make our appends (and the mode we set) land in their file too.
            raise OSError(errno.EMLINK, "has other hard links, which a spool file must not have")
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Spool:
    """An append-only, fsynced JSON Lines file of events awaiting the database.

    Safe to share between threads, tasks and processes on one machine. The file
    is created on first use with mode 0600 (it holds audit data).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
        if not isinstance(text, str) or not text or "\x00" in text:
            raise InvalidInputError("spool", path, "must be a file path without NUL characters")
        self.path = Path(text)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Spool({str(self.path)!r})"

    def _append(self, lines: Sequence[str]) -> None:
        payload = "".join(line + "\n" for line in lines).encode("utf-8")
        with self._lock:
            try:
                self._append_locked(payload)
            except OSError as exc:
                raise AuditSpoolError(f"spool {self.path}: cannot append: {exc}") from exc

    def _append_locked(self, payload: bytes) -> None:
        self._append_with(lambda fd: _write_all(fd, payload))

    def _append_with(self, write: Callable[[int], None]) -> None:
        """Append whatever ``write`` writes to the open file, whole or not at all."""
        while True:
            fd = _open_private(self.path, os.O_RDWR | os.O_APPEND, create=True)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # A replay may have moved the file away while we waited for the
                # lock; appending to the moved file would hide the record from it.
                mine = os.fstat(fd)
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    continue
                if (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                    continue
                try:
                    if mine.st_size and os.pread(fd, 1, mine.st_size - 1) != b"\n":
                        # A writer crashed mid-line: end that line so ours stays whole.
                        _write_all(fd, b"\n")
                    write(fd)
                    os.fsync(fd)
                except OSError:
                    # A full disk or an I/O error may have left part of our
                    # lines: cut them off, so no torn record stays behind a
                    # call that reports failure.
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, mine.st_size)
                        os.fsync(fd)
                    raise
                if mine.st_size == 0:
                    # A new file: make its directory entry durable too.
                    _fsync_dir(self.path.parent)
                return
            finally:
                os.close(fd)

    def append_event(
        self, prepared: PreparedEvent, error: str, *, attempt: str | None = None
    ) -> SpooledRecord:
        """Durably append one event; returns it as a :class:`SpooledRecord`.

        An event without a business time is spooled with ``occurred_at: null``:
        replay leaves it to the database, exactly as the direct write would
        have, so a retry of the same event meets the same verdict on both paths.
        The returned record shows the spool clock as its ``occurred_at``.
        """
        return self.append_events([prepared], error, attempt=attempt)[0]

    def append_events(
        self, events: Sequence[PreparedEvent], error: str, *, attempt: str | None = None
    ) -> list[SpooledRecord]:
        """Durably append a batch of events in order, with one write and one fsync.

        :param attempt: the write attempt's token (a fresh one by default); a
            later :meth:`append_voids` naming it cancels these lines only.
        """
        token = uuid4().hex if attempt is None else attempt
        if not isinstance(token, str) or not token:
            raise InvalidInputError("attempt", attempt, "must be a non-empty string")
        now = datetime.now(UTC)
        lines = [
            dumps_exact(
                {
                    "spool_format": SPOOL_FORMAT,
                    "kind": "event",
                    "event_id": str(prepared.id),
                    "attempt": token,
                    "spooled_at": now.isoformat(),
                    "error": error,
                    "event": event_fields(prepared),
                }
            )
            for prepared in events
        ]
        if lines:
            self._append(lines)
        return [self._record(prepared, now, error, token) for prepared in events]

    def _record(
        self, prepared: PreparedEvent, now: datetime, error: str, attempt: str
    ) -> SpooledRecord:
        return SpooledRecord(
            id=prepared.id,
            seq=0,
            event_type=prepared.event_type,
            entity_type=prepared.entity_type,
            entity_id=prepared.entity_id,
            actor=prepared.actor,
            data=prepared.data,
            occurred_at=prepared.occurred_at or now,
            recorded_at=now,
            recommendation_id=prepared.recommendation_id,
            order_id=prepared.order_id,
            ticker=prepared.ticker,
            corrects_id=prepared.corrects_id,
            error=error,
            spool=str(self.path),
            attempt=attempt,
        )

    def append_voids(
        self, event_ids: Iterable[UUID], reason: str, *, attempt: str | None = None
    ) -> None:
        """Durably mark spooled events as not to be replayed.

        :param attempt: cancel only the lines of this write attempt; ``None``
            cancels every attempt of each event.
        """
        now = datetime.now(UTC).isoformat()
        lines = [
            dumps_exact(
                {
                    "spool_format": SPOOL_FORMAT,
                    "kind": "void",
                    "event_id": str(event_id),
                    "attempt": attempt,
                    "spooled_at": now,
                    "reason": reason,
                }
            )
            for event_id in event_ids
        ]
        if lines:
            self._append(lines)

    def claim(self) -> Path | None:
        """Move the spool's records to the claimed file a replay works on.

        Under the spool's lock, so no append is lost: writers that were waiting
        notice the move and start a new spool file. If an interrupted replay left
        a claimed file, the new records are appended to it (a record that ends
        up there twice is harmless: replay is idempotent). Returns the claimed
        file, or ``None`` if there is nothing to replay.
        """
        claimed = self.path.with_name(self.path.name + CLAIMED_SUFFIX)
        with self._lock:
            try:
                fd = _open_private(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return claimed if os.path.lexists(claimed) else None
            except OSError as exc:
                raise AuditSpoolError(f"spool {self.path}: cannot open: {exc}") from exc
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if not os.path.lexists(claimed):
                    os.replace(self.path, claimed)
                else:
                    # Copied in pieces: a spool that grew through a long
                    # outage need not fit in memory.
                    def copy(out: int) -> None:
                        last = b"\n"
                        while chunk := os.read(fd, 1 << 20):
                            _write_all(out, chunk)
                            last = chunk[-1:]
                        if last != b"\n":
                            _write_all(out, b"\n")

                    Spool(claimed)._append_with(copy)
                    os.unlink(self.path)
                _fsync_dir(self.path.parent)
            except OSError as exc:
                raise AuditSpoolError(f"spool {self.path}: cannot claim: {exc}") from exc
            finally:
                os.close(fd)
        return claimed


# ---------------------------------------------------------------------- reading

#: Lines longer than this (bytes) are not parsed: replay quarantines them with
#: an excerpt, their size and their SHA-256. Replay raises the bound to fit the
#: largest event its ``max_payload_bytes`` allows.
MAX_LINE_BYTES = 1 << 20
#: How much of a line too long to parse is kept in the rejected file.
EXCERPT_BYTES = 4096


@dataclass(frozen=True, slots=True)
class SpoolProblem:
    """A spool line replay could not use, and why. It is kept in the rejected file.

    For a line too long to parse, ``raw`` is its first :data:`EXCERPT_BYTES`
    bytes and ``size`` and ``sha256`` describe the whole line.
    """

    line: int
    reason: str
    raw: str
    event_id: str | None = None
    size: int | None = None
    sha256: str | None = None

    @property
    def key(self) -> str:
        """What identifies this problem in the rejected file across reruns."""
        text = f"{self.line}\x00{self.event_id}\x00{self.sha256 or ''}\x00{self.raw}"
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class SpoolContents:
    """A parsed spool.

    ``attempts`` holds every event line by event id, in file order; ``events``
    the first of them (a convenience view); ``void_keys`` the ``(event_id,
    attempt)`` pairs voided (``attempt`` ``None``: every attempt), and ``voids``
    the event ids with any void.
    """

    events: dict[UUID, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    attempts: dict[UUID, list[tuple[int, dict[str, Any]]]] = field(default_factory=dict)
    voids: set[UUID] = field(default_factory=set)
    void_keys: set[tuple[UUID, str | None]] = field(default_factory=set)
    problems: list[SpoolProblem] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0

    def is_voided(self, event_id: UUID, attempt: str | None) -> bool:
        """Whether the event line of ``attempt`` was cancelled by a void."""
        return (event_id, None) in self.void_keys or (
            attempt is not None and (event_id, attempt) in self.void_keys
        )


def _has_non_finite(value: Any) -> bool:
    """Whether parsed JSON holds a NaN or an infinity (``NaN``, ``Infinity`` literals)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _has_lone_surrogate(value: Any) -> bool:
    """Whether any string in parsed JSON holds a lone surrogate (not encodable)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _parse_record(line_no: int, raw: bytes, last: bool, out: SpoolContents) -> None:
    text = raw.decode("utf-8", errors="backslashreplace")
    torn = last and not raw.endswith(b"\n")
    body = raw.strip()
    if not body:
        return
    try:
        record = loads_exact(body.decode("utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if _has_lone_surrogate(record):
            raise ValueError("a string holds a lone surrogate, which is not text")
        if _has_non_finite(record):
            # Python's parser takes NaN and Infinity; no spool writer emits them,
            # and they could not be written back to the rejected file either.
            raise ValueError("a number is NaN or infinite, which JSON cannot hold")
    except (ValueError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        reason = (
            "torn final line: the writer stopped mid-append (the process crashed "
            "before the record was complete, so its call never returned)"
            if torn
            else f"corrupt line, not a spool record: {detail}"
        )
        out.problems.append(SpoolProblem(line_no, reason, text.rstrip("\n")))
        return
    out.records += 1
    version = record.get("spool_format")
    kind = record.get("kind")
    raw_id = record.get("event_id")
    event_id = raw_id if isinstance(raw_id, str) else None
    if isinstance(version, bool) or version not in READABLE_FORMATS:
        reason = f"unsupported spool_format {version!r} (this version reads {READABLE_FORMATS})"
        out.problems.append(SpoolProblem(line_no, reason, text.rstrip("\n"), event_id))
        return
    try:
        uid = UUID(event_id) if event_id is not None else None
    except ValueError:
        uid = None
    if uid is None:
        reason = f"event_id {raw_id!r} is not a UUID"
        out.problems.append(SpoolProblem(line_no, reason, text.rstrip("\n"), event_id))
        return
    attempt = record.get("attempt")
    if version == 1:
        attempt = None
    elif not (attempt is None and kind == "void") and not (isinstance(attempt, str) and attempt):
        reason = f"attempt {attempt!r} is not a token"
        out.problems.append(SpoolProblem(line_no, reason, text.rstrip("\n"), event_id))
        return
    if kind == "void":
        out.voids.add(uid)
        out.void_keys.add((uid, attempt))
    elif kind == "event" and isinstance(record.get("event"), dict):
        record["attempt"] = attempt
        if uid in out.events:
            out.duplicates += 1
        else:
            out.events[uid] = (line_no, record)
        out.attempts.setdefault(uid, []).append((line_no, record))
    else:
        reason = f"unknown record kind {kind!r}"
        out.problems.append(SpoolProblem(line_no, reason, text.rstrip("\n"), event_id))


def _oversized(line_no: int, head: bytes, handle: BinaryIO) -> SpoolProblem:
    """Consume the rest of a line too long to parse; describe it by excerpt, size, hash."""
    digest = hashlib.sha256(head)
    size = len(head)
    while True:
        chunk = handle.readline(1 << 16)
        digest.update(chunk)
        size += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            break
    excerpt = head[:EXCERPT_BYTES].decode("utf-8", errors="backslashreplace")
    return SpoolProblem(
        line_no,
        f"line of {size} bytes is too long to be a spool record; kept as an excerpt "
        "with its size and SHA-256",
        excerpt,
        size=size,
        sha256=digest.hexdigest(),
    )


def read_spool(
    path: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES
) -> SpoolContents:
    """Parse a spool file, streaming. Unusable lines become :class:`SpoolProblem` entries.

    No line can stop the reading: a line that is not JSON, nested too deeply,
    holds a lone surrogate or is longer than ``max_line_bytes`` is reported and
    the next line is read.
    """
    out = SpoolContents()
    try:
        fd = _open_private(Path(os.fspath(path)), os.O_RDONLY)
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise AuditSpoolError(f"spool {os.fspath(path)}: cannot read: {exc}") from exc
    try:
        with open(fd, "rb", closefd=False) as handle:
            line_no = 0
            raw = handle.readline(max_line_bytes + 1)
            while raw:
                line_no += 1
                if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                    out.problems.append(_oversized(line_no, raw, handle))
                    raw = handle.readline(max_line_bytes + 1)
                    continue
                following = handle.readline(max_line_bytes + 1)
                _parse_record(line_no, raw, not following, out)
                raw = following
    except OSError as exc:
        raise AuditSpoolError(f"spool {os.fspath(path)}: cannot read: {exc}") from exc
    finally:
        os.close(fd)
    return out


def prepare_spooled(record: dict[str, Any], max_payload_bytes: int) -> PreparedEvent:
    """Validate a spooled event again, exactly as a fresh write would be.

    A spool is a file anyone could edit; nothing in it reaches the database
    without passing :func:`~audit_orm.repository.prepare_event`.
    """
    event = record["event"]
    prepared = prepare_event(
        event.get("event_type"),
        event.get("entity_type"),
        event.get("entity_id"),
        event.get("data"),
        actor=event.get("actor"),
        occurred_at=event.get("occurred_at"),
        event_id=event.get("id"),
        recommendation_id=event.get("recommendation_id"),
        order_id=event.get("order_id"),
        corrects=event.get("corrects_id"),
        max_payload_bytes=max_payload_bytes,
    )
    if str(prepared.id) != record.get("event_id"):
        raise InvalidInputError("event_id", record.get("event_id"), "differs from event.id")
    return prepared


# ---------------------------------------------------------------------- replay


@dataclass(slots=True)
class ReplayReport:
    """What a replay did. ``ok`` is true when nothing was rejected and nothing conflicts.

    ``conflicts`` lists event lines whose id is taken by a different event (in
    the table, or by an earlier line of the spool): the first of them is the
    event, as it would have been without an outage, and the others are refused.
    """

    spool: str
    records: int = 0
    written: int = 0
    already_present: int = 0
    voided: int = 0
    duplicates: int = 0
    rejected: list[SpoolProblem] = field(default_factory=list)
    conflicts: list[SpoolProblem] = field(default_factory=list)
    rejected_file: str | None = None

    @property
    def ok(self) -> bool:
        """True when every event in the spool is now in the database (or voided)."""
        return not self.rejected and not self.conflicts

    def summary(self) -> str:
        """One line of counts."""
        text = (
            f"{self.spool}: {self.records} records, {self.written} written, "
            f"{self.already_present} already present, {self.voided} voided, "
            f"{self.duplicates} duplicate lines, {len(self.conflicts)} conflicts, "
            f"{len(self.rejected)} rejected"
        )
        if self.rejected_file:
            text += f" (kept in {self.rejected_file})"
        return text


class ReplayInterruptedError(AuditUnavailableError):
    """The database failed during a replay even after retries.

    Chunks committed before the failure stay committed; ``report`` counts them.
    The claimed file is kept, so running the replay again finishes the job.
    """

    def __init__(self, message: str, report: ReplayReport) -> None:
        super().__init__(message)
        self.report = report


class ReplayStoppedError(AuditStorageError):
    """The database refused a replay for a reason that is not about a spool line.

    A read-only server, a full disk, a missing table or privilege: writing the
    next line would fail the same way, so replay stops instead of rejecting
    every line. Chunks committed before stay committed; the claimed file is
    kept for the next run.
    """

    def __init__(self, message: str, report: ReplayReport) -> None:
        super().__init__(message)
        self.report = report


#: SQLSTATE classes that mean the row itself is wrong (data exception, integrity
#: constraint violation, a program limit such as an index row too large): such
#: a line is rejected and replay goes on. Any other failure stops the replay.
_LINE_STATE_CLASSES = ("22", "23", "54")


def _about_the_line(exc: AuditStorageError) -> bool:
    if isinstance(exc, EventIdConflictError):
        return True
    state = sqlstate_of(exc)
    return state is not None and state.startswith(_LINE_STATE_CLASSES)


@dataclass(slots=True)
class _ChunkResult:
    written: int = 0
    already_present: int = 0
    rejected: list[SpoolProblem] = field(default_factory=list)
    conflicts: list[SpoolProblem] = field(default_factory=list)


class _LineIndependentError(Exception):
    """Raised out of a chunk so that its transaction rolls back; carries the cause."""

    def __init__(self, error: AuditStorageError) -> None:
        super().__init__(str(error))
        self.error = error


async def _write_chunk(
    sessions: async_sessionmaker[AsyncSession],
    chunk: Sequence[tuple[int, str, PreparedEvent]],
) -> _ChunkResult:
    result = _ChunkResult()
    try:
        async with sessions() as session, session.begin():
            # Replay reports events as durable: a server or role default of
            # synchronous_commit=off must not make that untrue.
            await session.execute(text("SET LOCAL synchronous_commit = on"))
            ids = [prepared.id for _, _, prepared in chunk]
            present = set(
                (await session.scalars(select(AuditEvent.id).where(AuditEvent.id.in_(ids)))).all()
            )
            repo = AuditRepository(session)
            for line_no, raw, prepared in chunk:
                if (
                    prepared.corrects_id is not None
                    and await repo.get(prepared.corrects_id) is None
                ):
                    reason = f"corrects: no event {prepared.corrects_id} was recorded"
                    result.rejected.append(SpoolProblem(line_no, reason, raw, str(prepared.id)))
                    continue
                try:
                    async with session.begin_nested():
                        await repo.insert_prepared(prepared)
                except AuditUnavailableError:
                    raise
                except EventIdConflictError as exc:
                    reason = f"conflict: {exc} (in the table)"
                    result.conflicts.append(SpoolProblem(line_no, reason, raw, str(prepared.id)))
                    continue
                except AuditStorageError as exc:
                    if not _about_the_line(exc):
                        raise _LineIndependentError(exc) from exc
                    result.rejected.append(SpoolProblem(line_no, str(exc), raw, str(prepared.id)))
                    continue
                if prepared.id in present:
                    result.already_present += 1
                else:
                    result.written += 1
    except DB_ERRORS as exc:
        raise translate_db_error(exc, "replaying spooled events") from exc
    return result


async def replay_spool(
    path: str | os.PathLike[str],
    engine: AsyncEngine,
    *,
    chunk_size: int = 500,
    retry: RetryPolicy | None = None,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> ReplayReport:
    """Write the events of a spool to the database, under their original ids.

    The protocol, and why it is safe to run again after a crash at any point:

    1. The spool is *claimed*: renamed to ``SPOOL.replaying`` under the spool's
       lock. Services keep appending to a fresh ``SPOOL`` meanwhile.
    2. The claimed file is read line by line; a line that cannot be a record
       (not JSON, nested too deeply, a lone surrogate, too long) is reported
       and reading goes on. Every event is validated again. An event line whose
       write attempt was voided is skipped; of the remaining lines of one event
       id the first is the event, a later one with the same content is a
       duplicate and one with different content a conflict (see
       :func:`~audit_orm.bulk.same_event`).
    3. Events are written in chunks of ``chunk_size``, one transaction per
       chunk with ``synchronous_commit = on``, with ``INSERT .. ON CONFLICT DO
       NOTHING``: an event already in the database with the same content (an
       earlier, interrupted replay wrote it) is counted as already present,
       never duplicated; with different content it is a conflict. A chunk that
       fails transiently is retried as a whole, as ``retry`` allows. A failure
       that is not about one line (read-only server, disk full, missing
       privilege) stops the replay with :class:`ReplayStoppedError`.
    4. Only when every chunk has committed are the unusable lines (torn, corrupt,
       invalid, conflicting, or refused by the database) appended to
       ``SPOOL.rejected``, each under a key, so a rerun after a crash does not
       add it twice, and the claimed file is deleted.

    A crash before step 4 leaves the claimed file; the next run picks it up and
    finds the committed events already present. Nothing leaves the spool
    without being written or reported.

    :raises InvalidInputError: a bad ``chunk_size``.
    :raises ReplayInterruptedError: the database stayed unavailable.
    :raises ReplayStoppedError: the database refused the replay itself.
    :raises AuditSpoolError: the spool files could not be read or written, or
        another replay of the same spool is running.
    """
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or not 1 <= chunk_size <= 10_000
    ):
        raise InvalidInputError("chunk_size", chunk_size, "must be an integer from 1 to 10000")
    if not isinstance(engine, AsyncEngine):
        raise InvalidInputError("engine", engine, "must be an AsyncEngine")
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidInputError("retry", retry, "must be a RetryPolicy")
    # Checked before the spool is claimed: a bad cap would reject every line.
    check_max_payload_bytes(max_payload_bytes)
    spool = Spool(path)
    if spool.path.is_symlink() or (spool.path.exists() and not spool.path.is_file()):
        raise AuditSpoolError(f"spool {spool.path}: is not a regular file")
    lock = await asyncio.to_thread(_replay_lock, spool.path)
    try:
        return await _replay(spool, engine, chunk_size, retry or RetryPolicy(), max_payload_bytes)
    finally:
        os.close(lock)


def _replay_lock(path: Path) -> int:
    """Hold an exclusive lock for the replay of ``path``, or fail at once."""
    lock_path = path.with_name(path.name + ".replay-lock")
    try:
        fd = _open_private(lock_path, os.O_RDWR, create=True)
    except OSError as exc:
        raise AuditSpoolError(f"spool {path}: cannot open {lock_path.name}: {exc}") from exc
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise AuditSpoolError(f"spool {path}: another replay is running") from exc
    return fd


def _sort_out(
    contents: SpoolContents, max_payload_bytes: int, report: ReplayReport
) -> tuple[list[tuple[int, str, PreparedEvent]], list[SpoolProblem]]:
    """The events to write, one per id, and the lines that cannot be written."""
    problems = list(contents.problems)
    pending: list[tuple[int, str, PreparedEvent]] = []
    for event_id, lines in contents.attempts.items():
        live = [
            (line_no, record)
            for line_no, record in lines
            if not contents.is_voided(event_id, record.get("attempt"))
        ]
        if not live:
            report.voided += 1
            continue
        first: tuple[int, str, PreparedEvent] | None = None
        for line_no, record in live:
            raw = dumps_exact(record)
            try:
                prepared = prepare_spooled(record, max_payload_bytes)
            except (InvalidInputError, TypeError, ValueError, AttributeError) as exc:
                problems.append(SpoolProblem(line_no, f"invalid event: {exc}", raw, str(event_id)))
                continue
            if first is None:
                first = (line_no, raw, prepared)
            elif same_event(first[2], prepared):
                report.duplicates += 1
            else:
                reason = (
                    f"conflict: event_id {event_id} is used by a different event "
                    f"at line {first[0]}; that one is replayed, this one is not"
                )
                report.conflicts.append(SpoolProblem(line_no, reason, raw, str(event_id)))
        if first is not None:
            pending.append(first)
    seen = {
        (uid, record.get("attempt"))
        for uid, lines in contents.attempts.items()
        for _, record in lines
    }
    for event_id, attempt in sorted(contents.void_keys, key=str):
        if (event_id, attempt) in seen or (attempt is None and event_id in contents.attempts):
            continue
        problems.append(
            SpoolProblem(
                0,
                "void for an event that is not in this spool (replayed before its "
                "transaction rolled back?); check the stored event",
                "",
                str(event_id),
            )
        )
    pending.sort(key=lambda item: item[0])
    return pending, problems


async def _replay(
    spool: Spool,
    engine: AsyncEngine,
    chunk_size: int,
    policy: RetryPolicy,
    max_payload_bytes: int,
) -> ReplayReport:
    report = ReplayReport(spool=str(spool.path))
    claimed = await asyncio.to_thread(spool.claim)
    if claimed is None:
        return report
    # An event as large as max_payload_bytes allows must still fit on a line
    # (JSON escapes can take six bytes per byte of text).
    line_limit = max(MAX_LINE_BYTES, 6 * max_payload_bytes + (64 << 10))
    contents = await asyncio.to_thread(read_spool, claimed, max_line_bytes=line_limit)
    report.records = contents.records
    pending, problems = _sort_out(contents, max_payload_bytes, report)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    for start in range(0, len(pending), chunk_size):
        chunk = pending[start : start + chunk_size]
        action = (
            f"replaying events {start + 1}-{start + len(chunk)} of {len(pending)} from {claimed}"
        )
        try:
            done = await call_with_retries(
                functools.partial(_write_chunk, sessions, chunk), policy=policy, action=action
            )
        except AuditUnavailableError as exc:
            report.rejected = problems
            raise ReplayInterruptedError(
                f"{exc}; {report.written} events were written before the failure; "
                f"the rest stay in {claimed}: run the replay again",
                report,
            ) from exc
        except _LineIndependentError as exc:
            report.rejected = problems
            logger.error("%s stopped: %s", action, exc.error)
            raise ReplayStoppedError(
                f"{exc.error}; this is not about one spooled line, so replay stopped; "
                f"{report.written} events were written before; the rest stay in "
                f"{claimed}: fix the cause and run the replay again",
                report,
            ) from exc.error
        report.written += done.written
        report.already_present += done.already_present
        problems.extend(done.rejected)
        report.conflicts.extend(done.conflicts)
        logger.info(
            "%s: %d written, %d already present", action, done.written, done.already_present
        )
    report.rejected = sorted(problems, key=lambda p: p.line)
    report.conflicts.sort(key=lambda p: p.line)
    if report.rejected or report.conflicts:
        rejected_path = spool.path.with_name(spool.path.name + REJECTED_SUFFIX)
        await asyncio.to_thread(_keep_rejected, rejected_path, report, line_limit)
        report.rejected_file = str(rejected_path)
        for problem in report.rejected + report.conflicts:
            logger.warning(
                "spool %s line %d rejected: %s", spool.path, problem.line, problem.reason
            )
    await asyncio.to_thread(_remove, claimed)
    return report


def _rejected_keys(path: Path, limit: int) -> set[str]:
    """The keys already in a rejected file (a crashed run may have written some)."""
    keys: set[str] = set()
    try:
        fd = _open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return keys
    except OSError as exc:
        raise AuditSpoolError(f"spool {path}: cannot read: {exc}") from exc
    try:
        with open(fd, "rb", closefd=False) as handle:
            line_no = 0
            while raw := handle.readline(limit + 1):
                line_no += 1
                if len(raw) > limit and not raw.endswith(b"\n"):
                    _oversized(line_no, raw, handle)  # not an entry of ours: skip it
                    continue
                try:
                    record = loads_exact(raw.decode("utf-8"))
                except (ValueError, RecursionError):
                    continue  # a torn line of a crashed run: its entry is written again
                if isinstance(record, dict) and isinstance(record.get("key"), str):
                    keys.add(record["key"])
    finally:
        os.close(fd)
    return keys


def _keep_rejected(path: Path, report: ReplayReport, line_limit: int) -> None:
    """Append what replay could not write to the rejected file, once per problem."""
    # An entry quotes a spool line as a JSON string: escaping can make it
    # several times longer than the line.
    known = _rejected_keys(path, 8 * line_limit)
    lines = []
    for kind, problems in (("rejected", report.rejected), ("conflict", report.conflicts)):
        for problem in problems:
            if problem.key in known:
                continue
            entry: dict[str, Any] = {
                "spool_format": SPOOL_FORMAT,
                "kind": kind,
                "key": problem.key,
                "event_id": problem.event_id,
                "line": problem.line,
                "reason": problem.reason,
                "raw": problem.raw,
            }
            if problem.size is not None:
                entry["size"] = problem.size
                entry["sha256"] = problem.sha256
            lines.append(dumps_exact(entry))
    if lines:
        Spool(path)._append(lines)


def _remove(path: Path) -> None:
    try:
        path.unlink()
        _fsync_dir(path.parent)
    except OSError as exc:
        raise AuditSpoolError(f"spool {path}: cannot remove after replay: {exc}") from exc
