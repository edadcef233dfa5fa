"""Run audit_orm's Alembic migrations, standalone or inside a host application.

The revisions ship inside the package. Two ways to use them, one per database:

* **standalone**: :func:`upgrade` (or ``audit-orm migrate``) runs them with
  audit_orm's own environment; the applied revision is kept in
  :data:`VERSION_TABLE`, apart from any version table of the application;
* **inside a host application's Alembic**: the host lists
  :func:`versions_location` in its ``version_locations``, runs
  ``alembic upgrade heads``, and its own version table records audit_orm's
  revisions next to its own. Its autogenerate then needs :func:`include_name`
  so audit_orm's tables are never proposed for dropping or altering.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit_orm.errors import (
    DB_ERRORS,
    InvalidInputError,
    MigrationConflictError,
    translate_db_error,
)
from audit_orm.models import Base

#: The version table of standalone use, apart from a host application's own.
VERSION_TABLE = "audit_orm_alembic_version"
#: The branch label of audit_orm's revisions, for ``alembic upgrade audit_orm@head``.
BRANCH_LABEL = "audit_orm"


def script_location() -> Path:
    """The folder holding ``env.py`` and ``versions/``.

    In a checkout that is the repository's ``alembic/``; in an installed wheel,
    the copy packaged as ``audit_orm/_migrations``.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("audit_orm's migrations are missing from this installation")


def versions_location() -> Path:
    """The ``versions/`` folder, for a host application's ``version_locations``."""
    return script_location() / "versions"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic :class:`Config` for audit_orm's own migrations."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def revision_ids() -> frozenset[str]:
    """The id of every audit_orm revision."""
    script = ScriptDirectory.from_config(alembic_config())
    return frozenset(rev.revision for rev in script.walk_revisions("base", "heads"))


def owned_tables() -> frozenset[str]:
    """The tables audit_orm creates, with its standalone version table."""
    return frozenset(Base.metadata.tables) | {VERSION_TABLE}


def include_name(name: str | None, type_: str, parent_names: Mapping[str, str | None]) -> bool:
    """An ``include_name`` hook for a host application's Alembic environment.

    It hides audit_orm's tables from the host's autogenerate, so a host whose
    metadata does not describe them is never offered to drop or alter them.
    Pass it as ``context.configure(include_name=audit_orm.migrate.include_name)``,
    or call it from the host's own hook.
    """
    return not (type_ == "table" and name in owned_tables())


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """An ``include_object`` hook doing what :func:`include_name` does.

    For environments that filter objects rather than names; indexes and
    constraints of audit_orm's tables are hidden along with the tables.
    """
    if type_ == "table":
        return name not in owned_tables()
    table = getattr(obj, "table", None)
    return getattr(table, "name", None) not in owned_tables()


def _tracking_tables(connection: Connection) -> dict[str, list[str]]:
    """Version tables other than ours that record an audit_orm revision."""
    ours = revision_ids()
    found: dict[str, list[str]] = {}
    names = connection.execute(
        text(
            "SELECT table_name FROM information_schema.columns "
            "WHERE column_name = 'version_num' AND table_schema = current_schema() "
            "AND table_name <> :ours ORDER BY table_name"
        ),
        {"ours": VERSION_TABLE},
    ).scalars()
    for table in list(names):
        quoted = connection.dialect.identifier_preparer.quote(table)
        versions = connection.execute(text(f"SELECT version_num FROM {quoted}")).scalars()
        mine = sorted(v for v in versions if v in ours)
        if mine:
            found[table] = mine
    return found


def check_standalone(connection: Connection) -> None:
    """Refuse to run the standalone migrations where they would collide.

    A database whose audit_orm revisions are recorded both in
    :data:`VERSION_TABLE` and in an application's version table is in both
    modes at once. A database whose ``audit_events`` table is not recorded in
    :data:`VERSION_TABLE` is managed some other way: by a host application's
    Alembic (its version table holds audit_orm's revision), or it holds the
    original module's table waiting to be adopted. Running the revisions there
    would try to create the table a second time.

    :raises MigrationConflictError: saying which of these it is and what to do.
    """
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    standalone = context.get_current_heads()
    tracking = _tracking_tables(connection)
    if standalone and tracking:
        table, revisions = next(iter(tracking.items()))
        raise MigrationConflictError(
            table,
            f"audit_orm's revisions are recorded both in {VERSION_TABLE!r} "
            f"({', '.join(standalone)}) and in the application's version table {table!r} "
            f"({', '.join(revisions)}); a database is migrated one way only: keep one "
            "record and drop the other (see the README, Migrations)",
        )
    if standalone or not inspect(connection).has_table("audit_events"):
        return
    if tracking:
        table, revisions = next(iter(tracking.items()))
        raise MigrationConflictError(
            table,
            f"audit_orm's revisions ({', '.join(revisions)}) are recorded in the version "
            f"table {table!r} of the application's own Alembic environment; migrate with "
            "that environment (alembic upgrade heads), not with audit_orm's standalone one",
        )
    raise MigrationConflictError(
        "audit_events",
        f"the table exists but no version table records an audit_orm revision; a table "
        f"written by the original module is adopted with "
        f"'alembic stamp 0001_seed_table' and then upgraded ({VERSION_TABLE} is created "
        f"by the stamp)",
    )


