"""The order trail collects the whole decision chain, and nothing else."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository


async def make_chain(repo: AuditRepository, ticker: str) -> tuple[uuid.UUID, uuid.UUID]:
    rec, evaluation, approval, order = (uuid.uuid4() for _ in range(4))
    await repo.recommendation_generated(rec, ticker, "buy", "live", 0.9, 3)
    await repo.risk_evaluated(evaluation, rec, ticker, True, "live", [], 7)
    await repo.approval_requested(approval, ticker, "buy", 5, "500.5", rec)
    await repo.approval_reviewed(approval, ticker, True)
    await repo.order_submitted(order, ticker, "buy", 5, "limit", "key-" + ticker, rec, evaluation)
    await repo.order_accepted(order, ticker, "BRK-1")
    await repo.order_filled(order, ticker, "buy", 5, "100.1", "BRK-1")
    await repo.position_change(order, ticker, "buy", 0, 5, 0, "100.1")
    return rec, order


CHAIN = [
    "recommendation.generated",
    "risk.evaluated",
    "approval.requested",
    "approval.approved",
    "order.submitted",
    "order.accepted",
    "order.filled",
    "position.opened",
]


async def test_trail_is_the_whole_chain_in_recorded_order(repo: AuditRepository) -> None:
    rec, order = await make_chain(repo, "AAA")
    await make_chain(repo, "BBB")  # another chain must not leak in

    trail = await repo.order_trail(order)

    assert [r.event_type.value for r in trail] == CHAIN
    assert [r.seq for r in trail] == sorted(r.seq for r in trail)
    assert {r.ticker for r in trail} == {"AAA"}
    assert await repo.order_trail(order, rec) == trail


async def test_trail_of_an_order_without_recommendation(repo: AuditRepository) -> None:
    order = uuid.uuid4()
    await repo.order_submitted(order, "CCC", "sell", 2, "market", "k-ccc")
    await repo.order_rejected(order, "CCC", "insufficient margin")
    await make_chain(repo, "CCC")

    trail = await repo.order_trail(str(order))

    assert [r.event_type.value for r in trail] == ["order.submitted", "order.rejected"]


async def test_trail_of_an_unknown_order_is_empty(repo: AuditRepository) -> None:
    assert await repo.order_trail(uuid.uuid4()) == []


async def test_first_and_later_trails_of_a_session_agree(engine: AsyncEngine) -> None:
    """The first statement of a transaction goes through SQLAlchemy, later ones to the driver."""
    ticker = "T" + uuid.uuid4().hex[:8]
    async with AsyncSession(engine) as session:
        _rec, order = await make_chain(AuditRepository(session), ticker)
        await session.commit()
    async with AsyncSession(engine) as session:
        repo = AuditRepository(session)
        first = await repo.order_trail(order)
        later = await repo.order_trail(order)
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with AsyncSession(autocommit) as session:
        without_transaction = await AuditRepository(session).order_trail(order)
    assert [r.event_type.value for r in first] == CHAIN
    assert later == first
    assert without_transaction == first
