"""The ``audit-orm`` command line: parses arguments, calls the public API, prints.

With no ``--database-url`` and no ``AUDIT_ORM_DATABASE_URL`` it uses an embedded
PostgreSQL whose data lives in the user's data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from alembic.util.exc import CommandError
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import migrate
from audit_orm.database import create_engine, session_factory
from audit_orm.demo import record_demo_chains
from audit_orm.errors import AuditError, InvalidInputError
from audit_orm.ids import coerce_optional_uuid, coerce_uuid
from audit_orm.repository import AuditRepository
from audit_orm.retry import RetryPolicy
from audit_orm.spool import ReplayInterruptedError, replay_spool
from audit_orm.timeline import render_timeline

#: A subcommand: receives the parsed arguments, an engine and the output stream.
Command = Callable[[argparse.Namespace, AsyncEngine, TextIO], Awaitable[int]]


async def cmd_migrate(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Bring the database schema to the latest revision."""
    revision = args.revision
    if not revision or not revision.isprintable():
        raise InvalidInputError("--revision", revision, "must be a revision id")
    try:
        await migrate.upgrade(engine, revision)
    except CommandError as exc:
        raise InvalidInputError("--revision", revision, "is not a known revision") from exc
    print(f"database migrated to {args.revision}", file=out)
    return 0


async def cmd_trail(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Print an order's decision chain."""
    order_id = coerce_uuid(args.order_id, "ORDER_ID")
    rec_id = coerce_optional_uuid(args.recommendation, "--recommendation")
    async with session_factory(engine)() as session:
        trail = await AuditRepository(session).order_trail(order_id, rec_id)
    if args.json:
        for record in trail:
            print(record.to_json(), file=out)
    elif trail:
        print(render_timeline(trail), file=out)
    else:
        print(f"no audit events for order {order_id}", file=out)
    return 0 if trail else 1


async def cmd_demo(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Migrate, record realistic chains and print one order's trail."""
    await migrate.upgrade(engine)
    ids = await record_demo_chains(engine)
    async with session_factory(engine)() as session:
        trail = await AuditRepository(session).order_trail(ids["filled"])
    print("Recorded six decision chains: filled, risk-rejected, approval expired,", file=out)
    print("cancelled, duplicate prevented, and a short position flipped long.\n", file=out)
    print(f"Trail of the filled order {ids['filled']}:\n", file=out)
    print(render_timeline(trail), file=out)
    print(f"\nTry: audit-orm trail {ids['short']}", file=out)
    return 0


async def cmd_replay(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Write a best-effort spool's events to the database; exit 1 if any were rejected."""
    policy = RetryPolicy(attempts=args.attempts)
    try:
        report = await replay_spool(args.spool, engine, chunk_size=args.chunk_size, retry=policy)
    except ReplayInterruptedError as exc:
        print(f"replay interrupted: {exc.report.summary()}", file=out)
        raise
    if not report.records and not report.rejected:
        print(f"nothing to replay in {report.spool}", file=out)
        return 0
    print(report.summary(), file=out)
    for problem in report.rejected:
        where = f"line {problem.line}" if problem.line else f"event {problem.event_id}"
        print(f"  rejected {where}: {problem.reason}", file=out)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``audit-orm``."""
    parser = argparse.ArgumentParser(
        prog="audit-orm", description="Execution audit trail of a trading system."
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL URL (default: $AUDIT_ORM_DATABASE_URL, else an embedded server)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("migrate", help="apply the migrations")
    p.add_argument("--revision", default="heads", help="target revision (default: heads)")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("trail", help="print an order's decision chain")
    p.add_argument("order_id", metavar="ORDER_ID")
    p.add_argument("--recommendation", metavar="ID", help="the order's recommendation id")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=cmd_trail)

    p = sub.add_parser("demo", help="record sample chains and show a trail")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("replay", help="write a best-effort spool's events to the database")
    p.add_argument("spool", metavar="SPOOL", help="the spool file")
    p.add_argument(
        "--chunk-size", type=int, default=500, metavar="N", help="events per transaction"
    )
    p.add_argument(
        "--attempts", type=int, default=5, metavar="N", help="tries per chunk (default: 5)"
    )
    p.set_defaults(handler=cmd_replay)
    return parser


def _engine(url: str | None) -> AsyncEngine:
    try:
        return create_engine(url)
    except (ValueError, ArgumentError) as exc:
        shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url or "")
        raise InvalidInputError("--database-url", shown, f"is not a usable URL: {exc}") from None


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    engine = _engine(args.database_url)
    try:
        handler: Command = args.handler
        return await handler(args, engine, out)
    finally:
        await engine.dispose()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``audit-orm`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, out or sys.stdout))
    except AuditError as exc:
        print(f"audit-orm: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"audit-orm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
