"""The demo: realistic decision chains recorded and one read back as a timeline."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm.database import session_factory
from audit_orm.repository import AuditRepository


async def record_demo_chains(engine: AsyncEngine) -> dict[str, uuid.UUID]:
    """Record six chains, each committed with its own transaction.

    Returns the order id of each chain by name: ``filled``, ``risk_rejected``
    (no order: the recommendation id), ``approval_expired`` (the approval id),
    ``cancelled``, ``duplicate`` and ``short``.
    """
    sessions = session_factory(engine)
    ids: dict[str, uuid.UUID] = {}
    now = datetime.now(UTC)

    async with sessions() as session, session.begin():
        audit = AuditRepository(session)
        # 1. A live buy: recommendation, risk, operator approval, order, fill, position.
        rec, evaluation, approval, order = (uuid.uuid4() for _ in range(4))
        await audit.recommendation_generated(rec, "AAPL", "buy", "live", 0.87, 5)
        await audit.risk_evaluated(evaluation, rec, "AAPL", True, "live", [], 12)
        await audit.approval_requested(
            approval, "AAPL", "buy", 100, Decimal("18950.00"), rec, now + timedelta(minutes=5)
        )
        await audit.approval_reviewed(approval, "AAPL", True, "alice", "within limits")
        await audit.order_submitted(
            order, "AAPL", "buy", 100, "limit", f"idem-{order}", rec, evaluation
        )
        await audit.order_accepted(order, "AAPL", "BRK-1001", "accepted")
        await audit.order_filled(
            order,
            "AAPL",
            "buy",
            60,
            Decimal("189.49"),
            "BRK-1001",
            occurred_at=now + timedelta(seconds=1),
        )
        await audit.order_filled(
            order,
            "AAPL",
            "buy",
            40,
            Decimal("189.51"),
            "BRK-1001",
            occurred_at=now + timedelta(seconds=2),
        )
        await audit.position_change(order, "AAPL", "buy", 0, 100, 0, Decimal("189.498"))
        ids["filled"] = order

    async with sessions() as session, session.begin():
        audit = AuditRepository(session)
        # 2. Risk says no: the chain ends before any order.
        rec = uuid.uuid4()
        await audit.recommendation_generated(rec, "TSLA", "buy", "live", 0.64, 2)
        await audit.risk_evaluated(
            uuid.uuid4(),
            rec,
            "TSLA",
            False,
            "none",
            ["max_position_exceeded", "volatility_halt"],
            12,
        )
        ids["risk_rejected"] = rec

        # 3. Nobody reviewed the approval in time.
        rec, approval = uuid.uuid4(), uuid.uuid4()
        await audit.recommendation_generated(rec, "NVDA", "sell", "live", 0.71, 3)
        await audit.approval_requested(
            approval, "NVDA", "sell", 20, Decimal("9120.40"), rec, now + timedelta(minutes=5)
        )
        await audit.approval_expired(approval, "NVDA")
        ids["approval_expired"] = approval

        # 4. Submitted, accepted, then cancelled.
        order = uuid.uuid4()
        await audit.order_submitted(order, "MSFT", "buy", 10, "limit", f"idem-{order}")
        await audit.order_accepted(order, "MSFT", "BRK-1002")
        await audit.order_cancelled(order, "MSFT", "BRK-1002")
        ids["cancelled"] = order

        # 5. The same submission arrived twice; the second was stopped.
        order = uuid.uuid4()
        await audit.order_submitted(order, "AMZN", "buy", 5, "market", "idem-amzn-7")
        await audit.duplicate_prevented(order, "AMZN", "idem-amzn-7", "idempotency_key")
        await audit.order_rejected(order, "AMZN", "insufficient buying power", "broker")
        ids["duplicate"] = order

        # 6. A short sale that is later covered and flipped long.
        order = uuid.uuid4()
        await audit.order_submitted(order, "GME", "sell", 50, "market", f"idem-{order}")
        await audit.order_filled(order, "GME", "sell", 50, Decimal("24.10"), "BRK-1003")
        await audit.position_change(order, "GME", "sell", 0, -50, 0, Decimal("24.10"))
        flip = uuid.uuid4()
        await audit.order_submitted(flip, "GME", "buy", 80, "market", f"idem-{flip}")
        await audit.order_filled(flip, "GME", "buy", 80, Decimal("22.00"), "BRK-1004")
        await audit.position_change(flip, "GME", "buy", -50, 30, Decimal("24.10"), Decimal("22.00"))
        ids["short"] = order

        await audit.trading_mode_changed(uuid.uuid4(), "paper", "live", "ops-bob")
    return ids
