"""Load: 64 concurrent producers, every write path mixed; zero lost, zero duplicated.

Each producer records whole order chains (submitted, accepted, filled, position
opened) through one write path: single writes in the caller's transaction,
``record_many`` batches, the shared ``AuditWriter``, best-effort writes, or own
transactions retried whole. Afterwards every event is present exactly once,
nothing else is in the table, and every order trail holds its chain, complete,
in the order it was recorded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from audit_orm import AuditEvent, AuditEventType, AuditRepository, BestEffortRepository
from audit_orm.database import session_factory
from audit_orm.repository import PreparedEvent, prepare_event
from audit_orm.retry import RetryPolicy, call_with_retries
from audit_orm.writer import AuditWriter
from tests.faultutil import business_database, event_counts, total_events

E = AuditEventType
PRODUCERS = 64
EVENTS_PER_PRODUCER = 200
CHAIN = [E.ORDER_SUBMITTED, E.ORDER_ACCEPTED, E.ORDER_FILLED, E.POSITION_OPENED]


def order_chain(producer: int, number: int) -> list[PreparedEvent]:
    """The four events of one order, validated, with their ids."""
    order = uuid.uuid4()
    ticker = f"P{producer:02d}"
    price = Decimal(f"{100 + producer}.{number:03d}0")
    return [
        prepare_event(
            E.ORDER_SUBMITTED,
            "order",
            order,
            {
                "ticker": ticker,
                "side": "buy",
                "quantity": number + 1,
                "order_type": "limit",
                "idempotency_key": f"{producer}-{number}",
            },
        ),
        prepare_event(E.ORDER_ACCEPTED, "order", order, {"ticker": ticker, "broker_order_id": "B"}),
        prepare_event(
            E.ORDER_FILLED,
            "order",
            order,
            {
                "ticker": ticker,
                "side": "buy",
                "fill_quantity": number + 1,
                "fill_price": price,
                "broker_order_id": "B",
            },
        ),
        prepare_event(
            E.POSITION_OPENED,
            "position",
            order,
            {
                "ticker": ticker,
                "side": "buy",
                "quantity_before": 0,
                "quantity_after": number + 1,
                "avg_entry_before": 0,
                "avg_entry_after": price,
            },
        ),
    ]


Writer = Callable[[list[PreparedEvent]], Awaitable[None]]


def single_writes(sessions: async_sessionmaker) -> Writer:  # type: ignore[type-arg]
    """The caller's transaction: one record per event, one commit per order."""

    async def write(chain: list[PreparedEvent]) -> None:
        async with sessions() as session, session.begin():
            repo = AuditRepository(session)
            for prepared in chain:
                await repo.insert_prepared(prepared)

    return write


def best_effort_writes(sessions: async_sessionmaker, spool: Path) -> Writer:  # type: ignore[type-arg]
    async def write(chain: list[PreparedEvent]) -> None:
        async with sessions() as session, session.begin():
            repo = BestEffortRepository(session, spool)
            for prepared in chain:
                await repo.insert_prepared(prepared)

    return write


def retried_writes(sessions: async_sessionmaker) -> Writer:  # type: ignore[type-arg]
    """The chain in a transaction of its own, retried whole (idempotent by event id)."""
    policy = RetryPolicy(attempts=3)

    async def write(chain: list[PreparedEvent]) -> None:
        async def attempt() -> None:
            async with sessions() as session, session.begin():
                repo = AuditRepository(session)
                for prepared in chain:
                    await repo.insert_prepared(prepared)

        await call_with_retries(attempt, policy=policy, action=f"recording {chain[0].entity_id}")

    return write


def batch_writes(sessions: async_sessionmaker) -> Writer:  # type: ignore[type-arg]
    """The chain as one record_many batch in the caller's transaction."""

    async def write(chain: list[PreparedEvent]) -> None:
        async with sessions() as session, session.begin():
            records = await AuditRepository(session).record_many(chain)
            assert [r.id for r in records] == [p.id for p in chain]

    return write


def writer_writes(writer: AuditWriter) -> Writer:
    """Each event through the shared AuditWriter, awaited in order."""

    async def write(chain: list[PreparedEvent]) -> None:
        for prepared in chain:
            await writer.record_prepared(prepared)

    return write


@pytest.fixture(scope="module")
async def db(admin_url: str) -> AsyncIterator[AsyncEngine]:
    async with business_database(admin_url) as (_, eng):
        yield eng


@pytest.mark.slow
async def test_mixed_load_loses_and_duplicates_nothing(db: AsyncEngine, tmp_path: Path) -> None:
    sessions = session_factory(db)
    spool = tmp_path / "audit.spool"
    writer = AuditWriter(db)
    paths: list[Writer] = [
        single_writes(sessions),
        batch_writes(sessions),
        writer_writes(writer),
        best_effort_writes(sessions, spool),
        retried_writes(sessions),
    ]
    chains: dict[uuid.UUID, list[PreparedEvent]] = {}

    async def producer(index: int) -> None:
        write = paths[index % len(paths)]
        for number in range(EVENTS_PER_PRODUCER // len(CHAIN)):
            chain = order_chain(index, number)
            chains[chain[0].entity_id] = chain
            await write(chain)

    started = time.perf_counter()
    async with writer:
        await asyncio.gather(*(producer(i) for i in range(PRODUCERS)))
    through_writer = sum(1 for i in range(PRODUCERS) if i % len(paths) == 2)
    assert writer.stats.events == through_writer * EVENTS_PER_PRODUCER
    assert writer.stats.batches < writer.stats.events  # concurrent callers were grouped
    print(
        f"{PRODUCERS} producers wrote {len(chains) * len(CHAIN)} events "
        f"in {time.perf_counter() - started:.1f}s"
    )

    everything = [prepared.id for chain in chains.values() for prepared in chain]
    assert len(everything) == PRODUCERS * EVENTS_PER_PRODUCER
    counts = await event_counts(db, everything)
    assert set(counts.values()) == {1}  # zero lost, zero duplicated
    assert await total_events(db) == len(everything)  # and nothing else
    assert not spool.exists()  # the database was up: best effort wrote everything

    # Every trail, from one ordered scan of the table ...
    async with db.connect() as conn:
        rows = await conn.execute(
            select(AuditEvent.order_id, AuditEvent.id).order_by(AuditEvent.seq)
        )
        recorded: dict[uuid.UUID, list[uuid.UUID]] = {}
        for order_id, event_id in rows:
            recorded.setdefault(order_id, []).append(event_id)
    assert recorded == {order: [p.id for p in chain] for order, chain in chains.items()}
    # ... and through the repository's trail query for one order of each producer.
    async with sessions() as session:
        repo = AuditRepository(session)
        for order in list(chains)[:: EVENTS_PER_PRODUCER // len(CHAIN)]:
            trail = await repo.order_trail(order)
            assert [r.id for r in trail] == [p.id for p in chains[order]]
            assert [r.event_type for r in trail] == CHAIN
