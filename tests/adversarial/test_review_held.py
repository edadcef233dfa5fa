"""Adversarial review: attacks on the README's promises that held.

Each test names the guarantee it attacks and how; all of them pass today and
keep the promise pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditRepository,
    AuditStorageError,
    AuditWriter,
    EventIdConflictError,
    WriterClosedError,
    export_events,
    grant,
    migrate,
    seal,
    verify,
)
from tests.dbutil import scratch_database

INSUFFICIENT_PRIVILEGE = "42501"


def _accepted(order_id: uuid.UUID, broker: str = "brk-1") -> dict[str, object]:
    return {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": order_id,
        "data": {"ticker": "ACME", "broker_order_id": broker},
    }


async def _present(engine: AsyncEngine, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        rows = await conn.scalars(
            text("SELECT id FROM audit_events WHERE id = ANY(:ids)"), {"ids": ids}
        )
        return set(rows)


# ------------------------------------------------------------------ the writer


async def test_writer_cancelled_caller_still_gets_its_event_written(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Writer: "Cancelling a caller's await does not withdraw its event once queued".

    The caller is cancelled while its event waits in a partial group; the
    event is written once anyway, and a retry with the same id returns it.
    """
    _, engine = fresh_db
    event_id, order = uuid.uuid4(), uuid.uuid4()
    async with AuditWriter(engine, max_delay=0.2) as writer:
        task = asyncio.ensure_future(writer.record(**_accepted(order), event_id=event_id))  # type: ignore[arg-type]
        while writer.queued == 0:  # noqa: ASYNC110 - the queue offers no event to wait on
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        again = await writer.record(**_accepted(order), event_id=event_id)  # type: ignore[arg-type]
    assert again.id == event_id
    assert await _present(engine, [event_id]) == {event_id}


