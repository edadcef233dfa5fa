"""Adversarial review: attacks on the README's promises that broke, each fixed.

Every test here failed on the code before its fix, except those whose
docstring says they pin a path a fix changed (or a finding another change
fixed first); each docstring names the promise it attacks and what must hold.
"""

from __future__ import annotations

import asyncio
import io
import math
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditError,
    AuditRepository,
    AuditSerializationError,
    AuditTimeoutError,
    AuditUnavailableError,
    AuditWriter,
    EventIdConflictError,
    InvalidInputError,
    MigrationConflictError,
    Spool,
    bulk,
    cli,
    grant,
    migrate,
)
from audit_orm.jsonb import dumps_exact
from audit_orm.repository import prepare_event
from audit_orm.retry import RetryPolicy, call_with_retries
from tests.dbutil import scratch_database
from tests.faultutil import unreachable_url


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
                # The sealer's UPDATE is only for the seal lock (README, Roles).
                "audit_seals:UPDATE",
            },
        ),
        (
            ("reader", "sealer"),
            {
                "audit_events:SELECT",
                "audit_seals:SELECT",
                "audit_seals:INSERT",
                "audit_seals:UPDATE",
            },
        ),
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


# ------------------------------------------- transient conflicts (#6, #15)


async def _fail_inserts_once(engine: AsyncEngine, sqlstate: str, times: int = 1) -> None:
    """The next ``times`` INSERT statements on audit_events fail with ``sqlstate``.

    A real server error through the real driver, from a statement trigger; a
    sequence counts the failures since it is not rolled back with them.
    """
    async with engine.begin() as conn:
        await conn.execute(text("CREATE SEQUENCE review_fault_count"))
        await conn.execute(
            text(
                "CREATE FUNCTION review_fault() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN IF nextval('review_fault_count') <= {times} THEN "
                f"RAISE EXCEPTION 'injected fault' USING ERRCODE = '{sqlstate}'; "
                "END IF; RETURN NULL; END $$"
            )
        )
        await conn.execute(
            text(
                "CREATE TRIGGER review_fault BEFORE INSERT ON audit_events "
                "FOR EACH STATEMENT EXECUTE FUNCTION review_fault()"
            )
        )


@pytest.mark.parametrize(
    ("sqlstate", "expected"),
    [
        ("40001", AuditSerializationError),  # serialization_failure
        ("40P01", AuditSerializationError),  # deadlock_detected
        ("25P03", AuditTimeoutError),  # idle_in_transaction_session_timeout
        ("25P04", AuditTimeoutError),  # transaction_timeout (PostgreSQL 17+)
    ],
)
async def test_transient_server_errors_are_typed(
    fresh_db: tuple[str, AsyncEngine], sqlstate: str, expected: type[AuditError]
) -> None:
    """README, Errors: serialization failures and deadlocks are transient, and so is a
    transaction cut by a timeout.

    Each SQLSTATE, raised by the server during a write, must reach the caller
    as its typed error, a subclass of ``AuditUnavailableError`` that retries
    act on.
    """
    _, engine = fresh_db
    await _fail_inserts_once(engine, sqlstate)
    async with AsyncSession(engine) as session:
        with pytest.raises(expected) as caught:
            await AuditRepository(session).record(**_accepted(uuid.uuid4()))  # type: ignore[arg-type]
    assert isinstance(caught.value, AuditUnavailableError)
    assert type(caught.value) is expected


@pytest.mark.parametrize("fails_at", ["insert", "commit"])
async def test_call_with_retries_repeats_a_transaction_that_lost_a_serialization_race(
    fresh_db: tuple[str, AsyncEngine], fails_at: str
) -> None:
    """README, Retries: ``call_with_retries`` acts on transient errors.

    Two SERIALIZABLE transactions read the same ticker's events and both
    record one (write skew): PostgreSQL aborts the later one with a
    serialization failure, at its INSERT or, when both wrote before the
    first committed, at its own COMMIT (a raw SQLAlchemy error from the
    caller's ``session.begin()``). The retry helper must run the unit of work
    again either way, and its event ends up stored once.
    """
    _, engine = fresh_db
    serializable = engine.execution_options(isolation_level="SERIALIZABLE")
    ticker_events = text("SELECT count(*) FROM audit_events WHERE ticker = 'ACME'")
    mine = uuid.uuid4()
    attempts = 0

    async def unit_of_work() -> None:
        nonlocal attempts
        attempts += 1
        async with AsyncSession(serializable) as session, session.begin():
            await session.execute(ticker_events)
            if fails_at == "commit":
                await AuditRepository(session).record(**_accepted(uuid.uuid4()), event_id=mine)  # type: ignore[arg-type]
            if attempts == 1:
                # A concurrent transaction reads the same events and records one.
                async with AsyncSession(serializable) as other, other.begin():
                    await other.execute(ticker_events)
                    await AuditRepository(other).record(**_accepted(uuid.uuid4()))  # type: ignore[arg-type]
            if fails_at == "insert":
                await AuditRepository(session).record(**_accepted(uuid.uuid4()), event_id=mine)  # type: ignore[arg-type]

    await call_with_retries(
        unit_of_work, policy=RetryPolicy(attempts=3, first_delay=0), action="serializable"
    )
    assert attempts == 2
    assert await _present(engine, [mine]) == {mine}