def _run(connection: Connection, revision: str, action: str) -> None:
    if action == "upgrade":
        began = not connection.in_transaction()
        check_standalone(connection)
        if began:
            # The check opened a transaction; end it so Alembic runs its own
            # (a revision may then step out of it with an autocommit block).
            connection.rollback()
    config = alembic_config()
    config.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(config, revision)
    else:
        command.downgrade(config, revision)


async def upgrade(target: AsyncEngine | AsyncConnection, revision: str = "heads") -> None:
    """Migrate the database of ``target`` to ``revision`` (default: the latest).

    Given an engine, Alembic runs on a connection of its own and owns the
    transaction, as a revision that commits part of its work needs (see the
    README, "Adding an event type"). Given a connection already in a
    transaction, every revision runs inside that transaction.

    :raises MigrationConflictError: the database's audit_orm tables are managed by
        a host application's Alembic, or are the original module's not yet adopted.
    """
    await _on(target, revision, "upgrade")


async def downgrade(target: AsyncEngine | AsyncConnection, revision: str) -> None:
    """Migrate the database of ``target`` down to ``revision`` (``base`` removes everything)."""
    await _on(target, revision, "downgrade")


#: The advisory lock that lets one audit_orm migration of a database run at a
#: time (a 64-bit key of our own: the ASCII of "auditmig").
MIGRATION_LOCK_KEY = 0x61756469746D6967
#: Alembic keeps the running migration in module globals (``alembic.context``,
#: ``alembic.op``), shared by every migration of the process, whichever its
#: database or event loop.
_PROCESS_LOCK = threading.Lock()


@asynccontextmanager
async def _one_in_this_process() -> AsyncIterator[None]:
    # Polled rather than waited for in a thread: a cancelled wait then never
    # leaves the lock taken by nobody.
    while not _PROCESS_LOCK.acquire(blocking=False):  # noqa: ASYNC110 - no event spans loops
        await asyncio.sleep(0.02)
    try:
        yield
    finally:
        _PROCESS_LOCK.release()


@asynccontextmanager
async def migration_lock(conn: AsyncConnection) -> AsyncIterator[None]:
    """Hold :data:`MIGRATION_LOCK_KEY` on ``conn`` for the block: one migration at a time.

    Two migrations of one database at once would both try to create the same
    tables, and one would fail half-way; with the lock, the second waits and
    then finds the revisions applied. On a connection already in a transaction
    the lock is that transaction's; otherwise it is the session's, so it
    outlives the transactions Alembic commits, and is released at the end (or
    by the server, if the connection dies).
    """
    key = {"key": MIGRATION_LOCK_KEY}
    if conn.in_transaction():
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), key)
        yield
        return
    await conn.execute(text("SELECT pg_advisory_lock(:key)"), key)
    await conn.commit()
    try:
        yield
    finally:
        try:
            await conn.rollback()
            await conn.execute(text("SELECT pg_advisory_unlock(:key)"), key)
            await conn.commit()
        except DB_ERRORS:
            # A connection that cannot say unlock must not go back to a pool
            # still holding the lock: closing it for good releases it.
            await conn.invalidate()


async def _on(target: AsyncEngine | AsyncConnection, revision: str, action: str) -> None:
    if not isinstance(target, (AsyncEngine, AsyncConnection)):
        raise InvalidInputError("target", target, "must be an AsyncEngine or an AsyncConnection")
    if not isinstance(revision, str) or not revision or not revision.isprintable():
        raise InvalidInputError("revision", revision, "must be a revision id")
    try:
        async with _one_in_this_process():
            if not isinstance(target, AsyncEngine):
                async with migration_lock(target):
                    await target.run_sync(_run, revision, action)
                return
            # A bare connection: Alembic's environment owns the transaction.
            try:
                conn = await target.connect()
            except DB_ERRORS as exc:
                raise translate_db_error(exc, f"connecting to {action}") from exc
            try:
                async with migration_lock(conn):
                    await conn.run_sync(_run, revision, action)
                    await conn.commit()
            finally:
                await conn.close()
    except CommandError as exc:
        # Alembic's word for a revision it cannot find or reach from here.
        lines = str(exc).strip().splitlines()
        reason = f"cannot be applied: {lines[0]}" if lines else "is not a known revision"
        raise InvalidInputError("revision", revision, reason) from exc


def current_heads(connection: Connection, version_table: str = VERSION_TABLE) -> tuple[str, ...]:
    """The revisions recorded in ``version_table`` (empty when it is missing)."""
    context = MigrationContext.configure(connection, opts={"version_table": version_table})
    return context.get_current_heads()
