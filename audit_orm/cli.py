"""The ``audit-orm`` command line: parses arguments, calls the public API, prints.

With no ``--database-url`` and no ``AUDIT_ORM_DATABASE_URL`` it uses an embedded
PostgreSQL whose data lives in the user's data directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn, TextIO

from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm import grants, migrate, sealing, verifying
from audit_orm.database import DATABASE_URL_ENV, create_engine, hide_password, session_factory
from audit_orm.demo import record_demo_chains
from audit_orm.display import escape_controls, escape_json
from audit_orm.errors import (
    AuditError,
    AuditUnavailableError,
    InvalidInputError,
    translate_db_error,
)
from audit_orm.export import FORMATS, TerminalProgress, export_events
from audit_orm.ids import coerce_optional_uuid, coerce_uuid
from audit_orm.repository import AuditRepository
from audit_orm.retry import RetryPolicy
from audit_orm.spool import ReplayInterruptedError, ReplayStoppedError, replay_spool
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
    except InvalidInputError as exc:
        if exc.field != "revision":
            raise
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
            print(escape_json(record.to_json()), file=out)
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
    """Write a best-effort spool's events to the database.

    Exit 1 if any line was rejected or conflicts with another event of its id.
    """
    policy = RetryPolicy(attempts=args.attempts)
    try:
        report = await replay_spool(args.spool, engine, chunk_size=args.chunk_size, retry=policy)
    except ReplayInterruptedError as exc:
        print(escape_controls(f"replay interrupted: {exc.report.summary()}"), file=out)
        raise
    except ReplayStoppedError as exc:
        print(escape_controls(f"replay stopped: {exc.report.summary()}"), file=out)
        raise
    if not report.records and not report.rejected and not report.conflicts:
        print(escape_controls(f"nothing to replay in {report.spool}"), file=out)
        return 0
    print(escape_controls(report.summary()), file=out)
    for problem in report.conflicts:
        where = f"line {problem.line}, event {problem.event_id}"
        print(escape_controls(f"  conflict {where}: {problem.reason}"), file=out)
    for problem in report.rejected:
        where = f"line {problem.line}" if problem.line else f"event {problem.event_id}"
        print(escape_controls(f"  rejected {where}: {problem.reason}"), file=out)
    return 0 if report.ok else 1


def _progress_bar() -> TerminalProgress | None:
    """A progress line on stderr, only when it is a terminal."""
    return TerminalProgress(sys.stderr) if sys.stderr.isatty() else None


def _feed(bar: TerminalProgress) -> sealing.ProgressCallback:
    def show(progress: sealing.Progress) -> None:
        bar(progress.done, progress.total)

    return show


def _seal_range(seals: Sequence[sealing.SealInfo]) -> str:
    return f"seq {seals[0].first_seq}..{seals[-1].last_seq}"


async def cmd_seal(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Seal every committed row that can no longer change."""
    bar = _progress_bar()
    try:
        result = await sealing.seal(
            engine,
            block_size=args.block_size,
            max_wait=args.max_wait,
            progress=None if bar is None else _feed(bar),
            schema=args.schema,
        )
    finally:
        if bar is not None:
            bar.finish()
    status = sealing.SealStatus
    if result.status is status.SEALED:
        print(
            f"sealed {result.rows_sealed} rows in {len(result.seals)} seals "
            f"({_seal_range(result.seals)}, {result.events_per_second:,.0f} events/s)",
            file=out,
        )
    elif result.status is status.UP_TO_DATE:
        print("up to date: every closed row is sealed", file=out)
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
    bar = _progress_bar()
    try:
        report = await verifying.verify(
            engine,
            digest=args.digest,
            progress=None if bar is None else _feed(bar),
            max_problems=args.max_problems,
            clock_tolerance=args.clock_tolerance,
            schema=args.schema,
        )
    finally:
        if bar is not None:
            bar.finish()
    summary = (
        f"{report.rows_checked} rows, {report.seals_checked} seals, "
        f"{report.unsealed_rows} rows not sealed yet ({report.events_per_second:,.0f} events/s)"
    )
    if report.ok:
        vouched = " digest matched;" if report.digest_matched else ""
        print(f"ok:{vouched} {summary}", file=out)
        for notice in report.notices:
            print(escape_controls(f"  notice: {notice}"), file=out)
        return 0
    vouched = " digest NOT matched;" if report.digest_matched is False else ""
    if report.digest_matched:
        vouched = " digest matched (the problems lie after its seal);"
    print(f"FAILED: {report.problem_count} problems;{vouched} {summary}", file=out)
    for problem in report.problems:
        print(escape_controls(f"  {problem}"), file=out)
    for notice in report.notices:
        print(escape_controls(f"  notice: {notice}"), file=out)
    if report.problem_count > len(report.problems):
        print(f"  ... and {report.problem_count - len(report.problems)} more", file=out)
    return 1


