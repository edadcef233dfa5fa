"""Second adversarial review: new classes of attack on the README's promises.

Each test names the promise it attacks. Tests of promises that held pin them;
tests of promises that broke were first seen failing on the code before
their fix.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditRepository,
    AuditWriter,
    InvalidIdError,
    InvalidInputError,
    digest,
    export_events,
    migrate,
    seal,
    verify,
)

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
        import io

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
