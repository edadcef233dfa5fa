"""Retry decisions the replay tests do not reach: typed errors and bad policy values.

README ("Retries"): only transient failures are retried; any other error reaches the caller
at once, as it came; a policy with a value that is not a number is bad input.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import AuditUnavailableError, InvalidInputError
from audit_orm.retry import RetryPolicy, call_with_retries, is_transient


def test_typed_errors_decide_on_their_own_kind() -> None:
    """An AuditUnavailableError is transient; any other AuditError is not, whatever it says."""
    assert is_transient(AuditUnavailableError("the server went away"))
    assert not is_transient(InvalidInputError("ticker", "", "must not be empty"))


@pytest.mark.parametrize("name", ["first_delay", "max_delay", "multiplier", "jitter"])
def test_a_delay_that_is_not_a_number_is_bad_input(name: str) -> None:
    """A string where a number of seconds belongs is refused up front, naming the field."""
    with pytest.raises(InvalidInputError) as info:
        RetryPolicy(**{name: "1"})  # type: ignore[arg-type]
    assert info.value.field == name


async def test_an_audit_error_from_the_work_is_not_retried(engine: AsyncEngine) -> None:
    """Work that fails with a typed, non-transient error runs once and raises that error."""
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        raise InvalidInputError("ticker", "", "must not be empty")

    with pytest.raises(InvalidInputError, match="ticker"):
        await call_with_retries(work, policy=RetryPolicy(attempts=5, first_delay=0), action="x")
    assert calls == 1
