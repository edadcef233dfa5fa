"""Property: any valid payload goes through PostgreSQL and back exactly, and a retry is a no-op."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from audit_orm import AuditEvent, AuditEventType, AuditRepository, EntityType
from audit_orm.jsonb import dumps_exact, loads_exact
from audit_orm.payloads import payload_to_data, validate_payload
from tests.strategies import events, exact_text

ENTITY = {
    "recommendation": EntityType.RECOMMENDATION,
    "risk": EntityType.RISK_EVALUATION,
    "order": EntityType.ORDER,
    "position": EntityType.POSITION,
    "approval": EntityType.APPROVAL,
    "trading": EntityType.RISK_CONFIG,
}


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(event=events)
async def test_any_valid_payload_round_trips_through_the_database(
    session: AsyncSession, event: tuple[AuditEventType, dict[str, Any]]
) -> None:
    kind, data = event
    repo = AuditRepository(session)
    entity = ENTITY[kind.value.split(".")[0]]
    event_id = uuid.uuid4()
    written = await repo.record(kind, entity, uuid.uuid4(), data, event_id=event_id)
    stored = await repo.get(event_id)
    assert stored is not None

    expected = payload_to_data(validate_payload(kind, data))
    assert stored.payload == validate_payload(kind, data)
    assert exact_text(payload_to_data(stored.payload)) == exact_text(expected)
    assert stored.data == loads_exact(dumps_exact(written.data))

    # Recording the same event again (a retry) is a no-op, whatever the payload holds.
    again = await repo.record(kind, entity, written.entity_id, data, event_id=event_id)
    assert again.seq == written.seq
    rows = await session.scalar(
        select(func.count()).select_from(AuditEvent).where(AuditEvent.id == event_id)
    )
    assert rows == 1
