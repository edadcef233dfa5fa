"""The bad-input catalogue: every kind of bad input, at every public entry point.

Promise attacked: "bad input is refused with a typed error, before anything is
written, and fails that caller alone". Each case must raise a typed error from
the ``AuditError`` hierarchy whose message names the field (or the command-line
option) and shows the value; nothing may be written, and the session, writer or
engine must stay usable. Free-text fields (an actor, a ticker, a reason) take
SQL fragments as plain data: that is covered by
``test_repository.test_hostile_strings_are_just_data``.

Each kind is one test id; :func:`test_the_catalogue_is_large_enough` counts them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditError,
    AuditEvent,
    AuditRecord,
    AuditRepository,
    AuditSeal,
    AuditStorageError,
    AuditUnavailableError,
    AuditWriter,
    BestEffortRepository,
    EventIdConflictError,
    InvalidIdError,
    InvalidInputError,
    InvalidPayloadError,
    UnknownEntityTypeError,
    UnknownEventTypeError,
    WriterClosedError,
    digest,
    export_events,
    grant,
    migrate,
    replay_spool,
    seal,
    verify,
)
from audit_orm.cli import _run, build_parser, main
from audit_orm.errors import AuditSpoolError
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.payloads import (
    OrderCancelledPayload,
    PositionChangePayload,
    RecommendationPayload,
)
from audit_orm.repository import prepare_event
from audit_orm.retry import RetryPolicy, call_with_retries
from audit_orm.spool import Spool

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


RECOMMENDATION = {"ticker": "X", "action": "buy", "mode": "paper", "confidence": 0.5}
RISK = {"ticker": "X", "eligible": False, "allowed_mode": "paper", "check_count": 1}
#: Aware times that exist locally but not in UTC (year 0, year 10000 there).
YEAR_ONE_EAST = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
LAST_WEST = datetime.max.replace(tzinfo=timezone(timedelta(hours=-14)))
HUGE = 10**5000


def recommendation(**changes: Any) -> Call:
    data = {**RECOMMENDATION, "evidence_count": 1, **changes}
    return rec(event_type="recommendation.generated", entity_type="recommendation", data=data)


def risk(**changes: Any) -> Call:
    return rec(event_type="risk.rejected", entity_type="risk_evaluation", data={**RISK, **changes})


def many(events: Any) -> Call:
    return lambda r: r.record_many(events)


def spec(**changes: Any) -> dict[str, Any]:
    """One record_many event (order.accepted) with some arguments changed."""
    return {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": uuid.uuid4(),
        "data": ACCEPTED,
        **changes,
    }


def now(make: Callable[[AuditRepository], Any]) -> Call:
    """A call that raises at once, before any await (constructors, stream())."""

    async def call(r: AuditRepository) -> Any:
        return make(r)

    return call


def constructed_nan() -> RecommendationPayload:
    # model_construct skips every validator: the repository must not trust it.
    return RecommendationPayload.model_construct(
        **RECOMMENDATION | {"confidence": float("nan")}, evidence_count=1, suppressed=False
    )


def copied_infinite() -> PositionChangePayload:
    valid = PositionChangePayload(
        ticker="X",
        side="buy",
        quantity_before=Decimal(1),
        quantity_after=Decimal(2),
        avg_entry_before=Decimal(1),
        avg_entry_after=Decimal(1),
    )
    return valid.model_copy(update={"quantity_after": Decimal("Infinity")})


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
    # -- text that is not Unicode: lone surrogates (UTF-8 cannot encode them)
    Case("lone surrogate in the actor", rec(actor="ops\ud800"), InvalidInputError,
         "actor", "'ops\\ud800'"),
    Case("lone surrogate in payload text", fill(broker_order_id="B\udc00"),
         InvalidPayloadError, "data.broker_order_id", "'B\\udc00'"),
    Case("lone surrogate in a ticker", fill(ticker="A\ud800"), InvalidPayloadError,
         "data.ticker", "'A\\ud800'"),
    Case("lone surrogate in a rejection reason", risk(rejection_reasons=["ok", "x\udfff"]),
         InvalidPayloadError, "data.rejection_reasons.1", "'x\\udfff'"),
    Case("lone surrogate in an idempotency key",
         lambda r: r.order_submitted(ORDER, "X", "buy", 1, "limit", "k\ud800"),
         InvalidPayloadError, "data.idempotency_key", "\\ud800"),
    Case("lone surrogate in a reviewer",
         lambda r: r.approval_reviewed(uuid.uuid4(), "X", True, reviewed_by="\udc80"),
         InvalidPayloadError, "data.reviewed_by", "'\\udc80'"),
    Case("search actor with a lone surrogate", search(actor="\ud800"), InvalidInputError,
         "actor", "'\\ud800'"),
    Case("search ticker with a lone surrogate", search(ticker="\ud800"), InvalidInputError,
         "ticker", "'\\ud800'"),
    # -- aware times that do not exist in UTC
    Case("occurred_at year 1 at +14:00", rec(occurred_at=YEAR_ONE_EAST), InvalidInputError,
         "occurred_at", "datetime.datetime(1, 1, 1"),
    Case("occurred_at datetime.max at -14:00", rec(occurred_at=LAST_WEST), InvalidInputError,
         "occurred_at", "datetime.datetime(9999, 12, 31"),
    Case("occurred_at text overflowing in UTC", rec(occurred_at="0001-01-01T05:00:00+09:00"),
         InvalidInputError, "occurred_at", "datetime.datetime(1, 1, 1, 5"),
    Case("expires_at overflowing in UTC", approval(expires_at=YEAR_ONE_EAST),
         InvalidPayloadError, "data.expires_at", "datetime.datetime(1, 1, 1"),
    Case("expires_at text overflowing in UTC", approval(expires_at="9999-12-31T23:00:00-05:00"),
         InvalidPayloadError, "data.expires_at", "9999"),
    Case("search since overflowing in UTC", search(since=YEAR_ONE_EAST), InvalidInputError,
         "since", "datetime.datetime(1, 1, 1"),
    Case("search until overflowing in UTC", search(until=LAST_WEST), InvalidInputError,
         "until", "datetime.datetime(9999"),
    # -- numbers no column or JSON text should hold
    Case("evidence count of 5000 digits", recommendation(evidence_count=HUGE),
         InvalidPayloadError, "data.evidence_count", "<an integer of 16610 bits>"),
    Case("check count beyond bigint", risk(check_count=2**63), InvalidPayloadError,
         "data.check_count", "9223372036854775808"),
    Case("quantity of 5000 digits as an int", fill(fill_quantity=HUGE), InvalidPayloadError,
         "data.fill_quantity", "data.fill_quantity"),
    Case("count as a float with a fraction", recommendation(evidence_count=1.5),
         InvalidPayloadError, "data.evidence_count", "1.5"),
    Case("confidence as text", recommendation(confidence="high"), InvalidPayloadError,
         "data.confidence", "'high'"),
    # -- payload models built around the validators
    Case("model_construct payload holding NaN",
         lambda r: r.record("recommendation.generated", "recommendation", ORDER,
                            constructed_nan()),
         InvalidPayloadError, "data.confidence", "nan"),
    Case("model_construct payload with a number for a ticker",
         lambda r: r.record("order.cancelled", "order", ORDER,
                            OrderCancelledPayload.model_construct(ticker=5, broker_order_id="B")),
         InvalidPayloadError, "data.ticker", "5"),
    Case("model_construct payload of the right type missing a field",
         lambda r: r.record("order.cancelled", "order", ORDER,
                            OrderCancelledPayload.model_construct(ticker="X")),
         InvalidPayloadError, "data.broker_order_id", "required field is missing"),
    Case("model_copy payload with an infinite amount",
         lambda r: r.record("position.updated", "position", ORDER, copied_infinite()),
         InvalidPayloadError, "data.quantity_after", "Infinity"),
    Case("payload keys that are not strings", rec(data={1: "AAPL"}), InvalidPayloadError,
         "data", "1"),
    Case("payload of None", rec(data=None), InvalidPayloadError, "data", "None"),
    # -- record_many
    Case("record_many of None", many(None), InvalidInputError, "events", "None"),
    Case("record_many of an integer", many(5), InvalidInputError, "events", "5"),
    Case("record_many of a string", many("order.accepted"), InvalidInputError,
         "events", "'order.accepted'"),
    Case("record_many of one event, not a list", many(spec()), InvalidInputError,
         "events", "event_type"),
    Case("record_many event not a mapping", many([spec(), 42]), InvalidInputError,
         "events[1].event", "42"),
    Case("record_many event with an unknown argument", many([spec(colour="red")]),
         InvalidInputError, "events[0].colour", "'red'"),
    Case("record_many event missing its payload",
         many([{k: v for k, v in spec().items() if k != "data"}]),
         InvalidInputError, "events[0].data", "None"),
    Case("record_many bad actor at position 2", many([spec(), spec(), spec(actor="")]),
         InvalidInputError, "events[2].actor", "''"),
    Case("record_many lone surrogate at position 1",
         many([spec(), spec(data={**ACCEPTED, "broker_order_id": "\ud800"})]),
         InvalidPayloadError, "events[1].data.broker_order_id", "'\\ud800'"),
    Case("record_many time overflowing in UTC", many([spec(occurred_at=LAST_WEST)]),
         InvalidInputError, "events[0].occurred_at", "9999"),
    Case("record_many correction of nothing", many([spec(corrects=ORDER)]),
         InvalidInputError, "events[0].corrects", str(ORDER)),
    Case("record_many reusing a stored id", many([spec(), spec(event_id=TAKEN)]),
         EventIdConflictError, "event_id", str(TAKEN)),
    Case("record_many one id for two events",
         many([spec(event_id=ORDER), spec(event_id=ORDER, actor="other")]),
         EventIdConflictError, "event_id", str(ORDER)),
    # -- corrections
    Case("correct an event never recorded", lambda r: r.correct(ORDER, ACCEPTED),
         InvalidInputError, "original_event_id", str(ORDER)),
    Case("correct a malformed id", lambda r: r.correct("nope", ACCEPTED), InvalidIdError,
         "original_event_id", "'nope'"),
    Case("correct with an invalid payload", lambda r: r.correct(TAKEN, {"ticker": "AAPL"}),
         InvalidPayloadError, "data.broker_order_id", "required field is missing"),
    Case("correct into an unknown event type",
         lambda r: r.correct(TAKEN, ACCEPTED, event_type="order.vanished"),
         UnknownEventTypeError, "event_type", "'order.vanished'"),
    Case("correct with a lone surrogate actor",
         lambda r: r.correct(TAKEN, ACCEPTED, actor="\udbff"), InvalidInputError,
         "actor", "'\\udbff'"),
    Case("correct with a time overflowing in UTC",
         lambda r: r.correct(TAKEN, ACCEPTED, occurred_at=YEAR_ONE_EAST), InvalidInputError,
         "occurred_at", "datetime.datetime(1, 1, 1"),
    Case("record correcting an event never recorded", rec(corrects=ORDER), InvalidInputError,
         "corrects", str(ORDER)),
    Case("record correcting itself", rec(event_id=ORDER, corrects=ORDER), InvalidInputError,
         "corrects", str(ORDER)),
    Case("corrections of a malformed id", lambda r: r.corrections("x"), InvalidIdError,
         "event_id", "'x'"),
    # -- every stage helper
    Case("recommendation_generated with a NaN confidence",
         lambda r: r.recommendation_generated(ORDER, "X", "buy", "paper", float("nan"), 1),
         InvalidPayloadError, "data.confidence", "nan"),
    Case("risk_evaluated with reasons as one string",
         lambda r: r.risk_evaluated(ORDER, None, "X", False, "paper", "too risky", 1),  # type: ignore[arg-type]
         InvalidPayloadError, "data.rejection_reasons", "'too risky'"),
    Case("order_submitted with a quantity in words",
         lambda r: r.order_submitted(ORDER, "X", "buy", "ten", "limit", "k-1"),
         InvalidPayloadError, "data.quantity", "'ten'"),
    Case("order_accepted with an oversized status",
         lambda r: r.order_accepted(ORDER, "X", "B-1", status="s" * 65),
         InvalidPayloadError, "data.status", "ssss"),
    Case("order_filled with an infinite price",
         lambda r: r.order_filled(ORDER, "X", "buy", 1, float("inf"), "B-1"),
         InvalidPayloadError, "data.fill_price", "inf"),
    Case("order_rejected with NUL in the reason",
         lambda r: r.order_rejected(ORDER, "X", "no\x00pe"),
         InvalidPayloadError, "data.reason", "'no\\x00pe'"),
    Case("order_cancelled with a malformed order id",
         lambda r: r.order_cancelled("order-7", "X", "B-1"),
         InvalidIdError, "entity_id", "'order-7'"),
    Case("duplicate_prevented with an empty label",
         lambda r: r.duplicate_prevented(ORDER, "X", "k-1", ""),
         InvalidPayloadError, "data.detected_via", "''"),
    Case("position_change with a NaN quantity",
         lambda r: r.position_change(ORDER, "X", "buy", 0, float("nan"), 0, 1),
         InvalidPayloadError, "data.quantity_after", "nan"),
    Case("position reversal given one event id",
         lambda r: r.position_change(ORDER, "X", "buy", 10, -5, 1, 1, event_id=uuid.uuid4()),
         InvalidInputError, "event_id", "omit it"),
    Case("approval_requested with an unparseable expiry",
         lambda r: r.approval_requested(ORDER, "X", "buy", 1, 100, expires_at="tomorrow"),
         InvalidPayloadError, "data.expires_at", "'tomorrow'"),
    Case("approval_reviewed with approved not a boolean",
         lambda r: r.approval_reviewed(ORDER, "X", "maybe"),  # type: ignore[arg-type]
         InvalidPayloadError, "data.approved", "'maybe'"),
    Case("approval_expired with an escape in the ticker",
         lambda r: r.approval_expired(ORDER, "X\x1b[0m"),
         InvalidPayloadError, "data.ticker", "'X\\x1b[0m'"),
    Case("trading_mode_changed to an empty mode",
         lambda r: r.trading_mode_changed(ORDER, "paper", ""),
         InvalidPayloadError, "data.new_mode", "''"),
    Case("trading_mode_changed by an oversized actor",
         lambda r: r.trading_mode_changed(ORDER, "paper", "live", actor="o" * 129),
         InvalidInputError, "actor", "oooo"),
    # -- reads: search, stream and the trails
    Case("search event types as an integer", search(event_types=123), InvalidInputError,
         "event_types", "123"),
    Case("search event types as bytes", search(event_types=b"order.filled"),
         InvalidInputError, "event_types", "b'order.filled'"),
    Case("search cursor as a boolean", search(after=True), InvalidInputError, "after", "True"),
    Case("search cursor of 30 digits", search(after="9" * 30), InvalidInputError,
         "after", "999"),
    Case("search cursor past bigint", search(after="9" * 19), InvalidInputError,
         "after", "'9999999999999999999'"),
    Case("search cursor integer past bigint", search(after=2**63), InvalidInputError,
         "after", "9223372036854775808"),
    Case("search limit as a boolean", search(limit=True), InvalidInputError, "limit", "True"),
    Case("stream chunk size zero", now(lambda r: r.stream(chunk_size=0)), InvalidInputError,
         "chunk_size", "0"),
    Case("stream chunk size as text", now(lambda r: r.stream(chunk_size="100")),
         InvalidInputError, "chunk_size", "'100'"),
    Case("stream with an unknown entity type", now(lambda r: r.stream(entity_type="wallet")),
         UnknownEntityTypeError, "entity_type", "'wallet'"),
    Case("stream with event types as an integer", now(lambda r: r.stream(event_types=7)),
         InvalidInputError, "event_types", "7"),
    Case("get with an integer", lambda r: r.get(12345), InvalidIdError, "event_id", "12345"),
    Case("order trail of None", lambda r: r.order_trail(None), InvalidIdError,
         "order_id", "None"),
    Case("entity trail with a malformed id", lambda r: r.entity_trail("order", "o-1"),
         InvalidIdError, "entity_id", "'o-1'"),
    # -- building a repository
    Case("repository with no payload cap",
         now(lambda r: AuditRepository(r.session, max_payload_bytes=None)),  # type: ignore[arg-type]
         InvalidInputError, "max_payload_bytes", "None"),
    Case("repository with a zero payload cap",
         now(lambda r: AuditRepository(r.session, max_payload_bytes=0)),
         InvalidInputError, "max_payload_bytes", "0"),
    Case("repository with a payload cap as text",
         now(lambda r: AuditRepository(r.session, max_payload_bytes="64k")),  # type: ignore[arg-type]
         InvalidInputError, "max_payload_bytes", "'64k'"),
    Case("repository on a URL instead of a session",
         now(lambda r: AuditRepository("postgresql://db/audit")),  # type: ignore[arg-type]
         InvalidInputError, "session", "'postgresql://db/audit'"),
    # -- retry policies (replay and call_with_retries): NaN passes every comparison
    Case("retry first delay NaN", now(lambda r: RetryPolicy(first_delay=float("nan"))),
         InvalidInputError, "first_delay", "nan"),
    Case("retry max delay infinite", now(lambda r: RetryPolicy(max_delay=float("inf"))),
         InvalidInputError, "max_delay", "inf"),
    Case("retry multiplier NaN", now(lambda r: RetryPolicy(multiplier=float("nan"))),
         InvalidInputError, "multiplier", "nan"),
    Case("retry jitter NaN", now(lambda r: RetryPolicy(jitter=float("nan"))),
         InvalidInputError, "jitter", "nan"),
    Case("retry first delay negative", now(lambda r: RetryPolicy(first_delay=-0.5)),
         InvalidInputError, "first_delay", "-0.5"),
    Case("retry first delay of a day", now(lambda r: RetryPolicy(first_delay=86_400)),
         InvalidInputError, "first_delay", "86400"),
    Case("retry attempts as text", now(lambda r: RetryPolicy(attempts="3")),  # type: ignore[arg-type]
         InvalidInputError, "attempts", "'3'"),
    Case("retry with a policy that is not one",
         lambda r: call_with_retries(lambda: r.get(ORDER), policy=3, action="x"),  # type: ignore[arg-type]
         InvalidInputError, "policy", "3"),
]
# fmt: on


def assert_typed(error: BaseException, case: Case | WriterCase) -> None:
    """The error is exactly the expected class and names the field and value, escaped."""
    message = str(error)
    assert type(error) is case.error, f"{type(error).__name__}: {message}"
    if isinstance(error, InvalidInputError):
        assert error.field == case.field
        assert message.startswith(case.field + ":"), message
    assert case.field in message, message
    assert case.shown in message, message
    assert not any(ord(ch) < 32 for ch in message)  # hostile bytes never reach a log raw
    assert "s3cret" not in message  # nor does a password


async def count_rows(session: AsyncSession) -> int:
    return int(await session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def all_kinds() -> list[str]:
    """Every kind of bad input the catalogue tries, one test id each."""
    return [
        *(case.kind for case in CASES),
        *(case.kind for case in WRITER_CASES),
        *(case.kind for case in BEST_EFFORT_CASES),
        *(case.kind for case in LIBRARY_CASES),
        *(case.kind for case in LINE_CASES),
        *(case.kind for case in CLI_CASES + URL_CASES),
        *(case.kind for case in OPTION_CASES),
    ]


def test_the_catalogue_is_large_enough() -> None:
    """The catalogue holds at least 100 distinct kinds, and every typed input error."""
    kinds = all_kinds()
    assert len(set(kinds)) == len(kinds) >= 100
    assert {case.error for case in CASES} >= {
        InvalidInputError,
        InvalidPayloadError,
        InvalidIdError,
        UnknownEventTypeError,
        UnknownEntityTypeError,
        EventIdConflictError,
    }


@pytest.mark.parametrize("case", CASES, ids=[case.kind for case in CASES])
async def test_bad_input_through_the_api(session: AsyncSession, case: Case) -> None:
    """Every argument of the repository: typed error, nothing written, session usable."""
    repo = AuditRepository(session, max_payload_bytes=256)
    await repo.order_accepted(uuid.uuid4(), "AAPL", "B-1", event_id=TAKEN)
    before = await count_rows(session)

    with pytest.raises(case.error) as info:
        await case.call(repo)

    assert_typed(info.value, case)
    # Nothing written, nothing pending, and the session goes on working.
    assert not session.new
    assert not session.dirty
    assert await count_rows(session) == before
    good = await repo.order_accepted(uuid.uuid4(), "AAPL", "B-1")
    assert await repo.get(good.id) == good
    assert await count_rows(session) == before + 1


# ------------------------------------------------------- writer, best effort


@dataclass(frozen=True)
class WriterCase:
    """A bad call on a writer or a best-effort repository (``target``) or its constructor."""

    kind: str
    call: Callable[[Any, AsyncEngine, Path], Awaitable[Any]]
    error: type[AuditError]
    field: str
    shown: str


def wrec(**kwargs: Any) -> Callable[[Any, AsyncEngine, Path], Awaitable[Any]]:
    """``target.record(order.accepted ...)`` with arguments replaced."""
    args: dict[str, Any] = {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": ORDER,
        "data": ACCEPTED,
    }
    args.update(kwargs)
    return lambda target, engine, tmp: target.record(**args)


def at_once(
    make: Callable[[Any, AsyncEngine, Path], Any],
) -> Callable[[Any, AsyncEngine, Path], Awaitable[Any]]:
    async def call(target: Any, engine: AsyncEngine, tmp: Path) -> Any:
        return make(target, engine, tmp)

    return call


def prepared_accepted(**changes: Any) -> Any:
    """A valid prepared event, changed by hand (as a caller could) past validation."""
    prepared = prepare_event("order.accepted", "order", uuid.uuid4(), ACCEPTED)
    return dataclasses.replace(prepared, **changes)


async def record_after_close(target: Any, engine: AsyncEngine, tmp: Path) -> Any:
    closed = AuditWriter(engine)
    await closed.close()
    return await closed.record("order.accepted", "order", ORDER, ACCEPTED)


# fmt: off
WRITER_CASES = [
    WriterCase("writer: lone surrogate in the actor", wrec(actor="\ud800"), InvalidInputError,
               "actor", "'\\ud800'"),
    WriterCase("writer: lone surrogate in payload text",
               wrec(data={**ACCEPTED, "broker_order_id": "\udfff"}), InvalidPayloadError,
               "data.broker_order_id", "'\\udfff'"),
    WriterCase("writer: time overflowing in UTC", wrec(occurred_at=YEAR_ONE_EAST),
               InvalidInputError, "occurred_at", "datetime.datetime(1, 1, 1"),
    WriterCase("writer: evidence count of 5000 digits",
               wrec(event_type="recommendation.generated", entity_type="recommendation",
                    data={**RECOMMENDATION, "evidence_count": HUGE}),
               InvalidPayloadError, "data.evidence_count", "bits>"),
    WriterCase("writer: model_construct payload holding NaN",
               wrec(event_type="recommendation.generated", entity_type="recommendation",
                    data=constructed_nan()),
               InvalidPayloadError, "data.confidence", "nan"),
    WriterCase("writer: correction of an event never recorded", wrec(corrects=ORDER),
               InvalidInputError, "corrects", str(ORDER)),
    WriterCase("writer: queueing a mapping as a prepared event",
               lambda target, engine, tmp: target.record_prepared(ACCEPTED),
               InvalidInputError, "event", "broker_order_id"),
    WriterCase("writer: a hand-built event with a lone surrogate",
               lambda target, engine, tmp: target.record_prepared(
                   dataclasses.replace(prepared_accepted(), actor="\udc00")),
               InvalidInputError, "actor", "'\\udc00'"),
    WriterCase("writer: a hand-built event with a time outside UTC",
               lambda target, engine, tmp: target.record_prepared(
                   dataclasses.replace(prepared_accepted(), occurred_at=LAST_WEST)),
               InvalidInputError, "occurred_at", "9999"),
    WriterCase("writer: recording after close", record_after_close, WriterClosedError,
               "the audit writer is closed", ""),
    WriterCase("writer: max_batch zero", at_once(lambda t, e, _: AuditWriter(e, max_batch=0)),
               InvalidInputError, "max_batch", "0"),
    WriterCase("writer: max_queue as a boolean",
               at_once(lambda t, e, _: AuditWriter(e, max_queue=True)),
               InvalidInputError, "max_queue", "True"),
    WriterCase("writer: max_delay NaN",
               at_once(lambda t, e, _: AuditWriter(e, max_delay=float("nan"))),
               InvalidInputError, "max_delay", "nan"),
    WriterCase("writer: max_delay infinite",
               at_once(lambda t, e, _: AuditWriter(e, max_delay=float("inf"))),
               InvalidInputError, "max_delay", "inf"),
    WriterCase("writer: no payload cap",
               at_once(lambda t, e, _: AuditWriter(e, max_payload_bytes=None)),
               InvalidInputError, "max_payload_bytes", "None"),
    WriterCase("writer: an engine that is a number", at_once(lambda t, e, _: AuditWriter(5)),
               InvalidInputError, "engine", "5"),
    WriterCase("writer: an empty URL", at_once(lambda t, e, _: AuditWriter("")),
               InvalidInputError, "engine", "''"),
    WriterCase("writer: a URL that is not one", at_once(lambda t, e, _: AuditWriter("db, please")),
               InvalidInputError, "engine", "'db, please'"),
    WriterCase("writer: a URL of another database, password hidden",
               at_once(lambda t, e, _: AuditWriter("mysql://app:s3cret@db/audit")),
               InvalidInputError, "engine", "'mysql://app:***@db/audit'"),
]
BEST_EFFORT_CASES = [
    WriterCase("best effort: lone surrogate in the actor", wrec(actor="a\udc00"),
               InvalidInputError, "actor", "'a\\udc00'"),
    WriterCase("best effort: lone surrogate in a ticker",
               wrec(data={**ACCEPTED, "ticker": "\ud834"}), InvalidPayloadError,
               "data.ticker", "'\\ud834'"),
    WriterCase("best effort: time overflowing in UTC", wrec(occurred_at=LAST_WEST),
               InvalidInputError, "occurred_at", "9999"),
    WriterCase("best effort: expiry overflowing in UTC",
               lambda t, e, _: t.approval_requested(ORDER, "X", "buy", 1, 2,
                                                    expires_at=YEAR_ONE_EAST),
               InvalidPayloadError, "data.expires_at", "datetime.datetime(1, 1, 1"),
    WriterCase("best effort: model_copy payload with an infinite amount",
               wrec(event_type="position.updated", entity_type="position",
                    data=copied_infinite()),
               InvalidPayloadError, "data.quantity_after", "Infinity"),
    WriterCase("best effort: helper with a count of 5000 digits",
               lambda t, e, _: t.recommendation_generated(ORDER, "X", "buy", "paper", 0.5, HUGE),
               InvalidPayloadError, "data.evidence_count", "bits>"),
    WriterCase("best effort: record_many of None",
               lambda t, e, _: t.record_many(None), InvalidInputError, "events", "None"),
    WriterCase("best effort: record_many with a lone surrogate",
               lambda t, e, _: t.record_many([spec(), spec(actor="\ud800")]),
               InvalidInputError, "events[1].actor", "'\\ud800'"),
    WriterCase("best effort: record_many of a hand-built event with a lone surrogate",
               lambda t, e, _: t.record_many([prepared_accepted(data_json='{"x": "\udfff"}')]),
               InvalidPayloadError, "events[0].data", "\\udfff"),
    WriterCase("best effort: record_many of a hand-built event with a naive time",
               lambda t, e, _: t.record_many([prepared_accepted(occurred_at=datetime(2026, 1, 1))]),
               InvalidInputError, "events[0].occurred_at", "datetime.datetime(2026, 1, 1"),
    WriterCase("best effort: correction of an event never recorded", wrec(corrects=ORDER),
               InvalidInputError, "corrects", str(ORDER)),
    WriterCase("best effort: no payload cap",
               at_once(lambda t, e, tmp: BestEffortRepository(t.session, tmp / "s",
                                                              max_payload_bytes=None)),
               InvalidInputError, "max_payload_bytes", "None"),
    WriterCase("best effort: spool path None",
               at_once(lambda t, e, tmp: BestEffortRepository(t.session, None)),
               InvalidInputError, "spool", "None"),
    WriterCase("best effort: spool path with NUL",
               at_once(lambda t, e, tmp: BestEffortRepository(t.session, "sp\x00ol")),
               InvalidInputError, "spool", "'sp\\x00ol'"),
]
# fmt: on


async def committed_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(AuditEvent)) or 0)


@pytest.mark.parametrize("case", WRITER_CASES, ids=[case.kind for case in WRITER_CASES])
async def test_bad_input_through_the_writer(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path, case: WriterCase
) -> None:
    """AuditWriter: bad input fails at once, queues nothing, and the writer goes on."""
    # A database of its own: the writer commits, and the shared one must stay as it was.
    _, engine = fresh_db
    async with AuditWriter(engine, max_payload_bytes=256) as writer:
        before = await committed_rows(engine)
        with pytest.raises(case.error) as info:
            await case.call(writer, engine, tmp_path)
        assert_typed(info.value, case)
        assert writer.queued == 0
        assert await committed_rows(engine) == before
        good = await writer.record("order.accepted", "order", uuid.uuid4(), ACCEPTED)
        assert good.seq > 0
    assert writer.stats.failed_batches == 0
    assert await committed_rows(engine) == before + 1


@pytest.mark.parametrize("case", BEST_EFFORT_CASES, ids=[c.kind for c in BEST_EFFORT_CASES])
async def test_bad_input_through_best_effort(
    session: AsyncSession, tmp_path: Path, case: WriterCase
) -> None:
    """BestEffortRepository: bad input raises (it is not an outage), nothing is spooled."""
    spool = tmp_path / "audit.spool"
    repo = BestEffortRepository(session, spool, max_payload_bytes=256)
    before = await count_rows(session)
    with pytest.raises(case.error) as info:
        await case.call(repo, session.bind, tmp_path)  # type: ignore[arg-type]
    assert_typed(info.value, case)
    assert not spool.exists() or spool.read_bytes() == b""
    assert await count_rows(session) == before
    good = await repo.order_accepted(uuid.uuid4(), "AAPL", "B-1")
    assert good.seq > 0  # written, not spooled: the session is still usable
    assert await count_rows(session) == before + 1
    assert not spool.exists() or spool.read_bytes() == b""


async def test_one_refused_event_fails_its_caller_alone_in_a_writer_group(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """AuditWriter: "one caller's bad input fails that caller alone", at the database too.

    Three events that only the database or its driver can refuse are queued
    among 200 good ones, built by hand past validation: one's JSON text is cut
    short, one holds a number too large for PostgreSQL's numeric, one has an
    entity id the driver cannot send as a UUID. Each fails its own caller; the
    200 others commit, in queue order.
    """
    _, engine = fresh_db
    ticker = f"P{uuid.uuid4().hex[:8].upper()}"
    good = [
        prepare_event("order.accepted", "order", uuid.uuid4(), {**ACCEPTED, "ticker": ticker})
        for _ in range(200)
    ]
    cut_short = dataclasses.replace(good[0], id=uuid.uuid4(), data_json='{"ticker": "X"')
    too_large = dataclasses.replace(good[0], id=uuid.uuid4(), data_json='{"n": 1e999999}')
    not_an_id = dataclasses.replace(good[0], id=uuid.uuid4(), entity_id="order-7")
    events = [*good[:60], cut_short, *good[60:150], too_large, *good[150:199], not_an_id, good[199]]
    async with AuditWriter(engine, max_delay=0.5) as writer:
        results = await asyncio.gather(
            *(writer.record_prepared(event) for event in events), return_exceptions=True
        )
    outcomes = dict(zip((event.id for event in events), results, strict=True))
    for refused in (cut_short, too_large, not_an_id):
        failure = outcomes.pop(refused.id)
        assert isinstance(failure, AuditStorageError), failure
        assert not isinstance(failure, AuditUnavailableError)
    records = list(outcomes.values())
    assert all(isinstance(record, AuditRecord) for record in records), records
    seqs = [record.seq for record in records if isinstance(record, AuditRecord)]
    assert seqs == sorted(seqs)  # queue order kept through the split
    assert writer.stats.refused_events == 3
    assert writer.stats.split_batches >= 1
    assert writer.stats.failed_batches == 0
    async with engine.connect() as conn:
        stored = await conn.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.ticker == ticker)
        )
    assert stored == 200


# ----------------------------- spool, replay, seal, verify, digest, export


async def replay(path: Any, engine: Any, **options: Any) -> Any:
    return await replay_spool(path, engine, **options)


async def export(engine: AsyncEngine, **options: Any) -> Any:
    return await export_events(engine, io.StringIO(), **options)


# fmt: off
LIBRARY_CASES = [
    WriterCase("spool path None", at_once(lambda t, e, tmp: Spool(None)),  # type: ignore[arg-type]
               InvalidInputError, "spool", "None"),
    WriterCase("spool path empty", at_once(lambda t, e, tmp: Spool("")), InvalidInputError,
               "spool", "''"),
    WriterCase("spool path a number", at_once(lambda t, e, tmp: Spool(7)),  # type: ignore[arg-type]
               InvalidInputError, "spool", "7"),
    WriterCase("replay chunk size as text",
               lambda t, e, tmp: replay(tmp / "s", e, chunk_size="10"),
               InvalidInputError, "chunk_size", "'10'"),
    WriterCase("replay chunk size huge", lambda t, e, tmp: replay(tmp / "s", e, chunk_size=10**6),
               InvalidInputError, "chunk_size", "1000000"),
    WriterCase("replay retry that is not a policy",
               lambda t, e, tmp: replay(tmp / "s", e, retry=5),
               InvalidInputError, "retry", "5"),
    WriterCase("replay with no payload cap",
               lambda t, e, tmp: replay(tmp / "s", e, max_payload_bytes=None),
               InvalidInputError, "max_payload_bytes", "None"),
    WriterCase("replay without an engine", lambda t, e, tmp: replay(tmp / "s", None),
               InvalidInputError, "engine", "None"),
    WriterCase("replay a spool path with NUL", lambda t, e, tmp: replay("s\x00p", e),
               InvalidInputError, "spool", "'s\\x00p'"),
    WriterCase("seal() block size zero", lambda t, e, tmp: seal(e, block_size=0),
               InvalidInputError, "block_size", "0"),
    WriterCase("seal block size as text", lambda t, e, tmp: seal(e, block_size="100"),
               InvalidInputError, "block_size", "'100'"),
    WriterCase("seal() max wait negative", lambda t, e, tmp: seal(e, max_wait=-1),
               InvalidInputError, "max_wait", "-1"),
    WriterCase("seal max wait as text", lambda t, e, tmp: seal(e, max_wait="soon"),
               InvalidInputError, "max_wait", "'soon'"),
    WriterCase("seal max wait NaN", lambda t, e, tmp: seal(e, max_wait=float("nan")),
               InvalidInputError, "max_wait", "nan"),
    WriterCase("seal max wait infinite", lambda t, e, tmp: seal(e, max_wait=float("inf")),
               InvalidInputError, "max_wait", "inf"),
    WriterCase("seal progress not callable", lambda t, e, tmp: seal(e, progress="bar"),
               InvalidInputError, "progress", "'bar'"),
    WriterCase("verify progress not callable", lambda t, e, tmp: verify(e, progress=5),
               InvalidInputError, "progress", "5"),
    WriterCase("verify clock tolerance NaN",
               lambda t, e, tmp: verify(e, clock_tolerance=float("nan")),
               InvalidInputError, "clock_tolerance", "nan"),
    WriterCase("verify schema empty", lambda t, e, tmp: verify(e, schema=""),
               InvalidInputError, "schema", "''"),
    WriterCase("verify schema with a lone surrogate", lambda t, e, tmp: verify(e, schema="a\ud800"),
               InvalidInputError, "schema", "'a\\ud800'"),
    WriterCase("grant to a role with a lone surrogate",
               lambda t, e, tmp: grant(e, writer="app\udcff"),
               InvalidInputError, "writer", "'app\\udcff'"),
    WriterCase("grant without an engine", lambda t, e, tmp: grant(None, reader="auditor"),
               InvalidInputError, "engine", "None"),
    WriterCase("migrate without an engine", lambda t, e, tmp: migrate.upgrade(None),
               InvalidInputError, "target", "None"),
    WriterCase("migrate to a revision that is a number",
               lambda t, e, tmp: migrate.upgrade(e, 3), InvalidInputError, "revision", "3"),
    WriterCase("migrate to a revision that does not exist",
               lambda t, e, tmp: migrate.upgrade(e, "ffffffffffff"), InvalidInputError,
               "revision", "'ffffffffffff'"),
    WriterCase("migrate to a revision with a lone surrogate",
               lambda t, e, tmp: migrate.downgrade(e, "\ud800"), InvalidInputError,
               "revision", "'\\ud800'"),
    WriterCase("seal without an engine", lambda t, e, tmp: seal("postgresql://x/y"),
               InvalidInputError, "engine", "'postgresql://x/y'"),
    WriterCase("verify() digest malformed", lambda t, e, tmp: verify(e, digest="12:xyz"),
               InvalidInputError, "digest", "'12:xyz'"),
    WriterCase("verify digest with SQL", lambda t, e, tmp: verify(e, digest=SQL),
               InvalidInputError, "digest", "DROP TABLE"),
    WriterCase("verify digest of bytes", lambda t, e, tmp: verify(e, digest=b"\x01" * 32),
               InvalidInputError, "digest", "b'\\x01"),
    WriterCase("verify() max problems zero", lambda t, e, tmp: verify(e, max_problems=0),
               InvalidInputError, "max_problems", "0"),
    WriterCase("verify without an engine", lambda t, e, tmp: verify(None),
               InvalidInputError, "engine", "None"),
    WriterCase("digest without an engine", lambda t, e, tmp: digest(42),
               InvalidInputError, "engine", "42"),
    WriterCase("export() format unknown", lambda t, e, tmp: export(e, format="xml"),
               InvalidInputError, "format", "'xml'"),
    WriterCase("export chunk size zero", lambda t, e, tmp: export(e, chunk_size=0),
               InvalidInputError, "chunk_size", "0"),
    WriterCase("export event types as an integer", lambda t, e, tmp: export(e, event_types=123),
               InvalidInputError, "event_types", "123"),
    WriterCase("export no event types", lambda t, e, tmp: export(e, event_types=[]),
               InvalidInputError, "event_types", "[]"),
    WriterCase("export() since overflowing in UTC",
               lambda t, e, tmp: export(e, since=YEAR_ONE_EAST),
               InvalidInputError, "since", "datetime.datetime(1, 1, 1"),
    WriterCase("export until naive", lambda t, e, tmp: export(e, until=datetime(2026, 1, 1)),
               InvalidInputError, "until", "datetime.datetime(2026, 1, 1"),
    WriterCase("export ticker with a lone surrogate",
               lambda t, e, tmp: export(e, ticker="A\udcff"),
               InvalidInputError, "ticker", "'A\\udcff'"),
    WriterCase("export order id malformed", lambda t, e, tmp: export(e, order_id="o-1"),
               InvalidIdError, "order_id", "'o-1'"),
    WriterCase("export from a URL",
               lambda t, e, tmp: export_events("postgresql://x/y", io.StringIO()),
               InvalidInputError, "source", "'postgresql://x/y'"),
    WriterCase("export into something not a stream",
               lambda t, e, tmp: export_events(e, str(tmp / "out.jsonl")),
               InvalidInputError, "out", "out.jsonl"),
    WriterCase("export progress not callable", lambda t, e, tmp: export(e, progress="bar"),
               InvalidInputError, "progress", "'bar'"),
]
# fmt: on


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=[case.kind for case in LIBRARY_CASES])
async def test_bad_input_to_spool_replay_seal_verify_and_export(
    engine: AsyncEngine, tmp_path: Path, case: WriterCase
) -> None:
    """Spool, replay_spool, seal, verify, digest, export_events: typed error, nothing done."""
    before = await committed_rows(engine)
    with pytest.raises(case.error) as info:
        await case.call(None, engine, tmp_path)
    assert_typed(info.value, case)
    assert os.listdir(tmp_path) == []  # no spool claimed, no file written
    assert await committed_rows(engine) == before
    async with engine.connect() as conn:  # the engine goes on working
        assert await conn.scalar(select(func.count()).select_from(AuditSeal)) is not None


@dataclass(frozen=True)
class LineCase:
    """A hostile spool line: how a good line is changed, and the field its rejection names."""

    kind: str
    change: Callable[[dict[str, Any]], str]
    field: str


def edit(**changes: Any) -> Callable[[dict[str, Any]], str]:
    """Change fields of the spooled event, then write the line."""

    def change(record: dict[str, Any]) -> str:
        record["event"].update(changes)
        return dumps_exact(record)

    return change


def raw(text: str) -> Callable[[dict[str, Any]], str]:
    """Replace part of the line's JSON text (escapes a JSON writer would never emit)."""
    old, new = text.split("=>")
    return lambda record: dumps_exact(record).replace(old, new)


