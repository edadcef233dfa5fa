"""Best-effort recording: auditing that never stops trading, and still loses nothing.

:class:`BestEffortRepository` is an :class:`~audit_orm.AuditRepository` whose
writes (every helper, :meth:`~audit_orm.AuditRepository.record` and
:meth:`~audit_orm.AuditRepository.record_many`) do not raise when the database
fails. Each write runs inside its own SAVEPOINT, so a failed audit statement
rolls back alone and the caller's transaction (and its business change) can
still commit. The event that could not be written goes to a durable local
:class:`~audit_orm.spool.Spool` and a warning on the ``audit_orm.spool`` logger
names it; ``audit-orm replay SPOOL`` writes it later under the same event id.

A spooled event belongs to the caller's transaction like any other audit event.
If that transaction later rolls back (or the session closes without committing),
the business change did not happen, so a ``void`` record naming the write
attempt is appended to the spool and replay skips that attempt (another attempt
of the same event, retried in a unit of work that committed, is still written).
If the process dies before the transaction ends, the event stays in the spool
and is replayed: when in doubt, the trail keeps it.

When the SAVEPOINT itself cannot be opened, rolled back to or released, the
audit write can no longer be kept apart from the caller's transaction, which
the server may already have aborted (and asyncpg reports the COMMIT of an
aborted transaction as a success). Then
:class:`~audit_orm.errors.AuditTransactionLostError` is raised, the connection
is invalidated so that the caller's commit fails, and every attempt the
transaction spooled is voided at once. On an AUTOCOMMIT session there is no
transaction: writes take no savepoint, and nothing spooled is ever voided.

What still raises, on purpose:

* bad input (:class:`~audit_orm.InvalidInputError` and its subclasses) and a
  reused event id (:class:`~audit_orm.EventIdConflictError`): these are bugs in
  the caller, not outages; they would fail the same way on replay;
* :class:`~audit_orm.errors.AuditTransactionLostError` (see above);
* :class:`~audit_orm.errors.AuditSpoolError`: the database *and* the spool
  failed, so the event cannot be kept anywhere; raising is the only way not to
  lose it silently;
* reads (trails, search, get, and :meth:`~audit_orm.AuditRepository.correct`'s
  lookup of the event it corrects): best effort concerns recording only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NoReturn, TypeVar, overload
from uuid import UUID

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from audit_orm import bulk
from audit_orm.enums import AuditEventType, EntityType
from audit_orm.errors import (
    DB_ERRORS,
    AuditSpoolError,
    AuditStorageError,
    AuditTransactionLostError,
    EventIdConflictError,
    InvalidInputError,
    connection_broken,
    translate_db_error,
)
from audit_orm.payloads import AuditPayload
from audit_orm.records import AuditRecord
from audit_orm.repository import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    AuditRepository,
    EventSpec,
    PreparedEvent,
    prepare_batch,
    prepare_event,
)
from audit_orm.spool import Spool, SpooledRecord

logger = logging.getLogger("audit_orm.spool")

_TRACKER_KEY = "audit_orm.spooled_events"
_VOID_REASON = "the transaction that carried the event rolled back"
_LOST_REASON = "the transaction that carried the event was lost (its savepoint failed)"

T = TypeVar("T")

#: What a savepoint step can fail with.
_FAILURES: tuple[type[BaseException], ...] = (AuditStorageError, *DB_ERRORS)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _as_storage_error(exc: BaseException, action: str) -> AuditStorageError:
    if isinstance(exc, AuditStorageError):
        return exc
    failure = translate_db_error(exc, action)
    failure.__cause__ = exc
    return failure


class _OutcomeTracker:
    """Follows spooled write attempts to the end of the transaction that carried them.

    Attempts are filed under the innermost transaction open when they were
    spooled. When a nested transaction commits they move to its parent; when
    the outermost one commits they are confirmed; when any of them ends without
    committing, its attempts are voided in their spool (each void names its
    attempt, so an earlier or later attempt of the same event is untouched).
    """

    def __init__(self, session: Session) -> None:
        self.pending: dict[SessionTransaction, list[_Attempt]] = {}
        self.committed: set[SessionTransaction] = set()
        event.listen(session, "after_commit", self.after_commit)
        event.listen(session, "after_transaction_end", self.after_transaction_end)

    @classmethod
    def of(cls, session: Session) -> _OutcomeTracker:
        tracker = session.info.get(_TRACKER_KEY)
        if not isinstance(tracker, cls):
            tracker = session.info[_TRACKER_KEY] = cls(session)
        return tracker

    def add(self, transaction: SessionTransaction, attempt: _Attempt) -> None:
        self.pending.setdefault(transaction, []).append(attempt)

    def after_commit(self, session: Session) -> None:
        # Dispatched before the committing transaction closes, so it is still
        # the session's innermost one.
        current = session.get_nested_transaction() or session.get_transaction()
        if current is not None:
            self.committed.add(current)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        committed = transaction in self.committed
        self.committed.discard(transaction)
        attempts = self.pending.pop(transaction, None)
        if not attempts:
            return
        if committed:
            if transaction.parent is not None:
                self.pending.setdefault(transaction.parent, []).extend(attempts)
            return
        _void(attempts, _VOID_REASON)

    def void_everything(self, reason: str) -> None:
        """Void every attempt still pending in this session (its transaction is lost)."""
        attempts = [a for pending in self.pending.values() for a in pending]
        self.pending.clear()
        _void(attempts, reason)


@dataclass(frozen=True, slots=True)
class _Failure:
    """A write the database failed, to be spooled."""

    error: AuditStorageError
    #: Whether the session commits statement by statement (nothing to void later).
    autocommit: bool


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One spooled write call: the events it spooled, under one attempt token."""

    spool: Spool
    token: str
    event_ids: tuple[UUID, ...]


