"""A small order service: submit an order, receive a broker fill, read a trail.

What it shows:

* handlers receive an :class:`~audit_orm.AuditRepository` by dependency
  injection, built on the request's session (FastAPI resolves ``get_session``
  once per request, so the repository and the handler share it);
* each handler owns its transaction: the business change and its audit event
  commit together, or neither does;
* an event that must survive the rollback (a prevented duplicate) is written in
  a transaction of its own, after the failed one;
* audit_orm's refusals (:class:`~audit_orm.InvalidInputError`) become HTTP 422,
  and numbers travel as exact JSON both ways.

Run it with any ASGI server, e.g. ``uvicorn examples.fastapi_service.app:app``;
the database comes from ``AUDIT_ORM_DATABASE_URL`` (else an embedded server).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.routing import APIRoute
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy import CheckConstraint, DateTime, Numeric, String, Uuid, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from audit_orm import AuditRepository, InvalidInputError, migrate
from audit_orm.database import create_engine
from audit_orm.jsonb import dumps_exact

# ----------------------------------------------------------------- the model


class ServiceBase(DeclarativeBase):
    """The service's own tables; audit_orm's live in their own metadata."""


class Order(ServiceBase):
    """An order as the service tracks it."""

    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    ticker: Mapped[str] = mapped_column(String(64), nullable=False)
    side: Mapped[str] = mapped_column(String(4), nullable=False)
    quantity: Mapped[Decimal] = mapped_column(Numeric(20, 8), nullable=False)
    filled_quantity: Mapped[Decimal] = mapped_column(
        Numeric(20, 8), nullable=False, default=Decimal(0)
    )
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    idempotency_key: Mapped[str] = mapped_column(String(128), nullable=False, unique=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        CheckConstraint("quantity > 0", name="orders_quantity_positive"),
        # The database has the last word on overfills, whatever a handler checked.
        CheckConstraint("filled_quantity <= quantity", name="orders_not_overfilled"),
    )


class SubmitOrder(BaseModel):
    """``POST /orders``. Decimals may be JSON numbers or strings; both are read exactly."""

    ticker: str
    side: Literal["buy", "sell"]
    quantity: Decimal = Field(gt=0)
    order_type: Literal["market", "limit"] = "market"
    idempotency_key: str = Field(min_length=1, max_length=128)
    recommendation_id: uuid.UUID | None = None


class BrokerFill(BaseModel):
    """``POST /orders/{order_id}/fills``: what the broker reports."""

    fill_quantity: Decimal = Field(gt=0)
    fill_price: Decimal = Field(gt=0)
    broker_order_id: str = Field(min_length=1)
    executed_at: AwareDatetime | None = None


# -------------------------------------------------------------- dependencies


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session, closed when the request ends."""
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    async with sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def get_audit(session: SessionDep) -> AuditRepository:
    """The audit repository on the request's session."""
    return AuditRepository(session)


AuditDep = Annotated[AuditRepository, Depends(get_audit)]


class ExactJSONRequest(Request):
    """A request whose JSON body reads numbers as :class:`~decimal.Decimal`.

    FastAPI parses bodies with the standard ``json`` module, which makes every
    number with a fraction a float: ``187.1250`` would arrive as ``187.125`` and
    a long quantity would lose digits before validation even starts.
    """

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=Decimal)
        return self._json


