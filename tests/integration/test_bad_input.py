"""The bad-input catalogue: every kind of bad input, across the public API and the CLI.

Each case must raise a typed error from the ``AuditError`` hierarchy whose
message names the field and shows the value; nothing may be written, and the
session must stay usable. Free-text fields (an actor, a ticker, a reason) take
SQL fragments as plain data: that is covered by
``test_repository.test_hostile_strings_are_just_data``.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditError,
    AuditEvent,
    AuditRepository,
    EventIdConflictError,
    InvalidIdError,
    InvalidInputError,
    InvalidPayloadError,
    UnknownEntityTypeError,
    UnknownEventTypeError,
)
from audit_orm.cli import _run, build_parser, main
from audit_orm.errors import AuditSpoolError
from audit_orm.payloads import OrderCancelledPayload

ORDER = uuid.UUID("0192f1a0-0000-7000-8000-000000000001")
TAKEN = uuid.UUID("0192f1a0-0000-7000-8000-0000000000ee")
ACCEPTED = {"ticker": "AAPL", "broker_order_id": "B-1"}
FILL = {
    "ticker": "AAPL",
    "side": "buy",
    "fill_quantity": "10",
    "fill_price": "150.25",
    "broker_order_id": "B-1",
}
SQL = "'; DROP TABLE audit_events; --"
ESCAPE = "ops\x1b[2J\x07"

Call = Callable[[AuditRepository], Awaitable[Any]]


@dataclass(frozen=True)
class Case:
    """One kind of bad input: the call, the error it must raise, the field and value it names."""

    kind: str
    call: Call
    error: type[AuditError]
    field: str
    shown: str  # how the value appears in the message (escaped, never raw)


def rec(**kwargs: Any) -> Call:
    """``record(order.accepted ...)`` with one argument replaced."""
    args: dict[str, Any] = {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": ORDER,
        "data": ACCEPTED,
    }
    args.update(kwargs)
    return lambda r: r.record(**args)


def fill(**changes: Any) -> Call:
    return rec(event_type="order.filled", data={**FILL, **changes})


def without(field: str) -> Call:
    return rec(event_type="order.filled", data={k: v for k, v in FILL.items() if k != field})


def search(**kwargs: Any) -> Call:
    return lambda r: r.search(**kwargs)


def approval(**changes: Any) -> Call:
    data = {"ticker": "AAPL", "side": "buy", "quantity": 1, "estimated_value": 100, **changes}
    return rec(event_type="approval.requested", entity_type="approval", data=data)


# fmt: off
CASES = [
    # -- types, ids and enums
    Case("unknown event type", rec(event_type="order.exploded"), UnknownEventTypeError,
         "event_type", "'order.exploded'"),
    Case("event type of the wrong type", rec(event_type=7), UnknownEventTypeError,
         "event_type", "7"),
    Case("unknown entity type", rec(entity_type="portfolio"), UnknownEntityTypeError,
         "entity_type", "'portfolio'"),
    Case("entity id of the wrong type", rec(entity_id=42), InvalidIdError, "entity_id", "42"),
    Case("entity id with SQL", rec(entity_id=SQL), InvalidIdError, "entity_id", "DROP TABLE"),
    Case("malformed event id", rec(event_id="not-a-uuid"), InvalidIdError,
         "event_id", "'not-a-uuid'"),
    Case("malformed correlation id", rec(recommendation_id="rec-1"), InvalidIdError,
         "recommendation_id", "'rec-1'"),
    Case("malformed id inside the payload",
         rec(event_type="risk.evaluated", entity_type="risk_evaluation",
             data={"recommendation_id": "12345", "ticker": "X", "eligible": True,
                   "allowed_mode": "paper", "check_count": 1}),
         InvalidPayloadError, "data.recommendation_id", "'12345'"),
    Case("reused event id", rec(event_id=TAKEN, data={**ACCEPTED, "broker_order_id": "B-2"}),
         EventIdConflictError, "event_id", str(TAKEN)),
    # -- payload shape
    Case("missing payload field", without("side"), InvalidPayloadError, "data.side",
         "required field is missing"),
    Case("extra payload field", fill(leverage=10), InvalidPayloadError, "data.leverage", "10"),
    Case("payload not a mapping", rec(data=["AAPL", "B-1"]), InvalidPayloadError,
         "data", "['AAPL', 'B-1']"),
    Case("payload model of another event type",
         rec(data=OrderCancelledPayload(ticker="X", broker_order_id="B")),
         InvalidPayloadError, "data", "OrderCancelledPayload"),
    Case("number of the wrong type", fill(fill_quantity=[10]), InvalidPayloadError,
         "data.fill_quantity", "[10]"),
    Case("text where a number belongs", fill(fill_price="cheap"), InvalidPayloadError,
         "data.fill_price", "'cheap'"),
    Case("negative count",
         rec(event_type="recommendation.generated", entity_type="recommendation",
             data={"ticker": "X", "action": "buy", "mode": "paper", "confidence": 0.5,
                   "evidence_count": -1}),
         InvalidPayloadError, "data.evidence_count", "-1"),
    # -- numbers JSONB cannot hold
    Case("NaN decimal", fill(fill_price="NaN"), InvalidPayloadError, "data.fill_price", "NaN"),
    Case("infinite float", fill(fill_quantity=float("inf")), InvalidPayloadError,
         "data.fill_quantity", "inf"),
    Case("decimal too small for PostgreSQL", fill(fill_price=Decimal("1E-20000")),
         InvalidPayloadError, "data.fill_price", "Decimal('1E-20000')"),
    Case("decimal too large to store sanely", fill(fill_quantity=Decimal("9E+200000")),
         InvalidPayloadError, "data.fill_quantity", "Decimal('9E+200000')"),
    Case("NaN float score",
         rec(event_type="recommendation.generated", entity_type="recommendation",
             data={"ticker": "X", "action": "buy", "mode": "paper",
                   "confidence": float("nan"), "evidence_count": 1}),
         InvalidPayloadError, "data.confidence", "nan"),
    # -- characters PostgreSQL cannot hold, or that have no business in a symbol
    Case("NUL in payload text", fill(broker_order_id="B\x00-1"), InvalidPayloadError,
         "data.broker_order_id", "'B\\x00-1'"),
    Case("control characters in a ticker", fill(ticker="AA\x1bPL"), InvalidPayloadError,
         "data.ticker", "'AA\\x1bPL'"),
    Case("oversized ticker", fill(ticker="T" * 33), InvalidPayloadError, "data.ticker", "TTTT"),
    # -- datetimes
    Case("naive occurred_at", rec(occurred_at=datetime(2026, 3, 2, 14, 30)), InvalidInputError,
         "occurred_at", "datetime.datetime(2026, 3, 2, 14, 30)"),
    Case("unparseable occurred_at", rec(occurred_at="yesterday at noon"), InvalidInputError,
         "occurred_at", "'yesterday at noon'"),
    Case("occurred_at of the wrong type", rec(occurred_at=1767225600), InvalidInputError,
         "occurred_at", "1767225600"),
    Case("naive datetime in the payload", approval(expires_at=datetime(2026, 1, 1)),
         InvalidPayloadError, "data.expires_at", "2026"),
    Case("unparseable datetime in the payload", approval(expires_at="soon"),
         InvalidPayloadError, "data.expires_at", "'soon'"),
    # -- size caps
    Case("payload over the configured cap", fill(broker_order_id="B" * 300),
         InvalidPayloadError, "data", "bytes>"),
    # -- actors
    Case("empty actor", rec(actor=""), InvalidInputError, "actor", "''"),
    Case("blank actor", rec(actor="   "), InvalidInputError, "actor", "'   '"),
    Case("oversized actor", rec(actor="a" * 129), InvalidInputError, "actor", "aaaa"),
    Case("control characters in actor", rec(actor=ESCAPE), InvalidInputError,
         "actor", "'ops\\x1b[2J\\x07'"),
    Case("actor of the wrong type", rec(actor=None), InvalidInputError, "actor", "None"),
    Case("position change that changes nothing",
         lambda r: r.position_change(ORDER, "X", "buy", 0, 0, 0, 0),
         InvalidPayloadError, "data.quantity_after", "0"),
    # -- every filter of search() and the trails, with hostile strings
    Case("search cursor with SQL", search(after=SQL), InvalidInputError, "after", "DROP TABLE"),
    Case("search cursor negative", search(after="-1"), InvalidInputError, "after", "'-1'"),
    Case("search limit zero", search(limit=0), InvalidInputError, "limit", "0"),
    Case("search limit huge", search(limit=10**9), InvalidInputError, "limit", "1000000000"),
    Case("search limit as text", search(limit="10"), InvalidInputError, "limit", "'10'"),
    Case("search event type with SQL", search(event_types=["order.filled' OR 1=1 --"]),
         UnknownEventTypeError, "event_type", "OR 1=1"),
    Case("search no event types", search(event_types=[]), InvalidInputError,
         "event_types", "[]"),
    Case("search entity type with SQL", search(entity_type="order; DELETE FROM audit_events"),
         UnknownEntityTypeError, "entity_type", "DELETE"),
    Case("search entity id with control characters", search(entity_id="\x1b[2J"),
         InvalidIdError, "entity_id", "'\\x1b[2J'"),
    Case("search order id with SQL", search(order_id="1 OR 1=1"), InvalidIdError,
         "order_id", "'1 OR 1=1'"),
    Case("search recommendation id", search(recommendation_id=SQL), InvalidIdError,
         "recommendation_id", "DROP"),
    Case("search actor with control characters", search(actor=ESCAPE), InvalidInputError,
         "actor", "\\x1b"),
    Case("search ticker with NUL", search(ticker="A\x00B"), InvalidInputError,
         "ticker", "'A\\x00B'"),
    Case("search ticker with escape", search(ticker="\x1b]0;pwned\x07"), InvalidInputError,
         "ticker", "\\x1b]0;pwned\\x07"),
    Case("search ticker oversized", search(ticker="T" * 33), InvalidInputError, "ticker", "TTT"),
    Case("search since unparseable", search(since="last week"), InvalidInputError,
         "since", "'last week'"),
    Case("search until naive", search(until=datetime(2026, 1, 1)), InvalidInputError,
         "until", "datetime.datetime(2026, 1, 1, 0, 0)"),
    Case("search until before since",
         search(since=datetime(2026, 1, 2, tzinfo=UTC), until=datetime(2026, 1, 1, tzinfo=UTC)),
         InvalidInputError, "until", "2026"),
    Case("get with SQL", lambda r: r.get(SQL), InvalidIdError, "event_id", "DROP TABLE"),
    Case("order trail with SQL", lambda r: r.order_trail("1=1"), InvalidIdError,
         "order_id", "'1=1'"),
    Case("order trail with a bad recommendation", lambda r: r.order_trail(ORDER, "x\n"),
         InvalidIdError, "recommendation_id", "'x\\n'"),
    Case("entity trail of an unknown type", lambda r: r.entity_trail("wallet", ORDER),
         UnknownEntityTypeError, "entity_type", "'wallet'"),
]
# fmt: on


async def count_rows(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_the_catalogue_is_large_enough() -> None:
    assert len({case.kind for case in CASES}) == len(CASES) >= 25
    assert len({case.error for case in CASES}) == 6


@pytest.mark.parametrize("case", CASES, ids=[case.kind for case in CASES])
async def test_bad_input_through_the_api(session: AsyncSession, case: Case) -> None:
    repo = AuditRepository(session, max_payload_bytes=256)
    await repo.order_accepted(uuid.uuid4(), "AAPL", "B-1", event_id=TAKEN)
    before = await count_rows(session)

    with pytest.raises(case.error) as info:
        await case.call(repo)

    error = info.value
    message = str(error)
    assert type(error) is case.error, f"{type(error).__name__}: {message}"
    assert message.startswith(case.field + ":") or f"{case.field}:" in message, message
    if isinstance(error, InvalidInputError):
        assert error.field == case.field
    assert case.shown in message, message
    assert not any(ord(ch) < 32 for ch in message)  # hostile bytes never reach a log raw
    # Nothing written, nothing pending, and the session goes on working.
    assert not session.new
    assert not session.dirty
    assert await count_rows(session) == before
    good = await repo.order_accepted(uuid.uuid4(), "AAPL", "B-1")
    assert await repo.get(good.id) == good
    assert await count_rows(session) == before + 1


# ----------------------------------------------------------------------- CLI


@dataclass(frozen=True)
class CliCase:
    kind: str
    argv: list[str]
    error: type[AuditError]
    field: str
    shown: str
    #: The option the CLI's message names, when the library's field is named otherwise.
    option: str | None = None


# fmt: off
CLI_CASES = [
    CliCase("trail id with SQL", ["trail", SQL], InvalidIdError, "ORDER_ID", "DROP TABLE"),
    CliCase("trail id with escapes", ["trail", "\x1b[2J"], InvalidIdError, "ORDER_ID",
            "'\\x1b[2J'"),
    CliCase("trail recommendation with SQL", ["trail", str(ORDER), "--recommendation", SQL],
            InvalidIdError, "--recommendation", "DROP TABLE"),
    CliCase("migrate revision with SQL", ["migrate", "--revision", SQL], InvalidInputError,
            "--revision", "DROP TABLE"),
    CliCase("migrate revision with escapes", ["migrate", "--revision", "heads\x1b[31m"],
            InvalidInputError, "--revision", "'heads\\x1b[31m'"),
    CliCase("replay path with NUL", ["replay", "spool\x00.jsonl"], InvalidInputError,
            "spool", "'spool\\x00.jsonl'"),
    CliCase("replay chunk size zero", ["replay", "s", "--chunk-size", "0"], InvalidInputError,
            "chunk_size", "0", "--chunk-size"),
    CliCase("replay attempts zero", ["replay", "s", "--attempts", "0"], InvalidInputError,
            "attempts", "0", "--attempts"),
    CliCase("export since unparseable", ["export", "--since", "last week"], InvalidInputError,
            "--since", "'last week'"),
    CliCase("export order with SQL", ["export", "--order", "1=1"], InvalidIdError,
            "--order", "'1=1'"),
    CliCase("export event type with SQL", ["export", "--event-type", "order.filled'--"],
            UnknownEventTypeError, "event_type", "order.filled'--", "--event-type"),
    CliCase("export ticker with escapes", ["export", "--ticker", "A\x1b]0;x\x07"],
            InvalidInputError, "ticker", "'A\\x1b]0;x\\x07'", "--ticker"),
    CliCase("replay a directory", ["replay", "{tmp}"], AuditSpoolError, "spool", "{tmp}"),
]
URL_CASES = [
    CliCase("database URL not a URL", ["--database-url", "not a url", "trail", str(ORDER)],
            InvalidInputError, "--database-url", "'not a url'"),
    CliCase("database URL of another database",
            ["--database-url", "mysql://trader:s3cret@db/prod", "trail", str(ORDER)],
            InvalidInputError, "--database-url", "mysql://trader:***@db/prod"),
]
# fmt: on


@pytest.mark.parametrize("case", CLI_CASES + URL_CASES, ids=[c.kind for c in CLI_CASES + URL_CASES])
async def test_bad_input_through_the_cli(
    db_url: str,
    engine: AsyncEngine,
    tmp_path: Path,
    case: CliCase,
    capfd: pytest.CaptureFixture[str],
) -> None:
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in case.argv]
    if case not in URL_CASES:
        argv = ["--database-url", db_url, *argv]
    shown = case.shown.replace("{tmp}", str(tmp_path))
    async with engine.connect() as conn:
        before = await conn.scalar(select(func.count()).select_from(AuditEvent))

    with pytest.raises(case.error) as info:
        await _run(build_parser().parse_args(argv), io.StringIO())
    assert case.field in str(info.value)
    assert shown in str(info.value)

    out = io.StringIO()
    code = await asyncio.to_thread(main, argv, out)
    err = capfd.readouterr().err
    assert code == 2
    assert err.startswith("audit-orm: error: ")
    assert (case.option or case.field) in err and shown in err, err
    assert "\x1b" not in err and "\x00" not in err
    assert "s3cret" not in err
    assert out.getvalue() == ""
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(AuditEvent)) == before
