"""How validated events reach the table: one row, one array INSERT, or COPY.

Every write path of the package ends here: :meth:`AuditRepository.record`
(one row), :meth:`AuditRepository.record_many` and :class:`AuditWriter`
(batches). The statements are plain SQL run on the caller's connection, so they
join whatever transaction that connection is in.

Idempotency by event id holds on every path. Small batches go out as one
``INSERT .. SELECT FROM unnest(arrays) .. ON CONFLICT (id) DO NOTHING
RETURNING``: one round trip, ids that already exist are skipped and then
compared with what is stored. In large batches the ids a caller chose are
looked up first (a fresh UUIDv7 cannot be stored already), and the new rows
are sent with ``COPY`` straight into ``audit_events``, the fastest way
PostgreSQL accepts rows; row triggers fire for ``COPY`` as for ``INSERT``.
Should an id turn out to be stored after all (another transaction stored it
meanwhile), the ``COPY`` fails inside its own savepoint and the batch falls
back to the array statement. ``seq`` and the recorded times of copied rows
are read back by id afterwards, unless the caller does not want them.

Rows are inserted in the order given, so ``seq`` follows the batch order.

Statements go straight to the asyncpg connection under the SQLAlchemy one when
that is safe, that is when its transaction has begun (or it is in autocommit
mode): the result layer of SQLAlchemy costs more than a small INSERT itself.
Before the first statement of a transaction they go through SQLAlchemy, which
begins the transaction. Event hooks on the engine (SQL logging, tracing) see
only the statements that pass through SQLAlchemy.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection

from audit_orm.errors import (
    DB_ERRORS,
    EventIdConflictError,
    InvalidInputError,
    connection_broken,
    translate_db_error,
)
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.records import AuditRecord, readable_time_sql, record_from_row

if TYPE_CHECKING:
    from audit_orm.repository import PreparedEvent

#: Batches of at least this many events are sent with COPY. Below it the array
#: INSERT is as fast and takes one round trip where COPY takes four (savepoint,
#: COPY, release, read-back).
COPY_THRESHOLD = 2_000

#: The columns a client writes, in the order of every statement below.
INSERT_COLUMNS = (
    "id",
    "event_type",
    "entity_type",
    "entity_id",
    "actor",
    "data",
    "occurred_at",
    "recommendation_id",
    "order_id",
    "ticker",
    "corrects_id",
)
_COLUMN_LIST = ", ".join(INSERT_COLUMNS)

INSERT_ONE_SQL = (
    f"INSERT INTO audit_events ({_COLUMN_LIST}) "
    "VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11) "
    "ON CONFLICT (id) DO NOTHING "
    "RETURNING seq, occurred_at, recorded_at"
)

# ORDER BY ord makes seq follow the batch order: the insert trigger draws seq
# for each row as the sorted rows reach it.
INSERT_ARRAYS_SQL = (
    f"INSERT INTO audit_events ({_COLUMN_LIST}) "
    "SELECT b.id, b.event_type, b.entity_type, b.entity_id, b.actor, b.data::jsonb, "
    "b.occurred_at, b.recommendation_id, b.order_id, b.ticker, b.corrects_id "
    "FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[], $6::text[], "
    "$7::timestamptz[], $8::uuid[], $9::uuid[], $10::text[], $11::uuid[]) "
    f"WITH ORDINALITY AS b({_COLUMN_LIST}, ord) "
    "ORDER BY b.ord "
    "ON CONFLICT (id) DO NOTHING "
    "RETURNING id, seq, occurred_at, recorded_at"
)

SELECT_KEYS_SQL = (
    "SELECT id, seq, occurred_at, recorded_at FROM audit_events WHERE id = ANY($1::uuid[])"
)

SELECT_STORED_SQL = (
    "SELECT id, seq, event_type, entity_type, entity_id, actor, data::text, "
    f"{readable_time_sql('occurred_at')}, {readable_time_sql('recorded_at')}, "
    "recommendation_id, order_id, ticker, corrects_id "
    "FROM audit_events WHERE id = ANY($1::uuid[])"
)

#: What one event of a batch came to: its stored record, or the conflict refusing it.
Outcome = AuditRecord | EventIdConflictError


def insert_params(event: PreparedEvent) -> tuple[Any, ...]:
    """The values of one row, in :data:`INSERT_COLUMNS` order."""
    return (
        event.id,
        event.event_type.value,
        event.entity_type.value,
        event.entity_id,
        event.actor,
        event.json_text(),
        event.occurred_at,
        event.recommendation_id,
        event.order_id,
        event.ticker,
        event.corrects_id,
    )


def written_record(
    event: PreparedEvent, seq: int, occurred_at: datetime, recorded_at: datetime
) -> AuditRecord:
    """The record of an event just inserted, from the values the database assigned."""
    return AuditRecord(
        id=event.id,
        seq=seq,
        event_type=event.event_type,
        entity_type=event.entity_type,
        entity_id=event.entity_id,
        actor=event.actor,
        data=event.data,
        occurred_at=occurred_at,
        recorded_at=recorded_at,
        recommendation_id=event.recommendation_id,
        order_id=event.order_id,
        ticker=event.ticker,
        corrects_id=event.corrects_id,
    )


def _comparable_data(event: AuditRecord | PreparedEvent) -> Any:
    # As the database would return it: a float such as a confidence of 0.9
    # reads back as Decimal('0.9'), which != 0.9 in Python.
    if isinstance(event, AuditRecord):
        return loads_exact(dumps_exact(event.data))
    return loads_exact(event.json_text())


def same_event(first: AuditRecord | PreparedEvent, other: AuditRecord | PreparedEvent) -> bool:
    """Whether ``other`` repeats ``first`` (a retry) rather than reusing its id.

    The one test of "the same event" on every path: a direct write meeting a
    stored row, a batch repeating an id, a replay meeting the table or another
    spooled copy. Every column a caller can choose is compared, the correlation
    links (``order_id``, ``recommendation_id``) and ``ticker`` included. The one
    exception is ``occurred_at`` left to default (``None`` on a prepared event):
    the database fills it at insert, so it matches whatever time the other side
    has.
    """
    if first is other:
        return True
    return (
        first.event_type is other.event_type
        and first.entity_type is other.entity_type
        and first.entity_id == other.entity_id
        and first.actor == other.actor
        and first.corrects_id == other.corrects_id
        and first.order_id == other.order_id
        and first.recommendation_id == other.recommendation_id
        and first.ticker == other.ticker
        and (
            first.occurred_at is None
            or other.occurred_at is None
            or first.occurred_at == other.occurred_at
        )
        and _comparable_data(first) == _comparable_data(other)
    )


@dataclass(frozen=True, slots=True)
class _Link:
    """How this call's statements reach the database."""

    conn: AsyncConnection
    #: The asyncpg connection, when statements may bypass SQLAlchemy.
    driver: Any | None
    #: The asyncpg connection, when it can COPY (asyncpg can).
    copier: Any | None
    autocommit: bool

    async def fetch(self, sql: str, *params: Any) -> Sequence[Sequence[Any]]:
        if self.driver is not None:
            return await driver_fetch(self.conn, self.driver, sql, *params)
        result = await self.conn.exec_driver_sql(sql, params)
        return result.all()


