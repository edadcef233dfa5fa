"""record_many: whole-batch validation, idempotency, order, and all-or-nothing writes."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditRepository,
    EventIdConflictError,
    EventSpec,
    InvalidIdError,
    InvalidInputError,
    InvalidPayloadError,
    bulk,
)
from audit_orm.models import AuditEvent
from audit_orm.repository import prepare_event


def fill(ticker: str, n: int, **extra: Any) -> EventSpec:
    """One order.filled event for a fresh order."""
    spec: EventSpec = {
        "event_type": "order.filled",
        "entity_type": "order",
        "entity_id": uuid.uuid4(),
        "data": {
            "ticker": ticker,
            "side": "buy",
            "fill_quantity": n,
            "fill_price": "150.25",
            "broker_order_id": f"B{n}",
        },
    }
    spec.update(extra)  # type: ignore[typeddict-item]
    return spec


def new_ticker() -> str:
    return "T" + uuid.uuid4().hex[:10].upper()


async def count_ticker(session: AsyncSession, ticker: str) -> int:
    stmt = select(func.count()).select_from(AuditEvent).where(AuditEvent.ticker == ticker)
    return int((await session.execute(stmt)).scalar_one())


@pytest.fixture(params=["array", "copy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the array INSERT and through COPY (threshold lowered)."""
    if request.param == "copy":
        monkeypatch.setattr(bulk, "COPY_THRESHOLD", 2)
    else:
        monkeypatch.setattr(bulk, "COPY_THRESHOLD", 1_000_000)
    return str(request.param)


async def test_batch_is_written_in_order(
    repo: AuditRepository, session: AsyncSession, path: str
) -> None:
    ticker = new_ticker()
    specs = [fill(ticker, n) for n in range(1, 31)]
    records = await repo.record_many(specs)

    assert [r.entity_id for r in records] == [s["entity_id"] for s in specs]
    seqs = [r.seq for r in records]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert all(r.recorded_at is not None and r.occurred_at == r.recorded_at for r in records)
    assert records[4].data["fill_quantity"] == 5
    assert records[4].data["fill_price"] == Decimal("150.25")
    assert records[4].order_id == specs[4]["entity_id"]

    stored = await repo.get(records[-1].id)
    assert stored == records[-1]
    trail = await repo.search(ticker=ticker, limit=100)
    assert [r.id for r in trail.records] == [r.id for r in records]


async def test_empty_batch_writes_nothing(repo: AuditRepository) -> None:
    assert await repo.record_many([]) == []


async def test_bad_event_refuses_the_whole_batch(
    repo: AuditRepository, session: AsyncSession, path: str
) -> None:
    ticker = new_ticker()
    specs = [fill(ticker, 1), fill(ticker, 2), fill(ticker, 3)]
    specs[1]["data"] = {**specs[1]["data"], "fill_quantity": "lots"}  # type: ignore[dict-item]

    with pytest.raises(InvalidPayloadError) as caught:
        await repo.record_many(specs)

    assert caught.value.field == "events[1].data.fill_quantity"
    assert caught.value.value == "lots"
    assert "events[1].data.fill_quantity" in str(caught.value)
    assert await count_ticker(session, ticker) == 0


@pytest.mark.parametrize(
    ("mutate", "error", "field"),
    [
        (lambda s: s.update(entity_id="not-a-uuid"), InvalidIdError, "events[2].entity_id"),
        (lambda s: s.update(colour="red"), InvalidInputError, "events[2].colour"),
        (lambda s: s.pop("data"), InvalidInputError, "events[2].data"),
        (lambda s: s.update(actor=""), InvalidInputError, "events[2].actor"),
        (
            lambda s: s.update(occurred_at="2026-01-01T10:00:00"),
            InvalidInputError,
            "events[2].occurred_at",
        ),
    ],
)
async def test_error_names_index_and_field(
    repo: AuditRepository,
    session: AsyncSession,
    mutate: Any,
    error: type[Exception],
    field: str,
) -> None:
    ticker = new_ticker()
    specs = [fill(ticker, n) for n in range(4)]
    mutate(specs[2])
    with pytest.raises(error) as caught:
        await repo.record_many(specs)
    assert getattr(caught.value, "field", None) == field
    assert await count_ticker(session, ticker) == 0


