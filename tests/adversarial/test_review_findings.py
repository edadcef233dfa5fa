"""Adversarial review: attacks on the README's promises that broke, each fixed.

Every test here failed on the code before its fix; its docstring names the
promise it attacks and what must hold now.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditRepository,
    AuditWriter,
    EventIdConflictError,
    InvalidInputError,
    MigrationConflictError,
    grant,
    migrate,
)
from audit_orm.repository import prepare_event


def _accepted(order_id: uuid.UUID, broker: str = "brk-1", **extra: object) -> dict[str, object]:
    return {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": order_id,
        "data": {"ticker": "ACME", "broker_order_id": broker},
        **extra,
    }


async def _present(engine: AsyncEngine, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        rows = await conn.scalars(
            text("SELECT id FROM audit_events WHERE id = ANY(:ids)"), {"ids": ids}
        )
        return set(rows)


# ------------------------------------------------------- batches (#3, #7)


async def test_record_many_on_an_autocommit_session_is_all_or_nothing(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README, batches: "nothing stays on a failure".

    On a session whose connection is in AUTOCOMMIT there is no transaction
    block for a savepoint. A batch whose last event reuses a stored id with
    other content is refused with ``EventIdConflictError``; the events before
    it must not stay committed.
    """
    _, engine = fresh_db
    taken = uuid.uuid4()
    async with AsyncSession(engine) as session, session.begin():
        await AuditRepository(session).record(**_accepted(uuid.uuid4()), event_id=taken)  # type: ignore[arg-type]
    fresh = [uuid.uuid4() for _ in range(3)]
    batch = [_accepted(uuid.uuid4(), event_id=event_id) for event_id in fresh]
    batch.append(_accepted(uuid.uuid4(), broker="other", event_id=taken))
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with AsyncSession(autocommit) as session:
        with pytest.raises(EventIdConflictError):
            await AuditRepository(session).record_many(batch)  # type: ignore[arg-type]
        assert await _present(engine, fresh) == set()
        # The session stays usable, and a good batch on it commits.
        written = await AuditRepository(session).record_many(batch[:3])  # type: ignore[arg-type]
    assert [record.id for record in written] == fresh
    assert await _present(engine, fresh) == set(fresh)