class ExactJSONRoute(APIRoute):
    """Routes whose handlers see :class:`ExactJSONRequest` (FastAPI's custom route recipe)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            return await original(ExactJSONRequest(request.scope, request.receive))

        return handler


def exact_json(payload: Any, status_code: int = 200) -> Response:
    """A JSON response whose decimals are written digit for digit."""
    return Response(dumps_exact(payload), status_code=status_code, media_type="application/json")


def order_view(order: Order) -> dict[str, Any]:
    return {
        "order_id": str(order.id),
        "ticker": order.ticker,
        "side": order.side,
        "quantity": order.quantity,
        "filled_quantity": order.filled_quantity,
        "status": order.status,
    }


# ------------------------------------------------------------------ handlers


async def submit_order(body: SubmitOrder, session: SessionDep, audit: AuditDep) -> Response:
    """Accept an order: its row and its ``order.submitted`` event, in one transaction."""
    order_id = uuid.uuid4()
    try:
        async with session.begin():
            await audit.order_submitted(
                order_id,
                body.ticker,
                body.side,
                body.quantity,
                body.order_type,
                body.idempotency_key,
                body.recommendation_id,
            )
            order = Order(
                id=order_id,
                ticker=body.ticker,
                side=body.side,
                quantity=body.quantity,
                filled_quantity=Decimal(0),
                status="submitted",
                idempotency_key=body.idempotency_key,
            )
            session.add(order)
            # The unique key refuses a second order for the same request; the
            # audit event above goes with the rollback.
            await session.flush()
    except IntegrityError:
        # A retried submission: nothing of it was kept. That a duplicate was
        # prevented is itself worth recording, so it gets its own transaction.
        async with session.begin():
            existing = await session.scalar(
                select(Order).where(Order.idempotency_key == body.idempotency_key)
            )
            if existing is None:
                raise
            await audit.duplicate_prevented(
                existing.id, existing.ticker, body.idempotency_key, "idempotency_key"
            )
        raise HTTPException(409, detail=f"order {existing.id} has this idempotency key") from None
    return exact_json(order_view(order), 201)


async def receive_fill(
    order_id: uuid.UUID, fill: BrokerFill, session: SessionDep, audit: AuditDep
) -> Response:
    """Apply a broker fill: the order's new state and its ``order.filled`` event, together."""
    try:
        async with session.begin():
            order = await session.get(Order, order_id, with_for_update=True)
            if order is None:
                raise HTTPException(404, detail=f"no order {order_id}")
            await audit.order_filled(
                order_id,
                order.ticker,
                order.side,
                fill.fill_quantity,
                fill.fill_price,
                fill.broker_order_id,
                occurred_at=fill.executed_at,
            )
            order.filled_quantity += fill.fill_quantity
            order.status = "filled" if order.filled_quantity == order.quantity else "partial"
            # An overfill breaks the table's CHECK here, after the event was
            # written: the rollback removes both.
            await session.flush()
    except IntegrityError:
        raise HTTPException(409, detail="the fill exceeds the order's open quantity") from None
    return exact_json(order_view(order))


async def read_trail(order_id: uuid.UUID, audit: AuditDep) -> Response:
    """The order's whole decision chain, in recorded order."""
    trail = await audit.order_trail(order_id)
    if not trail:
        raise HTTPException(404, detail=f"no audit events for order {order_id}")
    return exact_json([record.to_dict() for record in trail])


async def refused(request: Request, exc: Exception) -> Response:
    """audit_orm refused a value: the client sent it, so it is a 422 naming the field."""
    assert isinstance(exc, InvalidInputError)
    return exact_json({"detail": str(exc), "field": exc.field}, 422)


# ----------------------------------------------------------------------- app


async def prepare_database(engine: AsyncEngine) -> None:
    """Create the schema for the example.

    A real service migrates with its own Alembic environment including
    audit_orm's revisions (see the README, "Inside your application's Alembic").
    """
    await migrate.upgrade(engine)
    async with engine.begin() as conn:
        await conn.run_sync(ServiceBase.metadata.create_all)


def create_app(engine: AsyncEngine | None = None, *, prepare: bool = True) -> FastAPI:
    """The service on ``engine`` (default: one from ``AUDIT_ORM_DATABASE_URL``)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = engine is None
        eng = create_engine() if engine is None else engine
        if prepare:
            await prepare_database(eng)
        app.state.sessions = async_sessionmaker(eng, expire_on_commit=False)
        try:
            yield
        finally:
            if own:
                await eng.dispose()

    app = FastAPI(title="Orders with an audit trail", lifespan=lifespan)
    if engine is not None:
        # Usable without the lifespan too (an in-process test client).
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    router = APIRouter(route_class=ExactJSONRoute)
    router.add_api_route("/orders", submit_order, methods=["POST"], status_code=201)
    router.add_api_route("/orders/{order_id}/fills", receive_fill, methods=["POST"])
    router.add_api_route("/orders/{order_id}/trail", read_trail, methods=["GET"])
    app.include_router(router)
    app.add_exception_handler(InvalidInputError, refused)
    return app


app = create_app()