async def driver_fetch(
    conn: AsyncConnection, driver: Any, sql: str, *params: Any
) -> Sequence[Sequence[Any]]:
    """Run ``sql`` on the driver connection under ``conn``, as SQLAlchemy would fail.

    A statement that SQLAlchemy runs and that finds its connection gone makes
    SQLAlchemy invalidate the connection, so the session can roll back and go
    on with a new one. Past SQLAlchemy that is done here.
    """
    try:
        rows: Sequence[Sequence[Any]] = await driver.fetch(sql, *params)
    except Exception as exc:
        await _check_connection(conn, driver, exc)
        raise
    return rows


async def _check_connection(conn: AsyncConnection, driver: Any, exc: Exception) -> None:
    """After a driver error: if the connection is gone, invalidate it and say so.

    Gone includes left unusable: a COPY cut off half-way can leave the driver
    "in the middle of another operation", open but refusing every statement,
    the ROLLBACK that would clean up included. Such a connection must not go
    back to the pool.
    """
    if not driver.is_closed() and not connection_broken(exc):
        return
    await conn.invalidate(exc)
    raise DisconnectionError(f"the connection was lost: {exc}") from exc


async def _link(conn: AsyncConnection) -> _Link:
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    in_block = bool(getattr(driver, "is_in_transaction", lambda: False)())
    # An AUTOCOMMIT connection inside a block opened by transaction_block is
    # in a transaction like any other: statements no longer commit one by one.
    autocommit = bool(getattr(raw.dbapi_connection, "autocommit", False)) and not in_block
    direct = callable(getattr(driver, "fetch", None)) and (autocommit or in_block)
    copier = driver if callable(getattr(driver, "copy_records_to_table", None)) else None
    return _Link(conn, driver if direct else None, copier, autocommit)


async def direct_driver(conn: AsyncConnection) -> Any | None:
    """The asyncpg connection under ``conn`` if a statement may bypass SQLAlchemy now.

    That is once its transaction has begun, or in autocommit mode; ``None``
    otherwise (or for another driver).
    """
    return (await _link(conn)).driver