async def test_non_mapping_event_is_refused(repo: AuditRepository) -> None:
    with pytest.raises(InvalidInputError) as caught:
        await repo.record_many([fill(new_ticker(), 1), "order.filled"])  # type: ignore[list-item]
    assert caught.value.field == "events[1].event"


async def test_prepared_events_are_accepted(repo: AuditRepository, path: str) -> None:
    ticker = new_ticker()
    spec = fill(ticker, 7)
    prepared = prepare_event(
        spec["event_type"], spec["entity_type"], spec["entity_id"], spec["data"]
    )
    records = await repo.record_many([prepared, fill(ticker, 8)])
    assert records[0].id == prepared.id
    assert records[0].seq < records[1].seq


async def test_repeating_a_batch_is_idempotent(
    repo: AuditRepository, session: AsyncSession, path: str
) -> None:
    ticker = new_ticker()
    specs = [fill(ticker, n, event_id=uuid.uuid4()) for n in range(5)]
    first = await repo.record_many(specs)
    again = await repo.record_many(specs)

    assert again == first
    assert await count_ticker(session, ticker) == 5

    # Part old, part new: the old ones come back as stored, the new ones are added.
    more = [*specs[:2], fill(ticker, 99, event_id=uuid.uuid4())]
    mixed = await repo.record_many(more)
    assert mixed[:2] == first[:2]
    assert mixed[2].seq > first[-1].seq
    assert await count_ticker(session, ticker) == 6


async def test_reused_id_with_other_content_refuses_the_batch(
    repo: AuditRepository, session: AsyncSession, path: str
) -> None:
    ticker = new_ticker()
    taken = uuid.uuid4()
    await repo.record_many([fill(ticker, 1, event_id=taken)])

    batch = [fill(ticker, 2), fill(ticker, 3, event_id=taken), fill(ticker, 4)]
    with pytest.raises(EventIdConflictError) as caught:
        await repo.record_many(batch)

    assert caught.value.event_id == taken
    # Nothing of the refused batch stays, and the transaction is still usable.
    assert await count_ticker(session, ticker) == 1
    assert len(await repo.record_many([fill(ticker, 5)])) == 1
    assert await count_ticker(session, ticker) == 2


async def test_duplicate_ids_inside_a_batch(
    repo: AuditRepository, session: AsyncSession, path: str
) -> None:
    ticker = new_ticker()
    same = fill(ticker, 1, event_id=uuid.uuid4())
    records = await repo.record_many([same, fill(ticker, 2), dict(same)])  # type: ignore[list-item]
    assert records[0] == records[2]
    assert await count_ticker(session, ticker) == 2

    clash = fill(ticker, 3, event_id=uuid.uuid4())
    other = fill(ticker, 4, event_id=clash["event_id"])
    with pytest.raises(EventIdConflictError):
        await repo.record_many([clash, other])
    assert await count_ticker(session, ticker) == 2


async def test_rollback_leaves_nothing(engine: AsyncEngine, path: str) -> None:
    ticker = new_ticker()
    async with AsyncSession(engine) as session:
        records = await AuditRepository(session).record_many([fill(ticker, n) for n in range(10)])
        assert len(records) == 10
        assert await count_ticker(session, ticker) == 10
        await session.rollback()
    async with engine.connect() as conn:
        found = await conn.execute(
            text("SELECT count(*) FROM audit_events WHERE ticker = :t"), {"t": ticker}
        )
        assert found.scalar_one() == 0


async def test_commit_makes_the_batch_visible_elsewhere(engine: AsyncEngine, path: str) -> None:
    ticker = new_ticker()
    async with AsyncSession(engine) as session, session.begin():
        await AuditRepository(session).record_many([fill(ticker, n) for n in range(3)])
    async with engine.connect() as conn:
        found = await conn.execute(
            text("SELECT count(*) FROM audit_events WHERE ticker = :t"), {"t": ticker}
        )
        assert found.scalar_one() == 3


async def test_autocommit_session(engine: AsyncEngine, path: str) -> None:
    ticker = new_ticker()
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with AsyncSession(autocommit) as session:
        records = await AuditRepository(session).record_many([fill(ticker, n) for n in range(4)])
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    async with engine.connect() as conn:
        found = await conn.execute(
            text("SELECT count(*) FROM audit_events WHERE ticker = :t"), {"t": ticker}
        )
        assert found.scalar_one() == 4


