"""Adversarial review: rows a writer can insert by plain SQL are rows readers can read.

README, "Guarantees": every stored event reads back as an ``AuditRecord``. The
writer role of ``audit-orm grant`` may INSERT by plain SQL, past the payload
models; the table's CHECK constraints must refuse what a reader could not hold:
``data`` that is not a JSON object, numbers of more than 1000 digits on either
side of the point (at any depth), and times outside years 1 to 9999 UTC.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import AuditRecord, AuditRepository, grant, migrate, verify
from tests.dbutil import scratch_database

CHECK_VIOLATION = "23514"

_INSERT = (
    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, data, occurred_at) "
    "VALUES (:id, 'order.accepted', 'order', :entity, CAST(:data AS jsonb), "
    "CAST(CAST(:occurred AS text) AS timestamptz))"
)

_BIG = "9" * 1000
_TINY = "0." + "0" * 999 + "1"


@pytest.fixture
async def writer(fresh_db: tuple[str, AsyncEngine]) -> AsyncIterator[AsyncEngine]:
    """An engine logged in as a writer role made by ``grant`` (time zone +14:00)."""
    url, owner = fresh_db
    name = f"checks_writer_{uuid.uuid4().hex[:8]}"
    async with owner.begin() as conn:
        await conn.execute(text(f'CREATE ROLE "{name}" NOLOGIN'))
    await grant(owner, writer=name)
    engine = create_async_engine(
        url, connect_args={"server_settings": {"role": name, "timezone": "Pacific/Kiritimati"}}
    )
    try:
        yield engine
    finally:
        await engine.dispose()
        async with owner.begin() as conn:
            await conn.execute(text(f'DROP OWNED BY "{name}"'))
            await conn.execute(text(f'DROP ROLE "{name}"'))


async def _insert(engine: AsyncEngine, data: str, occurred: str) -> uuid.UUID:
    row = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text(_INSERT),
            {"id": row, "entity": uuid.uuid4(), "data": data, "occurred": occurred},
        )
    return row


_NOW = "2026-01-01 00:00:00+00"


@pytest.mark.parametrize(
    ("data", "occurred", "constraint"),
    [
        ("[1, 2]", _NOW, "data_object"),
        ('"text"', _NOW, "data_object"),
        ("null", _NOW, "data_object"),
        ("7", _NOW, "data_object"),
        ('{"qty": 1' + "0" * 1000 + "}", _NOW, "data_numbers"),
        ('{"qty": -1e1000}', _NOW, "data_numbers"),
        ('{"qty": 1e-1001}', _NOW, "data_numbers"),
        ('{"a": [1, {"b": [2, 1e5000]}]}', _NOW, "data_numbers"),
        ('{"a": {"b": {"c": 1e-3000}}}', _NOW, "data_numbers"),
        ("{}", "infinity", "occurred_at_range"),
        ("{}", "-infinity", "occurred_at_range"),
        ("{}", "0001-12-31 23:59:59+00 BC", "occurred_at_range"),
        ("{}", "10000-01-01 00:00:00+00", "occurred_at_range"),
        # Year 1 at +14:00 is year 0 in UTC.
        ("{}", "0001-01-01 13:59:59+14", "occurred_at_range"),
    ],
    ids=[
        "array",
        "string",
        "json null",
        "number",
        "1001 integer digits",
        "-1e1000",
        "1001 decimals",
        "nested in arrays",
        "nested in objects",
        "infinity",
        "-infinity",
        "year 1 BC",
        "year 10000",
        "year 0 in UTC",
    ],
)
async def test_a_writer_cannot_store_what_readers_cannot_read(
    writer: AsyncEngine, data: str, occurred: str, constraint: str
) -> None:
    """README: every stored row reads back; the writer role may insert by plain SQL.

    Each row is refused by the named CHECK constraint, and nothing is stored.
    """
    with pytest.raises(DBAPIError) as caught:
        await _insert(writer, data, occurred)
    assert getattr(caught.value.orig, "sqlstate", None) == CHECK_VIOLATION
    assert f"ck_audit_events_{constraint}" in str(caught.value)
    async with writer.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM audit_events")) == 0


async def test_the_edges_are_accepted_and_read_back(
    fresh_db: tuple[str, AsyncEngine], writer: AsyncEngine
) -> None:
    """The bounds are the payload models' bounds, not tighter: 1000 digits on
    either side of the point, years 1 and 9999 UTC, trailing zeros past the
    1000th decimal place (no digit is lost there). Every such row reads back
    through the repository and verifies."""
    _, owner = fresh_db
    rows = [
        await _insert(writer, '{"qty": ' + _BIG + "}", _NOW),
        await _insert(writer, '{"qty": -' + _BIG + "." + _BIG + "}", _NOW),
        await _insert(writer, '{"a": [{"qty": ' + _TINY + "}]}", _NOW),
        await _insert(writer, '{"qty": 1.5' + "0" * 2000 + "}", _NOW),
        await _insert(writer, "{}", "0001-01-01 00:00:00+00"),
        await _insert(writer, "{}", "9999-12-31 23:59:59.999999+00"),
    ]
    async with AsyncSession(owner) as session:
        repo = AuditRepository(session)
        for row in rows:
            record = await repo.get(row)
            assert isinstance(record, AuditRecord)
    assert (await verify(owner)).ok


async def test_rows_stored_before_the_checks_leave_them_not_valid(admin_url: str) -> None:
    """README, Migrations (0005): the upgrade is safe on a populated table.

    A table at 0004 already holding a row whose ``data`` is an array upgrades
    without error: that one constraint stays NOT VALID (still enforced for new
    rows), every other is validated, and no row is changed.
    """
    async with scratch_database(admin_url) as (_, engine):
        await migrate.upgrade(engine, "0004_trail_indexes")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, data, "
                    "occurred_at) VALUES (gen_random_uuid(), 'order.accepted', 'order', "
                    "gen_random_uuid(), '[1]', now())"
                )
            )
            before = (await conn.execute(text("SELECT * FROM audit_events"))).all()
        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            valid = dict(
                (
                    await conn.execute(
                        text(
                            "SELECT conname, convalidated FROM pg_constraint "
                            "WHERE conrelid = 'audit_events'::regclass AND contype = 'c' "
                            "AND conname <> 'ck_audit_events_actor_length'"
                        )
                    )
                ).all()
            )
            assert (await conn.execute(text("SELECT * FROM audit_events"))).all() == before
        assert {name for name, ok in valid.items() if not ok} == {"ck_audit_events_data_object"}
        with pytest.raises(DBAPIError) as caught:
            await _insert(engine, "[2]", _NOW)
        assert getattr(caught.value.orig, "sqlstate", None) == CHECK_VIOLATION