async def is_autocommit(conn: AsyncConnection) -> bool:
    """Whether ``conn`` runs each statement as its own transaction (``AUTOCOMMIT``)."""
    return (await _link(conn)).autocommit


@asynccontextmanager
async def transaction_block(conn: AsyncConnection) -> AsyncIterator[None]:
    """One transaction around the block, on an ``AUTOCOMMIT`` connection.

    There each statement commits on its own and no savepoint can be taken, so
    a batch written in several statements could stop half-way with its first
    part committed. The block sends ``BEGIN`` on the driver connection and
    ``COMMIT`` when it ends, or ``ROLLBACK`` when it raises.

    :raises InvalidInputError: the connection is not an asyncpg one.
    """
    driver = (await _link(conn)).driver
    if driver is None or not callable(getattr(driver, "is_closed", None)):
        raise InvalidInputError(
            "session", conn, "an AUTOCOMMIT session must run on the asyncpg driver"
        )
    await driver_fetch(conn, driver, "BEGIN")
    try:
        yield
    except BaseException:
        if not driver.is_closed():
            # The error being raised says what went wrong; a failed rollback
            # (the connection going away meanwhile) adds nothing to it.
            with contextlib.suppress(Exception):
                await driver.fetch("ROLLBACK")
        raise
    await driver_fetch(conn, driver, "COMMIT")


async def insert_one(conn: AsyncConnection, event: PreparedEvent) -> AuditRecord | None:
    """Insert one event; ``None`` if its id is already stored (nothing written)."""
    link = await _link(conn)
    try:
        rows = await link.fetch(INSERT_ONE_SQL, *insert_params(event))
    except Exception as exc:
        if from_database(exc):
            raise translate_db_error(exc, f"recording {event.event_type.value}") from exc
        raise
    if not rows:
        return None
    row = rows[0]
    return written_record(event, row[0], row[1], row[2])


async def existing_ids(conn: AsyncConnection, ids: Sequence[UUID]) -> set[UUID]:
    """The ids among ``ids`` that are stored."""
    if not ids:
        return set()
    link = await _link(conn)
    rows = await link.fetch("SELECT id FROM audit_events WHERE id = ANY($1::uuid[])", list(ids))
    return {row[0] for row in rows}


async def fetch_stored(conn: AsyncConnection, ids: Sequence[UUID]) -> dict[UUID, AuditRecord]:
    """The stored records among ``ids``."""
    if not ids:
        return {}
    link = await _link(conn)
    stored: dict[UUID, AuditRecord] = {}
    for row in await link.fetch(SELECT_STORED_SQL, list(ids)):
        stored[row[0]] = record_from_row(row)
    return stored


async def insert_many(
    conn: AsyncConnection, events: Sequence[PreparedEvent], *, copy_threshold: int | None = None
) -> list[Outcome]:
    """Insert ``events`` in order; return one outcome per event, in the same order.

    An event whose id is already stored (or appears earlier in the batch) with
    the same content comes back as the stored record; with different content
    as an :class:`EventIdConflictError`, and nothing is written for it. The
    other events are written either way: callers that need all-or-nothing run
    this in a savepoint and undo it when any outcome is a conflict.

    :param copy_threshold: send with COPY from this many new events on
        (default :data:`COPY_THRESHOLD`).
    :raises AuditStorageError: the database failed; what was sent is undone only
        if the caller's transaction (or savepoint) is rolled back.
    """
    outcomes, _ = await _write_batch(conn, events, copy_threshold, read_back=True)
    checked: list[Outcome] = []
    for outcome in outcomes:
        if outcome is None:  # pragma: no cover - read_back returns every record
            raise AssertionError("a written event was not read back")
        checked.append(outcome)
    return checked


async def write_many(
    conn: AsyncConnection, events: Sequence[PreparedEvent], *, copy_threshold: int | None = None
) -> int:
    """Like :func:`insert_many`, without reading the new rows back: the number added.

    Skips the lookup of ``seq`` and the recorded times of the new rows, the
    dearest part of a large batch after the COPY itself.

    :raises EventIdConflictError: at the first event whose id is taken by other
        content (the rest of the batch may be written: run it in a savepoint).
    :raises AuditStorageError: the database failed.
    """
    outcomes, added = await _write_batch(conn, events, copy_threshold, read_back=False)
    for outcome in outcomes:
        if isinstance(outcome, EventIdConflictError):
            raise outcome
    return added


