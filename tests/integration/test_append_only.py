"""Append-only at the database: UPDATE, DELETE and TRUNCATE fail for every role.

The session's connection is a superuser and the tables' owner, the strongest
role there is short of dropping the triggers themselves.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit_orm import AppendOnlyError, AuditEvent, AuditRepository
from audit_orm.errors import translate_db_error
from audit_orm.hashing import micros, row_hash

INSERT = text(
    "INSERT INTO audit_events (id, event_type, entity_type, entity_id, data) "
    "VALUES (:id, 'order.accepted', 'order', :entity, CAST(:data AS jsonb)) RETURNING seq"
)

REFUSED = [
    "UPDATE audit_events SET actor = 'mallory'",
    "UPDATE audit_events SET actor = 'mallory' WHERE false",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
    "TRUNCATE audit_events CASCADE",
    "INSERT INTO audit_events (id, event_type, entity_type, entity_id) "
    "SELECT id, event_type, entity_type, entity_id FROM audit_events "
    "ON CONFLICT (id) DO UPDATE SET actor = 'mallory'",
    "MERGE INTO audit_events t USING (SELECT 1) s ON true "
    "WHEN MATCHED THEN UPDATE SET actor = 'mallory'",
    "UPDATE audit_seals SET row_count = 1",
    "DELETE FROM audit_seals",
    "TRUNCATE audit_seals",
]


@pytest.fixture
async def conn(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A superuser connection inside a transaction rolled back after the test."""
    async with engine.connect() as connection:
        outer = await connection.begin()
        try:
            yield connection
        finally:
            await outer.rollback()


async def _one_row(conn: AsyncConnection) -> int:
    seq = await conn.scalar(
        INSERT, {"id": uuid.uuid4(), "entity": uuid.uuid4(), "data": '{"ticker": "X"}'}
    )
    assert isinstance(seq, int)
    return seq


async def _refused(conn: AsyncConnection, statement: str) -> DBAPIError:
    nested = await conn.begin_nested()
    with pytest.raises(DBAPIError) as caught:
        await conn.execute(text(statement))
    await nested.rollback()
    return caught.value


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
@pytest.mark.parametrize("statement", REFUSED)
async def test_changes_are_refused_for_the_owner(
    conn: AsyncConnection, statement: str, replica: bool
) -> None:
    await _one_row(conn)
    if replica:
        # Ordinary triggers do not fire in replica mode; these are ENABLE ALWAYS.
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
    error = await _refused(conn, statement)
    assert getattr(error.orig, "sqlstate", None) == "AU001"
    assert "append-only" in str(error.orig)
    assert await conn.scalar(text("SELECT count(*) FROM audit_events WHERE actor = 'mallory'")) == 0


async def test_refusal_becomes_an_append_only_error(conn: AsyncConnection) -> None:
    await _one_row(conn)
    nested = await conn.begin_nested()
    with pytest.raises(DBAPIError) as caught:
        await conn.execute(update(AuditEvent).values(actor="mallory"))
    await nested.rollback()
    translated = translate_db_error(caught.value, "changing an event")
    assert isinstance(translated, AppendOnlyError)
    assert "append-only" in str(translated)


async def test_every_trigger_fires_always(conn: AsyncConnection) -> None:
    rows = (
        await conn.execute(
            text(
                "SELECT tgrelid::regclass::text, tgname, tgenabled::text FROM pg_trigger "
                "WHERE NOT tgisinternal AND tgrelid IN "
                "('audit_events'::regclass, 'audit_seals'::regclass) ORDER BY 1, 2"
            )
        )
    ).all()
    assert [(table, name) for table, name, _ in rows] == [
        ("audit_events", "audit_events_append_only"),
        ("audit_events", "audit_events_before_insert"),
        ("audit_events", "audit_events_claim_xid"),
        ("audit_seals", "audit_seals_append_only"),
    ]
    assert {enabled for _, _, enabled in rows} == {"A"}


