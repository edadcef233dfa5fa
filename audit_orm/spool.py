"""The local spool: where best-effort recording keeps events the database refused.

A spool is a text file of JSON Lines, one self-describing record per line::

    {"spool_format":1,"kind":"event","event_id":"…","spooled_at":"…",
     "error":"recording order.filled failed: …","event":{…every column…}}
    {"spool_format":1,"kind":"void","event_id":"…","spooled_at":"…","reason":"…"}

An ``event`` record carries every prepared column of the event (numbers as exact
JSON numbers) and the error that kept it out of the database. A ``void`` record
says that the transaction which carried a spooled event rolled back afterwards,
so the event describes nothing that happened and must not be replayed.

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
import dataclasses
import functools
import logging
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit_orm.errors import (
    DB_ERRORS,
    AuditSpoolError,
    AuditStorageError,
    AuditUnavailableError,
    EventIdConflictError,
    InvalidInputError,
    translate_db_error,
)
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.models import AuditEvent
from audit_orm.records import AuditRecord
from audit_orm.repository import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    AuditRepository,
    PreparedEvent,
    prepare_event,
)
from audit_orm.retry import RetryPolicy, call_with_retries

try:  # POSIX; elsewhere the in-process lock alone serializes appends.
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("audit_orm.spool")

#: The version written in every record's ``spool_format`` field.
SPOOL_FORMAT = 1
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
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
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
                data = payload
                if mine.st_size and os.pread(fd, 1, mine.st_size - 1) != b"\n":
                    # A writer crashed mid-line: end that line so ours stays whole.
                    data = b"\n" + payload
                _write_all(fd, data)
                os.fsync(fd)
                if mine.st_size == 0:
                    # A new file: make its directory entry durable too.
                    _fsync_dir(self.path.parent)
                return
            finally:
                os.close(fd)

    def append_event(self, prepared: PreparedEvent, error: str) -> SpooledRecord:
        """Durably append one event; returns it as a :class:`SpooledRecord`.

        An event without a business time gets the local clock as ``occurred_at``,
        so replay later does not stamp it with the replay time.
        """
        return self.append_events([prepared], error)[0]

    def append_events(self, events: Sequence[PreparedEvent], error: str) -> list[SpooledRecord]:
        """Durably append a batch of events in order, with one write and one fsync."""
        now = datetime.now(UTC)
        dated = [
            e if e.occurred_at is not None else dataclasses.replace(e, occurred_at=now)
            for e in events
        ]
        lines = [
            dumps_exact(
                {
                    "spool_format": SPOOL_FORMAT,
                    "kind": "event",
                    "event_id": str(prepared.id),
                    "spooled_at": now.isoformat(),
                    "error": error,
                    "event": event_fields(prepared),
                }
            )
            for prepared in dated
        ]
        if lines:
            self._append(lines)
        return [self._record(prepared, now, error) for prepared in dated]

    def _record(self, prepared: PreparedEvent, now: datetime, error: str) -> SpooledRecord:
        assert prepared.occurred_at is not None
        return SpooledRecord(
            id=prepared.id,
            seq=0,
            event_type=prepared.event_type,
            entity_type=prepared.entity_type,
            entity_id=prepared.entity_id,
            actor=prepared.actor,
            data=prepared.data,
            occurred_at=prepared.occurred_at,
            recorded_at=now,
            recommendation_id=prepared.recommendation_id,
            order_id=prepared.order_id,
            ticker=prepared.ticker,
            corrects_id=prepared.corrects_id,
            error=error,
            spool=str(self.path),
        )

    def append_voids(self, event_ids: Iterable[UUID], reason: str) -> None:
        """Durably mark spooled events as not to be replayed."""
        now = datetime.now(UTC).isoformat()
        lines = [
            dumps_exact(
                {
                    "spool_format": SPOOL_FORMAT,
                    "kind": "void",
                    "event_id": str(event_id),
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
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return claimed if claimed.exists() else None
            except OSError as exc:
                raise AuditSpoolError(f"spool {self.path}: cannot open: {exc}") from exc
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise AuditSpoolError(f"spool {self.path}: is not a regular file")
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if not claimed.exists():
                    os.replace(self.path, claimed)
                else:
                    with open(fd, "rb", closefd=False) as source:
                        pending = source.read()
                    if pending:
                        Spool(claimed)._append_locked(
                            pending if pending.endswith(b"\n") else pending + b"\n"
                        )
                    os.unlink(self.path)
                _fsync_dir(self.path.parent)
            except OSError as exc:
                raise AuditSpoolError(f"spool {self.path}: cannot claim: {exc}") from exc
            finally:
                os.close(fd)
        return claimed


# ---------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class SpoolProblem:
    """A spool line replay could not use, and why. It is kept in the rejected file."""

    line: int
    reason: str
    raw: str
    event_id: str | None = None


@dataclass(slots=True)
class SpoolContents:
    """A parsed spool: events by id (first occurrence wins), voids, problems."""

    events: dict[UUID, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    voids: set[UUID] = field(default_factory=set)
    problems: list[SpoolProblem] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0


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
    except ValueError as exc:
        reason = (
            "torn final line: the writer stopped mid-append (the process crashed "
            "before the record was complete, so its call never returned)"
            if torn
            else f"corrupt line, not a spool record: {exc}"
        )
        out.problems.append(SpoolProblem(line_no, reason, text.rstrip("\n")))
        return
    out.records += 1
    version = record.get("spool_format")
    kind = record.get("kind")
    raw_id = record.get("event_id")
    event_id = raw_id if isinstance(raw_id, str) else None
    if version != SPOOL_FORMAT:
        reason = f"unsupported spool_format {version!r} (this version reads {SPOOL_FORMAT})"
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
    if kind == "void":
        out.voids.add(uid)
    elif kind == "event" and isinstance(record.get("event"), dict):
        if uid in out.events:
            out.duplicates += 1
        else:
            out.events[uid] = (line_no, record)
    else:
        reason = f"unknown record kind {kind!r}"
        out.problems.append(SpoolProblem(line_no, reason, text.rstrip("\n"), event_id))


def read_spool(path: str | os.PathLike[str]) -> SpoolContents:
    """Parse a spool file. Unusable lines become :class:`SpoolProblem` entries."""
    out = SpoolContents()
    try:
        with open(path, "rb") as handle:
            lines = handle.readlines()
    except FileNotFoundError:
        return out
    except OSError as exc:
        raise AuditSpoolError(f"spool {os.fspath(path)}: cannot read: {exc}") from exc
    for index, raw in enumerate(lines):
        _parse_record(index + 1, raw, index == len(lines) - 1, out)
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
    """What a replay did. ``ok`` is true when nothing was rejected."""

    spool: str
    records: int = 0
    written: int = 0
    already_present: int = 0
    voided: int = 0
    duplicates: int = 0
    rejected: list[SpoolProblem] = field(default_factory=list)
    rejected_file: str | None = None

    @property
    def ok(self) -> bool:
        """True when every event in the spool is now in the database (or voided)."""
        return not self.rejected

    def summary(self) -> str:
        """One line of counts."""
        text = (
            f"{self.spool}: {self.records} records, {self.written} written, "
            f"{self.already_present} already present, {self.voided} voided, "
            f"{self.duplicates} duplicate lines, {len(self.rejected)} rejected"
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


@dataclass(slots=True)
class _ChunkResult:
    written: int = 0
    already_present: int = 0
    rejected: list[SpoolProblem] = field(default_factory=list)


async def _write_chunk(
    sessions: async_sessionmaker[AsyncSession],
    chunk: Sequence[tuple[int, str, PreparedEvent]],
) -> _ChunkResult:
    result = _ChunkResult()
    try:
        async with sessions() as session, session.begin():
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
                except (EventIdConflictError, AuditStorageError) as exc:
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
    2. Every line is parsed and every event validated again. Voided events are
       skipped; an event id seen twice is written once.
    3. Events are written in chunks of ``chunk_size``, one transaction per
       chunk, with ``INSERT .. ON CONFLICT DO NOTHING``: an event already in the
       database (an earlier, interrupted replay wrote it) is counted as already
       present, never duplicated. A chunk that fails transiently is retried as
       a whole, as ``retry`` allows.
    4. Only when every chunk has committed are the unusable lines (torn, corrupt,
       invalid, or refused by the database) appended to ``SPOOL.rejected`` and
       the claimed file deleted.

    A crash before step 4 leaves the claimed file; the next run picks it up and
    finds the committed events already present. A torn last line (a writer
    crashed mid-append; its call never returned) is reported and kept in the
    rejected file, as is anything else replay cannot write: nothing leaves the
    spool without being written or reported.

    :raises InvalidInputError: a bad ``chunk_size``.
    :raises ReplayInterruptedError: the database stayed unavailable.
    :raises AuditSpoolError: the spool files could not be read or written, or
        another replay of the same spool is running.
    """
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or not 1 <= chunk_size <= 10_000
    ):
        raise InvalidInputError("chunk_size", chunk_size, "must be an integer from 1 to 10000")
    spool = Spool(path)
    if spool.path.exists() and not spool.path.is_file():
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
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise AuditSpoolError(f"spool {path}: cannot create {lock_path.name}: {exc}") from exc
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise AuditSpoolError(f"spool {path}: another replay is running") from exc
    return fd


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
    contents = await asyncio.to_thread(read_spool, claimed)
    report.records = contents.records
    report.duplicates = contents.duplicates
    problems = list(contents.problems)
    pending: list[tuple[int, str, PreparedEvent]] = []
    for event_id, (line_no, record) in contents.events.items():
        raw = dumps_exact(record)
        if event_id in contents.voids:
            report.voided += 1
            continue
        try:
            prepared = prepare_spooled(record, max_payload_bytes)
        except InvalidInputError as exc:
            problems.append(SpoolProblem(line_no, f"invalid event: {exc}", raw, str(event_id)))
            continue
        pending.append((line_no, raw, prepared))
    for event_id in sorted(contents.voids - contents.events.keys(), key=str):
        problems.append(
            SpoolProblem(
                0,
                "void for an event that is not in this spool (replayed before its "
                "transaction rolled back?); check the stored event",
                "",
                str(event_id),
            )
        )
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
        report.written += done.written
        report.already_present += done.already_present
        problems.extend(done.rejected)
        logger.info(
            "%s: %d written, %d already present", action, done.written, done.already_present
        )
    report.rejected = sorted(problems, key=lambda p: p.line)
    if report.rejected:
        rejected_path = spool.path.with_name(spool.path.name + REJECTED_SUFFIX)
        lines = [
            dumps_exact(
                {
                    "spool_format": SPOOL_FORMAT,
                    "kind": "rejected",
                    "event_id": problem.event_id,
                    "line": problem.line,
                    "reason": problem.reason,
                    "raw": problem.raw,
                }
            )
            for problem in report.rejected
        ]
        await asyncio.to_thread(Spool(rejected_path)._append, lines)
        report.rejected_file = str(rejected_path)
        for problem in report.rejected:
            logger.warning(
                "spool %s line %d rejected: %s", spool.path, problem.line, problem.reason
            )
    await asyncio.to_thread(_remove, claimed)
    return report


def _remove(path: Path) -> None:
    try:
        path.unlink()
        _fsync_dir(path.parent)
    except OSError as exc:
        raise AuditSpoolError(f"spool {path}: cannot remove after replay: {exc}") from exc
