"""AuditWriter: events written apart from the caller's transaction, committed in groups.

Some events must be stored whatever happens to the caller's transaction: a
risk rejection, a prevented duplicate order. :class:`AuditWriter` owns its
connection and its transactions for them. Many concurrent
``await writer.record(...)`` calls are grouped: the writer takes what is
queued (up to ``max_batch`` events), writes it as one statement and commits
once, and each caller's ``await`` returns only when its event is committed.
While one group commits the next one gathers, so a busy writer spends one
commit on many events instead of one commit each.

Guarantees:

* validation happens in :meth:`AuditWriter.record`, before the event is queued,
  so one caller's bad input fails that caller alone;
* an ``await`` that returns means the event is committed and on disk: the
  writer's connection runs with ``synchronous_commit = on`` whatever the
  server's or the role's default;
* an event the database refuses (a constraint, a value the driver cannot
  send) fails its caller alone: the group is split and its other events are
  written (see :meth:`AuditWriter._write`);
* a group the server aborts for a concurrent transaction (serialization
  failure, deadlock) is run again, up to :data:`CONFLICT_ATTEMPTS` times;
* a group that fails for a reason that is not one event's (the connection
  broke, a timeout, a missing table or privilege) raises to every caller in
  it: nothing is dropped silently. When the connection breaks during a
  commit, the outcome is unknown; retry with the same ``event_id``
  (idempotent) to be sure;
* an event id already stored with other content fails that caller alone with
  :class:`EventIdConflictError`; the rest of the group is written;
* the queue is bounded: when it is full, ``record`` waits (back-pressure);
* :meth:`AuditWriter.close` (or leaving ``async with``) writes everything
  queued before it returns;
* events are inserted in the order they were queued, so ``seq`` follows it.

Cancelling a caller's ``await`` does not withdraw its event once queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any
from uuid import UUID

from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit_orm import bulk
from audit_orm.database import create_engine, hide_password
from audit_orm.enums import AuditEventType, EntityType
from audit_orm.errors import (
    DB_ERRORS,
    AuditError,
    AuditSerializationError,
    AuditStorageError,
    AuditUnavailableError,
    EventIdConflictError,
    InvalidInputError,
    WriterClosedError,
    translate_db_error,
)
from audit_orm.payloads import AuditPayload
from audit_orm.records import AuditRecord
from audit_orm.repository import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    PreparedEvent,
    check_max_payload_bytes,
    check_prepared,
    prepare_event,
)

#: Tries of a group the server aborts for a concurrent transaction.
CONFLICT_ATTEMPTS = 5
#: Default largest group written and committed at once.
DEFAULT_MAX_BATCH = 1_000
#: Default bound of the queue; ``record`` waits while it is full.
DEFAULT_MAX_QUEUE = 10_000
#: Default wait for more events before a partial group is committed (seconds).
DEFAULT_MAX_DELAY = 0.0


@dataclass(slots=True)
class WriterStats:
    """Counters of an :class:`AuditWriter` since it was created."""

    #: Events confirmed to their callers (idempotent repeats included).
    events: int = 0
    #: Groups committed, each one transaction.
    batches: int = 0
    #: Groups that failed and raised to all their callers.
    failed_batches: int = 0
    #: Groups (or parts of one) run again after a serialization failure or deadlock.
    conflict_retries: int = 0
    #: Groups split because the database refused one of their events.
    split_batches: int = 0
    #: Events the database refused, each failing its own caller only.
    refused_events: int = 0


class _Pending:
    """One queued event and the future its caller awaits."""

    __slots__ = ("event", "future", "queued_at")

    def __init__(self, event: PreparedEvent, future: asyncio.Future[AuditRecord], at: float):
        self.event = event
        self.future = future
        self.queued_at = at

    def resolve(self, outcome: AuditRecord | BaseException) -> None:
        if self.future.done():
            return
        if isinstance(outcome, BaseException):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


#: Queued after the last event by :meth:`AuditWriter.close`.
_STOP = object()

#: SQLSTATE classes that blame the data of a statement, not the server or the
#: schema: data exceptions (22: a value out of range, bad JSON text) and
#: integrity constraint violations (23: a check, a foreign key).
_DATA_STATE_CLASSES = ("22", "23")


def _blames_one_event(exc: BaseException) -> bool:
    """Whether a failed group statement may be the fault of some of its events.

    Then the group is worth splitting to find them. A lost connection or a
    timeout is not (the outcome of the group is unknown), nor is an error
    that every event would meet (no table, no privilege, a read-only server).
    """
    if isinstance(exc, AuditUnavailableError):
        return False
    causes: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        cause = todo.pop()
        if cause is None or cause in causes:
            continue
        causes.append(cause)
        todo += [cause.__cause__, getattr(cause, "orig", None)]
    for cause in causes:
        state = getattr(cause, "sqlstate", None)
        if isinstance(state, str):
            return state[:2] in _DATA_STATE_CLASSES
    # No SQLSTATE: the server never saw the statement. A value the driver
    # could not convert (a string it cannot encode, an id that is no UUID) is
    # that value's event alone; anything else (a connection busy or closed)
    # is the group's.
    return any(isinstance(cause, (ValueError, TypeError, OverflowError)) for cause in causes)


def _failure(exc: BaseException, event: PreparedEvent) -> BaseException:
    """A fresh exception for one caller of a failed group (each raises its own)."""
    action = f"recording {event.event_type.value}"
    if isinstance(exc, AuditStorageError):
        error: BaseException = type(exc)(str(exc))
    elif isinstance(exc, asyncio.CancelledError):
        error = AuditStorageError(
            f"{action}: the writer stopped before the commit was confirmed; "
            "the event may or may not be stored"
        )
    elif isinstance(exc, AuditError):
        error = AuditStorageError(f"{action} failed: {exc}")
    else:
        error = translate_db_error(exc, action)
    error.__cause__ = exc
    return error


class AuditWriter:
    """Write audit events in their own transactions, grouping concurrent callers.

    Use it as an async context manager (or call :meth:`start` and
    :meth:`close`)::

        async with AuditWriter(engine) as writer:
            record = await writer.record(AuditEventType.RISK_REJECTED, ...)

    :param engine: the engine to write through (a connection of its pool is
        held while the writer runs), or a database URL, or ``None`` for
        :func:`audit_orm.database.create_engine`'s default. An engine made
        here is disposed by :meth:`close`; one passed in is left open.
    :param max_batch: the largest group written and committed at once.
    :param max_delay: how long (seconds) the first event of a partial group
        may wait for more before the group is committed. ``0`` commits as
        soon as the previous commit is done, with whatever has queued during
        it; that already groups concurrent callers, and adds no latency.
    :param max_queue: events queued at most; further ``record`` calls wait.
    :param max_payload_bytes: refuse payloads whose stored JSON is larger.
    """

    def __init__(
        self,
        engine: AsyncEngine | str | None = None,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay: float = DEFAULT_MAX_DELAY,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInputError("max_batch", max_batch, "must be a positive integer")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise InvalidInputError("max_queue", max_queue, "must be a positive integer")
        if (
            isinstance(max_delay, bool)
            or not isinstance(max_delay, (int, float))
            or not 0 <= max_delay <= 60
        ):
            raise InvalidInputError("max_delay", max_delay, "must be from 0 to 60 seconds")
        if not isinstance(engine, (AsyncEngine, str)) and engine is not None:
            raise InvalidInputError("engine", engine, "must be an AsyncEngine, a URL or None")
        if isinstance(engine, str) and not engine.strip():
            # Not the default: an empty URL is a missing setting, not a choice.
            raise InvalidInputError("engine", engine, "is an empty URL")
        max_payload_bytes = check_max_payload_bytes(max_payload_bytes)
        self._owns_engine = not isinstance(engine, AsyncEngine)
        try:
            base = engine if isinstance(engine, AsyncEngine) else create_engine(engine)
        except (ValueError, ArgumentError) as exc:
            # Not a URL, or not PostgreSQL's; the password is not shown.
            shown = hide_password(engine if isinstance(engine, str) else "")
            raise InvalidInputError("engine", shown, f"is not a usable URL: {exc}") from None
        # Each group is one INSERT statement, which in autocommit mode is a
        # transaction of its own: one round trip writes and commits a group.
        self._engine = base.execution_options(isolation_level="AUTOCOMMIT")
        self._base_engine = base
        self.max_batch = max_batch
        self.max_delay = float(max_delay)
        self.max_payload_bytes = max_payload_bytes
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max_queue)
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection | None = None
        self._closing = False
        self._closed = False
        self._putting = 0
        self.stats = WriterStats()

    # ----------------------------------------------------------- lifecycle

    async def __aenter__(self) -> AuditWriter:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the background task that writes the groups (``record`` does it when needed)."""
        if self._closing:
            raise WriterClosedError("the audit writer is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="audit_orm.AuditWriter"
            )

    async def close(self) -> None:
        """Stop taking events, write everything queued, then release the connection.

        Callers already waiting for room in the queue were admitted before
        the close: their events are written too.
        """
        if self._closed:
            return
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            await self._queue.put(_STOP)
            await asyncio.wait([task])
            if not task.cancelled():
                # Every waiter was answered; a task that died only needs reaping.
                task.exception()
        await self._disconnect()
        if self._owns_engine:
            await self._base_engine.dispose()
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has begun: ``record`` raises :class:`WriterClosedError`."""
        return self._closing

    @property
    def queued(self) -> int:
        """Events waiting in the queue (not yet taken into a group)."""
        return self._queue.qsize()

    @property
    def blocked(self) -> int:
        """Callers waiting for room in the full queue (back-pressure)."""
        return self._putting

    # -------------------------------------------------------------- writes

    async def record(
        self,
        event_type: AuditEventType | str,
        entity_type: EntityType | str,
        entity_id: UUID | str,
        data: AuditPayload | Mapping[str, Any],
        *,
        actor: str = "system",
        occurred_at: datetime | str | None = None,
        event_id: UUID | str | None = None,
        recommendation_id: UUID | str | None = None,
        order_id: UUID | str | None = None,
        corrects: UUID | str | None = None,
    ) -> AuditRecord:
        """Validate an event, queue it, and return its record once it is committed.

        Arguments as for :meth:`AuditRepository.record
        <audit_orm.AuditRepository.record>`. A ``corrects`` is looked up before
        the event is queued (on another connection of the engine), so a
        correction of an unknown event fails its caller alone, not its group.

        :raises InvalidInputError: (or a subclass) at once; nothing is queued.
        :raises WriterClosedError: the writer is closed.
        :raises EventIdConflictError: ``event_id`` exists with different content.
        :raises AuditStorageError: the group holding the event failed.
        """
        prepared = prepare_event(
            event_type,
            entity_type,
            entity_id,
            data,
            actor=actor,
            occurred_at=occurred_at,
            event_id=event_id,
            recommendation_id=recommendation_id,
            order_id=order_id,
            corrects=corrects,
            max_payload_bytes=self.max_payload_bytes,
        )
        return await self.record_prepared(prepared)

    async def _check_corrected(self, event_id: UUID) -> None:
        try:
            async with self._engine.connect() as conn:
                found = await bulk.existing_ids(conn, [event_id])
        except DB_ERRORS as exc:
            raise translate_db_error(exc, "looking up the corrected event") from exc
        if event_id not in found:
            raise InvalidInputError("corrects", event_id, "no event with this id was recorded")

    async def record_prepared(self, event: PreparedEvent) -> AuditRecord:
        """Queue an event validated by :func:`~audit_orm.repository.prepare_event`.

        Returns its record once committed; raises as :meth:`record` does,
        including :class:`InvalidInputError` when ``corrects_id`` names no
        recorded event (looked up before the event is queued).
        """
        if not isinstance(event, PreparedEvent):
            raise InvalidInputError("event", event, "must be a PreparedEvent (see prepare_event)")
        check_prepared(event)
        if self._closing:
            raise WriterClosedError("the audit writer is closed")
        if self._task is None:
            await self.start()
        if event.corrects_id is not None:
            # Here rather than in record(), so no way in skips it.
            await self._check_corrected(event.corrects_id)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditRecord] = loop.create_future()
        self._putting += 1
        try:
            await self._queue.put(_Pending(event, future, loop.time()))
        finally:
            self._putting -= 1
        if self._task is None or self._task.done():
            # The background task ended (its loop is shutting down): nothing
            # will take this event, so say so instead of waiting forever.
            raise WriterClosedError("the audit writer stopped; the event was not written")
        # Shielded: a caller that stops waiting must not cancel the outcome the
        # writer will still deliver for the queued event.
        return await asyncio.shield(future)

    # ---------------------------------------------------------- background

    async def _run(self) -> None:
        batch: list[_Pending] = []
        stopping = False
        try:
            while True:
                if not stopping:
                    item = await self._queue.get()
                elif not self._queue.empty():
                    item = self._queue.get_nowait()
                elif self._putting:
                    # Admitted callers are about to enqueue (the queue has room).
                    await asyncio.sleep(0)
                    continue
                else:
                    return
                if item is _STOP:
                    self._queue.task_done()
                    stopping = True
                    continue
                batch = [item]
                met_stop = await self._gather(batch, wait=not stopping)
                await self._write(batch)
                for _ in batch:
                    self._queue.task_done()
                batch = []
                if met_stop:
                    self._queue.task_done()
                    stopping = True
        except BaseException as exc:
            # Stopped from outside (the loop is shutting down): whoever still
            # waits learns that the outcome is unknown or that nothing was written.
            self._closing = True
            for pending in batch:
                pending.resolve(_failure(exc, pending.event))
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if isinstance(item, _Pending):
                    item.resolve(_failure(exc, item.event))
                self._queue.task_done()
            raise

    async def _gather(self, batch: list[_Pending], *, wait: bool) -> bool:
        """Add queued events to ``batch``; ``True`` if the stop marker was met.

        Waits for more only while the first event is younger than
        ``max_delay``; :meth:`close` cuts the wait short with its marker.
        """
        deadline = batch[0].queued_at + self.max_delay
        loop = asyncio.get_running_loop()
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if not wait or remaining <= 0:
                    return False
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()
                except TimeoutError:
                    return False
            if item is _STOP:
                return True
            batch.append(item)
        return False

    async def _write(self, batch: list[_Pending]) -> None:
        """Write a group; an event the database refuses fails its caller alone.

        Each statement is a transaction of its own (the connection is in
        autocommit mode), so a refused statement wrote nothing. The group is
        then split in halves, each written or split again, until the refused
        events stand alone: ``k`` bad events among ``n`` cost about
        ``2 k log2(n)`` extra statements, and the written events keep their
        queue order.
        """
        events = [pending.event for pending in batch]
        try:
            conn = await self._connect()
            outcomes, lost = await self._write_isolating(conn, events)
        except Exception as exc:
            self.stats.failed_batches += 1
            await self._disconnect(broken=True)
            for pending in batch:
                pending.resolve(_failure(exc, pending.event))
            return
        except BaseException as exc:
            # Cancelled mid-write: the connection may be mid-statement.
            self.stats.failed_batches += 1
            for pending in batch:
                pending.resolve(_failure(exc, pending.event))
            raise
        if lost is not None:
            self.stats.failed_batches += 1
            await self._disconnect(broken=True)
        for pending, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, EventIdConflictError):
                pending.resolve(EventIdConflictError(outcome.event_id))
            elif isinstance(outcome, BaseException):
                if outcome is not lost:
                    self.stats.refused_events += 1
                pending.resolve(_failure(outcome, pending.event))
            else:
                self.stats.events += 1
                pending.resolve(outcome)

    async def _write_isolating(
        self, conn: AsyncConnection, events: Sequence[PreparedEvent]
    ) -> tuple[list[bulk.Outcome | BaseException], BaseException | None]:
        """One outcome per event (its record, its conflict, or why it was refused).

        Raises when the whole group fails for a reason that is not one event's
        (see :func:`_blames_one_event`). Should that happen midway through a
        split, what was written stays confirmed, every event not written yet
        gets that failure, and it is returned second.
        """
        outcomes: list[bulk.Outcome | BaseException | None] = [None] * len(events)
        todo = deque([(0, len(events))])
        lost: BaseException | None = None
        while todo:
            start, end = todo.popleft()
            try:
                written = await self._insert_retrying(conn, events[start:end])
            except Exception as exc:
                if not _blames_one_event(exc):
                    if end - start == len(events):
                        raise
                    lost = exc
                    break
                if end - start == 1:
                    outcomes[start] = exc
                    continue
                if end - start == len(events):
                    self.stats.split_batches += 1
                middle = (start + end) // 2
                # Left half first, so what is written keeps the queue order.
                todo.extendleft([(middle, end), (start, middle)])
                continue
            self.stats.batches += 1
            outcomes[start:end] = written
        done: list[bulk.Outcome | BaseException] = []
        for outcome in outcomes:
            if outcome is None:
                # Only a range abandoned after a lost connection has no outcome.
                assert lost is not None
                outcome = lost
            done.append(outcome)
        return done, lost

    async def _insert_retrying(
        self, conn: AsyncConnection, events: Sequence[PreparedEvent]
    ) -> list[bulk.Outcome]:
        """:func:`bulk.insert_many`, run again when the server aborts it for a concurrent
        transaction (serialization failure, deadlock).

        Each statement commits on its own, so the aborted one wrote nothing and
        what an earlier one wrote is found again by id: running the group again
        is safe, and under ``SERIALIZABLE`` defaults it is what such a failure
        asks for. After :data:`CONFLICT_ATTEMPTS` tries the error reaches the
        callers, still an :class:`AuditSerializationError` they may retry.
        """
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await bulk.insert_many(conn, events)
            except AuditSerializationError:
                if attempt == CONFLICT_ATTEMPTS:
                    raise
                self.stats.conflict_retries += 1
                # A short, random pause, so two deadlocked writers do not meet again.
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _connect(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self._engine.connect()
            try:
                # An acknowledged event must be on disk: a server or role
                # default of synchronous_commit=off must not make it untrue.
                # Each group commits on its own (AUTOCOMMIT), so the setting is
                # the connection's, reset before it goes back to the pool.
                await conn.exec_driver_sql("SET synchronous_commit = on")
            except BaseException:
                with contextlib.suppress(Exception):
                    await conn.invalidate()
                    await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def _disconnect(self, *, broken: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if broken:
                # After a failure the connection's state is unknown: discard it
                # rather than hand it back to the pool.
                await conn.invalidate()
            else:
                try:
                    await conn.exec_driver_sql("RESET synchronous_commit")
                except Exception:
                    await conn.invalidate()
            await conn.close()
        except Exception:
            # A broken connection may refuse to close; it is dropped either way.
            pass
