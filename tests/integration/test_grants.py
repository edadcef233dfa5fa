"""Roles: a writer may INSERT and SELECT only, a reader SELECT only, the sealer add seals."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditRepository,
    AuditStorageError,
    InvalidInputError,
    SealStatus,
    grant,
    seal,
    verify,
)
from audit_orm.grants import grant_statements, quote_role

INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(frozen=True)
class Roles:
    writer: str
    reader: str
    sealer: str
    engines: dict[str, AsyncEngine]


@pytest.fixture
async def roles(fresh_db: tuple[str, AsyncEngine]) -> AsyncIterator[Roles]:
    url, owner = fresh_db
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"audit_{kind}_{suffix}" for kind in ("writer", "reader", "sealer")}
    async with owner.begin() as conn:
        for name in names.values():
            await conn.execute(text(f'CREATE ROLE "{name}" NOLOGIN'))
    # The test server has one login role; acting as another is SET ROLE, which
    # checks privileges exactly as logging in as that role would.
    engines = {
        kind: create_async_engine(url, connect_args={"server_settings": {"role": name}})
        for kind, name in names.items()
    }
    try:
        yield Roles(names["writer"], names["reader"], names["sealer"], engines)
    finally:
        for engine in engines.values():
            await engine.dispose()
        async with owner.begin() as conn:
            for name in names.values():
                await conn.execute(text(f'DROP OWNED BY "{name}"'))
                await conn.execute(text(f'DROP ROLE "{name}"'))


async def _denied(engine: AsyncEngine, statement: str, **params: object) -> None:
    async with engine.connect() as conn:
        with pytest.raises(DBAPIError) as caught:
            await conn.execute(text(statement), params)
    assert getattr(caught.value.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE, statement


async def _record(engine: AsyncEngine) -> uuid.UUID:
    async with AsyncSession(engine) as session, session.begin():
        written = await AuditRepository(session).order_accepted(uuid.uuid4(), "ACME", "brk")
    return written.id


FORGED_SEAL = (
    "INSERT INTO audit_seals (seal_no, first_seq, last_seq, row_count, merkle_root, "
    "seal_hash, horizon_txid, cut_at, sealed_at) VALUES (1, 1, 1, 1, :h, :h, '1', now(), now())"
)


async def test_each_role_gets_exactly_its_privileges(
    fresh_db: tuple[str, AsyncEngine], roles: Roles
) -> None:
    _, owner = fresh_db
    statements = await grant(owner, writer=roles.writer, reader=roles.reader, sealer=roles.sealer)
    assert statements == grant_statements(
        writer=roles.writer,
        reader=roles.reader,
        sealer=roles.sealer,
        sequence="public.audit_events_seq_seq",
    )
    writer, reader, sealer = (roles.engines[k] for k in ("writer", "reader", "sealer"))

    # The writer records events (the identity needs no sequence privilege) and reads them.
    event_id = await _record(writer)
    async with AsyncSession(writer) as session:
        assert await AuditRepository(session).get(event_id) is not None
    for statement in (
        "UPDATE audit_events SET actor = 'mallory'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "ALTER TABLE audit_events DISABLE TRIGGER USER",
        "UPDATE audit_seals SET row_count = 1",
        "DELETE FROM audit_seals",
    ):
        await _denied(writer, statement)
    await _denied(writer, FORGED_SEAL, h=b"\x01" * 33)
    with pytest.raises(AuditStorageError, match="permission denied"):
        await seal(writer)

    # The reader reads and verifies, nothing else.
    await _denied(
        reader,
        "INSERT INTO audit_events (id, event_type, entity_type, entity_id) "
        "VALUES (:id, 'order.accepted', 'order', :id)",
        id=uuid.uuid4(),
    )
    await _denied(reader, FORGED_SEAL, h=b"\x01" * 33)
    await _denied(reader, "DELETE FROM audit_events")
    with pytest.raises(AuditStorageError, match="permission denied"):
        await seal(reader)

    # The sealer seals but cannot write events or change seals.
    result = await seal(sealer)
    assert result.status is SealStatus.SEALED and result.rows_sealed == 1
    await _denied(sealer, "DELETE FROM audit_seals")
    await _denied(
        sealer,
        "INSERT INTO audit_events (id, event_type, entity_type, entity_id) "
        "VALUES (:id, 'order.accepted', 'order', :id)",
        id=uuid.uuid4(),
    )
    for engine in (reader, writer):
        report = await verify(engine)
        assert report.ok and report.rows_checked == 1 and report.seals_checked == 1


async def test_grant_refuses_unknown_roles_and_changes_nothing(
    fresh_db: tuple[str, AsyncEngine], roles: Roles
) -> None:
    _, owner = fresh_db
    with pytest.raises(InvalidInputError, match="reader") as caught:
        await grant(owner, writer=roles.writer, reader="no_such_role_" + uuid.uuid4().hex)
    assert caught.value.field == "reader"
    # The writer's grant was not applied either.
    await _denied(
        roles.engines["writer"],
        "INSERT INTO audit_events (id, event_type, entity_type, entity_id) "
        "VALUES (:id, 'order.accepted', 'order', :id)",
        id=uuid.uuid4(),
    )


def test_statements_quote_role_names() -> None:
    assert quote_role('odd "name"', "writer") == '"odd ""name"""'
    sql = grant_statements(reader='odd "name"')
    assert sql == [
        'REVOKE ALL ON audit_events, audit_seals FROM "odd ""name"""',
        'GRANT SELECT ON audit_events, audit_seals TO "odd ""name"""',
    ]
    writer = grant_statements(writer="app")
    assert 'GRANT SELECT, INSERT ON audit_events TO "app"' in writer
    assert not any("audit_seals TO" in s and "INSERT" in s for s in writer)


@pytest.mark.parametrize(
    ("roles", "field"),
    [
        ({}, "roles"),
        ({"writer": ""}, "writer"),
        ({"reader": "public"}, "reader"),
        ({"sealer": "x" * 64}, "sealer"),
        ({"writer": "a\x00b"}, "writer"),
    ],
)
def test_statements_refuse_bad_names(roles: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        grant_statements(**roles)
    assert caught.value.field == field