# fmt: off
LINE_CASES = [
    LineCase("spool line: escaped lone surrogate in the actor",
             raw('"actor":"system"=>"actor":"sys\\ud800tem"'), "lone surrogate"),
    LineCase("spool line: escaped lone surrogate in payload text",
             raw('"broker_order_id":"B-1"=>"broker_order_id":"B\\udfff"'), "lone surrogate"),
    LineCase("spool line: time overflowing in UTC",
             edit(occurred_at="0001-01-01T00:00:00+14:00"), "occurred_at"),
    LineCase("spool line: count of 5000 digits",
             raw('"ticker":"AAPL","broker_order_id"=>"ticker":"AAPL","n":1' + "0" * 5000
                 + ',"broker_order_id"'), "corrupt line"),
    LineCase("spool line: NaN in the payload",
             raw('"broker_order_id":"B-1"=>"broker_order_id":NaN'), "NaN or infinite"),
    LineCase("spool line: Infinity in the payload",
             raw('"status":null=>"status":-Infinity'), "NaN or infinite"),
    LineCase("spool line: unknown event type", edit(event_type="order.exploded"), "event_type"),
    LineCase("spool line: actor of the wrong type", edit(actor=["root"]), "actor"),
    LineCase("spool line: payload not an object",
             lambda record: dumps_exact({**record, "event": {**record["event"], "data": [1]}}),
             "data"),
    LineCase("spool line: event id differs from its record",
             lambda record: dumps_exact({**record, "event_id": str(uuid.uuid4())}), "event_id"),
    LineCase("spool line: entity id with SQL", edit(entity_id=SQL), "entity_id"),
    LineCase("spool line: control characters in the actor", edit(actor="ops\x1b[2J"), "actor"),
    LineCase("spool line: not JSON", lambda record: "{not json", "corrupt line"),
    LineCase("spool line: a JSON array", lambda record: "[1, 2, 3]", "corrupt line"),
    LineCase("spool line: deeply nested JSON", lambda record: "[" * 100_000 + "]" * 100_000,
             "corrupt line"),
]
# fmt: on


