"""The exceptions audit_orm raises.

Everything the library refuses is a subclass of :class:`AuditError`, so a caller
can catch one base class. Each error names the offending field and value.
Database exceptions are translated in :func:`translate_db_error`, the single place
where driver errors become audit errors.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc


def _show(value: Any, limit: int = 80) -> str:
    """A bounded, escaped rendering of a bad value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        # repr() of an integer of thousands of digits raises (and is no message).
        return f"<an integer of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:
        # A value whose repr() fails must not turn a typed error into another.
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AuditError(Exception):
    """Base class of every error audit_orm raises."""


class InvalidInputError(AuditError, ValueError):
    """A value given to the public API is not acceptable.

    ``field`` names what was wrong and ``value`` holds what was given.
    """

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {_show(value)})")


class InvalidPayloadError(InvalidInputError):
    """An event payload failed validation (missing, extra or malformed fields)."""


class UnknownEventTypeError(InvalidInputError):
    """The event type is not one of :class:`~audit_orm.AuditEventType`."""


class UnknownEntityTypeError(InvalidInputError):
    """The entity type is not one of :class:`~audit_orm.EntityType`."""


class InvalidIdError(InvalidInputError):
    """An identifier is not a valid UUID."""


class EventIdConflictError(AuditError):
    """An event id was recorded before with different content.

    Recording the same event twice (same id, same content) is a no-op; reusing an
    id for a different event is refused so a retry can never rewrite history.
    """

    def __init__(self, event_id: Any) -> None:
        self.event_id = event_id
        super().__init__(f"event_id: {event_id} was already recorded with different content")


class MigrationConflictError(AuditError):
    """The database's migration state forbids the requested migration.

    Raised when audit_orm's standalone migrations meet tables they do not track:
    managed by a host application's Alembic, or written by the original module
    and not yet adopted. ``where`` names the table in question.
    """

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")


class AuditStorageError(AuditError):
    """The database refused or failed a statement.

    The original driver exception is chained as ``__cause__``.
    """


class AuditUnavailableError(AuditStorageError):
    """The database could not be reached (connection refused, lost or timed out),
    or it aborted the transaction so others could go on (serialization failure,
    deadlock: :class:`AuditSerializationError`).

    The condition is transient: the same unit of work may succeed when run
    again, which is why retries (see :mod:`audit_orm.retry`) act on this class
    only. :func:`connection_broken` tells whether a raw exception is of this kind.
    """


class AuditTransactionLostError(AuditUnavailableError):
    """Best-effort recording could not keep the caller's transaction apart from its audit write.

    Opening, rolling back to or releasing the SAVEPOINT around an audit write
    failed (a lost connection, a pooler that does not keep the transaction on
    one server connection, any failure of the savepoint statement itself). The
    transaction may be aborted on the server, where a COMMIT would silently
    become a ROLLBACK; so its connection has been invalidated (the caller's
    commit raises), and what the transaction spooled has been voided. Retry the
    whole unit of work, as for any lost connection.
    """


class AuditTimeoutError(AuditUnavailableError):
    """A statement or lock wait exceeded its time limit (``statement_timeout``,
    ``lock_timeout``, ``idle_in_transaction_session_timeout``,
    ``transaction_timeout``) and was cancelled by the server; nothing it did remains."""


class AuditSerializationError(AuditUnavailableError):
    """The server aborted the transaction because it collided with a concurrent one.

    A serialization failure (SQLSTATE ``40001``, under ``REPEATABLE READ`` or
    ``SERIALIZABLE``) or a deadlock (``40P01``): nothing the transaction did
    remains, and running the whole transaction again is expected to succeed,
    so retries (:func:`~audit_orm.retry.call_with_retries`) act on it like on
    any transient failure. Repeating one statement inside the aborted
    transaction cannot.
    """


class AuditSpoolError(AuditStorageError):
    """The local spool could not be written or read.

    Raised by best-effort recording only when the database *and* the spool both
    failed: the event could not be kept anywhere, and saying so is the only
    alternative to losing it silently.
    """


#: SQLSTATEs of a cancelled statement: query_canceled (statement_timeout),
#: lock_not_available (lock_timeout, NOWAIT), idle-in-transaction timeout,
#: transaction_timeout (PostgreSQL 17 and later).
_TIMEOUT_STATES = frozenset({"57014", "55P03", "25P03", "25P04"})
#: SQLSTATEs of a transaction aborted for a concurrent one: serialization
#: failure, deadlock. Worth running the whole transaction again.
_CONFLICT_STATES = frozenset({"40001", "40P01"})
#: SQLSTATEs of a server that is going away or not accepting connections yet:
#: admin/crash shutdown, cannot_connect_now, too_many_connections.
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(getattr(exc, "orig", None), "sqlstate", None) or getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE behind ``exc``: its own, or that of the driver error it was translated from."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = _sqlstate(current)
        if state is not None:
            return state
        current = current.__cause__ or current.__context__
    return None