# ---------------------------------------------------------- CLI exit (#14)


def test_cli_exit_codes_tell_an_outage_from_bad_input(
    fresh_db: tuple[str, AsyncEngine], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """README, Command line: a script must tell "try again later" from "fix the call".

    Every command against a database that cannot be reached exits 3; bad
    input exits 2, before any connection is tried.
    """
    url, _ = fresh_db
    dead = unreachable_url(url)
    spool = tmp_path / "audit.spool"
    Spool(spool).append_event(prepare_event(**_accepted(uuid.uuid4())), "outage")  # type: ignore[arg-type]
    for argv in (
        ["replay", str(spool), "--attempts", "1"],
        ["trail", str(uuid.uuid4())],
        ["export"],
        ["verify"],
        ["seal"],
        ["digest"],
        ["migrate"],
        ["grant", "--reader", "someone"],
    ):
        assert cli.main(["--database-url", dead, *argv], out=io.StringIO()) == 3, argv
        assert "audit-orm: error:" in capsys.readouterr().err
    assert cli.main(["--database-url", dead, "trail", "not-a-uuid"], out=io.StringIO()) == 2


# ---------------------------------------------- concurrent migrations (#8)


async def _heads(engine: AsyncEngine) -> tuple[str, ...]:
    async with engine.connect() as conn:
        return await conn.run_sync(migrate.current_heads)


async def test_concurrent_upgrades_in_one_process(admin_url: str) -> None:
    """README, Migrations: ``audit_orm.migrate.upgrade(engine)`` migrates a database.

    Three upgrades at once in one process, two of them of the same empty
    database: Alembic keeps the running migration in module globals, so
    interleaved runs used to trip over each other (a ``KeyError``, or two
    runs of one database waiting for each other forever). Each must succeed, and both
    databases end at head.
    """
    head = tuple(ScriptDirectory.from_config(migrate.alembic_config()).get_heads())
    async with scratch_database(admin_url) as (_, one), scratch_database(admin_url) as (_, two):
        # A guard, not a measure: interleaved runs of one database used to
        # wait for each other forever.
        async with asyncio.timeout(120):
            await asyncio.gather(migrate.upgrade(one), migrate.upgrade(two), migrate.upgrade(one))
        assert await _heads(one) == head
        assert await _heads(two) == head


async def test_two_migrate_commands_on_one_empty_database(admin_url: str) -> None:
    """README, Command line: ``audit-orm migrate`` applies the migrations.

    Two deployments start ``audit-orm migrate`` on the same empty database at
    the same moment. Both are held at their first ``CREATE TABLE`` (the test
    holds the schema's lock) and released together: without a lock between
    them, one failed with a raw ``IntegrityError``. Both must exit 0, the
    second finding nothing left to do.
    """
    head = tuple(ScriptDirectory.from_config(migrate.alembic_config()).get_heads())
    async with scratch_database(admin_url) as (url, engine):
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        async with engine.connect() as blocker, engine.connect() as watcher:
            # Dropping the schema in an open transaction takes its lock; every
            # CREATE in it waits until the rollback puts the schema back.
            await blocker.execute(text("DROP SCHEMA public"))
            runs = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "audit_orm", "--database-url", url, "migrate"),
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                for _ in range(2)
            ]
            while await watcher.scalar(waiting) < 2 and all(r.returncode is None for r in runs):
                await watcher.rollback()
                await asyncio.sleep(0.05)
            await blocker.rollback()
        outputs = [await run.communicate() for run in runs]
        for run, (_, err) in zip(runs, outputs, strict=True):
            assert run.returncode == 0, err.decode()
        assert await _heads(engine) == head


