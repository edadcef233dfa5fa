"""The repository against a real PostgreSQL: every helper, every query."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditEvent,
    AuditEventType,
    AuditRepository,
    EntityType,
    EventIdConflictError,
    InvalidInputError,
    InvalidPayloadError,
)
from audit_orm.database import session_factory
from audit_orm.payloads import OrderFilledPayload, PositionChangePayload

E = AuditEventType


async def full_chain(repo: AuditRepository) -> dict[str, uuid.UUID]:
    ids = {k: uuid.uuid4() for k in ("rec", "eval", "approval", "order")}
    await repo.recommendation_generated(ids["rec"], "AAPL", "buy", "live", 0.9, 4)
    await repo.risk_evaluated(ids["eval"], ids["rec"], "AAPL", True, "live", [], 9)
    await repo.approval_requested(ids["approval"], "AAPL", "buy", 10, "1500.00", ids["rec"])
    await repo.approval_reviewed(ids["approval"], "AAPL", True, "alice", "ok")
    await repo.order_submitted(
        ids["order"], "AAPL", "buy", 10, "limit", "idem-1", ids["rec"], ids["eval"]
    )
    await repo.order_accepted(ids["order"], "AAPL", "BRK-1")
    await repo.order_filled(ids["order"], "AAPL", "buy", 10, Decimal("150.25"), "BRK-1")
    await repo.position_change(ids["order"], "AAPL", "buy", 0, 10, 0, Decimal("150.25"))
    return ids


async def test_order_trail_is_the_whole_chain_in_recorded_order(repo: AuditRepository) -> None:
    ids = await full_chain(repo)
    # Noise: another chain and an unrelated event must not leak in.
    await full_chain(repo)
    await repo.trading_mode_changed(uuid.uuid4(), "paper", "live")

    expected = [
        E.RECOMMENDATION_GENERATED,
        E.RISK_EVALUATED,
        E.APPROVAL_REQUESTED,
        E.APPROVAL_APPROVED,
        E.ORDER_SUBMITTED,
        E.ORDER_ACCEPTED,
        E.ORDER_FILLED,
        E.POSITION_OPENED,
    ]
    for trail in (
        await repo.order_trail(ids["order"]),
        await repo.order_trail(str(ids["order"]), str(ids["rec"])),
    ):
        assert [r.event_type for r in trail] == expected
        seqs = [r.seq for r in trail]
        assert seqs == sorted(seqs)
        assert len(set(seqs)) == len(seqs)
        assert trail[0].entity_id == ids["rec"]


async def test_every_helper_writes_its_event(repo: AuditRepository) -> None:
    order, rec, approval, cfg = (uuid.uuid4() for _ in range(4))
    written = [
        await repo.recommendation_generated(rec, "X", "buy", "paper", 0.5, 1),
        await repo.recommendation_generated(uuid.uuid4(), "X", "buy", "paper", 0.5, 1, True),
        await repo.risk_evaluated(uuid.uuid4(), rec, "X", True, "paper", [], 3),
        await repo.risk_evaluated(uuid.uuid4(), rec, "X", False, "none", ["limit"], 3),
        await repo.order_submitted(order, "X", "buy", 1, "market", "k"),
        await repo.order_accepted(order, "X", "B"),
        await repo.order_filled(order, "X", "buy", 1, 2, "B"),
        await repo.order_rejected(order, "X", "no funds", "risk"),
        await repo.order_cancelled(order, "X", "B"),
        await repo.duplicate_prevented(order, "X", "k", "redis"),
        *(await repo.position_change(order, "X", "buy", 0, 1, 0, 2)),
        *(await repo.position_change(order, "X", "buy", 1, 3, 2, 2)),
        *(await repo.position_change(order, "X", "sell", 3, 0, 2, 0)),
        await repo.approval_requested(approval, "X", "buy", 1, 2, rec, "2030-01-01T00:00:00Z"),
        await repo.approval_reviewed(approval, "X", True, "bob"),
        await repo.approval_reviewed(uuid.uuid4(), "X", False, "bob", "too big"),
        await repo.approval_expired(uuid.uuid4(), "X"),
        await repo.trading_mode_changed(cfg, "paper", "live", "carol"),
    ]
    assert {r.event_type for r in written} == set(AuditEventType)
    actors = {r.event_type: r.actor for r in written}
    assert actors[E.RECOMMENDATION_GENERATED] == "recommendation_worker"
    assert actors[E.RISK_REJECTED] == "risk_engine"
    assert actors[E.ORDER_FILLED] == "broker_service"
    assert actors[E.APPROVAL_APPROVED] == "bob"
    assert actors[E.APPROVAL_EXPIRED] == "system"
    assert actors[E.TRADING_MODE_CHANGED] == "carol"
    rejected = next(r for r in written if r.event_type is E.ORDER_REJECTED)
    assert rejected.data["rejection_source"] == "risk"
    # Read back: same rows, same data, typed payloads.
    for record in written:
        stored = await repo.get(record.id)
        assert stored == record
        assert type(stored.payload) is type(record.payload)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (0, 10, [E.POSITION_OPENED]),
        (0, -10, [E.POSITION_OPENED]),
        (-10, 0, [E.POSITION_CLOSED]),
        (10, 0, [E.POSITION_CLOSED]),
        (10, 15, [E.POSITION_UPDATED]),
        (-10, -4, [E.POSITION_UPDATED]),
        (10, -5, [E.POSITION_CLOSED, E.POSITION_OPENED]),
        (-5, 10, [E.POSITION_CLOSED, E.POSITION_OPENED]),
    ],
)
async def test_position_change_handles_shorts(
    repo: AuditRepository, before: int, after: int, expected: list[AuditEventType]
) -> None:
    records = await repo.position_change(uuid.uuid4(), "X", "sell", before, after, 10, 11)
    assert [r.event_type for r in records] == expected
    first = records[0].payload
    last = records[-1].payload
    assert isinstance(first, PositionChangePayload)
    assert isinstance(last, PositionChangePayload)
    assert first.quantity_before == before
    assert last.quantity_after == after
    if len(records) == 2:
        assert first.quantity_after == 0
        assert last.quantity_before == 0


async def test_position_change_zero_to_zero_refused(repo: AuditRepository) -> None:
    with pytest.raises(InvalidPayloadError):
        await repo.position_change(uuid.uuid4(), "X", "buy", 0, 0, 0, 0)


async def test_decimals_round_trip_exactly(repo: AuditRepository) -> None:
    order = uuid.uuid4()
    price = Decimal("123456789.123456789012345")
    written = await repo.order_filled(order, "X", "buy", Decimal("0.00000001"), price, "B")
    (stored,) = await repo.entity_trail(EntityType.ORDER, order)
    payload = stored.payload
    assert isinstance(payload, OrderFilledPayload)
    assert payload.fill_price == price
    assert str(payload.fill_price) == str(price)
    assert payload.fill_quantity == Decimal("0.00000001")
    assert stored.data == written.data


async def test_unicode_and_payload_model_instance(repo: AuditRepository) -> None:
    order = uuid.uuid4()
    model = OrderFilledPayload(
        ticker="7203.T",
        side="買い",
        fill_quantity=Decimal(1),
        fill_price=None,
        broker_order_id="注文-🚀",
    )
    await repo.record("order.filled", "order", order, model, actor="tokyo-gw")
    (stored,) = await repo.entity_trail("order", order)
    assert stored.payload == model


async def test_idempotent_event_id(repo: AuditRepository, session: AsyncSession) -> None:
    order, event_id = uuid.uuid4(), uuid.uuid4()
    first = await repo.order_accepted(order, "X", "B", event_id=event_id)
    again = await repo.order_accepted(order, "X", "B", event_id=str(event_id))
    assert again == first
    count = await session.scalar(
        select(func.count()).select_from(AuditEvent).where(AuditEvent.id == event_id)
    )
    assert count == 1
    with pytest.raises(EventIdConflictError):
        await repo.order_accepted(order, "X", "OTHER", event_id=event_id)


async def test_occurred_at_and_recorded_at(repo: AuditRepository) -> None:
    fill_time = datetime(2026, 3, 2, 14, 30, 0, 123456, tzinfo=UTC)
    fill = await repo.order_filled(uuid.uuid4(), "X", "buy", 1, 1, "B", occurred_at=fill_time)
    assert fill.occurred_at == fill_time
    assert fill.recorded_at > fill_time
    plain = await repo.order_accepted(uuid.uuid4(), "X", "B")
    assert plain.occurred_at == plain.recorded_at


async def test_recorded_at_is_database_clock(repo: AuditRepository, session: AsyncSession) -> None:
    record = await repo.order_accepted(uuid.uuid4(), "X", "B")
    db_now = await session.scalar(select(func.clock_timestamp()))
    assert db_now is not None
    assert timedelta(0) <= db_now - record.recorded_at < timedelta(seconds=5)


async def test_seq_is_assigned_by_the_database(session: AsyncSession) -> None:
    """A seq in the INSERT is ignored: the insert trigger draws the next number."""
    from sqlalchemy import text

    insert = (
        "INSERT INTO audit_events (id, seq, event_type, entity_type, entity_id, data,"
        " occurred_at) OVERRIDING SYSTEM VALUE VALUES (gen_random_uuid(), :seq, "
        "'order.accepted', 'order', gen_random_uuid(), '{}', now()) RETURNING seq"
    )
    first = await session.scalar(text(insert), {"seq": -1})
    second = await session.scalar(text(insert), {"seq": first})
    assert first >= 1 and second > first


async def test_rollback_leaves_no_audit_row(session: AsyncSession) -> None:
    repo = AuditRepository(session)
    order = uuid.uuid4()

    async def failing_business_change() -> None:
        async with session.begin_nested():
            await repo.order_submitted(order, "X", "buy", 1, "market", "k")
            raise RuntimeError("business change failed")

    with pytest.raises(RuntimeError):
        await failing_business_change()
    assert await repo.entity_trail("order", order) == []


async def test_commit_is_the_callers(engine: AsyncEngine) -> None:
    sessions = session_factory(engine)
    order = uuid.uuid4()
    async with sessions() as session:
        await AuditRepository(session).order_accepted(order, "X", "B")
        # Not committed: another connection cannot see it.
        async with sessions() as other:
            assert await AuditRepository(other).entity_trail("order", order) == []
        await session.commit()
    async with sessions() as other:
        assert len(await AuditRepository(other).entity_trail("order", order)) == 1


async def test_refused_write_leaves_session_usable(repo: AuditRepository) -> None:
    order = uuid.uuid4()
    with pytest.raises(InvalidPayloadError):
        await repo.record("order.filled", "order", order, {"ticker": "X"})
    with pytest.raises(InvalidInputError):
        await repo.order_filled(order, "X", "buy", 1, 1, "B", occurred_at=datetime(2026, 1, 1))
    assert not repo.session.new
    assert not repo.session.dirty
    await repo.order_accepted(order, "X", "B")
    assert len(await repo.entity_trail("order", order)) == 1


async def test_entity_trail_filters_entity_type(repo: AuditRepository) -> None:
    order = uuid.uuid4()
    await repo.order_submitted(order, "X", "buy", 1, "market", "k")
    await repo.position_change(order, "X", "buy", 0, 1, 0, 1)
    assert [r.event_type for r in await repo.entity_trail("order", order)] == [E.ORDER_SUBMITTED]
    assert [r.event_type for r in await repo.entity_trail("position", order)] == [E.POSITION_OPENED]


async def test_search_filters_and_keyset_pagination(repo: AuditRepository) -> None:
    ticker = f"T{uuid.uuid4().hex[:8]}"
    start = datetime.now(UTC) - timedelta(seconds=1)
    for i in range(7):
        await repo.order_accepted(uuid.uuid4(), ticker, f"B{i}", actor="gw-a" if i % 2 else "gw-b")
    await repo.order_cancelled(uuid.uuid4(), ticker, "C")

    seen = []
    page = await repo.search(ticker=ticker, limit=3)
    while True:
        seen.extend(page.records)
        if page.next_cursor is None:
            break
        page = await repo.search(ticker=ticker, limit=3, after=page.next_cursor)
    assert len(seen) == 8
    assert [r.seq for r in seen] == sorted(r.seq for r in seen)

    accepted = await repo.search(ticker=ticker, event_types=["order.accepted"])
    assert len(accepted.records) == 7
    by_actor = await repo.search(ticker=ticker, actor="gw-a", entity_type="order")
    assert {r.actor for r in by_actor.records} == {"gw-a"}
    assert len(by_actor.records) == 3
    window = await repo.search(ticker=ticker, since=start, until=datetime.now(UTC) + timedelta(1))
    assert len(window.records) == 8
    assert (await repo.search(ticker=ticker, until=start)).records == []
    one = seen[0]
    assert (await repo.search(order_id=one.order_id)).records == [one]


async def test_hostile_strings_are_just_data(repo: AuditRepository) -> None:
    hostile = "x'); DROP TABLE audit_events; --"
    order = uuid.uuid4()
    await repo.order_rejected(order, "X", hostile)
    assert (await repo.search(ticker="'; SELECT 1; --")).records == []
    (stored,) = await repo.entity_trail("order", order)
    assert stored.data["reason"] == hostile


async def test_to_dict_has_the_seed_shape(repo: AuditRepository) -> None:
    order = uuid.uuid4()
    record = await repo.order_filled(order, "X", "buy", 1, Decimal("2.50"), "B")
    out = record.to_dict()
    assert {"id", "event_type", "entity_type", "entity_id", "actor", "data", "created_at"} <= set(
        out
    )
    assert out["id"] == str(record.id)
    assert out["entity_id"] == str(order)
    assert out["event_type"] == "order.filled"
    assert datetime.fromisoformat(out["created_at"]) == record.occurred_at
    assert out["order_id"] == str(order)
    assert out["seq"] == record.seq
    assert '"fill_price":2.50' in record.to_json()