async def test_trigger_stamps_txid_hash_and_clock_whatever_the_client_sends(
    conn: AsyncConnection,
) -> None:
    forged = datetime(2001, 1, 1, tzinfo=UTC)
    await conn.execute(
        text(
            "INSERT INTO audit_events (id, event_type, entity_type, entity_id, recorded_at, "
            "txid, row_hash) VALUES (:id, 'order.accepted', 'order', :entity, :forged, "
            "'1'::xid8, :hash)"
        ),
        {"id": uuid.uuid4(), "entity": uuid.uuid4(), "forged": forged, "hash": b"\x01" * 33},
    )
    row = (
        await conn.execute(
            text(
                "SELECT id, seq, event_type, entity_type, entity_id, actor, data::text, "
                "occurred_at, recorded_at, recommendation_id, order_id, ticker, corrects_id, "
                "row_hash, txid, pg_current_xact_id() FROM audit_events ORDER BY seq DESC LIMIT 1"
            )
        )
    ).one()
    assert row.recorded_at > forged
    assert row.occurred_at == row.recorded_at
    assert row.txid == row.pg_current_xact_id
    assert row.row_hash == _python_hash(row)


def _python_hash(row: Any) -> bytes:
    def raw(value: uuid.UUID | None) -> bytes | None:
        return None if value is None else value.bytes

    return row_hash(
        row.id.bytes,
        row.seq,
        row.event_type,
        row.entity_type,
        row.entity_id.bytes,
        row.actor,
        row.data,
        micros(row.occurred_at),
        micros(row.recorded_at),
        raw(row.recommendation_id),
        raw(row.order_id),
        row.ticker,
        raw(row.corrects_id),
    )


async def test_repository_rows_carry_the_python_hash(
    repo: AuditRepository, engine: AsyncEngine
) -> None:
    order = uuid.uuid4()
    await repo.order_filled(order, "ÄPFEL", "buy", "1.50", "99.125", "brk-1")
    original = await repo.order_accepted(order, "ÄPFEL", "brk-1")
    await repo.correct(original.id, {"ticker": "ÄPFEL", "broker_order_id": "brk-2"})
    rows = (
        await repo.session.execute(
            text(
                "SELECT id, seq, event_type, entity_type, entity_id, actor, data::text, "
                "occurred_at, recorded_at, recommendation_id, order_id, ticker, corrects_id, "
                "row_hash FROM audit_events WHERE entity_id = :order ORDER BY seq"
            ),
            {"order": order},
        )
    ).all()
    assert len(rows) == 3
    assert rows[2].corrects_id == original.id
    for row in rows:
        assert row.row_hash == _python_hash(row)


_json_text = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12
)
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.decimals(allow_nan=False, allow_infinity=False, places=4)
    | _json_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_json_text, inner, max_size=3),
    max_leaves=8,
)
_maybe_uuid = st.none() | st.uuids()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.dictionaries(_json_text, _json, max_size=4),
    actor=st.text(st.characters(exclude_categories=("Cs", "Cc")), min_size=1, max_size=20),
    occurred=st.datetimes(
        min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    recommendation=_maybe_uuid,
    order=_maybe_uuid,
    ticker=st.none() | st.text(st.characters(exclude_categories=("Cs", "Cc")), max_size=8),
    corrects=_maybe_uuid,
)
async def test_sql_and_python_hashes_agree(
    engine: AsyncEngine,
    data: dict[str, Any],
    actor: str,
    occurred: datetime,
    recommendation: uuid.UUID | None,
    order: uuid.UUID | None,
    ticker: str | None,
    corrects: uuid.UUID | None,
) -> None:
    """The database function and the verifier's encoder are the same encoding."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT CAST(:data AS jsonb)::text AS data, audit_event_row_hash("
                    ":id, :seq, :event_type, :entity_type, :entity, :actor, CAST(:data AS jsonb), "
                    ":occurred, :recorded, :rec, :ord, :ticker, :corrects) AS hash"
                ),
                {
                    "data": json.dumps(data, default=str),
                    "id": uuid.UUID(int=1),
                    "seq": 42,
                    "event_type": "order.filled",
                    "entity_type": "order",
                    "entity": uuid.UUID(int=2),
                    "actor": actor,
                    "occurred": occurred,
                    "recorded": datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
                    "rec": recommendation,
                    "ord": order,
                    "ticker": ticker,
                    "corrects": corrects,
                },
            )
        ).one()

    def raw(value: uuid.UUID | None) -> bytes | None:
        return None if value is None else value.bytes

    expected = row_hash(
        uuid.UUID(int=1).bytes,
        42,
        "order.filled",
        "order",
        uuid.UUID(int=2).bytes,
        actor,
        row.data,
        micros(occurred),
        micros(datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC)),
        raw(recommendation),
        raw(order),
        ticker,
        raw(corrects),
    )
    assert row.hash == expected