async def cmd_digest(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Print the latest seal's digest, to keep outside the database."""
    found = await sealing.digest(engine, schema=args.schema)
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


def parse_time(value: str | None, flag: str) -> datetime | None:
    """An ISO 8601 date or time from the command line; without an offset it is UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInputError(flag, value, "is not an ISO 8601 date or time") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    try:
        parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidInputError(
            flag, value, "is outside the years 1 to 9999 once converted to UTC"
        ) from None
    return parsed


async def cmd_export(args: argparse.Namespace, engine: AsyncEngine, out: TextIO) -> int:
    """Export events as JSON Lines or CSV, to a file or the output stream."""
    since = parse_time(args.since, "--since")
    until = parse_time(args.until, "--until")
    order_id = coerce_optional_uuid(args.order, "--order")
    bar = TerminalProgress(sys.stderr) if sys.stderr.isatty() else None

    async def write(stream: TextIO) -> int:
        return await export_events(
            engine,
            stream,
            format=args.format,
            since=since,
            until=until,
            ticker=args.ticker,
            event_types=args.event_type,
            order_id=order_id,
            progress=bar,
        )

    try:
        if args.output is None:
            await write(out)
            return 0
        # CSV gets a byte order mark: without it Excel reads UTF-8 as a legacy code page.
        encoding = "utf-8-sig" if args.format == "csv" else "utf-8"
        with replaced_on_success(Path(args.output), encoding) as stream:
            count = await write(stream)
    finally:
        if bar is not None:
            bar.finish()
    print(f"exported {count} records to {escape_controls(args.output)}", file=out)
    return 0


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def check_output_path(target: Path) -> None:
    """Refuse ``--output`` unless it names a regular file or a path that does not exist yet.

    The export is renamed onto the target: renamed onto a device, a FIFO or a
    symbolic link it would replace that, not write to it. A symbolic link is
    refused even to a regular file: name the file itself.
    """
    try:
        found = os.lstat(target)
    except FileNotFoundError:
        if not target.parent.is_dir():
            raise InvalidInputError(
                "--output", str(target), "is in a directory that does not exist"
            ) from None
        return
    except OSError as exc:
        raise InvalidInputError("--output", str(target), f"cannot be examined: {exc}") from None
    if stat.S_ISLNK(found.st_mode):
        raise InvalidInputError("--output", str(target), "is a symbolic link: name the file itself")
    if not stat.S_ISREG(found.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(found.st_mode)), "not a file")
        raise InvalidInputError(
            "--output",
            str(target),
            f"is {kind}: only a regular file or a new path is replaced by an export",
        )


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replaced_on_success(target: Path, encoding: str) -> Iterator[TextIO]:
    """A text file written beside ``target`` and renamed onto it only if the block succeeds.

    A failed export then never leaves a truncated file under the requested
    name. The file is flushed to disk before the rename and the directory
    after it, so a crash leaves the old file or the whole new one. The
    target is checked again just before the rename (see
    :func:`check_output_path`); the file is created with mode 0600.
    """
    check_output_path(target)
    try:
        fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as exc:
        raise InvalidInputError(
            "--output", str(target), f"cannot be written beside: {exc.strerror}"
        ) from None
    try:
        with open(fd, "w", encoding=encoding, newline="") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        check_output_path(target)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose error messages are escaped.

    argparse quotes most bad values with ``repr``, but not all: "unrecognized
    arguments" repeats them raw.
    """

    def error(self, message: str) -> NoReturn:
        """Print the usage and the escaped message, exit 2."""
        super().error(escape_controls(message))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``audit-orm``."""
    parser = _Parser(prog="audit-orm", description="Execution audit trail of a trading system.")
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

    p = sub.add_parser(
        "export",
        help="write events as JSON Lines or CSV",
        description="Write events in recorded order, with every field, timestamps in UTC and "
        "exact numbers. Times without an offset are UTC; --since is inclusive, --until "
        "exclusive, both on the recorded time.",
    )
    p.add_argument("--since", metavar="TIME", help="recorded at or after (ISO 8601)")
    p.add_argument("--until", metavar="TIME", help="recorded before (ISO 8601)")
    p.add_argument("--ticker", help="only this instrument")
    p.add_argument(
        "--event-type",
        action="append",
        metavar="TYPE",
        help="only this event type (repeat for several)",
    )
    p.add_argument("--order", metavar="ORDER_ID", help="only this order's decision chain")
    p.add_argument("--format", choices=FORMATS, default="jsonl", help="default: jsonl")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(handler=cmd_export)

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
        help="seconds to wait for another sealer and for running writers (default: %(default)s)",
    )
    _schema_option(p)
    p.set_defaults(handler=cmd_seal)

    p = sub.add_parser("verify", help="recompute every hash and check the seal chain")
    p.add_argument("--digest", metavar="HEX", help="a digest printed earlier by `digest`")
    p.add_argument(
        "--max-problems",
        type=int,
        default=verifying.DEFAULT_MAX_PROBLEMS,
        help="problems to list (all are counted; default: %(default)s)",
    )
    p.add_argument(
        "--clock-tolerance",
        type=float,
        default=verifying.DEFAULT_CLOCK_TOLERANCE,
        metavar="SECONDS",
        help="rows dated at most this much before a preceding seal are a clock step, not "
        "back-dated (default: %(default)s)",
    )
    _schema_option(p)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("digest", help="print the latest seal's digest")
    _schema_option(p)
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


def _schema_option(parser: argparse.ArgumentParser) -> None:
    """``--schema``, as seal, digest and verify take it."""
    parser.add_argument(
        "--schema",
        help="the schema of the audit tables (default: the one schema holding them)",
    )


def _engine(url: str | None) -> AsyncEngine:
    # An empty URL (an unset variable in "--database-url $URL") must not fall
    # back to the embedded server: verify would vouch for an empty database.
    if url is not None and not url.strip():
        raise InvalidInputError("--database-url", url, "is empty")
    if url is None and os.environ.get(DATABASE_URL_ENV) == "":
        raise InvalidInputError(DATABASE_URL_ENV, "", "is set but empty")
    try:
        return create_engine(url)
    except (ValueError, ArgumentError) as exc:
        given, name = (
            (url, "--database-url")
            if url is not None
            else (
                os.environ.get(DATABASE_URL_ENV, ""),
                DATABASE_URL_ENV,
            )
        )
        raise InvalidInputError(name, hide_password(given), f"is not a usable URL: {exc}") from None


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    if getattr(args, "print_sql", False):
        return print_grant_sql(args, out)
    engine = _engine(args.database_url)
    # SIGTERM (a scheduler stopping the job) unwinds the command as a
    # cancellation, so that a partial export file beside its target is removed
    # and open transactions end, instead of the process dying mid-write.
    # Only the main thread can take signals: main() run from another thread
    # (an application's worker, a test) keeps the default.
    main_task = asyncio.current_task()
    if main_task is not None and threading.current_thread() is threading.main_thread():
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        handler: Command = args.handler
        return await handler(args, engine, out)
    except SQLAlchemyError as exc:
        # A database error a command let through untranslated still gets its
        # typed class, so the exit status says whether to try again.
        raise translate_db_error(exc, args.command) from exc
    finally:
        await engine.dispose()


#: The command-line option behind each argument name the library reports, so
#: that every error names what the user typed.
OPTION_NAMES = {
    "since": "--since",
    "until": "--until",
    "ticker": "--ticker",
    "event_type": "--event-type",
    "event_types": "--event-type",
    "format": "--format",
    "chunk_size": "--chunk-size",
    "attempts": "--attempts",
    "block_size": "--block-size",
    "max_wait": "--max-wait",
    "max_problems": "--max-problems",
    "clock_tolerance": "--clock-tolerance",
    "schema": "--schema",
    "digest": "--digest",
    "writer": "--writer",
    "reader": "--reader",
    "sealer": "--sealer",
    "roles": "--writer, --reader or --sealer",
    "spool": "SPOOL",
}


def error_message(exc: BaseException) -> str:
    """What the CLI prints for ``exc``: its option named, nothing a terminal acts on."""
    if isinstance(exc, InvalidInputError) and exc.field in OPTION_NAMES:
        text = str(InvalidInputError(OPTION_NAMES[exc.field], exc.value, exc.reason))
    else:
        text = str(exc)
    return escape_controls(f"audit-orm: error: {text}")


#: Exit status: the command failed on its arguments or a local file (argparse's own too).
EXIT_BAD_INPUT = 2
#: Exit status: the database could not be reached, or the command met a
#: transient failure (timeout, lost connection, serialization failure): run it
#: again later.
EXIT_UNAVAILABLE = 3
#: Exit status: stopped by SIGTERM, as a shell reports a process that signal ended.
EXIT_STOPPED = 128 + signal.SIGTERM


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the ``audit-orm`` console script; returns the exit code.

    0: done; 1: done, and what was checked does not hold (see each command);
    :data:`EXIT_BAD_INPUT` for bad input and every other refusal;
    :data:`EXIT_UNAVAILABLE` when the database is unavailable.
    """
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, out or sys.stdout))
    except asyncio.CancelledError:
        print("audit-orm: error: stopped by SIGTERM", file=sys.stderr)
        return EXIT_STOPPED
    except AuditUnavailableError as exc:
        print(error_message(exc), file=sys.stderr)
        return EXIT_UNAVAILABLE
    except (AuditError, OSError, ValueError) as exc:
        print(error_message(exc), file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