async def test_writer_close_under_load_answers_every_caller_truthfully(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Writer: "close() writes everything already admitted"; an await that returns means
    committed.

    200 callers race a close() on a small queue (back-pressure) and small
    groups: each caller gets a record exactly when its event is stored, or
    ``WriterClosedError`` and nothing stored; none hangs.
    """
    _, engine = fresh_db
    writer = AuditWriter(engine, max_queue=5, max_batch=3)
    await writer.start()
    ids = [uuid.uuid4() for _ in range(200)]

    async def one(event_id: uuid.UUID) -> bool:
        try:
            await writer.record(**_accepted(uuid.uuid4()), event_id=event_id)  # type: ignore[arg-type]
        except WriterClosedError:
            return False
        return True

    tasks = [asyncio.ensure_future(one(event_id)) for event_id in ids]
    await asyncio.sleep(0)
    await writer.close()
    answers = await asyncio.gather(*tasks)
    present = await _present(engine, ids)
    assert {i for i, ok in zip(ids, answers, strict=True) if ok} == present


async def test_writer_conflict_in_one_group_fails_that_caller_alone(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Writer: "an event id already stored with other content fails that caller alone".

    Two callers in one group reuse one id with different content, a third
    repeats the first exactly: the first and third get the same record, the
    second ``EventIdConflictError``; one row.
    """
    _, engine = fresh_db
    event_id, order = uuid.uuid4(), uuid.uuid4()
    async with AuditWriter(engine, max_delay=0.5) as writer:
        outcomes = await asyncio.gather(
            writer.record(**_accepted(order), event_id=event_id),  # type: ignore[arg-type]
            writer.record(**_accepted(order, "other"), event_id=event_id),  # type: ignore[arg-type]
            writer.record(**_accepted(order), event_id=event_id),  # type: ignore[arg-type]
            return_exceptions=True,
        )
    assert isinstance(outcomes[1], EventIdConflictError)
    assert not isinstance(outcomes[0], BaseException)
    assert not isinstance(outcomes[2], BaseException)
    assert outcomes[0].seq == outcomes[2].seq
    assert await _present(engine, [event_id]) == {event_id}


# ------------------------------------------------- same event, same verdict


@pytest.mark.parametrize("second", ["record", "record_many", "record_many_copy", "writer"])
async def test_same_event_same_verdict_on_every_write_path(
    fresh_db: tuple[str, AsyncEngine], second: str
) -> None:
    """README: "recording the same event again returns the stored row"; reusing an id for
    different content raises ``EventIdConflictError`` -- on every path.

    The event is recorded by ``record``, then repeated by each path: the repeat
    returns the stored row (same seq); a changed payload is a conflict.
    """
    _, engine = fresh_db
    event_id, order = uuid.uuid4(), uuid.uuid4()
    fill = {
        "event_type": "order.filled",
        "entity_type": "order",
        "entity_id": order,
        "data": {
            "ticker": "ACME",
            "side": "buy",
            "fill_quantity": Decimal("10"),
            "fill_price": Decimal("187.1250"),
            "broker_order_id": "b",
        },
        "occurred_at": datetime(2026, 11, 30, 14, 5, 9, 123456, tzinfo=UTC),
        "event_id": event_id,
    }
    changed = {**fill, "data": {**fill["data"], "fill_price": Decimal("187.1251")}}  # type: ignore[dict-item]
    async with AsyncSession(engine) as session, session.begin():
        stored = await AuditRepository(session).record(**fill)  # type: ignore[arg-type]

    async def again(spec: dict[str, object]) -> int:
        if second == "writer":
            async with AuditWriter(engine) as writer:
                return (await writer.record(**spec)).seq  # type: ignore[arg-type]
        async with AsyncSession(engine) as session, session.begin():
            repo = AuditRepository(session)
            if second == "record":
                return (await repo.record(**spec)).seq  # type: ignore[arg-type]
            extra = []
            if second == "record_many_copy":
                extra = [
                    {**_accepted(uuid.uuid4()), "event_id": uuid.uuid4()} for _ in range(2_000)
                ]
            records = await repo.record_many([spec, *extra])  # type: ignore[list-item]
            return records[0].seq

    assert await again(fill) == stored.seq
    with pytest.raises(EventIdConflictError):
        await again(changed)
    async with engine.connect() as conn:
        assert (
            await conn.scalar(
                text("SELECT count(*) FROM audit_events WHERE id = :i"), {"i": event_id}
            )
            == 1
        )


# ------------------------------------------------------------- corrections


async def test_a_correction_of_a_correction_and_of_an_uncommitted_event(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README: corrections reference the event they correct; ``corrects=`` checks it exists.

    A correction may itself be corrected (the chain reads back); an event
    still uncommitted in another transaction cannot be corrected (it is not
    recorded yet): ``InvalidInputError``, nothing written.
    """
    _, engine = fresh_db
    order = uuid.uuid4()
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        wrong = await repo.record(**_accepted(order))  # type: ignore[arg-type]
        fixed = await repo.correct(wrong.id, {"ticker": "ACME", "broker_order_id": "brk-2"})
        fixed_again = await repo.correct(fixed.id, {"ticker": "ACME", "broker_order_id": "brk-3"})
        assert [r.id for r in await repo.corrections(fixed.id)] == [fixed_again.id]
        assert fixed_again.order_id == order
    async with AsyncSession(engine) as pending:
        await pending.begin()
        open_event = await AuditRepository(pending).record(**_accepted(uuid.uuid4()))  # type: ignore[arg-type]
        async with AsyncSession(engine) as other, other.begin():
            repo = AuditRepository(other)
            with pytest.raises(ValueError, match="no event"):
                await repo.correct(open_event.id, {"ticker": "ACME", "broker_order_id": "x"})
        await pending.rollback()


# ------------------------------------------------------------------ grants


@pytest.fixture
async def granted(fresh_db: tuple[str, AsyncEngine]) -> AsyncIterator[dict[str, AsyncEngine]]:
    url, owner = fresh_db
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"review_{kind}_{suffix}" for kind in ("writer", "reader", "sealer", "nobody")}
    async with owner.begin() as conn:
        for name in names.values():
            await conn.execute(text(f'CREATE ROLE "{name}" NOLOGIN'))
    await grant(owner, writer=names["writer"], reader=names["reader"], sealer=names["sealer"])
    engines = {
        kind: create_async_engine(url, connect_args={"server_settings": {"role": name}})
        for kind, name in names.items()
    }
    try:
        yield engines
    finally:
        for engine in engines.values():
            await engine.dispose()
        async with owner.begin() as conn:
            for name in names.values():
                await conn.execute(text(f'DROP OWNED BY "{name}"'))
                await conn.execute(text(f'DROP ROLE "{name}"'))


async def _denied(engine: AsyncEngine, statement: str) -> None:
    async with engine.connect() as conn:
        with pytest.raises(DBAPIError) as caught:
            await conn.execute(text(statement))
    assert getattr(caught.value.orig, "sqlstate", None) == INSUFFICIENT_PRIVILEGE, statement


async def test_no_role_can_move_the_sequence_and_public_gets_nothing(
    granted: dict[str, AsyncEngine],
) -> None:
    """README, Roles: "a reader may SELECT only; the sealer may read events and add seals";
    writers "need nothing on the seq sequence".

    No granted role may draw (``nextval``) or set (``setval``) the ``seq``
    sequence, which would let it burn or rewind the numbers sealing relies on;
    a role with only PUBLIC's defaults can neither read nor write either table.
    """
    for kind in ("writer", "reader", "sealer", "nobody"):
        for statement in (
            "SELECT nextval('audit_events_seq_seq')",
            "SELECT setval('audit_events_seq_seq', 1000000)",
            "ALTER SEQUENCE audit_events_seq_seq RESTART",
            "SELECT * FROM audit_events FOR UPDATE",
            "LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE",
            "LOCK TABLE audit_seals IN EXCLUSIVE MODE",
        ):
            if kind == "sealer" and statement.startswith("LOCK TABLE audit_seals"):
                # The sealer holds UPDATE on audit_seals to take the seal lock
                # (README, Sealing): locking that table is its privilege.
                continue
            await _denied(granted[kind], statement)
    for statement in (
        "SELECT * FROM audit_events",
        "SELECT * FROM audit_seals",
        "INSERT INTO audit_events (id, event_type, entity_type, entity_id) "
        "VALUES (gen_random_uuid(), 'order.accepted', 'order', gen_random_uuid())",
        "SELECT last_value FROM audit_events_seq_seq",
    ):
        await _denied(granted["nobody"], statement)


async def test_a_writer_cannot_choose_the_database_stamps(
    granted: dict[str, AsyncEngine],
) -> None:
    """README: the recorded time is "the database clock ... forced by a trigger"; rows are
    "hashed by the database at insert"; each row records ``txid``.

    The writer role inserts by plain SQL with a back-dated ``recorded_at``, a
    chosen ``row_hash`` and ``txid``: the trigger replaces all three.
    """
    event_id = uuid.uuid4()
    async with granted["writer"].begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO audit_events (id, event_type, entity_type, entity_id, actor, data, "
                "occurred_at, recorded_at, row_hash, txid) VALUES (:id, 'order.accepted', "
                '\'order\', :id, \'x\', \'{"ticker": "A", "broker_order_id": "b"}\', now(), '
                "'2000-01-01', :h, '5')"
            ),
            {"id": event_id, "h": b"\x01" * 33},
        )
        row = (
            await conn.execute(
                text(
                    "SELECT recorded_at > '2020-01-01', row_hash <> :h, txid::text <> '5' "
                    "FROM audit_events WHERE id = :id"
                ),
                {"id": event_id, "h": b"\x01" * 33},
            )
        ).one()
    assert tuple(row) == (True, True, True)


async def test_writer_and_reader_cannot_run_sealing(granted: dict[str, AsyncEngine]) -> None:
    """README: "only the sealer may add seals" -- through the library too, as a typed error."""
    for kind in ("writer", "reader", "nobody"):
        with pytest.raises(AuditStorageError):
            await seal(granted[kind])


# ---------------------------------------------------------------- the CLI


def _cli(
    url: str, *argv: str, stdout: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "audit_orm", "--database-url", url, *argv],
        stdout=stdout,
        stderr=subprocess.PIPE,
        check=False,
    )


def test_demo_twice_on_a_non_empty_database(fresh_db: tuple[str, AsyncEngine]) -> None:
    """README: ``demo`` migrates, records sample chains and prints one trail.

    Run twice on the same database (the second time it is not empty): both
    runs succeed and print a trail of their own order.
    """
    url, _ = fresh_db
    for _ in range(2):
        result = _cli(url, "demo")
        assert result.returncode == 0, result.stderr.decode()
        assert b"audit-orm trail " in result.stdout


@pytest.mark.parametrize("command", [["export"], ["export", "--format", "csv"], ["seal"]])
def test_a_full_disk_on_stdout_is_not_a_success(
    fresh_db: tuple[str, AsyncEngine], command: list[str]
) -> None:
    """README: "a failed export never leaves a truncated file" -- and never says it worked.

    Writing to ``/dev/full`` (ENOSPC on every write) ends with a non-zero exit
    and a one-line message naming the error, not a traceback.
    """
    url, _ = fresh_db
    assert _cli(url, "demo").returncode == 0
    with open("/dev/full", "wb") as full:
        result = _cli(url, *command, stdout=full.fileno())
    assert result.returncode != 0
    assert b"Traceback" not in result.stderr
    assert b"No space left" in result.stderr


# ------------------------------------------------------- a non-public schema


async def test_everything_works_in_a_schema_of_its_own(admin_url: str) -> None:
    """README: roles "need USAGE on the schema if it is not public" -- a non-public schema
    is supported.

    Migrated with ``search_path = audit`` (tables, sequence and version table in
    ``audit``), every path works there: record, record_many by COPY, the
    writer, seal, verify, export, grant, and a second migrate that finds
    nothing to do. (Pins this while names get qualified for other reasons.)
    """
    async with scratch_database(admin_url) as (url, admin):
        async with admin.begin() as conn:
            await conn.execute(text("CREATE SCHEMA audit"))
            await conn.execute(text("CREATE ROLE review_schema_writer NOLOGIN"))
        engine = create_async_engine(
            url, connect_args={"server_settings": {"search_path": "audit"}}
        )
        try:
            await migrate.upgrade(engine)
            async with engine.connect() as conn:
                tables = set(
                    await conn.scalars(
                        text("SELECT tablename FROM pg_tables WHERE schemaname = 'audit'")
                    )
                )
            assert {"audit_events", "audit_seals", "audit_orm_alembic_version"} <= tables
            async with AsyncSession(engine) as session, session.begin():
                repo = AuditRepository(session)
                await repo.record(**_accepted(uuid.uuid4()))  # type: ignore[arg-type]
                added = await repo.record_many(
                    [_accepted(uuid.uuid4()) for _ in range(2_100)],  # type: ignore[misc]
                    returning=False,
                )
                assert added == 2_100
            async with AuditWriter(engine) as writer:
                await writer.record(**_accepted(uuid.uuid4()))  # type: ignore[arg-type]
            assert (await seal(engine)).rows_sealed == 2_102
            report = await verify(engine)
            assert report.ok and report.rows_checked == 2_102
            assert await export_events(engine, io.StringIO()) == 2_102
            await grant(engine, writer="review_schema_writer")
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()
            async with admin.begin() as conn:
                await conn.execute(text("DROP SCHEMA audit CASCADE"))
                await conn.execute(text("DROP ROLE review_schema_writer"))