async def test_record_many_on_an_autocommit_session_refuses_a_repeated_id_whole(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README, batches: "nothing stays on a failure", in AUTOCOMMIT, large batches too.

    An id repeated inside one batch with different content refuses the batch,
    whether it goes out as one array INSERT or through COPY; nothing of it
    is committed.
    """
    _, engine = fresh_db
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    for size in (3, 2_100):
        ids = [uuid.uuid4() for _ in range(size)]
        batch = [_accepted(uuid.uuid4(), event_id=event_id) for event_id in ids]
        batch.append(_accepted(uuid.uuid4(), broker="other", event_id=ids[0]))
        async with AsyncSession(autocommit) as session:
            with pytest.raises(EventIdConflictError):
                await AuditRepository(session).record_many(batch, returning=False)  # type: ignore[call-overload]
        assert await _present(engine, ids) == set(), size


async def test_record_many_refuses_a_correction_of_a_later_event(
    repo: AuditRepository, session: AsyncSession
) -> None:
    """README, corrections: "corrects= ... checks the original exists"; a correction
    corrects an event recorded before it.

    In one batch, an event that corrects an event placed after it (the
    correction would get the smaller ``seq``) is refused, naming its
    position, and nothing is written.
    """
    first, later = uuid.uuid4(), uuid.uuid4()
    batch = [
        _accepted(uuid.uuid4(), event_id=first, corrects=later),
        _accepted(uuid.uuid4(), event_id=later),
    ]
    with pytest.raises(InvalidInputError) as caught:
        await repo.record_many(batch)  # type: ignore[arg-type]
    assert caught.value.field == "events[0].corrects"
    rows = await session.scalar(
        text("SELECT count(*) FROM audit_events WHERE id = ANY(:ids)"), {"ids": [first, later]}
    )
    assert rows == 0
    # Corrections of an earlier event of the batch are fine.
    records = await repo.record_many([batch[1], batch[0]])  # type: ignore[arg-type]
    assert records[1].corrects_id == later


async def test_record_many_refuses_corrections_forming_a_cycle(repo: AuditRepository) -> None:
    """README, corrections: a correction references an earlier event, so no cycle can form.

    Two events of one batch that correct each other are refused.
    """
    a, b = uuid.uuid4(), uuid.uuid4()
    with pytest.raises(InvalidInputError, match="corrects"):
        await repo.record_many(
            [  # type: ignore[list-item]
                _accepted(uuid.uuid4(), event_id=a, corrects=b),
                _accepted(uuid.uuid4(), event_id=b, corrects=a),
            ]
        )


# ------------------------------------------------------------- grants (#5)


@pytest.fixture
async def one_role(fresh_db: tuple[str, AsyncEngine]) -> AsyncIterator[str]:
    _, owner = fresh_db
    name = f"review_multi_{uuid.uuid4().hex[:8]}"
    async with owner.begin() as conn:
        await conn.execute(text(f'CREATE ROLE "{name}" NOLOGIN'))
    try:
        yield name
    finally:
        async with owner.begin() as conn:
            await conn.execute(text(f'DROP OWNED BY "{name}"'))
            await conn.execute(text(f'DROP ROLE "{name}"'))


async def _privileges(engine: AsyncEngine, role: str) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT t || ':' || p FROM unnest(ARRAY['audit_events', 'audit_seals']) t, "
                "unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p "
                "WHERE has_table_privilege(:r, t, p)"
            ),
            {"r": role},
        )
        return set(rows.scalars())


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        (
            ("writer", "reader"),
            {"audit_events:SELECT", "audit_events:INSERT", "audit_seals:SELECT"},
        ),
        (
            ("reader", "writer"),
            {"audit_events:SELECT", "audit_events:INSERT", "audit_seals:SELECT"},
        ),
        (
            ("writer", "sealer"),
            {
                "audit_events:SELECT",
                "audit_events:INSERT",
                "audit_seals:SELECT",
                "audit_seals:INSERT",
            },
        ),
        (("reader", "sealer"), {"audit_events:SELECT", "audit_seals:SELECT", "audit_seals:INSERT"}),
    ],
)
async def test_one_role_in_two_jobs_gets_the_union(
    fresh_db: tuple[str, AsyncEngine], one_role: str, jobs: tuple[str, str], expected: set[str]
) -> None:
    """README, Roles: "give roles exactly their privileges".

    A role named for two jobs (a small deployment's one application role as
    writer and reader) must end with both jobs' privileges: the second job's
    ``REVOKE ALL`` must not strip the first job's grants.
    """
    _, owner = fresh_db
    await grant(owner, **dict.fromkeys(jobs, one_role))
    assert await _privileges(owner, one_role) == expected


# ---------------------------------------------------------- migrations (#9)


async def test_migrate_refuses_audit_orm_revisions_in_two_version_tables(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README, Migrations: "A database uses them in one of two ways, never both".

    A database migrated standalone whose host ``alembic_version`` also records
    an audit_orm revision is in both modes: ``upgrade`` must refuse it with
    ``MigrationConflictError`` naming the host table, not run quietly.
    """
    _, engine = fresh_db
    async with engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        )
        await conn.execute(
            text("INSERT INTO alembic_version VALUES ('0002_order_clock_correlation')")
        )
    with pytest.raises(MigrationConflictError) as caught:
        await migrate.upgrade(engine)
    assert caught.value.where == "alembic_version"


# -------------------------------------------------------------- writer (#10)


async def test_writer_prepared_path_checks_the_corrected_event(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README, corrections: every writer's ``corrects=`` "checks the original exists".

    ``AuditWriter.record_prepared`` (the path for events validated beforehand
    with ``prepare_event``) must refuse a correction of an event that was
    never recorded, as ``record`` does, and write nothing.
    """
    _, engine = fresh_db
    prepared = prepare_event(**_accepted(uuid.uuid4(), corrects=uuid.uuid4()))  # type: ignore[arg-type]
    async with AuditWriter(engine) as writer:
        with pytest.raises(InvalidInputError, match="corrects"):
            await writer.record_prepared(prepared)
    assert await _present(engine, [prepared.id]) == set()
