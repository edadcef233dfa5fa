"""The ``audit-orm`` command line: parses arguments, calls the public API, prints.

With no ``--database-url`` and no ``AUDIT_ORM_DATABASE_URL`` it uses an embedded
PostgreSQL whose data lives in the user's data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TextIO

from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import grants, migrate, sealing
from audit_orm.database import create_engine, session_factory
from audit_orm.demo import record_demo_chains
from audit_orm.errors import AuditError
from audit_orm.ids import coerce_optional_uuid, coerce_uuid
from audit_orm.repository import AuditRepository
from audit_orm.timeline import render_timeline

#: A subcommand: receives the parsed arguments, an engine and the output stream.
Command = Callable[[argparse.Namespace, AsyncEngine, TextIO], Awaitable[int]]


async def cmd_migrate(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Bring the database schema to the latest revision."""
    await migrate.upgrade(engine, args.revision)
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


class _ProgressLine:
    """Progress on stderr, only when it is a terminal, at most five times a second."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = 0.0
        self.shown = False

    def callback(self) -> sealing.ProgressCallback | None:
        """The callback to hand to the API, or ``None`` when not on a terminal."""
        return self.update if self.stream.isatty() else None

    def update(self, progress: sealing.Progress) -> None:
        """Show one report (rate-limited)."""
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        of = f" of ~{progress.total:,}" if progress.total else ""
        print(f"\r{progress.phase}: {progress.done:,}{of} rows", end="", file=self.stream)
        self.shown = True

    def finish(self) -> None:
        """End the progress line."""
        if self.shown:
            print(file=self.stream)


def _seal_range(seals: Sequence[sealing.SealInfo]) -> str:
    return f"seq {seals[0].first_seq}..{seals[-1].last_seq}"


async def cmd_seal(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Seal every committed row that can no longer change."""
    line = _ProgressLine(sys.stderr)
    try:
        result = await sealing.seal(
            engine, block_size=args.block_size, max_wait=args.max_wait, progress=line.callback()
        )
    finally:
        line.finish()
    status = sealing.SealStatus
    if result.status is status.SEALED:
        print(
            f"sealed {result.rows_sealed} rows in {len(result.seals)} seals "
            f"({_seal_range(result.seals)}, {result.events_per_second:,.0f} events/s)",
            file=out,
        )
    elif result.status is status.UP_TO_DATE:
        print("up to date: every closed row is sealed", file=out)
    elif result.status is status.BUSY:
        print("another sealer is running; nothing done", file=out)
    else:
        pid = "" if result.blocking_pid is None else f" (pid {result.blocking_pid})"
        print(
            f"waiting: transaction {result.blocking_txid}{pid} is still open; nothing sealed",
            file=out,
        )
    if result.head is not None:
        print(f"head: seal {result.head.seal_no}, digest {result.head.digest}", file=out)
    return 1 if result.status is status.WAITING else 0


async def cmd_verify(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Recompute every hash, block root and seal link; name what does not hold."""
    line = _ProgressLine(sys.stderr)
    try:
        report = await sealing.verify(
            engine,
            digest=args.digest,
            progress=line.callback(),
            max_problems=args.max_problems,
        )
    finally:
        line.finish()
    summary = (
        f"{report.rows_checked} rows, {report.seals_checked} seals, "
        f"{report.unsealed_rows} rows not sealed yet ({report.events_per_second:,.0f} events/s)"
    )
    if report.ok:
        vouched = " digest matched;" if report.digest_matched else ""
        print(f"ok:{vouched} {summary}", file=out)
        return 0
    print(f"FAILED: {report.problem_count} problems; {summary}", file=out)
    for problem in report.problems:
        print(f"  {problem}", file=out)
    if report.problem_count > len(report.problems):
        print(f"  ... and {report.problem_count - len(report.problems)} more", file=out)
    return 1


async def cmd_digest(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Print the latest seal's digest, to keep outside the database."""
    found = await sealing.digest(engine)
    if found is None:
        print("audit-orm: no seals yet: run audit-orm seal first", file=sys.stderr)
        return 1
    print(found, file=out)
    return 0


async def cmd_grant(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Give writer, reader and sealer roles exactly their privileges."""
    statements = await grants.grant(
        engine, writer=args.writer, reader=args.reader, sealer=args.sealer
    )
    for statement in statements:
        print(f"{statement};", file=out)
    return 0


def print_grant_sql(args: argparse.Namespace, out: TextIO) -> int:
    """``grant --print-sql``: the statements, without touching a database."""
    for statement in grants.grant_statements(
        writer=args.writer, reader=args.reader, sealer=args.sealer
    ):
        print(f"{statement};", file=out)
    return 0


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

    p = sub.add_parser("seal", help="seal committed rows into the hash chain")
    p.add_argument(
        "--block-size",
        type=int,
        default=sealing.DEFAULT_BLOCK_SIZE,
        help=f"rows per seal (default: {sealing.DEFAULT_BLOCK_SIZE})",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=sealing.DEFAULT_MAX_WAIT,
        help="seconds to wait for running writers (default: %(default)s)",
    )
    p.set_defaults(handler=cmd_seal)

    p = sub.add_parser("verify", help="recompute every hash and check the seal chain")
    p.add_argument("--digest", metavar="HEX", help="a digest printed earlier by `digest`")
    p.add_argument(
        "--max-problems",
        type=int,
        default=sealing.DEFAULT_MAX_PROBLEMS,
        help="problems to list (all are counted; default: %(default)s)",
    )
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("digest", help="print the latest seal's digest")
    p.set_defaults(handler=cmd_digest)

    p = sub.add_parser("grant", help="give roles writer, reader or sealer privileges")
    p.add_argument("--writer", metavar="ROLE", help="may INSERT and SELECT events")
    p.add_argument("--reader", metavar="ROLE", help="may SELECT only")
    p.add_argument("--sealer", metavar="ROLE", help="may read events and add seals")
    p.add_argument(
        "--print-sql", action="store_true", help="print the statements instead of running them"
    )
    p.set_defaults(handler=cmd_grant)
    return parser


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    if getattr(args, "print_sql", False):
        return print_grant_sql(args, out)
    engine = create_engine(args.database_url)
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
