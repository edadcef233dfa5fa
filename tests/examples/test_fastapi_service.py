"""The FastAPI example, driven over HTTP in-process against a real database."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditEvent
from examples.fastapi_service.app import Order, create_app, prepare_database
from tests.dbutil import scratch_database


@pytest.fixture(scope="module")
async def service(admin_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine]]:
    async with scratch_database(admin_url) as (_, engine):
        await prepare_database(engine)
        app = create_app(engine, prepare=False)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
            yield client, engine


def exact(response: httpx.Response) -> Any:
    return json.loads(response.text, parse_float=Decimal)


async def submit(client: httpx.AsyncClient, key: str, quantity: str = "10") -> httpx.Response:
    # Numbers as JSON numbers, as most clients send them.
    body = (
        f'{{"ticker": "AAPL", "side": "buy", "quantity": {quantity}, "idempotency_key": "{key}"}}'
    )
    return await client.post("/orders", content=body, headers={"content-type": "application/json"})


async def fill(
    client: httpx.AsyncClient, order_id: str, quantity: str, price: str
) -> httpx.Response:
    body = (
        f'{{"fill_quantity": {quantity}, "fill_price": {price}, "broker_order_id": "B-7", '
        f'"executed_at": "2026-11-30T14:30:00.250000-05:00"}}'
    )
    return await client.post(
        f"/orders/{order_id}/fills", content=body, headers={"content-type": "application/json"}
    )


async def committed(engine: AsyncEngine, order_id: uuid.UUID | str) -> tuple[Any, list[str]]:
    """What another connection sees: the order row and the order's audit event types."""
    async with AsyncSession(engine) as session:
        order = await session.get(Order, uuid.UUID(str(order_id)))
        kinds = (
            await session.scalars(
                select(AuditEvent.event_type)
                .where(AuditEvent.order_id == uuid.UUID(str(order_id)))
                .order_by(AuditEvent.seq)
            )
        ).all()
    return order, list(kinds)


async def test_submit_fill_and_read_the_trail(
    service: tuple[httpx.AsyncClient, AsyncEngine],
) -> None:
    client, engine = service
    response = await submit(client, f"k-{uuid.uuid4()}", "10.50")
    assert response.status_code == 201, response.text
    order_id = exact(response)["order_id"]
    assert exact(response)["quantity"] == Decimal("10.50")

    response = await fill(client, order_id, "4", "187.1250")
    assert response.status_code == 200, response.text
    assert exact(response)["status"] == "partial"
    response = await fill(client, order_id, "6.50", "12345678901234.123456789")
    assert exact(response)["status"] == "filled"

    response = await client.get(f"/orders/{order_id}/trail")
    assert response.status_code == 200
    trail = exact(response)
    assert [e["event_type"] for e in trail] == ["order.submitted", "order.filled", "order.filled"]
    # Digit for digit through HTTP, the repository and JSONB, and back.
    assert [e["data"]["fill_price"] for e in trail[1:]] == [
        Decimal("187.1250"),
        Decimal("12345678901234.123456789"),
    ]
    assert '"fill_price":187.1250' in response.text
    assert trail[1]["occurred_at"] == "2026-11-30T19:30:00.250000+00:00"

    order, kinds = await committed(engine, order_id)
    assert order.filled_quantity == order.quantity == Decimal("10.5")
    assert kinds == ["order.submitted", "order.filled", "order.filled"]


async def test_failed_fill_commits_neither_the_change_nor_its_event(
    service: tuple[httpx.AsyncClient, AsyncEngine],
) -> None:
    client, engine = service
    order_id = exact(await submit(client, f"k-{uuid.uuid4()}", "5"))["order_id"]
    assert (await fill(client, order_id, "3", "10")).status_code == 200
    before, kinds_before = await committed(engine, order_id)

    # 3 + 4 > 5: the table refuses it at flush, after the audit event was written.
    response = await fill(client, order_id, "4", "10")
    assert response.status_code == 409
    after, kinds_after = await committed(engine, order_id)
    assert (after.filled_quantity, after.status) == (before.filled_quantity, before.status)
    assert kinds_after == kinds_before == ["order.submitted", "order.filled"]


async def test_duplicate_submission_keeps_nothing_but_records_the_prevention(
    service: tuple[httpx.AsyncClient, AsyncEngine],
) -> None:
    client, engine = service
    key = f"k-{uuid.uuid4()}"
    first = exact(await submit(client, key))["order_id"]

    response = await submit(client, key)
    assert response.status_code == 409
    assert first in response.text
    async with AsyncSession(engine) as session:
        orders = await session.scalar(
            select(func.count()).select_from(Order).where(Order.idempotency_key == key)
        )
        submitted = await session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(
                AuditEvent.event_type == "order.submitted",
                AuditEvent.data["idempotency_key"].astext == key,
            )
        )
    # Neither the second order nor its order.submitted event was committed ...
    assert (orders, submitted) == (1, 1)
    # ... and the prevention, written in a transaction of its own, was.
    _, kinds = await committed(engine, first)
    assert kinds == ["order.submitted", "order.duplicate_prevented"]


async def test_refusals(service: tuple[httpx.AsyncClient, AsyncEngine]) -> None:
    client, engine = service
    async with AsyncSession(engine) as session:
        events_before = await session.scalar(select(func.count()).select_from(AuditEvent))

    # Refused by audit_orm (a ticker longer than an audit ticker may be): 422 naming the field.
    body = {"ticker": "X" * 40, "side": "buy", "quantity": "1", "idempotency_key": "long"}
    response = await client.post("/orders", json=body)
    assert response.status_code == 422
    assert response.json()["field"] == "data.ticker"
    # Refused by the request model.
    body = {"ticker": "AAPL", "side": "short", "quantity": "1", "idempotency_key": "side"}
    assert (await client.post("/orders", json=body)).status_code == 422
    # No such order.
    assert (await fill(client, str(uuid.uuid4()), "1", "1")).status_code == 404
    assert (await client.get(f"/orders/{uuid.uuid4()}/trail")).status_code == 404

    async with AsyncSession(engine) as session:
        assert await session.scalar(select(func.count()).select_from(AuditEvent)) == events_before
        keys = (await session.scalars(select(Order.idempotency_key))).all()
    assert "long" not in keys and "side" not in keys