async def test_copy_falls_back_when_an_id_appears_meanwhile(
    repo: AuditRepository, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id stored between the check and the COPY: the array INSERT takes over."""
    monkeypatch.setattr(bulk, "COPY_THRESHOLD", 2)
    ticker = new_ticker()
    taken = fill(ticker, 1, event_id=uuid.uuid4())
    first = await repo.record_many([taken])

    real_fetch = bulk.fetch_stored
    calls = 0

    async def blind_first_check(conn: Any, ids: Any) -> Any:
        nonlocal calls
        calls += 1
        return {} if calls == 1 else await real_fetch(conn, ids)

    monkeypatch.setattr(bulk, "fetch_stored", blind_first_check)
    records = await repo.record_many([fill(ticker, 2), taken, fill(ticker, 3)])

    assert records[1] == first[0]
    assert records[0].seq < records[2].seq
    assert await count_ticker(session, ticker) == 3


async def test_copy_fires_the_insert_trigger(
    repo: AuditRepository, session: AsyncSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recorded_at comes from the database clock even on the COPY path."""
    monkeypatch.setattr(bulk, "COPY_THRESHOLD", 2)
    ticker = new_ticker()
    before = (await session.execute(text("SELECT clock_timestamp()"))).scalar_one()
    records = await repo.record_many(
        [fill(ticker, 1, occurred_at="2020-01-01T00:00:00+00:00"), fill(ticker, 2)]
    )
    assert all(r.recorded_at >= before for r in records)
    assert records[0].occurred_at.year == 2020
    assert records[1].occurred_at == records[1].recorded_at


async def test_large_batches_go_through_copy(
    repo: AuditRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bulk, "COPY_THRESHOLD", 3)
    real_copy = bulk._copy
    copied: list[int] = []

    async def spy(link: Any, events: Any, **options: Any) -> Any:
        copied.append(len(events))
        return await real_copy(link, events, **options)

    monkeypatch.setattr(bulk, "_copy", spy)
    ticker = new_ticker()
    await repo.record_many([fill(ticker, 1), fill(ticker, 2)])
    assert copied == []
    records = await repo.record_many([fill(ticker, n) for n in range(5)])
    assert copied == [5]
    assert [r.seq for r in records] == sorted(r.seq for r in records)


async def test_without_returning_counts_rows_added(
    repo: AuditRepository, session: AsyncSession, path: str
) -> None:
    ticker = new_ticker()
    specs = [fill(ticker, n, event_id=uuid.uuid4()) for n in range(6)]

    assert await repo.record_many(specs, returning=False) == 6
    assert await repo.record_many(specs, returning=False) == 0
    fresh = fill(ticker, 50, event_id=uuid.uuid4())
    assert await repo.record_many([*specs[:3], fresh, dict(fresh)], returning=False) == 1  # type: ignore[list-item]
    assert await count_ticker(session, ticker) == 7
    assert await repo.record_many([], returning=False) == 0


async def test_without_returning_a_conflict_leaves_nothing(
    repo: AuditRepository, session: AsyncSession, path: str
) -> None:
    ticker = new_ticker()
    taken = uuid.uuid4()
    await repo.record_many([fill(ticker, 1, event_id=taken)], returning=False)
    with pytest.raises(EventIdConflictError):
        await repo.record_many(
            [fill(ticker, 2), fill(ticker, 3), fill(ticker, 9, event_id=taken)], returning=False
        )
    assert await count_ticker(session, ticker) == 1


async def test_records_roll_back_with_the_session(engine: AsyncEngine) -> None:
    """The first statement of a transaction and the later ones (sent straight to the
    driver) all belong to the session's transaction."""
    ticker = new_ticker()
    async with AsyncSession(engine) as session:
        repo = AuditRepository(session)
        await repo.order_rejected(uuid.uuid4(), ticker, "first statement")
        await repo.order_rejected(uuid.uuid4(), ticker, "second statement")
        await repo.record_many([fill(ticker, 1)])
        assert await count_ticker(session, ticker) == 3
        await session.rollback()
    async with engine.connect() as conn:
        found = await conn.execute(
            text("SELECT count(*) FROM audit_events WHERE ticker = :t"), {"t": ticker}
        )
        assert found.scalar_one() == 0
