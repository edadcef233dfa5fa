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
the business change did not happen, so a ``void`` record is appended to the spool
and replay skips the event. If the process dies before the transaction ends, the
event stays in the spool and is replayed: when in doubt, the trail keeps it.

What still raises, on purpose:

* bad input (:class:`~audit_orm.InvalidInputError` and its subclasses) and a
  reused event id (:class:`~audit_orm.EventIdConflictError`): these are bugs in
  the caller, not outages; they would fail the same way on replay;
* :class:`~audit_orm.errors.AuditSpoolError`: the database *and* the spool
  failed, so the event cannot be kept anywhere; raising is the only way not to
  lose it silently;
* reads (trails, search, get, and :meth:`~audit_orm.AuditRepository.correct`'s
  lookup of the event it corrects): best effort concerns recording only.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Literal, overload
from uuid import UUID

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from audit_orm.enums import AuditEventType, EntityType
from audit_orm.errors import (
    DB_ERRORS,
    AuditSpoolError,
    AuditStorageError,
    InvalidInputError,
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


class _OutcomeTracker:
    """Follows spooled events to the end of the transaction that carried them.

    Events are filed under the innermost transaction open when they were
    spooled. When a nested transaction commits they move to its parent; when
    the outermost one commits they are confirmed; when any of them ends without
    committing, its events are voided in their spool.
    """

    def __init__(self, session: Session) -> None:
        self.pending: dict[SessionTransaction, list[tuple[Spool, UUID]]] = {}
        self.committed: set[SessionTransaction] = set()
        event.listen(session, "after_commit", self.after_commit)
        event.listen(session, "after_transaction_end", self.after_transaction_end)

    @classmethod
    def of(cls, session: Session) -> _OutcomeTracker:
        tracker = session.info.get(_TRACKER_KEY)
        if not isinstance(tracker, cls):
            tracker = session.info[_TRACKER_KEY] = cls(session)
        return tracker

    def add(self, transaction: SessionTransaction, spool: Spool, event_id: UUID) -> None:
        self.pending.setdefault(transaction, []).append((spool, event_id))

    def after_commit(self, session: Session) -> None:
        # Dispatched before the committing transaction closes, so it is still
        # the session's innermost one.
        current = session.get_nested_transaction() or session.get_transaction()
        if current is not None:
            self.committed.add(current)

    def after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        committed = transaction in self.committed
        self.committed.discard(transaction)
        events = self.pending.pop(transaction, None)
        if not events:
            return
        if committed:
            if transaction.parent is not None:
                self.pending.setdefault(transaction.parent, []).extend(events)
            return
        by_spool: dict[Spool, list[UUID]] = {}
        for spool, event_id in events:
            by_spool.setdefault(spool, []).append(event_id)
        for spool, ids in by_spool.items():
            try:
                spool.append_voids(ids, _VOID_REASON)
            except AuditSpoolError:
                # Raising from a rollback would hide the caller's own error;
                # replay will write these events, so make that visible.
                logger.exception(
                    "could not void %d spooled event(s) in %s; replay will write them: %s",
                    len(ids),
                    spool.path,
                    ", ".join(str(i) for i in ids),
                )
                continue
            logger.warning(
                "voided %d spooled audit event(s) in %s (%s): %s",
                len(ids),
                spool.path,
                _VOID_REASON,
                ", ".join(str(i) for i in ids),
            )


class BestEffortRepository(AuditRepository):
    """An :class:`~audit_orm.AuditRepository` whose writes survive database failures.

    Every write helper and :meth:`record` behave as in the base class when the
    database works. When it does not (:class:`~audit_orm.AuditStorageError`,
    including unreachable, lost connection and timeouts), the write returns a
    :class:`~audit_orm.spool.SpooledRecord` (``seq == 0``) instead of raising,
    and the event is in the spool, fsynced, before the call returns.

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
            try:
                async with self.session.begin_nested():
                    found = await self.get(prepared.corrects_id)
            except AuditStorageError as exc:
                return await self._spool(prepared, exc)
            except DB_ERRORS as exc:
                return await self._spool(prepared, translate_db_error(exc, "looking up corrects"))
            if found is None:
                raise InvalidInputError("corrects", corrects, "no event with this id was recorded")
        return await self.insert_prepared(prepared)

    async def insert_prepared(self, prepared: PreparedEvent) -> AuditRecord:
        """Insert inside a savepoint; on a database failure, spool the event instead."""
        try:
            async with self.session.begin_nested():
                return await super().insert_prepared(prepared)
        except AuditStorageError as exc:
            failure: AuditStorageError = exc
        except DB_ERRORS as exc:
            # The savepoint itself could not be opened, released or rolled back.
            failure = translate_db_error(exc, f"recording {prepared.event_type.value}")
            failure.__cause__ = exc
        return await self._spool(prepared, failure)

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
        try:
            # The base class's own savepoint covers the INSERT; this one covers
            # the lookups it makes first (corrections), so no failure of the
            # batch can abort the caller's transaction.
            async with self.session.begin_nested():
                if returning:
                    return await super().record_many(prepared)
                return await super().record_many(prepared, returning=False)
        except AuditSpoolError:
            raise
        except AuditStorageError as exc:
            failure: AuditStorageError = exc
        except DB_ERRORS as exc:
            failure = translate_db_error(exc, f"recording {len(prepared)} events")
            failure.__cause__ = exc
        records = await self._spool_all(prepared, failure)
        return list(records) if returning else 0

    async def _spool(self, prepared: PreparedEvent, failure: AuditStorageError) -> AuditRecord:
        (record,) = await self._spool_all([prepared], failure)
        return record

    async def _spool_all(
        self, events: list[PreparedEvent], failure: AuditStorageError
    ) -> list[SpooledRecord]:
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
        if owner is not None:
            tracker = _OutcomeTracker.of(sync)
            for prepared in events:
                tracker.add(owner, self.spool, prepared.id)
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
