"""Corrections: a new event that references the one it corrects; the original stays."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from sqlalchemy import func, select

from audit_orm import AuditEvent, AuditEventType, AuditRepository, InvalidInputError


async def _count(repo: AuditRepository) -> int:
    return int(
        (await repo.session.execute(select(func.count()).select_from(AuditEvent))).scalar_one()
    )


async def test_correct_writes_a_new_event_and_keeps_the_original(repo: AuditRepository) -> None:
    order, rec = uuid.uuid4(), uuid.uuid4()
    await repo.order_submitted(order, "AAPL", "buy", 10, "market", "k-1", rec)
    wrong = await repo.order_filled(order, "AAPL", "buy", 10, "150.25", "brk-1")

    fixed = await repo.correct(
        wrong.id,
        {
            "ticker": "AAPL",
            "side": "buy",
            "fill_quantity": 10,
            "fill_price": "150.52",
            "broker_order_id": "brk-1",
        },
        actor="ops:alice",
    )

    assert fixed.id != wrong.id
    assert fixed.corrects_id == wrong.id
    assert fixed.event_type is AuditEventType.ORDER_FILLED
    assert (fixed.entity_type, fixed.entity_id) == (wrong.entity_type, wrong.entity_id)
    assert fixed.order_id == order
    assert fixed.actor == "ops:alice"
    assert fixed.seq > wrong.seq
    assert fixed.data["fill_price"] == Decimal("150.52")
    assert fixed.to_dict()["corrects_id"] == str(wrong.id)

    original = await repo.get(wrong.id)
    assert original == wrong
    assert original is not None and original.corrects_id is None
    assert original.data["fill_price"] == Decimal("150.25")
    assert await repo.corrections(wrong.id) == [fixed]
    # The order's trail shows both, in recorded order.
    trail = await repo.order_trail(order)
    assert [r.id for r in trail][-2:] == [wrong.id, fixed.id]


async def test_a_correction_may_change_the_type_and_be_corrected_itself(
    repo: AuditRepository,
) -> None:
    order = uuid.uuid4()
    wrong = await repo.order_filled(order, "MSFT", "sell", 5, "300", "brk-9")
    first = await repo.correct(
        wrong.id,
        {"ticker": "MSFT", "reason": "broker reversed the fill", "rejection_source": "broker"},
        event_type="order.rejected",
    )
    second = await repo.correct(
        first.id,
        {"ticker": "MSFT", "reason": "broker rejected the order", "rejection_source": "broker"},
    )
    assert first.event_type is AuditEventType.ORDER_REJECTED
    assert second.event_type is AuditEventType.ORDER_REJECTED
    assert second.corrects_id == first.id
    assert await repo.corrections(wrong.id) == [first]
    assert await repo.corrections(first.id) == [second]


async def test_record_accepts_corrects_and_stage_helpers_pass_it(repo: AuditRepository) -> None:
    order = uuid.uuid4()
    wrong = await repo.order_accepted(order, "NVDA", "brk-1")
    fixed = await repo.order_accepted(order, "NVDA", "brk-2", corrects=str(wrong.id))
    assert fixed.corrects_id == wrong.id
    # An idempotent retry of the correction returns it, not a second row.
    again = await repo.record(
        "order.accepted",
        "order",
        order,
        {"ticker": "NVDA", "broker_order_id": "brk-2"},
        event_id=fixed.id,
        actor="broker_service",
        corrects=wrong.id,
    )
    assert again == fixed


async def test_correcting_nothing_is_refused_and_writes_nothing(repo: AuditRepository) -> None:
    before = await _count(repo)
    missing = uuid.uuid4()
    with pytest.raises(InvalidInputError, match="original_event_id") as caught:
        await repo.correct(missing, {"ticker": "X", "broker_order_id": "b"})
    assert caught.value.value == missing
    with pytest.raises(InvalidInputError, match="corrects"):
        await repo.order_accepted(uuid.uuid4(), "X", "b", corrects=missing)
    with pytest.raises(InvalidInputError, match="corrects"):
        await repo.order_accepted(uuid.uuid4(), "X", "b", corrects="not-a-uuid")
    own = uuid.uuid4()
    with pytest.raises(InvalidInputError, match="cannot correct itself"):
        await repo.order_accepted(uuid.uuid4(), "X", "b", event_id=own, corrects=own)
    assert await _count(repo) == before


async def test_an_invalid_corrected_payload_is_refused(repo: AuditRepository) -> None:
    wrong = await repo.order_accepted(uuid.uuid4(), "X", "b")
    before = await _count(repo)
    with pytest.raises(InvalidInputError, match="fill_price"):
        await repo.correct(wrong.id, {"ticker": "X", "broker_order_id": "b", "fill_price": "1"})
    assert await _count(repo) == before
