"""Rows written by the fast paths (array INSERT, COPY, AuditWriter) hash, seal and verify."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, AuditWriter, InvalidInputError, bulk, migrate, seal, verify
from tests.dbutil import scratch_database


def fill(n: int) -> dict[str, object]:
    return {
        "event_type": "order.filled",
        "entity_type": "order",
        "entity_id": uuid.uuid4(),
        "data": {
            "ticker": "SEAL",
            "side": "buy",
            "fill_quantity": n,
            "fill_price": "9.99",
            "broker_order_id": f"B{n}",
        },
    }


async def test_fast_paths_produce_sealable_rows(
    admin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with scratch_database(admin_url) as (_url, engine):
        await migrate.upgrade(engine)
        async with AsyncSession(engine) as session, session.begin():
            repo = AuditRepository(session)
            arrays = await repo.record_many([fill(n) for n in range(5)])  # type: ignore[misc]
            monkeypatch.setattr(bulk, "COPY_THRESHOLD", 2)
            copied = await repo.record_many([fill(n) for n in range(5, 12)])  # type: ignore[misc]
            correction = {**fill(99), "corrects": copied[0].id, "entity_id": copied[0].entity_id}
            fixed = await repo.record_many([correction])  # type: ignore[list-item]
        async with AuditWriter(engine) as writer:
            written = await asyncio.gather(
                *(writer.record(**fill(n)) for n in range(20, 30))  # type: ignore[arg-type]
            )
        assert fixed[0].corrects_id == copied[0].id
        total = len(arrays) + len(copied) + len(fixed) + len(written)

        sealed = await seal(engine)
        report = await verify(engine)

        assert sealed.rows_sealed == total
        assert report.ok, report.first_problem
        assert report.rows_checked == total


async def test_batch_correction_of_an_unknown_event_is_refused(repo: AuditRepository) -> None:
    unknown = uuid.uuid4()
    batch = [fill(1), {**fill(2), "corrects": unknown}]
    with pytest.raises(InvalidInputError) as caught:
        await repo.record_many(batch)  # type: ignore[arg-type]
    assert caught.value.field == "events[1].corrects"
    assert caught.value.value == unknown


async def test_batch_may_correct_an_event_of_the_same_batch(repo: AuditRepository) -> None:
    first = fill(1)
    first["event_id"] = uuid.uuid4()
    second = {**fill(2), "corrects": first["event_id"], "entity_id": first["entity_id"]}
    records = await repo.record_many([first, second])  # type: ignore[list-item]
    assert records[1].corrects_id == records[0].id
    assert await repo.corrections(records[0].id) == [records[1]]


async def test_writer_refuses_a_correction_of_an_unknown_event_alone(engine: AsyncEngine) -> None:
    async with AuditWriter(engine) as writer:
        good = writer.record(**fill(1))  # type: ignore[arg-type]
        bad = writer.record(**fill(2), corrects=uuid.uuid4())  # type: ignore[arg-type]
        results = await asyncio.gather(good, bad, return_exceptions=True)
    assert results[0].seq > 0  # type: ignore[union-attr]
    assert isinstance(results[1], InvalidInputError)
    assert results[1].field == "corrects"
