"""stream(): every row of a search, in order, from a server-side cursor in chunks."""

from __future__ import annotations

import uuid
from contextlib import aclosing
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from audit_orm import AuditRecord, AuditRepository, InvalidInputError


def new_ticker() -> str:
    return "S" + uuid.uuid4().hex[:10].upper()


async def seed_fills(repo: AuditRepository, ticker: str, n: int) -> list[AuditRecord]:
    return await repo.record_many(
        [
            {
                "event_type": "order.filled",
                "entity_type": "order",
                "entity_id": uuid.uuid4(),
                "data": {
                    "ticker": ticker,
                    "side": "sell",
                    "fill_quantity": i,
                    "fill_price": "1.25",
                    "broker_order_id": f"B{i}",
                },
            }
            for i in range(n)
        ]
    )


async def open_cursors(session: AsyncSession) -> int:
    """Cursors open in the session's own backend."""
    result = await session.execute(text("SELECT count(*) FROM pg_cursors"))
    return int(result.scalar_one())


async def test_stream_yields_every_row_in_order(repo: AuditRepository) -> None:
    ticker = new_ticker()
    written = await seed_fills(repo, ticker, 230)

    streamed = [r async for r in repo.stream(ticker=ticker, chunk_size=64)]

    assert streamed == written
    assert [r.seq for r in streamed] == sorted(r.seq for r in streamed)


async def test_stream_matches_search_pages(repo: AuditRepository) -> None:
    ticker = new_ticker()
    await seed_fills(repo, ticker, 75)
    paged: list[AuditRecord] = []
    cursor = None
    while True:
        page = await repo.search(ticker=ticker, after=cursor, limit=20)
        paged.extend(page.records)
        cursor = page.next_cursor
        if cursor is None:
            break

    streamed = [r async for r in repo.stream(ticker=ticker, chunk_size=7)]

    assert streamed == paged


async def test_stream_reads_from_a_server_side_cursor(
    repo: AuditRepository, session: AsyncSession
) -> None:
    ticker = new_ticker()
    await seed_fills(repo, ticker, 50)
    before = await open_cursors(session)

    seen = 0
    mid_stream = 0
    async with aclosing(repo.stream(ticker=ticker, chunk_size=10)) as rows:
        async for _ in rows:
            seen += 1
            if seen == 15:
                # Past the first chunk the rows still come from a cursor open on the server.
                mid_stream = await open_cursors(session)
                break
    assert seen == 15
    assert mid_stream == before + 1


async def test_stream_resumes_after_a_cursor(repo: AuditRepository) -> None:
    ticker = new_ticker()
    written = await seed_fills(repo, ticker, 12)
    rest = [r async for r in repo.stream(ticker=ticker, after=str(written[4].seq))]
    assert rest == written[5:]


async def test_stream_of_nothing(repo: AuditRepository) -> None:
    assert [r async for r in repo.stream(ticker=new_ticker())] == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ticker": ""}, "ticker"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"after": "x"}, "after"),
        ({"event_types": ["order.nope"]}, "event_type"),
    ],
)
def test_stream_validates_filters_when_called(
    repo: AuditRepository, kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        repo.stream(**kwargs)
    assert caught.value.field == field