#: What drivers say when the connection under them is gone or unusable, in
#: errors that carry no SQLSTATE (asyncpg's InterfaceError after a killed COPY:
#: "another operation is in progress"; "connection is closed"; ...).
_BROKEN_WORDS = (
    "connection is closed",
    "connection was closed",
    "connection was lost",
    "the connection was lost",
    "another operation is in progress",
    "cannot perform operation",
    "underlying connection is closed",
    "connection reset",
    "broken pipe",
    "server closed the connection",
    "terminating connection",
    "can't reconnect until invalid transaction is rolled back",
    "this connection is closed",
)


def connection_broken(exc: BaseException) -> bool:
    """Whether ``exc`` means the database connection is lost or left unusable.

    True for a lost, closed or invalidated connection at any step (a statement,
    ``COPY``, ``ROLLBACK``, savepoint release, ``COMMIT``), whatever class the
    driver or SQLAlchemy raised it as. Such a failure is transient for the
    unit of work: retried on a new connection it may succeed.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AuditUnavailableError):
            return True
        if isinstance(current, AuditError):
            return False
        if isinstance(current, (sa_exc.DisconnectionError, ConnectionError)):
            return True
        if isinstance(current, sa_exc.DBAPIError) and current.connection_invalidated:
            return True
        state = _sqlstate(current)
        if state is not None and (state in _UNAVAILABLE_STATES or state.startswith("08")):
            return True
        name = type(current).__name__
        if name in {"ConnectionDoesNotExistError", "InterfaceError", "InternalClientError"} or (
            isinstance(current, sa_exc.InterfaceError)
        ):
            words = str(current).lower()
            if any(w in words for w in _BROKEN_WORDS):
                return True
        if isinstance(current, sa_exc.PendingRollbackError) and "invalid transaction" in str(
            current
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


class AppendOnlyError(AuditStorageError):
    """The database refused to UPDATE, DELETE or TRUNCATE the audit trail.

    The audit tables are append-only for every role; record a correction instead
    (:meth:`~audit_orm.AuditRepository.correct`).
    """


class SealingError(AuditError):
    """Sealing cannot go on safely; the message says what to fix.

    Raised, for instance, when the ``seq`` sequence caches values (its numbers
    would no longer be handed out in order) or when a row in a range about to be
    sealed carries a number that was not drawn from the sequence.
    """


class UnreadableRowError(AuditError):
    """A stored row cannot be read back as an :class:`~audit_orm.AuditRecord`.

    Rows written through this package always can; a row inserted by plain SQL
    (or written before a constraint existed) may hold what no record can: a
    ``data`` that is not a JSON object, a number too long or nesting too deep
    to decode, an event or entity type this version does not know, a time
    outside the years 1 to 9999. Readers name the row (``seq``, ``event_id``)
    and the ``reason`` rather than fail on it with an untyped error.
    """

    def __init__(self, seq: Any, event_id: Any, reason: str) -> None:
        self.seq = seq
        self.event_id = event_id
        self.reason = reason
        super().__init__(f"row seq {seq} (id {event_id}) cannot be read: {reason}")


class WriterClosedError(AuditError):
    """The :class:`~audit_orm.AuditWriter` is closed (or closing) and takes no more events."""


#: The SQLSTATE the append-only triggers raise.
APPEND_ONLY_SQLSTATE = "AU001"


def translate_db_error(exc: BaseException, action: str) -> AuditStorageError:
    """Turn a SQLAlchemy/driver exception into an :class:`AuditStorageError`.

    Connection failures (refused, lost, a server shutting down; see
    :func:`connection_broken`) become :class:`AuditUnavailableError`,
    server-side timeouts :class:`AuditTimeoutError`, transactions the server
    aborted to let others go on (serialization failure, deadlock)
    :class:`AuditSerializationError`, anything else :class:`AuditStorageError`.
    Callers ``raise translate_db_error(exc, "...") from exc`` so the cause stays
    attached for debugging.
    """
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = detail[0] if detail else type(exc).__name__
    state = _sqlstate(exc)
    if state == APPEND_ONLY_SQLSTATE:
        return AppendOnlyError(f"{action} failed: {first}")
    if state in _TIMEOUT_STATES:
        return AuditTimeoutError(f"{action} failed: {first}")
    if state in _CONFLICT_STATES:
        return AuditSerializationError(f"{action} failed: transaction aborted, retry it ({first})")
    if isinstance(exc, (OSError, TimeoutError)):
        return AuditUnavailableError(
            f"{action} failed: database unreachable ({type(exc).__name__}: {first})"
        )
    if connection_broken(exc):
        # The driver's own words for a dropped connection can be obscure
        # ("cannot switch to state 11"); say what happened first.
        return AuditUnavailableError(f"{action} failed: connection lost ({first})")
    return AuditStorageError(f"{action} failed: {first}")


#: What a database call can raise besides SQLAlchemy's own errors: asyncpg
#: raises :class:`OSError` (refused, no such socket) and :class:`TimeoutError`
#: while connecting, before SQLAlchemy wraps anything.
DB_ERRORS: tuple[type[BaseException], ...] = (sa_exc.SQLAlchemyError, OSError, TimeoutError)
