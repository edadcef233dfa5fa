"""Second adversarial review: new classes of attack on the README's promises.

Each test names the promise it attacks. Tests of promises that held pin them;
tests of promises that broke were first seen failing on the code before
their fix.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import unicodedata
import uuid
from asyncio.subprocess import PIPE
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditRepository,
    AuditWriter,
    EventIdConflictError,
    InvalidIdError,
    InvalidInputError,
    digest,
    export_events,
    migrate,
    seal,
    verify,
)
from audit_orm.repository import PreparedEvent, prepare_event
from audit_orm.spool import CLAIMED_SUFFIX, REJECTED_SUFFIX, Spool
from tests.faultutil import audit_table_locked, event_counts, total_events

SECRET = "S3cr3tPassw0rd"


def _cli(
    *argv: str, url: str | None = None, env_url: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AUDIT_ORM_DATABASE_URL"}
    if env_url is not None:
        env["AUDIT_ORM_DATABASE_URL"] = env_url
    prefix = ["--database-url", url] if url is not None else []
    return subprocess.run(
        [sys.executable, "-m", "audit_orm", *prefix, *argv],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


# --------------------------------------------------------- hostile database URLs


@pytest.mark.parametrize(
    "url",
    [
        # libpq's sslmode, which the driver does not take: a raw TypeError before
        f"postgresql://app:{SECRET}@127.0.0.1:1/db?sslmode=require",
        f"postgresql://app:{SECRET}@127.0.0.1:1/db?application=x",
        # a port the socket layer refuses: a raw OverflowError before
        f"postgresql://app:{SECRET}@127.0.0.1:99999/db",
        # a password holding "@": its tail was shown
        f"mysql://app:{SECRET[:4]}@{SECRET[4:]}@127.0.0.1:1/db",
        # a password in the query string: shown whole
        f"mysql://app@127.0.0.1:1/db?password={SECRET}",
    ],
)
@pytest.mark.parametrize("where", ["option", "environment"])
def test_a_hostile_database_url_is_bad_input_and_hides_its_password(url: str, where: str) -> None:
    """Command line: bad input exits 2 with one line naming the option; Errors: no secret shown.

    A URL the driver would only trip on at connection time (an unknown query
    parameter, a port out of range) is refused as bad input naming
    ``--database-url`` or ``AUDIT_ORM_DATABASE_URL``, with no traceback, and no
    part of the password reaches the terminal.
    """
    result = _cli("digest", url=url) if where == "option" else _cli("digest", env_url=url)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    named = "--database-url" if where == "option" else "AUDIT_ORM_DATABASE_URL"
    assert named in result.stderr
    for part in (SECRET, SECRET[:4], SECRET[4:]):
        assert part not in result.stderr


@pytest.fixture
def not_postgresql() -> Iterator[dict[str, int]]:
    """Two local ports that are not PostgreSQL: one answers HTTP, one hangs up."""
    servers = {
        "http": socket.create_server(("127.0.0.1", 0)),
        "close": socket.create_server(("127.0.0.1", 0)),
    }
    stop = threading.Event()

    def serve(sock: socket.socket, reply: bytes) -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                if reply:
                    conn.sendall(reply)

    threads = [
        threading.Thread(
            target=serve, args=(servers["http"], b"HTTP/1.1 400 Bad Request\r\n\r\n" * 50)
        ),
        threading.Thread(target=serve, args=(servers["close"], b"")),
    ]
    for thread in threads:
        thread.start()
    try:
        yield {name: sock.getsockname()[1] for name, sock in servers.items()}
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        for sock in servers.values():
            sock.close()


@pytest.mark.parametrize("kind", ["http", "close"])
@pytest.mark.parametrize("command", [["digest"], ["verify"], ["seal"], ["export"], ["migrate"]])
def test_a_url_at_a_port_that_is_not_postgresql_is_unavailable(
    not_postgresql: dict[str, int], kind: str, command: list[str]
) -> None:
    """Command line: exit 3 when the database is unavailable, with one line and no secret.

    ``AUDIT_ORM_DATABASE_URL`` names a port where something else listens (an
    HTTP server, a service that hangs up): every command exits 3 with a
    one-line message, never a traceback or a success.
    """
    url = f"postgresql://app:{SECRET}@127.0.0.1:{not_postgresql[kind]}/db"
    result = _cli(*command, env_url=url)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert SECRET not in result.stderr
    assert result.stderr.startswith("audit-orm: error: ")


# ----------------------------------------------- session time zone and date style


ODD_SETTINGS = {
    "TimeZone": "Asia/Kathmandu",  # +05:45
    "DateStyle": "SQL, DMY",
    "IntervalStyle": "sql_standard",
    "extra_float_digits": "-15",
    "lc_monetary": "C",
}


async def test_odd_session_time_zone_and_date_style_change_no_stamp_or_hash(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Row hashes and Sealing: the hash covers the times exactly, whatever the session shows.

    Events are written through the repository, a batch and the writer by a
    connection whose TimeZone is +05:45 and whose DateStyle is day-first;
    they are sealed by a connection at -03:30 and verified by one at +13:45.
    Every hash holds, the digest matches, ``occurred_at`` comes back as the
    instant given, and a ``since`` bound selects by instant, not wall time.
    """
    url, _ = fresh_db

    def engine_in(zone: str) -> AsyncEngine:
        settings = {**ODD_SETTINGS, "TimeZone": zone}
        return create_async_engine(url, connect_args={"server_settings": settings})

    writer_engine = engine_in("Asia/Kathmandu")
    sealer_engine = engine_in("America/St_Johns")
    auditor_engine = engine_in("Pacific/Chatham")
    try:
        order = uuid.uuid4()
        when = datetime(2026, 3, 29, 1, 30, tzinfo=timezone(timedelta(hours=-9, minutes=-30)))
        async with AsyncSession(writer_engine) as session, session.begin():
            repo = AuditRepository(session)
            first = await repo.order_accepted(order, "ACME", "brk-1", occurred_at=when)
            await repo.record_many(
                [
                    {
                        "event_type": "order.cancelled",
                        "entity_type": "order",
                        "entity_id": order,
                        "data": {"ticker": "ACME", "broker_order_id": "brk-1"},
                        "occurred_at": datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
                    }
                ]
            )
        async with AuditWriter(writer_engine) as writer:
            await writer.record(
                "order.rejected",
                "order",
                order,
                {"ticker": "ACME", "reason": "late"},
                occurred_at=datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
            )
        assert first.occurred_at == when
        assert (await seal(sealer_engine)).rows_sealed == 3
        kept = str(await digest(sealer_engine))
        report = await verify(auditor_engine, digest=kept)
        assert report.ok, report.problems
        assert report.digest_matched
        async with AsyncSession(auditor_engine) as session:
            trail = await AuditRepository(session).order_trail(order)
            assert [r.occurred_at for r in trail] == [
                when,
                datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
                datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
            ]
            since = trail[0].recorded_at
            page = await AuditRepository(session).search(since=since)
            assert [r.id for r in page.records] == [r.id for r in trail]
            later = await AuditRepository(session).search(since=since + timedelta(microseconds=1))
            assert trail[0].id not in [r.id for r in later.records]
        out = io.StringIO()
        assert await export_events(auditor_engine, out, since=since) == 3
        assert "0001-01-01T00:00:00.000001Z" in out.getvalue()
        assert "9999-12-31T23:59:59.999998Z" in out.getvalue()
    finally:
        for eng in (writer_engine, sealer_engine, auditor_engine):
            await eng.dispose()


