"""Bounded, logged retries of idempotent database work.

Retries live where audit_orm owns the transaction (spool replay, and any
caller-owned unit of work built on :func:`call_with_retries`). They never live
inside a caller's transaction: once PostgreSQL has lost the connection or
aborted the transaction, repeating one statement cannot bring the rest of that
transaction back. There, the error reaches the caller (or, in best-effort
mode, the event goes to the spool).

Only transient failures (:class:`~audit_orm.errors.AuditUnavailableError` and
its subclasses :class:`~audit_orm.errors.AuditTimeoutError` and
:class:`~audit_orm.errors.AuditSerializationError`) are retried, and so is a
raw driver or SQLAlchemy error that translates to one: a lost connection
(:func:`~audit_orm.errors.connection_broken`) or a serialization failure met
by the caller's own ``COMMIT``, say. It is raised on as the translated error. Audit
writes are idempotent by event id, so repeating one whose acknowledgement was
lost cannot write the event twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import SQLAlchemyError

from audit_orm.errors import (
    AuditError,
    AuditUnavailableError,
    InvalidInputError,
    connection_broken,
    translate_db_error,
)

logger = logging.getLogger("audit_orm.retry")

T = TypeVar("T")

#: The longest wait a policy may ask for between tries (seconds).
MAX_RETRY_DELAY = 3600.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to repeat a transient failure.

    :param attempts: total tries, the first one included (1 = no retry).
    :param first_delay: seconds before the second try.
    :param max_delay: cap on any single wait.
    :param multiplier: growth of the wait after each failure.
    :param jitter: fraction of each wait drawn at random, so that many clients
        recovering from the same outage do not reconnect in lockstep.
    """

    attempts: int = 5
    first_delay: float = 0.1
    max_delay: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise InvalidInputError("attempts", self.attempts, "must be an integer")
        if not 1 <= self.attempts <= 100:
            raise InvalidInputError("attempts", self.attempts, "must be from 1 to 100")
        for name in ("first_delay", "max_delay", "multiplier", "jitter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInputError(name, value, "must be a number")
            # NaN passes every comparison below, and an infinite wait never ends.
            if not math.isfinite(value) or value < 0:
                raise InvalidInputError(name, value, "must be a finite, non-negative number")
        for name in ("first_delay", "max_delay"):
            if getattr(self, name) > MAX_RETRY_DELAY:
                raise InvalidInputError(
                    name, getattr(self, name), f"must be at most {MAX_RETRY_DELAY:g} seconds"
                )
        if self.jitter > 1:
            raise InvalidInputError("jitter", self.jitter, "must be at most 1")

    def delays(self) -> Iterator[float]:
        """The waits between tries: ``attempts - 1`` values, growing to ``max_delay``."""
        delay = float(self.first_delay)
        for _ in range(self.attempts - 1):
            bounded = min(delay, self.max_delay)
            yield bounded * (1 - self.jitter * random.random())
            delay *= self.multiplier


#: Try once, never repeat.
NO_RETRY = RetryPolicy(attempts=1)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth running the failed unit of work again for.

    An :class:`~audit_orm.errors.AuditUnavailableError` is, and so is a raw
    database error that translates to one: those reach a unit of work from
    the caller's own statements, its ``COMMIT`` above all, where a
    serialization failure or a lost connection shows up untranslated.
    """
    if isinstance(exc, AuditUnavailableError):
        return True
    if isinstance(exc, AuditError):
        return False
    if connection_broken(exc):
        return True
    raw = isinstance(exc, SQLAlchemyError) or type(exc).__module__.startswith("asyncpg")
    return raw and isinstance(translate_db_error(exc, "retry"), AuditUnavailableError)


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    action: str,
) -> T:
    """Await ``operation()``; repeat it on a transient failure, as ``policy`` allows.

    ``operation`` must be idempotent and must open its own transaction on each
    call. What is retried is decided by :func:`is_transient` (a raw error is
    translated first); anything else is raised at once, as it came. Every retry
    is logged at WARNING on the ``audit_orm.retry`` logger with the attempt
    number and the error; giving up is logged at ERROR and the last error is
    raised.
    """
    if not isinstance(policy, RetryPolicy):
        raise InvalidInputError("policy", policy, "must be a RetryPolicy")
    delays = policy.delays()
    attempt = 1
    while True:
        try:
            try:
                return await operation()
            except AuditUnavailableError:
                raise
            except Exception as raw:
                if not is_transient(raw):
                    raise
                translated = translate_db_error(raw, action)
                if not isinstance(translated, AuditUnavailableError):
                    translated = AuditUnavailableError(f"{action} failed: connection lost ({raw})")
                raise translated from raw
        except AuditUnavailableError as exc:
            delay = next(delays, None)
            if delay is None:
                logger.error("%s failed after %d attempt(s), giving up: %s", action, attempt, exc)
                raise
            logger.warning(
                "%s failed (attempt %d of %d), retrying in %.2fs: %s",
                action,
                attempt,
                policy.attempts,
                delay,
                exc,
            )
            await asyncio.sleep(delay)
            attempt += 1