async def _write_batch(
    conn: AsyncConnection,
    events: Sequence[PreparedEvent],
    copy_threshold: int | None,
    *,
    read_back: bool,
) -> tuple[list[Outcome | None], int]:
    """The outcome of each event (``None``: written, not read back), and rows added."""
    threshold = COPY_THRESHOLD if copy_threshold is None else copy_threshold
    unique: list[PreparedEvent] = []
    first_of: dict[UUID, PreparedEvent] = {}
    for event in events:
        if event.id not in first_of:
            first_of[event.id] = event
            unique.append(event)

    stored: dict[UUID, AuditRecord] = {}
    try:
        link = await _link(conn)
        if len(unique) < threshold or link.copier is None:
            written = await _insert_arrays(link, unique, read_back=read_back)
        else:
            # Only ids a caller chose can be stored already; a fresh UUIDv7
            # cannot, and should one collide, the COPY fails and falls back.
            stored = await fetch_stored(conn, [e.id for e in unique if e.id_supplied])
            fresh = [event for event in unique if event.id not in stored]
            written = await _copy(link, fresh, read_back=read_back)
        skipped = [e.id for e in unique if e.id not in written and e.id not in stored]
        stored.update(await fetch_stored(conn, skipped))
    except Exception as exc:
        if from_database(exc):
            raise translate_db_error(exc, f"recording {len(unique)} events") from exc
        raise

    outcomes: list[Outcome | None] = []
    for event in events:
        if event.id in written:
            # Written now from the first event with this id; a later one in
            # the batch must repeat it.
            first = first_of[event.id]
            same = same_event(first, event)
            outcomes.append(written[event.id] if same else EventIdConflictError(event.id))
            continue
        existing = stored.get(event.id)
        if existing is None:  # pragma: no cover - a skipped insert means the row exists
            raise translate_db_error(
                LookupError(f"event {event.id} was neither written nor found"), "recording events"
            )
        outcomes.append(existing if same_event(existing, event) else EventIdConflictError(event.id))
    return outcomes, len(written)


async def _insert_arrays(
    link: _Link, events: Sequence[PreparedEvent], *, read_back: bool
) -> dict[UUID, AuditRecord | None]:
    if not events:
        return {}
    columns: list[list[Any]] = [[] for _ in INSERT_COLUMNS]
    for event in events:
        for column, value in zip(columns, insert_params(event), strict=True):
            column.append(value)
    rows = await link.fetch(INSERT_ARRAYS_SQL, *columns)
    if not read_back:
        return {row[0]: None for row in rows}
    by_id = {event.id: event for event in events}
    return {row[0]: written_record(by_id[row[0]], row[1], row[2], row[3]) for row in rows}


#: SQLSTATE of a unique violation.
_UNIQUE_VIOLATION = "23505"


def from_database(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the database or the driver (raw COPY errors included)."""
    return isinstance(exc, DB_ERRORS) or type(exc).__module__.startswith("asyncpg")


async def _copy(
    link: _Link, events: Sequence[PreparedEvent], *, read_back: bool
) -> dict[UUID, AuditRecord | None]:
    if not events:
        return {}
    copier = link.copier
    if copier is None:  # pragma: no cover - callers check for COPY first
        return await _insert_arrays(link, events, read_back=read_back)
    values = [insert_params(event) for event in events]
    try:
        if link.autocommit:
            # Outside a transaction block the COPY is a transaction of its own.
            await _copy_in(link.conn, copier, values)
        else:
            # The savepoint confines a failed COPY (an id stored meanwhile by
            # another transaction) so the caller's transaction survives the
            # fallback; issuing it also makes the driver begin the transaction
            # before the COPY runs, should nothing have been sent yet.
            async with link.conn.begin_nested():
                await _copy_in(link.conn, copier, values)
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
            raise
        return await _insert_arrays(await _link(link.conn), events, read_back=read_back)
    if not read_back:
        return dict.fromkeys((event.id for event in events), None)
    # The transaction has begun by now, so the driver takes this directly:
    # for a hundred thousand rows SQLAlchemy's result layer would cost more
    # than the lookup itself.
    rows = await driver_fetch(link.conn, copier, SELECT_KEYS_SQL, [event.id for event in events])
    keys = {row[0]: (row[1], row[2], row[3]) for row in rows}
    return {
        event.id: written_record(event, *keys[event.id]) for event in events if event.id in keys
    }


async def _copy_in(conn: AsyncConnection, copier: Any, values: list[tuple[Any, ...]]) -> None:
    try:
        await copier.copy_records_to_table("audit_events", records=values, columns=INSERT_COLUMNS)
    except Exception as exc:
        await _check_connection(conn, copier, exc)
        raise
