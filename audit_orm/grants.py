"""Database roles for the audit trail: writers, readers and the sealer.

The tables refuse UPDATE, DELETE and TRUNCATE for everyone (triggers), but
privileges are the first line: an application's writer role gets INSERT and
SELECT on the events and nothing else, a reader SELECT only, and only the
sealer may add seals. Run :func:`grant` (or ``audit-orm grant``) as the tables'
owner; :func:`grant_statements` gives the same SQL to review or apply by hand.

Writers need no privilege on the ``seq`` sequence: the insert trigger draws the
number with the rights of the table's owner, whatever the INSERT says. The
sealer reads the sequence's last value, so it gets SELECT on it, and UPDATE on
``audit_seals`` only because PostgreSQL requires it for the lock sealers take
turns on (``LOCK TABLE ... IN SHARE ROW EXCLUSIVE MODE``): the append-only
trigger refuses every UPDATE, and roles without it cannot hold sealing up. Roles
also need USAGE on the tables' schema when that is not ``public``.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm.display import UNSAFE_CHARACTERS
from audit_orm.errors import DB_ERRORS, InvalidInputError, translate_db_error

_TABLES = "audit_events, audit_seals"
_NAME_MAX_BYTES = 63


def quote_role(role: str, field: str) -> str:
    """``role`` as a quoted SQL identifier, after checking it is a plausible name."""
    if not isinstance(role, str) or not role or role.isspace():
        raise InvalidInputError(field, role, "must be a role name")
    if UNSAFE_CHARACTERS.search(role):
        # PostgreSQL would take them quoted, but the statements are printed for review.
        raise InvalidInputError(
            field, role, "must not contain control or bidirectional formatting characters"
        )
    if not role.isprintable():
        # Lone surrogates among them: UTF-8 cannot carry them to the server.
        raise InvalidInputError(field, role, "must be printable text")
    if len(role.encode()) > _NAME_MAX_BYTES:
        raise InvalidInputError(field, role, "is not a valid PostgreSQL role name")
    if role.lower() == "public":
        raise InvalidInputError(field, role, "must be a role, not PUBLIC")
    return '"' + role.replace('"', '""') + '"'


#: What each job may do, per object: the table's privileges, and SELECT on the sequence.
_JOBS: dict[str, dict[str, tuple[str, ...]]] = {
    "writer": {"audit_events": ("SELECT", "INSERT"), "audit_seals": ("SELECT",)},
    "reader": {"audit_events": ("SELECT",), "audit_seals": ("SELECT",)},
    "sealer": {
        "audit_events": ("SELECT",),
        # UPDATE only to take the seal lock (see the module notes).
        "audit_seals": ("SELECT", "INSERT", "UPDATE"),
        "sequence": ("SELECT",),
    },
}
_ORDER = ("SELECT", "INSERT", "UPDATE")


def _union(jobs: list[str]) -> dict[str, list[str]]:
    """The privileges of a role that holds every job in ``jobs``, per object."""
    wanted: dict[str, set[str]] = {}
    for job in jobs:
        for target, privileges in _JOBS[job].items():
            wanted.setdefault(target, set()).update(privileges)
    return {target: [p for p in _ORDER if p in held] for target, held in wanted.items()}


def grant_statements(
    *,
    writer: str | None = None,
    reader: str | None = None,
    sealer: str | None = None,
    sequence: str = "audit_events_seq_seq",
) -> list[str]:
    """The SQL that gives each role exactly its privileges (and revokes any others).

    A role named for several jobs (one application role as writer and reader,
    say) gets the union of their privileges: its grants are computed once, so
    one job's ``REVOKE`` never takes back another job's ``GRANT``.
    """
    if writer is None and reader is None and sealer is None:
        raise InvalidInputError("roles", None, "name at least one of writer, reader and sealer")
    jobs_of: dict[str, list[str]] = {}
    for field, role in (("writer", writer), ("reader", reader), ("sealer", sealer)):
        if role is not None:
            jobs_of.setdefault(quote_role(role, field), []).append(field)
    statements: list[str] = []
    for role, jobs in jobs_of.items():
        held = _union(jobs)
        statements.append(f"REVOKE ALL ON {_TABLES} FROM {role}")
        events, seals = held["audit_events"], held["audit_seals"]
        if events == seals:
            statements.append(f"GRANT {', '.join(events)} ON {_TABLES} TO {role}")
        else:
            statements.append(f"GRANT {', '.join(events)} ON audit_events TO {role}")
            statements.append(f"GRANT {', '.join(seals)} ON audit_seals TO {role}")
        if "sequence" in held:
            statements.append(f"GRANT SELECT ON SEQUENCE {sequence} TO {role}")
    return statements


async def grant(
    engine: AsyncEngine,
    *,
    writer: str | None = None,
    reader: str | None = None,
    sealer: str | None = None,
) -> list[str]:
    """Give the roles their privileges, in one transaction; return the SQL run.

    :raises InvalidInputError: no role given, or a role that does not exist.
    :raises AuditStorageError: the database refused (not run as the tables' owner?).
    """
    roles = {"writer": writer, "reader": reader, "sealer": sealer}
    grant_statements(writer=writer, reader=reader, sealer=sealer)
    if not isinstance(engine, AsyncEngine):
        raise InvalidInputError("engine", engine, "must be an AsyncEngine")
    try:
        async with engine.begin() as conn:
            for field, role in roles.items():
                if role is None:
                    continue
                exists = await conn.scalar(
                    text("SELECT 1 FROM pg_roles WHERE rolname = :name"), {"name": role}
                )
                if exists is None:
                    raise InvalidInputError(field, role, "no such role")
            sequence = await conn.scalar(
                text("SELECT pg_get_serial_sequence('audit_events', 'seq')")
            )
            statements = grant_statements(
                writer=writer,
                reader=reader,
                sealer=sealer,
                sequence=str(sequence or "audit_events_seq_seq"),
            )
            for statement in statements:
                await conn.execute(text(statement))
    except DB_ERRORS as exc:
        raise translate_db_error(exc, "granting privileges") from exc
    return statements
