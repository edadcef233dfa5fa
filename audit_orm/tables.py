"""Find the schema holding the real audit tables, whatever the role's search_path says.

Sealing and verification pin ``search_path`` and name every table by the schema
found here, so a view or table of the same name that a hostile role put on the
connecting role's path is never read or written. Only ordinary and partitioned
tables count; when several schemas hold both tables the caller must name one.
"""

from __future__ import annotations

from typing import Any

from audit_orm.errors import AuditStorageError, InvalidInputError

#: What :func:`pin_path` sets: built-in names first, and nothing a role chose.
PINNED_SEARCH_PATH = "SET LOCAL search_path TO pg_catalog, pg_temp"


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def check_schema_name(schema: object) -> str | None:
    """``schema`` as given, after checking it is ``None`` or a usable name.

    :raises InvalidInputError: anything else, naming ``schema``.
    """
    if schema is not None and (not isinstance(schema, str) or not schema or "\x00" in schema):
        raise InvalidInputError("schema", schema, "must be a schema name")
    return schema


async def pin_path(conn: Any) -> None:
    """Pin ``search_path`` for the rest of ``conn``'s transaction (asyncpg)."""
    await conn.execute(PINNED_SEARCH_PATH)


async def resolve_schema(conn: Any, schema: str | None, action: str) -> tuple[str, int, int]:
    """The schema holding the real audit tables, and the OIDs of ``audit_events``
    and ``audit_seals`` there.

    Every name in the query is qualified, so it is safe before the path is pinned.

    :raises InvalidInputError: ``schema`` holds no such tables, or it is not
        given and several schemas do.
    :raises AuditStorageError: no schema holds them, naming ``action``.
    """
    records = await conn.fetch(
        "SELECT n.nspname, c.relname, c.oid FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace "
        "WHERE c.relname OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.name[]) "
        "AND c.relkind OPERATOR(pg_catalog.=) ANY ('{r,p}'::pg_catalog.char[])",
        ["audit_events", "audit_seals"],
    )
    tables: dict[str, dict[str, int]] = {}
    for nspname, relname, oid in records:
        tables.setdefault(nspname, {})[relname] = int(oid)
    complete = sorted(name for name, found in tables.items() if len(found) == 2)
    if schema is not None:
        if schema not in complete:
            raise InvalidInputError(
                "schema", schema, "holds no audit_events and audit_seals tables"
            )
        chosen = schema
    elif len(complete) == 1:
        chosen = complete[0]
    elif not complete:
        raise AuditStorageError(
            f"{action} failed: no schema holds the audit_events and audit_seals tables "
            "(is the database migrated?)"
        )
    else:
        raise InvalidInputError(
            "schema",
            None,
            f"the audit tables exist in several schemas ({', '.join(complete)}): name the one "
            f"to use",
        )
    return chosen, tables[chosen]["audit_events"], tables[chosen]["audit_seals"]