async def test_writer_retries_a_group_aborted_by_a_serialization_failure(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Writer: "an await that returns means the event is committed"; a transient conflict
    must not fail a whole group for good.

    The server aborts the group's INSERT twice with a serialization failure
    (as it may under ``default_transaction_isolation = serializable``). Each
    statement of the writer is a transaction of its own, so nothing was
    written: the writer runs the group again, and every caller gets its
    record, each event stored once. When the conflict does not clear, the
    callers get ``AuditSerializationError``, which ``call_with_retries`` acts on.
    """
    _, engine = fresh_db
    await _fail_inserts_once(engine, "40001", times=2)
    ids = [uuid.uuid4() for _ in range(5)]
    async with AuditWriter(engine, max_delay=0.05) as writer:
        records = await asyncio.gather(
            *(writer.record(**_accepted(uuid.uuid4()), event_id=i) for i in ids)  # type: ignore[arg-type]
        )
        assert writer.stats.failed_batches == 0
    assert [record.id for record in records] == ids
    assert await _present(engine, ids) == set(ids)

    async with engine.begin() as conn:
        await conn.execute(
            text("ALTER SEQUENCE review_fault_count MINVALUE -1000000 RESTART WITH -1000000")
        )
    async with AuditWriter(engine) as writer:
        with pytest.raises(AuditSerializationError):
            await writer.record(**_accepted(uuid.uuid4()))  # type: ignore[arg-type]


# ------------------------------------------------------ negative zero (property flake)


async def test_negative_zero_score_is_stored_and_returned_as_zero(
    repo: AuditRepository,
) -> None:
    """README, Exactness: "PostgreSQL ... has no negative zero, so payloads store -0.00 as
    0.00" -- for scores (floats) as for amounts.

    A confidence of ``-0.0`` used to be kept as ``-0.0`` in the returned
    record while the row read back ``0.0``: the same event said two things,
    which the database property test tripped over now and then. The record
    returned, the row read back and its JSON must all say ``0.0``.
    """
    data = {
        "ticker": "ACME",
        "action": "buy",
        "mode": "paper",
        "confidence": -0.0,
        "evidence_count": 1,
        "suppressed": False,
    }
    written = await repo.record("recommendation.generated", "recommendation", uuid.uuid4(), data)
    stored = await repo.get(written.id)
    assert stored is not None
    for record in (written, stored):
        confidence = record.payload.confidence  # type: ignore[attr-defined]
        assert math.copysign(1.0, confidence) == 1.0
    assert {k: str(v) for k, v in written.data.items()} == {
        k: str(v) for k, v in stored.data.items()
    }
    assert '"confidence":0.0' in dumps_exact(written.data)


async def test_autocommit_batch_falls_back_from_copy_inside_its_transaction(
    fresh_db: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, batches: large batches go through COPY and fall back to the array INSERT
    when an id turns out to be stored; on an AUTOCOMMIT session that happens inside
    the batch's own transaction.

    The lookup before the COPY is made blind, so the COPY meets a stored id
    and fails; the batch must fall back (a savepoint in the batch's
    transaction keeps it alive), return the stored event for the repeated
    id, and commit the rest, in order. (Pins the path the AUTOCOMMIT fix
    changed; it held once that fix was in.)
    """
    _, engine = fresh_db
    monkeypatch.setattr(bulk, "COPY_THRESHOLD", 2)
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    taken = _accepted(uuid.uuid4(), event_id=uuid.uuid4())
    async with AsyncSession(autocommit) as session:
        first = await AuditRepository(session).record_many([taken])  # type: ignore[list-item]
        real_fetch = bulk.fetch_stored
        calls = 0

        async def blind_first_check(conn: Any, ids: Any) -> Any:
            nonlocal calls
            calls += 1
            return {} if calls == 1 else await real_fetch(conn, ids)

        monkeypatch.setattr(bulk, "fetch_stored", blind_first_check)
        batch = [_accepted(uuid.uuid4()), taken, _accepted(uuid.uuid4())]
        records = await AuditRepository(session).record_many(batch)  # type: ignore[arg-type]
    assert calls >= 2
    assert records[1] == first[0]
    assert records[0].seq < records[2].seq
    assert await _present(engine, [r.id for r in records]) == {r.id for r in records}


# --------------------------------------------------------- retry policy (#12)


@pytest.mark.parametrize(
    "options",
    [
        {"attempts": 0},
        {"attempts": -1},
        {"first_delay": float("nan")},
        {"first_delay": -0.5},
        {"max_delay": float("inf")},
        {"multiplier": float("nan")},
        {"jitter": float("-inf")},
    ],
)
def test_retry_policy_refuses_waits_that_never_end_or_make_no_sense(
    options: dict[str, float],
) -> None:
    """README, Retries: "bounded (RetryPolicy.attempts, exponential backoff with jitter,
    capped)".

    A NaN or infinite wait never ends (or sleeps for no time, forever); a
    negative one or fewer than one attempt means nothing. Each is refused with
    ``InvalidInputError`` naming the option. (Fixed first by the bad-input
    work; pinned here with the review's finding.)
    """
    with pytest.raises(InvalidInputError) as caught:
        RetryPolicy(**options)  # type: ignore[arg-type]
    assert caught.value.field == next(iter(options))
