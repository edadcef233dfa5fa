"""Adversarial: sealing cannot be held up by a role that may not seal, and never fails quietly.

README, Sealing: sealers take turns on a lock only a role allowed to seal can
hold; a sealer kept out longer than its ``--max-wait`` fails loudly; bad options
are refused naming the option.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, create_async_engine

from audit_orm import (
    AuditRepository,
    AuditStorageError,
    InvalidInputError,
    SealingError,
    SealStatus,
    digest,
    grant,
    seal,
    verify,
)
from audit_orm.cli import main

#: The advisory lock key sealers used to take: any role could hold it.
OLD_SEAL_LOCK_KEY = 0x61756469745F7365


async def _write(engine: AsyncEngine, count: int) -> None:
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(count):
            await repo.order_accepted(uuid.uuid4(), "ACME", "brk")


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


@pytest.fixture
async def roles(fresh_db: tuple[str, AsyncEngine]) -> AsyncIterator[dict[str, AsyncEngine]]:
    """Engines acting as a granted writer, reader and sealer, and a role with no grant."""
    url, owner = fresh_db
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"guard_{kind}_{suffix}" for kind in ("writer", "reader", "sealer", "nobody")}
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


async def _hold_what_it_can(conn: AsyncConnection) -> None:
    """Inside ``conn``'s transaction, take every lock on the seal path the role may take,
    and a transaction id older than any the sealer will take."""
    await conn.execute(text("SELECT pg_current_xact_id()"))
    await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": OLD_SEAL_LOCK_KEY})
    for mode in ("SHARE ROW EXCLUSIVE", "ROW EXCLUSIVE", "ACCESS SHARE"):
        try:
            async with conn.begin_nested():
                await conn.execute(text(f"LOCK TABLE audit_seals IN {mode} MODE"))
        except DBAPIError:  # refused to this role: try a weaker mode
            continue
        break


@pytest.mark.parametrize("kind", ["writer", "reader", "nobody"])
async def test_a_role_that_may_not_seal_cannot_hold_sealing_up(
    fresh_db: tuple[str, AsyncEngine], roles: dict[str, AsyncEngine], kind: str
) -> None:
    """Attack: a role that can only connect (or write, or read) holds the seal lock.

    Before, any role could take the advisory lock and every ``seal`` returned
    ``busy`` (exit 0) while nothing was sealed; and any open transaction with an
    id, of any role, kept it ``waiting``. Now neither stands in the sealer's
    way: only a transaction that may hold uncommitted rows (a writer's, inside
    an INSERT's lock) is waited for, and the rows get sealed.
    """
    _, owner = fresh_db
    await _write(owner, 3)
    async with roles[kind].connect() as conn, conn.begin():
        await _hold_what_it_can(conn)
        result = await seal(roles["sealer"], max_wait=5)
    assert result.status is SealStatus.SEALED and result.rows_sealed == 3


async def test_a_sealer_kept_out_longer_than_its_wait_fails_loudly(
    fresh_db: tuple[str, AsyncEngine], roles: dict[str, AsyncEngine]
) -> None:
    """Attack: another sealer holds the seal lock past this sealer's ``max_wait``.

    The kept-out sealer raises :class:`SealingError` naming the holder and its
    wait, seals nothing, and the command line exits non-zero with the message.
    """
    url, owner = fresh_db
    await _write(owner, 2)
    async with roles["sealer"].connect() as holder, holder.begin():
        await holder.execute(text("LOCK TABLE audit_seals IN SHARE ROW EXCLUSIVE MODE"))
        pid = await holder.scalar(text("SELECT pg_backend_pid()"))
        with pytest.raises(SealingError, match=rf"pid {pid} .*max_wait=0\.2 s") as caught:
            await seal(owner, max_wait=0.2)
        assert "nothing sealed" in str(caught.value)
        code, out = await asyncio.to_thread(
            _run, "--database-url", url, "seal", "--max-wait", "0.2"
        )
        assert code != 0 and "sealed" not in out
    async with owner.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM audit_seals")) == 0
    assert (await seal(owner)).rows_sealed == 2


async def test_a_role_without_the_lock_privilege_is_told_why(
    fresh_db: tuple[str, AsyncEngine], roles: dict[str, AsyncEngine]
) -> None:
    """A sealer granted before sealers needed UPDATE on audit_seals (or a reader) is
    refused with an error that says which privilege is missing, not left waiting."""
    _, owner = fresh_db
    await _write(owner, 1)
    with pytest.raises(AuditStorageError, match=r"permission denied.*UPDATE on audit_seals"):
        await seal(roles["reader"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1, -0.001, 86_401])
async def test_seal_refuses_a_wait_that_is_not_a_finite_number_of_seconds(
    fresh_db: tuple[str, AsyncEngine], value: float
) -> None:
    """``seal(max_wait=nan)`` compared false with everything and waited as if 0 or forever."""
    _, engine = fresh_db
    with pytest.raises(InvalidInputError, match="max_wait") as caught:
        await seal(engine, max_wait=value)
    assert caught.value.field == "max_wait"


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--max-wait", "nan"], "--max-wait"),
        (["--max-wait", "inf"], "--max-wait"),
        (["--max-wait", "-1"], "--max-wait"),
        (["--block-size", "0"], "--block-size"),
        (["--block-size", "-5"], "--block-size"),
        (["--block-size", "1000001"], "--block-size"),
    ],
)
def test_seal_command_refuses_bad_options_naming_them(
    fresh_db: tuple[str, AsyncEngine],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    option: str,
) -> None:
    """Bad ``--max-wait`` / ``--block-size`` exit 2 with an error naming the option, and
    nothing is sealed."""
    url, _ = fresh_db
    assert _run("--database-url", url, "seal", *argv)[0] == 2
    assert f"error: {option}:" in capsys.readouterr().err


#: Objects named like an audit table that a hostile role puts first on the sealer's path.
_SHADOWS = {
    "a view showing no rows": (
        "CREATE VIEW evil.audit_events AS SELECT * FROM public.audit_events WHERE false",
    ),
    "a table with its own sequence and no rows": (
        "CREATE TABLE evil.audit_events (seq bigserial, row_hash bytea, txid xid8)",
        "SELECT setval('evil.audit_events_seq_seq', 3)",
    ),
    "a table taking the seals": ("CREATE TABLE evil.audit_seals (LIKE public.audit_seals)",),
}


@pytest.mark.parametrize("shadow", list(_SHADOWS))
async def test_a_shadow_on_the_sealers_path_is_neither_read_nor_written(
    fresh_db: tuple[str, AsyncEngine], roles: dict[str, AsyncEngine], shadow: str
) -> None:
    """Attack: an object named ``audit_events`` or ``audit_seals`` in a schema put first
    on the sealer role's ``search_path``.

    Before, seal resolved the names through that path: it refused to seal (a
    view has no sequence), said "up to date" having sealed nothing (an empty
    table with a sequence of its own), or wrote the seals into the shadow, and
    digest read them from there. Now seal and digest pin the path and use the one schema
    holding the real tables: the three rows are sealed into ``public.audit_seals``,
    digest names that seal and verify vouches for it.
    """
    url, owner = fresh_db
    await _write(owner, 3)
    async with roles["sealer"].connect() as conn:
        sealer_name = await conn.scalar(text("SELECT current_user"))
    async with owner.begin() as conn:
        await conn.execute(text("CREATE SCHEMA evil"))
        for statement in _SHADOWS[shadow]:
            await conn.execute(text(statement))
        await conn.execute(text(f'GRANT USAGE ON SCHEMA evil TO "{sealer_name}"'))
        await conn.execute(text(f'GRANT ALL ON ALL TABLES IN SCHEMA evil TO "{sealer_name}"'))
        await conn.execute(text(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA evil TO "{sealer_name}"'))
    misled = create_async_engine(
        url,
        connect_args={"server_settings": {"role": sealer_name, "search_path": "evil, public"}},
    )
    try:
        result = await seal(misled)
        found = await digest(misled)
    finally:
        await misled.dispose()
    assert result.status is SealStatus.SEALED and result.rows_sealed == 3
    assert result.head is not None and found == result.head.digest
    report = await verify(owner, digest=found)
    assert report.ok and report.digest_matched and report.rows_checked == 3
    async with owner.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM public.audit_seals")) == 1


async def test_seal_and_digest_must_be_told_which_of_two_schemas(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """A twin of the audit tables in another schema is never chosen silently: without
    ``schema=`` (``--schema``) seal and digest refuse naming both schemas, with it they
    use that one."""
    url, owner = fresh_db
    await _write(owner, 2)
    async with owner.begin() as conn:
        await conn.execute(text("CREATE SCHEMA twin"))
        await conn.execute(text("CREATE TABLE twin.audit_events (LIKE public.audit_events)"))
        await conn.execute(text("CREATE TABLE twin.audit_seals (LIKE public.audit_seals)"))
    for call in (seal(owner), digest(owner)):
        with pytest.raises(InvalidInputError, match="public, twin") as caught:
            await call
        assert caught.value.field == "schema"
    assert (await seal(owner, schema="public")).rows_sealed == 2
    code, out = await asyncio.to_thread(_run, "--database-url", url, "digest", "--schema", "public")
    assert code == 0 and out.strip() == str(await digest(owner, schema="public"))
    code, _ = await asyncio.to_thread(_run, "--database-url", url, "seal", "--schema", "nowhere")
    assert code == 2