def _void(attempts: list[_Attempt], reason: str) -> None:
    for attempt in attempts:
        ids = attempt.event_ids
        try:
            attempt.spool.append_voids(ids, reason, attempt=attempt.token)
        except AuditSpoolError:
            # Raising from a rollback would hide the caller's own error;
            # replay will write these events, so make that visible.
            logger.exception(
                "could not void %d spooled event(s) in %s; replay will write them: %s",
                len(ids),
                attempt.spool.path,
                ", ".join(str(i) for i in ids),
            )
            continue
        logger.warning(
            "voided %d spooled audit event(s) of attempt %s in %s (%s): %s",
            len(ids),
            attempt.token,
            attempt.spool.path,
            reason,
            ", ".join(str(i) for i in ids),
        )


class BestEffortRepository(AuditRepository):
    """An :class:`~audit_orm.AuditRepository` whose writes survive database failures.

    Every write helper and :meth:`record` behave as in the base class when the
    database works. When it does not (:class:`~audit_orm.AuditStorageError`,
    including unreachable, lost connection and timeouts), the write returns a
    :class:`~audit_orm.spool.SpooledRecord` (``seq == 0``) instead of raising,
    and the event is in the spool, fsynced, before the call returns. When the
    savepoint that isolates the write fails, it raises
    :class:`~audit_orm.AuditTransactionLostError` instead (see the module docs).
    Works on AUTOCOMMIT sessions too, without savepoints.

    :param session: the session whose transaction the events join.
    :param spool: a :class:`~audit_orm.spool.Spool` or the path of its file.
    :param max_payload_bytes: refuse payloads whose stored JSON is larger.
    """

    def __init__(
        self,
        session: AsyncSession,
        spool: Spool | str | os.PathLike[str],
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        super().__init__(session, max_payload_bytes=max_payload_bytes)
        self.spool = spool if isinstance(spool, Spool) else Spool(spool)

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
        """As :meth:`AuditRepository.record`; a database failure spools the event.

        A correction's lookup of the event it corrects runs in a savepoint too;
        if the database cannot answer it, the correction is spooled and replay
        checks the reference instead.
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
        if prepared.corrects_id is not None:
            target = prepared.corrects_id
            found, failure = await self._isolated(
                lambda: self.get(target), "looking up the event it corrects"
            )
            if failure is not None:
                return (await self._spool([prepared], failure))[0]
            if found is None:
                raise InvalidInputError("corrects", corrects, "no event with this id was recorded")
        return await self.insert_prepared(prepared)

    async def insert_prepared(self, prepared: PreparedEvent) -> AuditRecord:
        """Insert inside a savepoint; on a database failure, spool the event instead.

        :raises AuditTransactionLostError: the savepoint itself failed (see the
            module docs); nothing is spooled and the transaction must be retried.
        """
        record, failure = await self._isolated(
            lambda: AuditRepository.insert_prepared(self, prepared),
            f"recording {prepared.event_type.value}",
        )
        if failure is not None:
            return (await self._spool([prepared], failure))[0]
        assert record is not None
        return record

    @overload
    async def record_many(
        self, events: Iterable[EventSpec | PreparedEvent], *, returning: Literal[True] = ...
    ) -> list[AuditRecord]: ...

    @overload
    async def record_many(
        self, events: Iterable[EventSpec | PreparedEvent], *, returning: Literal[False]
    ) -> int: ...

    async def record_many(
        self, events: Iterable[EventSpec | PreparedEvent], *, returning: bool = True
    ) -> list[AuditRecord] | int:
        """As :meth:`AuditRepository.record_many`; a database failure spools the batch.

        The batch is all or nothing either way: written together, or appended to
        the spool together (one write, one fsync), in order. With
        ``returning=False`` the count is of rows added to the table, so 0 when
        the batch was spooled.
        """
        prepared = prepare_batch(events, max_payload_bytes=self.max_payload_bytes)
        if not prepared:
            return [] if returning else 0
        # The direct path refuses a batch that reuses an id for other content;
        # so must the spool, or replay would keep half of a refused batch.
        first_of: dict[UUID, PreparedEvent] = {}
        for one in prepared:
            first = first_of.setdefault(one.id, one)
            if not bulk.same_event(first, one):
                raise EventIdConflictError(one.id)

        async def write() -> list[AuditRecord] | int:
            if returning:
                return await AuditRepository.record_many(self, prepared)
            return await AuditRepository.record_many(self, prepared, returning=False)

        # The base class's own savepoint covers the INSERT; this one covers the
        # lookups it makes first (corrections), so no failure of the batch can
        # abort the caller's transaction.
        result, failure = await self._isolated(write, f"recording {len(prepared)} events")
        if failure is None:
            assert result is not None
            return result
        records = await self._spool(prepared, failure)
        return list(records) if returning else 0

    def _configured_autocommit(self) -> bool:
        """Whether the session's connections will be AUTOCOMMIT, without connecting."""
        bind = self.session.sync_session.get_bind()
        level = bind.get_execution_options().get("isolation_level") or getattr(
            bind.dialect, "_on_connect_isolation_level", None
        )
        return bool(level == "AUTOCOMMIT")

    async def _isolated(
        self, write: Callable[[], Awaitable[T]], action: str
    ) -> tuple[T | None, _Failure | None]:
        """Run ``write`` so that its failure cannot cost the caller's transaction.

        Returns the result, or the storage failure to spool. In a transaction
        the write runs inside a SAVEPOINT; if the SAVEPOINT cannot be opened,
        rolled back to or released, the transaction can no longer be told
        apart from the audit write, so :meth:`_lose` ends it. On an AUTOCOMMIT
        session there is no transaction to protect: each statement commits on
        its own.
        """
        session = self.session
        try:
            conn = await session.connection()
            autocommit = await bulk.is_autocommit(conn)
        except DB_ERRORS as exc:
            # Not even connected: nothing of the caller's reached the server
            # through this session yet, so there is nothing to lose.
            return None, _Failure(_as_storage_error(exc, action), self._configured_autocommit())
        if autocommit:
            try:
                return await write(), None
            except AuditStorageError as exc:
                return None, _Failure(exc, True)
            except DB_ERRORS as exc:
                return None, _Failure(_as_storage_error(exc, action), True)
        try:
            # The caller's pending changes first, on their own: a failure of
            # theirs (a constraint of a business table) is theirs to see as it
            # is; only a lost connection here means the transaction is gone.
            await session.flush()
        except DB_ERRORS as exc:
            if connection_broken(exc):
                await self._lose(conn, exc, f"flushing the session before {action}")
            raise
        try:
            nested = await session.begin_nested()
            # The session opens the savepoint lazily: ask for the connection.
            await session.connection()
        except _FAILURES as exc:
            await self._lose(conn, exc, f"opening the savepoint for {action}")
        try:
            result = await write()
        except BaseException as exc:
            try:
                if nested.is_active:
                    await nested.rollback()
            except _FAILURES as rollback_exc:
                rollback_exc.__context__ = exc
                await self._lose(conn, rollback_exc, f"rolling back the savepoint of {action}")
            if isinstance(exc, AuditStorageError) and not isinstance(exc, AuditSpoolError):
                return None, _Failure(exc, False)
            if isinstance(exc, DB_ERRORS):
                return None, _Failure(_as_storage_error(exc, action), False)
            raise
        try:
            await nested.commit()
        except _FAILURES as exc:
            await self._lose(conn, exc, f"releasing the savepoint of {action}")
        return result, None

    async def _lose(self, conn: AsyncConnection, exc: BaseException, action: str) -> NoReturn:
        """End a transaction whose savepoint failed: its commit must fail, its spool be voided.

        The server may have aborted the transaction (any failed statement does),
        and asyncpg reports a COMMIT of an aborted transaction as success while
        the server rolls it back: the business change would be gone silently.
        Invalidating the connection makes the caller's commit raise instead.
        """
        with contextlib.suppress(Exception):
            await conn.invalidate(exc if isinstance(exc, Exception) else None)
        tracker = self.session.sync_session.info.get(_TRACKER_KEY)
        if isinstance(tracker, _OutcomeTracker):
            tracker.void_everything(_LOST_REASON)
        logger.error("%s failed; the caller's transaction is lost: %s", action, exc)
        raise AuditTransactionLostError(
            f"{action} failed ({_first_line(exc)}); the transaction is lost: its "
            "connection was closed so that its commit fails, and what it spooled "
            "was voided; retry the whole unit of work"
        ) from exc

    async def _spool(self, events: list[PreparedEvent], outcome: _Failure) -> list[SpooledRecord]:
        failure = outcome.error
        try:
            records = await asyncio.to_thread(self.spool.append_events, events, str(failure))
        except AuditSpoolError as exc:
            ids = ", ".join(str(e.id) for e in events)
            logger.error("audit event(s) %s were neither written nor spooled: %s", ids, exc)
            raise AuditSpoolError(
                f"audit event(s) {ids} ({events[0].event_type.value}"
                f"{', ...' if len(events) > 1 else ''}) were neither written "
                f"({failure}) nor spooled ({exc})"
            ) from exc
        sync = self.session.sync_session
        owner = sync.get_nested_transaction() or sync.get_transaction()
        if owner is not None and not outcome.autocommit:
            # On an AUTOCOMMIT session nothing is rolled back later: the event
            # stands for work that committed statement by statement.
            attempt = _Attempt(self.spool, records[0].attempt, tuple(e.id for e in events))
            _OutcomeTracker.of(sync).add(owner, attempt)
        for prepared in events:
            logger.warning(
                "audit event %s (%s on %s %s) was not written and is kept in spool %s: %s",
                prepared.id,
                prepared.event_type.value,
                prepared.entity_type.value,
                prepared.entity_id,
                self.spool.path,
                failure,
            )
        return records

    def __repr__(self) -> str:
        return f"BestEffortRepository(spool={self.spool!r})"