def test_cli_times_without_offset_are_utc_whatever_the_database_time_zone(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Exports: "--since ... without an offset it is UTC", even when the database says otherwise.

    The database's default TimeZone is set to +14:00 (and DateStyle to
    day-first); an export bounded by ``--since`` at the UTC minute before the
    rows were written finds them all, and one at the minute after finds none.
    """
    url, _ = fresh_db
    assert _cli("demo", url=url).returncode == 0

    async def set_database_defaults() -> datetime:
        eng = create_async_engine(url)
        try:
            async with eng.begin() as conn:
                name = await conn.scalar(text("SELECT current_database()"))
                await conn.execute(
                    text(f"ALTER DATABASE \"{name}\" SET TimeZone = 'Pacific/Kiritimati'")
                )
                await conn.execute(text(f"ALTER DATABASE \"{name}\" SET DateStyle = 'SQL, DMY'"))
                last = await conn.scalar(text("SELECT max(recorded_at) FROM audit_events"))
                assert isinstance(last, datetime)
                return last
        finally:
            await eng.dispose()

    import asyncio

    last = asyncio.run(set_database_defaults())
    before = (last - timedelta(minutes=1)).astimezone(UTC).replace(tzinfo=None)
    after = (last + timedelta(minutes=1)).astimezone(UTC).replace(tzinfo=None)
    found = _cli("export", "--since", before.isoformat(), url=url)
    assert found.returncode == 0, found.stderr
    assert found.stdout.count("\n") >= 1
    none = _cli("export", "--since", after.isoformat(), url=url)
    assert none.returncode == 0, none.stderr
    assert none.stdout == ""


async def _write(engine: AsyncEngine, path: str, event: dict[str, object]) -> None:
    if path == "writer":
        async with AuditWriter(engine) as writer:
            await writer.record(**event)  # type: ignore[arg-type]
        return
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        if path == "batch":
            await repo.record_many([event])  # type: ignore[list-item]
        else:
            await repo.record(**event)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "when",
    [
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 13, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-10))),
        datetime(1, 1, 1, tzinfo=UTC),
    ],
    ids=["max-utc", "max-at-minus-10", "min-utc"],
)
@pytest.mark.parametrize("path", ["repository", "batch", "writer"])
async def test_the_first_and_last_instants_are_bad_input_not_infinity(
    fresh_db: tuple[str, AsyncEngine], when: datetime, path: str
) -> None:
    """Bad input: refused before anything is sent; the table: no ``infinity``.

    The driver sends the first and the last instant Python has (year 1
    00:00 UTC, 9999-12-31 23:59:59.999999 UTC) as ``-infinity`` and
    ``infinity``, which the table's CHECK refuses: before the fix, an
    ``AuditStorageError`` from the database (failing a writer's group). It is
    ``InvalidInputError`` naming ``occurred_at``, and nothing is written.
    """
    _, engine = fresh_db
    order = uuid.uuid4()
    event = {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": order,
        "data": {"ticker": "ACME", "broker_order_id": "brk-1"},
        "occurred_at": when,
    }
    with pytest.raises(InvalidInputError) as caught:
        await _write(engine, path, event)
    assert "occurred_at" in str(caught.value.field)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM audit_events")) == 0


# ------------------------------------------------- trails that share a recommendation


async def test_order_trail_with_a_recommendation_shared_by_two_orders(
    repo: AuditRepository,
) -> None:
    """Reading trails: an order's chain, and what a shared recommendation brings with it.

    One recommendation leads to order A (rejected) and then order B (filled);
    a third order C's only event names A's recommendation by mistake. The
    README states the limit this pins: every event linked to the
    recommendation is in the chain, with every event about the entities those
    events are about, so B's lifecycle shows in A's trail (and A's and B's in
    C's). Nothing of the chain is ever left out, and the records come in
    recorded order.
    """
    rec, a, b, c = (uuid.uuid4() for _ in range(4))
    await repo.recommendation_generated(rec, "ACME", "buy", "paper", 0.9, 3)
    await repo.order_submitted(a, "ACME", "buy", 10, "market", "k-a", recommendation_id=rec)
    await repo.order_rejected(a, "ACME", "no funds")
    await repo.order_submitted(b, "ACME", "buy", 5, "market", "k-b", recommendation_id=rec)
    await repo.order_filled(b, "ACME", "buy", 5, "10.5", "brk-b")
    await repo.order_submitted(c, "ACME", "sell", 1, "market", "k-c", recommendation_id=rec)
    trail_a = await repo.order_trail(a)
    kinds_a = [(r.event_type.value, r.entity_id) for r in trail_a]
    assert ("order.rejected", a) in kinds_a
    assert ("order.filled", b) in kinds_a  # the limit the README states
    assert [r.seq for r in trail_a] == sorted(r.seq for r in trail_a)
    trail_c = await repo.order_trail(c)
    assert {r.entity_id for r in trail_c} == {rec, a, b, c}


# --------------------------------------------------- migrations down and up with data


async def _chain(engine: AsyncEngine, orders: int) -> list[uuid.UUID]:
    made = []
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(orders):
            order = uuid.uuid4()
            await repo.order_submitted(order, "ACME", "buy", 3, "limit", f"k-{order}")
            await repo.order_filled(order, "ACME", "buy", 3, "101.125", "brk")
            made.append(order)
    return made


@pytest.mark.parametrize("down_to", ["0004_trail_indexes", "0003_append_only_sealing"])
async def test_a_downgrade_and_upgrade_with_sealed_data_keeps_every_seal(
    fresh_db: tuple[str, AsyncEngine], down_to: str
) -> None:
    """Migrations and Sealing: a round trip through an older revision changes no sealed row.

    Rows are written and sealed and the digest kept; the schema goes down to
    ``down_to`` and up to head again (as the README tells a superuser to do
    to add the guard later). The kept digest still matches, every hash
    holds, numbering goes on after the old rows, and new rows seal onto the
    same chain.
    """
    _, engine = fresh_db
    await _chain(engine, 5)
    await seal(engine)
    kept = str(await digest(engine))
    async with engine.connect() as conn:
        last = await conn.scalar(text("SELECT max(seq) FROM audit_events"))
    await migrate.downgrade(engine, down_to)
    await migrate.upgrade(engine)
    report = await verify(engine, digest=kept)
    assert report.ok, report.problems
    assert report.digest_matched
    await _chain(engine, 2)
    async with engine.connect() as conn:
        assert (
            await conn.scalar(text("SELECT min(seq) FROM audit_events WHERE seq > :s"), {"s": last})
            == last + 1
        )
    await seal(engine)
    report = await verify(engine, digest=kept)
    assert report.ok, report.problems
    assert report.digest_matched


# --------------------------------------------- seal and verify without the privileges


@pytest.mark.parametrize("command", [["verify"], ["seal"], ["digest"], ["export"], ["migrate"]])
def test_a_role_without_privileges_gets_a_clear_refusal(
    fresh_db: tuple[str, AsyncEngine], command: list[str]
) -> None:
    """Command line: a refusal by the database exits 2 with one line, never 0 or a traceback.

    A role that may log in but was granted nothing runs each command: each
    exits 2 with a one-line message saying permission was denied, and
    ``verify`` never reports the trail as holding.
    """
    url, _ = fresh_db
    name = f"review2_nobody_{uuid.uuid4().hex[:8]}"

    async def roles(create: bool) -> None:
        eng = create_async_engine(url)
        try:
            async with eng.begin() as conn:
                if create:
                    await conn.execute(text(f'CREATE ROLE "{name}" LOGIN'))
                else:
                    await conn.execute(text(f'DROP OWNED BY "{name}"'))
                    await conn.execute(text(f'DROP ROLE "{name}"'))
        finally:
            await eng.dispose()

    import asyncio

    assert _cli("demo", url=url).returncode == 0
    asyncio.run(roles(create=True))
    try:
        as_nobody = str(make_url(url).set(username=name, password=None))
        result = _cli(*command, url=as_nobody)
    finally:
        asyncio.run(roles(create=False))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "permission denied" in result.stderr


# ------------------------------------------------------ ids that are not quite ids


@pytest.mark.parametrize(
    "given",
    [
        "1_" + "0" * 30,  # an underscore in place of a digit
        " " + "a" * 31,  # a space in place of a digit
        "+" + "a" * 31,  # a sign
        "a" * 31 + "\n",  # a digit lost, a newline kept
        "\uff10" * 32,  # fullwidth zeros
        "\u0663" * 32,  # Arabic-Indic threes
        "{" + "a" * 32,  # an unbalanced brace
    ],
    ids=["underscore", "space", "sign", "newline", "fullwidth", "arabic-indic", "brace"],
)
async def test_an_id_that_only_int_would_read_is_refused(repo: AuditRepository, given: str) -> None:
    """Bad input: an id is a UUID or its string form; anything else is ``InvalidIdError``.

    Python's ``uuid.UUID`` reads the digits with ``int()``, so before the fix
    these strings were taken as *other* ids (``"1_000..."`` as
    ``01000000-...``, fullwidth digits as the ASCII id): an event recorded
    under an id the caller never wrote, a trail read for another order. They
    are refused at every entry point, and nothing is written.
    """
    with pytest.raises(InvalidIdError):
        await repo.order_rejected(given, "ACME", "no")
    with pytest.raises(InvalidIdError):
        await repo.order_trail(given)
    with pytest.raises(InvalidIdError):
        await repo.get(given)
    assert (await repo.search()).records == []


def test_the_usual_id_forms_still_read() -> None:
    """Bad input: the string forms of a UUID stay accepted (dashes or not, braces, urn, case)."""
    from audit_orm.ids import coerce_uuid

    want = uuid.UUID("0193a4c2-7b1e-7abc-8def-0123456789ab")
    for form in (
        str(want),
        want.hex,
        str(want).upper(),
        "{" + str(want) + "}",
        "urn:uuid:" + str(want),
    ):
        assert coerce_uuid(form, "id") == want


# ------------------------------------------- a replay stopped by SIGTERM, then rerun


async def test_a_replay_killed_by_sigterm_between_chunks_then_rerun(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """What replay does: a crash leaves ``SPOOL.replaying``, and the next run picks it up.

    ``audit-orm replay --chunk-size 25`` over 1,500 spooled events is sent
    SIGTERM once some chunks have committed; a service appends one more event
    meanwhile. The rerun exits 0, and every event is present exactly once
    (the committed chunks counted as already present, none written twice),
    with no rejected file and no claimed file left.
    """
    url, engine = fresh_db
    spool = Spool(tmp_path / "audit.spool")

    def accepted(broker: str) -> PreparedEvent:
        data = {"ticker": "X", "broker_order_id": broker}
        return prepare_event("order.accepted", "order", uuid.uuid4(), data)

    events = [accepted(f"b{i}") for i in range(1500)]
    spool.append_events(events, "outage")
    env = {k: v for k, v in os.environ.items() if k != "AUDIT_ORM_DATABASE_URL"}
    argv = [sys.executable, "-m", "audit_orm", "--database-url", url, "replay", str(spool.path)]
    proc = await asyncio.create_subprocess_exec(
        *argv, "--chunk-size", "25", env=env, stdout=PIPE, stderr=PIPE
    )
    try:
        # Until a chunk has committed (or the run ended): no clock involved.
        while proc.returncode is None and await total_events(engine) == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    late = accepted("late")
    spool.append_event(late, "outage")
    rerun = await asyncio.create_subprocess_exec(*argv, env=env, stdout=PIPE, stderr=PIPE)
    _, err = await rerun.communicate()
    assert rerun.returncode == 0, err.decode()
    counts = await event_counts(engine, [e.id for e in [*events, late]])
    assert set(counts.values()) == {1}
    assert len(counts) == len(events) + 1
    assert await total_events(engine) == len(events) + 1
    assert not spool.path.with_name(spool.path.name + CLAIMED_SUFFIX).exists()
    assert not spool.path.with_name(spool.path.name + REJECTED_SUFFIX).exists()


# ------------------------------------------------------- Unicode normalisation


async def test_actors_in_two_normal_forms_are_two_texts_on_every_path(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Same event, same verdict; Row hashes: text is stored and hashed as given, never normalised.

    An actor written in NFC (``Zoë``, one code point) and the same name in NFD
    (``e`` + combining diaeresis) are different texts: each round-trips
    exactly, seals and verifies; a retry of an event under its id with the
    other form is a conflict on the repository and on the writer alike (the
    trail must not say someone else wrote it).
    """
    _, engine = fresh_db
    nfc, nfd = unicodedata.normalize("NFC", "Zoë"), unicodedata.normalize("NFD", "Zoë")
    assert nfc != nfd
    order, event_id = uuid.uuid4(), uuid.uuid4()
    spec = {
        "event_type": "order.accepted",
        "entity_type": "order",
        "entity_id": order,
        "data": {"ticker": "ACME", "broker_order_id": "brk"},
        "event_id": event_id,
    }
    async with AsyncSession(engine) as session, session.begin():
        stored = await AuditRepository(session).record(**spec, actor=nfc)  # type: ignore[arg-type]
    assert stored.actor == nfc
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(EventIdConflictError):
            await AuditRepository(session).record(**spec, actor=nfd)  # type: ignore[arg-type]
    async with AuditWriter(engine) as writer:
        with pytest.raises(EventIdConflictError):
            await writer.record(**spec, actor=nfd)  # type: ignore[arg-type]
        other = await writer.record(**{**spec, "event_id": uuid.uuid4()}, actor=nfd)  # type: ignore[arg-type]
    async with AsyncSession(engine) as session:
        back = await AuditRepository(session).order_trail(order)
    assert [r.actor for r in back] == [nfc, nfd]
    assert other.actor == nfd
    await seal(engine)
    report = await verify(engine)
    assert report.ok, report.problems


# ----------------------------------------- the writer's full queue, and cancellations


async def test_callers_cancelled_while_the_writers_queue_is_full(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Writer: back-pressure at ``max_queue``; Never silently missing.

    The table is locked so no group can commit; 40 callers fill a queue of 3
    and wait for room; every other one is cancelled, some while queued and
    some while still waiting for room. Once the lock goes, every caller not
    cancelled gets its record, present exactly once; a cancelled caller's
    event is present at most once (it may have been queued); nothing stays
    queued or blocked, and ``close()`` returns.
    """
    _, engine = fresh_db
    order = uuid.uuid4()

    def spec(i: int) -> dict[str, object]:
        return {
            "event_type": "order.accepted",
            "entity_type": "order",
            "entity_id": order,
            "data": {"ticker": "ACME", "broker_order_id": f"b{i}"},
            "event_id": uuid.uuid4(),
        }

    specs = [spec(i) for i in range(40)]
    writer = AuditWriter(engine, max_queue=3, max_batch=2, max_delay=0)
    try:
        async with audit_table_locked(engine):
            tasks = [asyncio.ensure_future(writer.record(**s)) for s in specs]  # type: ignore[arg-type]
            while writer.blocked < 30:  # noqa: ASYNC110 - the writer offers no event to wait on
                await asyncio.sleep(0.01)
            for task in tasks[::2]:
                task.cancel()
            await asyncio.sleep(0)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await writer.close()
    assert (writer.queued, writer.blocked) == (0, 0)
    counts = await event_counts(engine, [s["event_id"] for s in specs])  # type: ignore[misc]
    for i, (s, outcome) in enumerate(zip(specs, outcomes, strict=True)):
        if i % 2:
            assert not isinstance(outcome, BaseException), outcome
            assert outcome.id == s["event_id"]
            assert counts.get(s["event_id"]) == 1  # type: ignore[call-overload]
        else:
            assert isinstance(outcome, asyncio.CancelledError)
            assert counts.get(s["event_id"], 0) <= 1  # type: ignore[call-overload]


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://app:{SECRET[:4]}@{SECRET[4:]}@127.0.0.1:1/db",
        f"mysql://app@127.0.0.1:1/db?password={SECRET}",
        f"postgresql://app:{SECRET[:4]}@{SECRET[4:]}@127.0.0.1:1/db?sslmode=require",
    ],
)
def test_a_writer_given_an_unusable_url_shows_no_part_of_its_password(url: str) -> None:
    """Errors: "hostile strings never reach a log raw"; the writer's URL is refused as bad input.

    ``AuditWriter(url)`` refuses a URL it cannot use with ``InvalidInputError``
    naming ``engine``; before the fix the tail of a password holding ``@``,
    or one in the query string, was in the message.
    """
    with pytest.raises(InvalidInputError) as caught:
        AuditWriter(url)
    assert caught.value.field == "engine"
    for part in (SECRET, SECRET[:4], SECRET[4:]):
        assert part not in str(caught.value)


# ---------------------------------------------------- an export while writers insert


async def test_an_export_while_writers_insert_is_one_snapshot(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """Exports: "one read-only REPEATABLE READ transaction gives every chunk the same snapshot".

    2,500 rows are exported in chunks of 1,000 while a writer commits pairs of
    events, starting once the export has counted its total: the export holds
    exactly the 2,500 rows, each once and in ``seq`` order, and none of the
    rows committed during it, whichever chunk they would have fallen into.
    """
    _, engine = fresh_db
    order = uuid.uuid4()

    def accepted(i: int) -> dict[str, object]:
        return {
            "event_type": "order.accepted",
            "entity_type": "order",
            "entity_id": order,
            "data": {"ticker": "ACME", "broker_order_id": f"b{i}"},
        }

    async with AsyncSession(engine) as session, session.begin():
        await AuditRepository(session).record_many([accepted(i) for i in range(2500)])  # type: ignore[misc]
    counted = asyncio.Event()
    done = False
    during: list[uuid.UUID] = []

    def progress(written: int, total: int | None) -> None:
        counted.set()

    async def insert_pairs() -> None:
        await counted.wait()
        while not done:
            async with AsyncSession(engine) as session, session.begin():
                repo = AuditRepository(session)
                for _ in range(2):
                    during.append((await repo.record(**accepted(-1))).id)  # type: ignore[arg-type]

    inserter = asyncio.ensure_future(insert_pairs())
    out = io.StringIO()
    try:
        exported = await export_events(engine, out, progress=progress)
    finally:
        done = True
        await inserter
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert exported == len(rows) == 2500
    seqs = [row["seq"] for row in rows]
    assert seqs == sorted(set(seqs))
    assert not {str(i) for i in during} & {row["id"] for row in rows}


# ------------------------------------------- seal and export -o stopped by SIGTERM


async def _sigterm_when(argv: list[str], ready: Callable[[], Awaitable[bool]]) -> None:
    """Run the CLI with ``argv`` and send it SIGTERM once ``ready()`` says so."""
    env = {k: v for k, v in os.environ.items() if k != "AUDIT_ORM_DATABASE_URL"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "audit_orm", *argv, env=env, stdout=PIPE, stderr=PIPE
    )
    try:
        while proc.returncode is None and not await ready():  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_seal_killed_by_sigterm_then_rerun(fresh_db: tuple[str, AsyncEngine]) -> None:
    """Sealing: "Sealing is idempotent": a sealer killed between seals leaves a sound chain.

    ``audit-orm seal --block-size 10`` over 1,500 rows is sent SIGTERM once
    its first seal has committed. The chain it left verifies; a rerun seals
    the rest, and the whole trail verifies with its digest.
    """
    url, engine = fresh_db
    await _chain(engine, 750)

    async def first_seal() -> bool:
        async with engine.connect() as conn:
            return bool(await conn.scalar(text("SELECT count(*) FROM audit_seals")))

    await _sigterm_when(["--database-url", url, "seal", "--block-size", "10"], first_seal)
    assert (await verify(engine)).ok
    result = await seal(engine)
    assert result.status != "waiting"
    async with engine.connect() as conn:
        unsealed = await conn.scalar(
            text(
                "SELECT count(*) FROM audit_events WHERE seq > "
                "(SELECT max(last_seq) FROM audit_seals)"
            )
        )
    assert unsealed == 0
    report = await verify(engine, digest=str(await digest(engine)))
    assert report.ok, report.problems
    assert report.digest_matched


async def test_an_export_to_a_file_killed_by_sigterm_leaves_the_old_file(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """Exports: "a crash leaves the old file or the whole new one".

    ``audit-orm export -o FILE`` over 3,000 rows is sent SIGTERM once its
    partial file exists beside the target: the target still holds the old
    export, byte for byte (or, if the export had already finished, the
    whole new one), and no partial file is left beside it.
    """
    url, engine = fresh_db
    await _chain(engine, 1500)
    target = tmp_path / "out.jsonl"
    target.write_text("the old export\n")

    async def partial_exists() -> bool:
        # A directory listing of a test folder: nothing to gain from a thread.
        return any(p.name != target.name for p in tmp_path.iterdir())  # noqa: ASYNC240

    await _sigterm_when(["--database-url", url, "export", "-o", str(target)], partial_exists)
    text_now = target.read_text()
    # The partial file was removed on the way out (before the fix it stayed).
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # noqa: ASYNC240
    if text_now != "the old export\n":
        assert len(text_now.splitlines()) == 3000