@pytest.mark.parametrize("case", LINE_CASES, ids=[case.kind for case in LINE_CASES])
async def test_hostile_spool_lines_are_rejected_by_replay(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path, case: LineCase
) -> None:
    """replay_spool: a spool is a file anyone could edit; a hostile line is rejected alone.

    The line is never written, the report names it (with the field at fault),
    and the good lines around it are written.
    """
    _, engine = fresh_db
    path = tmp_path / "audit.spool"
    spool = Spool(path)
    events = [
        prepare_event("order.accepted", "order", uuid.uuid4(), {**ACCEPTED, "ticker": "AAPL"})
        for _ in range(3)
    ]
    spool.append_events(events, "the database was down")
    first, hostile, last = path.read_text().splitlines()
    path.write_text(
        "\n".join([first, case.change(loads_exact(hostile)), last]) + "\n", encoding="utf-8"
    )

    report = await replay_spool(path, engine, retry=RetryPolicy(attempts=1))

    assert not report.ok
    assert report.written == 2
    assert [problem.line for problem in report.rejected] == [2]
    assert case.field in report.rejected[0].reason, report.rejected[0].reason
    async with engine.connect() as conn:
        stored = set(await conn.scalars(select(AuditEvent.id)))
    assert stored == {events[0].id, events[2].id}


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
    CliCase("trail id empty", ["trail", ""], InvalidIdError, "ORDER_ID", "''"),
    CliCase("trail id from undecodable bytes", ["trail", "\udcff"], InvalidIdError,
            "ORDER_ID", "'\\udcff'"),
    CliCase("trail id too long", ["trail", str(ORDER) + "0"], InvalidIdError, "ORDER_ID",
            str(ORDER) + "0"),
    CliCase("export since overflowing in UTC", ["export", "--since", "0001-01-01T00:00+14:00"],
            InvalidInputError, "--since", "'0001-01-01T00:00+14:00'"),
    CliCase("export until overflowing in UTC", ["export", "--until", "9999-12-31T23:00-05:00"],
            InvalidInputError, "--until", "'9999-12-31T23:00-05:00'"),
    CliCase("export until before since",
            ["export", "--since", "2026-02-01", "--until", "2026-01-01"],
            InvalidInputError, "until", "2026", "--until"),
    CliCase("export since a month thirteen", ["export", "--since", "2026-13-01"],
            InvalidInputError, "--since", "'2026-13-01'"),
    CliCase("export ticker from undecodable bytes", ["export", "--ticker", "A\udcff"],
            InvalidInputError, "ticker", "'A\\udcff'", "--ticker"),
    CliCase("export order id of the nil UUID with junk", ["export", "--order", "0" * 33],
            InvalidIdError, "--order", "'000"),
    CliCase("verify digest malformed", ["verify", "--digest", "12:xyz"], InvalidInputError,
            "digest", "'12:xyz'", "--digest"),
    CliCase("verify max problems zero", ["verify", "--max-problems", "0"], InvalidInputError,
            "max_problems", "0", "--max-problems"),
    CliCase("seal block size zero", ["seal", "--block-size", "0"], InvalidInputError,
            "block_size", "0", "--block-size"),
    CliCase("seal max wait negative", ["seal", "--max-wait", "-1"], InvalidInputError,
            "max_wait", "-1", "--max-wait"),
    CliCase("grant a role name with SQL", ["grant", "--writer", "app; DROP ROLE x"],
            InvalidInputError, "writer", "DROP ROLE", "--writer"),
    CliCase("grant to PUBLIC", ["grant", "--reader", "public"], InvalidInputError,
            "reader", "'public'", "--reader"),
    CliCase("grant to a role from undecodable bytes", ["grant", "--sealer", "s\udcff"],
            InvalidInputError, "sealer", "'s\\udcff'", "--sealer"),
    CliCase("export into a directory that does not exist",
            ["export", "-o", "{tmp}/missing/out.jsonl"], InvalidInputError, "--output",
            # The path itself may be cut short in the message (it is shown bounded).
            "does not exist"),
    CliCase("export onto a directory", ["export", "-o", "{tmp}"], InvalidInputError,
            "--output", "{tmp}"),
    CliCase("export onto a character device", ["export", "-o", "/dev/null"],
            InvalidInputError, "--output", "'/dev/null'"),
    CliCase("replay a spool in a directory that does not exist",
            ["replay", "{tmp}/missing/audit.spool"], AuditSpoolError, "spool",
            "missing/audit.spool"),
]
URL_CASES = [
    CliCase("database URL not a URL", ["--database-url", "not a url", "trail", str(ORDER)],
            InvalidInputError, "--database-url", "'not a url'"),
    CliCase("database URL of another database",
            ["--database-url", "mysql://trader:s3cret@db/prod", "trail", str(ORDER)],
            InvalidInputError, "--database-url", "mysql://trader:***@db/prod"),
    CliCase("database URL empty, as from an unset variable",
            ["--database-url", "", "verify"], InvalidInputError, "--database-url", "''"),
    CliCase("database URL of spaces", ["--database-url", "  ", "digest"], InvalidInputError,
            "--database-url", "'  '"),
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
    """audit-orm: the library's typed error, then exit 2 with a message naming the option."""
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


@dataclass(frozen=True)
class OptionCase:
    """A command line argparse itself refuses: exit 2, a message naming the option."""

    kind: str
    argv: list[str]
    option: str


# fmt: off
OPTION_CASES = [
    OptionCase("replay chunk size not a number", ["replay", "s", "--chunk-size", "x"],
               "--chunk-size"),
    OptionCase("replay attempts not a number", ["replay", "s", "--attempts", "1.5"],
               "--attempts"),
    OptionCase("seal block size not a number", ["seal", "--block-size", "1e3"], "--block-size"),
    OptionCase("seal max wait not a number", ["seal", "--max-wait", "soon"], "--max-wait"),
    OptionCase("verify max problems not a number", ["verify", "--max-problems", "all"],
               "--max-problems"),
    OptionCase("export format unknown", ["export", "--format", "xml"], "--format"),
    OptionCase("export option missing its value", ["export", "--since"], "--since"),
    OptionCase("an option no command has", ["export", "--colour", "red"], "--colour"),
    OptionCase("a command that does not exist", ["obliterate"], "COMMAND"),
    OptionCase("trail without an order id", ["trail"], "ORDER_ID"),
    OptionCase("replay without a spool", ["replay"], "SPOOL"),
    OptionCase("an escape in an unknown option", ["digest", "--x\x1b[2J"], "--x\\x1b[2J"),
]
# fmt: on


def test_an_empty_database_url_variable_is_refused(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """audit-orm: AUDIT_ORM_DATABASE_URL set but empty is refused, not the embedded server.

    Falling back would let ``verify`` vouch for an empty database the operator
    never meant to check.
    """
    monkeypatch.setenv("AUDIT_ORM_DATABASE_URL", "")
    out = io.StringIO()
    assert main(["verify"], out) == 2
    err = capfd.readouterr().err
    assert "AUDIT_ORM_DATABASE_URL" in err and "empty" in err, err
    assert out.getvalue() == ""


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c.kind for c in OPTION_CASES])
async def test_bad_options_through_the_cli(
    db_url: str, engine: AsyncEngine, case: OptionCase, capfd: pytest.CaptureFixture[str]
) -> None:
    """audit-orm: options argparse refuses exit 2 naming the option, before any connection."""
    async with engine.connect() as conn:
        before = await conn.scalar(select(func.count()).select_from(AuditEvent))
    out = io.StringIO()
    with pytest.raises(SystemExit) as info:
        await asyncio.to_thread(main, ["--database-url", db_url, *case.argv], out)
    err = capfd.readouterr().err
    assert info.value.code == 2
    assert case.option in err, err
    assert "error:" in err
    assert "\x1b" not in err
    assert out.getvalue() == ""
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(AuditEvent)) == before
