"""Bounded, logged retries of idempotent database work.

Retries live where audit_orm owns the transaction (spool replay, and any
caller-owned unit of work built on :func:`call_with_retries`). They never live
inside a caller's transaction: once PostgreSQL has lost the connection or
aborted the transaction, repeating one statement cannot bring the rest of that
transaction back. There, the error reaches the caller (or, in best-effort
mode, the event goes to the spool).

Only transient failures (:class:`~audit_orm.errors.AuditUnavailableError` and
its subclasses) are retried, and a raw driver or SQLAlchemy error that
:func:`~audit_orm.errors.connection_broken` recognises as a lost connection
(the caller's own ``ROLLBACK`` or ``COMMIT`` on a dead connection, say) counts
as one: it is translated to :class:`~audit_orm.errors.AuditUnavailableError`. Audit
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

from audit_orm.errors import (
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


async def call_with_retries(
    operation: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    action: str,
) -> T:
    """Await ``operation()``; repeat it on a transient failure, as ``policy`` allows.

    ``operation`` must be idempotent and must open its own transaction on each
    call. Every retry is logged at WARNING on the ``audit_orm.retry`` logger with
    the attempt number and the error; giving up is logged at ERROR and the last
    error is raised.
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
                if not connection_broken(raw):
                    raise
                translated = translate_db_error(raw, action)
                if not isinstance(translated, AuditUnavailableError):  # pragma: no cover
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
