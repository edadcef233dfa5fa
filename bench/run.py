"""audit_orm against the module it replaces and against the driver's limits, in one run.

    python -m bench.run              # 1,000,000 rows
    python -m bench.run --big        # and the order trail again at 10,000,000 rows
    python -m bench.run --quick      # a small smoke run

Every line is measured in this run, on the same PostgreSQL: the embedded
server in a temporary directory, or the server of ``AUDIT_ORM_DATABASE_URL``
(a throwaway database is created there and dropped at the end). Our tables are
migrated to head; the original module's table lives in schema ``seed`` of the
same database and holds the same rows. Contenders alternate round by round so
a noisy machine slows both alike; the table reports medians.

1. one event per transaction: the repository vs the original INSERT (asyncpg pool);
2. 64 concurrent producers, each event committed on return: AuditWriter vs
   the original per-event commits (asyncpg pool, its default ten connections);
3. 100,000 events in one call: record_many (validation included) vs asyncpg
   ``copy_records_to_table`` of the same, already encoded rows into the same table;
4. order trail: p50/p99 of ``order_trail`` vs the original query on its schema;
5. streaming every event: peak memory of a process doing only that.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

# Runnable as ``python bench/run.py`` as well as ``python -m bench.run``.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from audit_orm import AuditRepository, AuditWriter, EventSpec, migrate
from audit_orm.bulk import INSERT_COLUMNS
from audit_orm.database import DATABASE_URL_ENV, asyncpg_url, start_embedded
from audit_orm.jsonb import dumps_exact
from bench import data
from tests.legacy import execution_audit as seed

#: Where ``python -m bench...`` finds the packages.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
#: Rows generated per statement while loading.
LOAD_STEP = 250_000
#: The payload of the fills written by lines 1 and 2 (the original module's helper
#: builds the same dict from its arguments).
FILL = {
    "ticker": "AAPL",
    "side": "buy",
    "fill_quantity": 10,
    "fill_price": 150.25,
    "broker_order_id": "B1",
}


@dataclass
class Line:
    """One row of the final table."""

    name: str
    ours: str
    baseline: str
    ratio: str
    goal: str
    verdict: str


@dataclass
class Settings:
    rows: int
    big: bool
    rounds: int
    single_events: int
    producers: int
    per_producer: int
    batch_events: int
    trail_samples: int
    seed_trail_samples: int


def settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(
            data.rounded_rows(args.rows or 80_000), False, 2, 200, 64, 10, 10_000, 300, 5
        )
    return Settings(
        data.rounded_rows(args.rows or 1_000_000), args.big, 3, 1_000, 64, 40, 100_000, 2_000, 15
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def fill_spec(ticker: str, n: int) -> EventSpec:
    return {
        "event_type": "order.filled",
        "entity_type": "order",
        "entity_id": uuid.uuid4(),
        "data": {
            "ticker": ticker,
            "side": "buy",
            "fill_quantity": 10,
            "fill_price": "150.25",
            "broker_order_id": f"B{n}",
        },
        "actor": "broker_service",
    }


class Bench:
    """The databases, engines and pools of one run."""

    def __init__(self, url: str, conf: Settings) -> None:
        self.url = url
        self.conf = conf
        self.engine: AsyncEngine = create_async_engine(url)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.autocommit_sessions = async_sessionmaker(
            self.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        )
        self.lines: list[Line] = []
        self.pool: Any = None
        self.rows = 0

    def connect_args(self, **extra: Any) -> dict[str, Any]:
        parsed = make_url(self.url)
        args: dict[str, Any] = {
            "user": parsed.username,
            "password": parsed.password,
            "database": parsed.database,
            "host": parsed.query.get("host") or parsed.host,
            "port": int(str(parsed.query.get("port") or parsed.port or 5432)),
        }
        args.update(extra)
        return args

    async def open(self) -> None:
        await migrate.upgrade(self.engine)
        async with self.engine.begin() as conn:
            await data.create_seed_schema(conn)
        # The original module takes an asyncpg pool; its defaults (ten
        # connections) are what a host application most likely passes.
        self.pool = await asyncpg.create_pool(
            **self.connect_args(server_settings={"search_path": "seed"})
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        await self.engine.dispose()

    # ------------------------------------------------------------------ data

    async def load(self, rows: int) -> None:
        """Grow both tables to ``rows`` synthetic events, then VACUUM ANALYZE them."""
        if rows <= self.rows:
            return
        log(f"loading {self.rows:,} -> {rows:,} rows")
        started = time.perf_counter()
        async with self.engine.connect() as conn:
            (last_seq,) = (
                await conn.exec_driver_sql("SELECT coalesce(max(seq), 0) FROM audit_events")
            ).one()
        for start in range(self.rows, rows, LOAD_STEP):
            async with self.engine.begin() as conn:
                await data.generate(conn, start, min(rows, start + LOAD_STEP))
        async with self.engine.begin() as conn:
            (new_seq,) = (await conn.exec_driver_sql("SELECT max(seq) FROM audit_events")).one()
            await data.copy_to_seed(conn, last_seq, new_seq)
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.exec_driver_sql("VACUUM ANALYZE audit_events")
            await conn.exec_driver_sql("VACUUM ANALYZE seed.audit_events")
        self.rows = rows
        log(f"loaded in {time.perf_counter() - started:.0f} s")

    async def table_rows(self) -> tuple[int, int]:
        async with self.engine.connect() as conn:
            ours = (await conn.exec_driver_sql("SELECT count(*) FROM audit_events")).scalar_one()
            theirs = (
                await conn.exec_driver_sql("SELECT count(*) FROM seed.audit_events")
            ).scalar_one()
        return int(ours), int(theirs)

    # ----------------------------------------------------------- line 1

    async def single_events(self) -> None:
        n = self.conf.single_events
        log(f"line 1: {n} single-event transactions per round")
        order = uuid.uuid4()

        async def theirs() -> None:
            for _ in range(n):
                await seed.audit_order_filled(
                    self.pool, str(order), "AAPL", "buy", 10, 150.25, "B1"
                )

        async def ours_tx() -> None:
            for _ in range(n):
                async with self.sessions.begin() as session:
                    await AuditRepository(session).order_filled(
                        order, "AAPL", "buy", 10, 150.25, "B1"
                    )

        async def ours_autocommit() -> None:
            for _ in range(n):
                async with self.autocommit_sessions() as session:
                    await AuditRepository(session).order_filled(
                        order, "AAPL", "buy", 10, 150.25, "B1"
                    )

        async def ours_writer() -> None:
            async with AuditWriter(self.engine) as writer:
                for _ in range(n):
                    await writer.record("order.filled", "order", order, FILL)

        times = await self.rounds(
            {"seed": theirs, "tx": ours_tx, "ac": ours_autocommit, "writer": ours_writer}
        )
        rate = {k: n / statistics.median(v) for k, v in times.items()}
        for key, label in (
            ("tx", "repository, session.begin()"),
            ("ac", "repository, autocommit session"),
            ("writer", "AuditWriter, one producer"),
        ):
            ratio = rate[key] / rate["seed"]
            self.lines.append(
                Line(
                    f"1. one event per transaction ({label})",
                    f"{rate[key]:,.0f} ev/s",
                    f"{rate['seed']:,.0f} ev/s",
                    f"{ratio:.2f}x",
                    ">= 0.8x",
                    verdict(ratio >= 0.8),
                )
            )

    # ----------------------------------------------------------- line 2

    async def concurrent_producers(self) -> None:
        producers, each = self.conf.producers, self.conf.per_producer
        total = producers * each
        log(f"line 2: {producers} producers x {each} events per round")

        async def theirs() -> None:
            async def producer() -> None:
                order = str(uuid.uuid4())
                for _ in range(each):
                    await seed.audit_order_filled(self.pool, order, "AAPL", "buy", 10, 150.25, "B1")

            await asyncio.gather(*(producer() for _ in range(producers)))

        batches: list[float] = []

        async def ours() -> None:
            async with AuditWriter(self.engine) as writer:

                async def producer() -> None:
                    order = uuid.uuid4()
                    for _ in range(each):
                        await writer.record("order.filled", "order", order, FILL)

                await asyncio.gather(*(producer() for _ in range(producers)))
            batches.append(total / writer.stats.batches)

        times = await self.rounds({"seed": theirs, "writer": ours})
        rate = {k: total / statistics.median(v) for k, v in times.items()}
        ratio = rate["writer"] / rate["seed"]
        self.lines.append(
            Line(
                f"2. {producers} producers, durable on return (AuditWriter; "
                f"{statistics.median(batches):.0f} events/commit)",
                f"{rate['writer']:,.0f} ev/s",
                f"{rate['seed']:,.0f} ev/s",
                f"{ratio:.1f}x",
                ">= 20x",
                verdict(ratio >= 20),
            )
        )

    # ----------------------------------------------------------- line 3

    async def one_big_batch(self) -> None:
        n = self.conf.batch_events
        log(f"line 3: {n:,} events in one call per round")
        driver = await asyncpg.connect(**self.connect_args())
        try:

            async def baseline() -> Callable[[], Awaitable[None]]:
                rows = [
                    (
                        uuid.uuid4(),
                        "order.filled",
                        "order",
                        spec["entity_id"],
                        "broker_service",
                        dumps_exact(spec["data"]),
                        None,
                        None,
                        spec["entity_id"],
                        "COPY",
                        None,
                    )
                    for spec in (fill_spec("COPY", i) for i in range(n))
                ]

                async def run() -> None:
                    async with driver.transaction():
                        await driver.copy_records_to_table(
                            "audit_events", records=rows, columns=INSERT_COLUMNS
                        )

                return run

            async def ours() -> Callable[[], Awaitable[None]]:
                specs = [fill_spec("MANY", i) for i in range(n)]

                async def run() -> None:
                    async with self.sessions.begin() as session:
                        records = await AuditRepository(session).record_many(specs)
                    assert len(records) == n

                return run

            async def ours_count() -> Callable[[], Awaitable[None]]:
                specs = [fill_spec("MANY", i) for i in range(n)]

                async def run() -> None:
                    async with self.sessions.begin() as session:
                        added = await AuditRepository(session).record_many(specs, returning=False)
                    assert added == n

                return run

            times = await self.rounds(
                {"copy": baseline, "records": ours, "count": ours_count}, prepared=True
            )
        finally:
            await driver.close()
        copy_s = statistics.median(times["copy"])
        for key, label in (("records", "records returned"), ("count", "returning=False")):
            ours_s = statistics.median(times[key])
            ratio = copy_s / ours_s
            self.lines.append(
                Line(
                    f"3. {n:,} events in one call (record_many, {label}; vs copy_records_to_table)",
                    f"{ours_s:.2f} s ({n / ours_s:,.0f} ev/s)",
                    f"{copy_s:.2f} s ({n / copy_s:,.0f} ev/s)",
                    f"{ratio:.2f}x",
                    ">= 0.5x",
                    verdict(ratio >= 0.5),
                )
            )

    # ----------------------------------------------------------- line 4

    async def order_trails(self) -> None:
        chains = self.rows // data.CHAIN_LENGTH
        rng = random.Random(self.rows)
        samples = [rng.randrange(chains) for _ in range(self.conf.trail_samples)]
        log(f"line 4: order trails at {self.rows:,} rows")

        async def ours(sessions: async_sessionmaker[Any]) -> list[float]:
            timings = []
            for chain in samples:
                order = data.chain_id("ord", chain)
                started = time.perf_counter()
                async with sessions() as session:
                    trail = await AuditRepository(session).order_trail(order)
                timings.append(time.perf_counter() - started)
                assert len(trail) == data.CHAIN_LENGTH, len(trail)
            return timings

        async def theirs() -> tuple[list[float], int]:
            timings, found = [], 0
            for chain in samples[: self.conf.seed_trail_samples]:
                order, rec = data.chain_id("ord", chain), data.chain_id("rec", chain)
                started = time.perf_counter()
                trail = await seed.get_order_audit_trail(self.pool, str(order), str(rec))
                timings.append(time.perf_counter() - started)
                found = len(trail)
            return timings, found

        await ours(self.sessions)  # warm the caches and prepared statements
        session_times = await ours(self.sessions)
        autocommit_times = await ours(self.autocommit_sessions)
        seed_times, seed_found = await theirs()
        server_ours, server_seed = await self.explain_trail(samples[0])
        base = pct(seed_times, 0.5)
        for label, timings in (("session", session_times), ("autocommit", autocommit_times)):
            p50, p99 = pct(timings, 0.5), pct(timings, 0.99)
            ratio = base / p50
            self.lines.append(
                Line(
                    f"4. order trail at {self.rows:,} rows ({label}; p50 / p99)",
                    f"{p50 * 1e3:.2f} / {p99 * 1e3:.2f} ms",
                    f"{base * 1e3:.0f} / {pct(seed_times, 0.99) * 1e3:.0f} ms",
                    f"{ratio:,.0f}x",
                    "p50 <= 1 ms, >= 100x",
                    verdict(p50 <= 0.001 and ratio >= 100),
                )
            )
        self.lines.append(
            Line(
                f"   server execution of one trail at {self.rows:,} rows "
                f"(EXPLAIN ANALYZE; {data.CHAIN_LENGTH} vs {seed_found} events found)",
                f"{server_ours:.3f} ms",
                f"{server_seed:.1f} ms",
                f"{server_seed / server_ours:,.0f}x",
                "",
                "",
            )
        )

    async def explain_trail(self, chain: int) -> tuple[float, float]:
        """Server-side execution time (ms) of one trail: ours and the original query."""
        from sqlalchemy.dialects import postgresql

        from audit_orm.repository import order_trail_statement

        order, rec = data.chain_id("ord", chain), data.chain_id("rec", chain)
        ours_sql = str(
            order_trail_statement(order).compile(
                dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        seed_sql = (
            seed._FETCH_AUDIT_TRAIL_FOR_ORDER.replace("$1", f"'{order}'")
            .replace("$2", f"'{rec}'")
            .replace("FROM audit_events", "FROM seed.audit_events")
        )
        results = []
        async with self.engine.connect() as conn:
            for sql in (ours_sql, seed_sql):
                best = float("inf")
                for _ in range(3):
                    plan = await conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
                    best = min(best, float(plan.scalar_one()[0]["Execution Time"]))
                results.append(best)
        return results[0], results[1]

    # ----------------------------------------------------------- line 5

    async def streaming(self) -> None:
        log(f"line 5: streaming all {self.rows:,}+ events in a child process")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.stream_child",
            self.url,
            "1000",
            stdout=asyncio.subprocess.PIPE,
            cwd=PROJECT_ROOT,
        )
        stdout, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"the streaming child failed with exit code {child.returncode}")
        result = json.loads(stdout.decode().strip().splitlines()[-1])
        peak_mb = result["peak_kib"] / 1024
        start_mb = result["start_kib"] / 1024
        self.lines.append(
            Line(
                f"5. stream {int(result['rows']):,} events (peak RSS of the process)",
                f"{peak_mb:.0f} MB ({result['rows'] / result['seconds']:,.0f} ev/s)",
                f"{start_mb:.0f} MB after imports",
                "",
                "<= 150 MB",
                verdict(peak_mb <= 150),
            )
        )

    # ----------------------------------------------------------- helpers

    async def rounds(
        self, contenders: dict[str, Any], *, prepared: bool = False
    ) -> dict[str, list[float]]:
        """Run each contender once per round, alternating; seconds per run.

        With ``prepared``, a contender is a coroutine function returning the
        timed coroutine function (its input is built outside the timing).
        One untimed warm-up run of each comes first.
        """
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for round_no in range(self.conf.rounds + 1):
            for name, contender in contenders.items():
                run = await contender() if prepared else contender
                started = time.perf_counter()
                await (run() if prepared else contender())
                elapsed = time.perf_counter() - started
                if round_no:
                    times[name].append(elapsed)
        return times


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def print_table(lines: list[Line], header: str) -> None:
    columns = ("line", "ours", "baseline", "ratio", "goal", "")
    rows = [(x.name, x.ours, x.baseline, x.ratio, x.goal, x.verdict) for x in lines]
    widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
    print()
    print(header)
    for row in [columns, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


async def server_version(url: str) -> str:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return str((await conn.exec_driver_sql("SHOW server_version")).scalar_one())
    finally:
        await engine.dispose()


async def run(conf: Settings, admin_url: str) -> None:
    name = f"audit_orm_bench_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    bench = Bench(url, conf)
    try:
        await bench.open()
        await bench.load(conf.rows)
        await bench.order_trails()
        await bench.streaming()
        await bench.single_events()
        await bench.concurrent_producers()
        await bench.one_big_batch()
        if conf.big:
            await bench.load(10_000_000)
            await bench.order_trails()
        ours, theirs = await bench.table_rows()
        version = await server_version(url)
        print_table(
            bench.lines,
            f"audit_orm benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, PostgreSQL "
            f"{version}, {os.cpu_count()} CPUs; tables at the end: {ours:,} rows (ours), "
            f"{theirs:,} rows (seed)",
        )
    finally:
        await bench.close()
        async with admin.connect() as conn:
            await conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=0, help="rows for lines 4-5 (1,000,000)")
    parser.add_argument("--big", action="store_true", help="order trail at 10,000,000 rows too")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    conf = settings(args)
    configured = os.environ.get(DATABASE_URL_ENV)
    if configured:
        admin_url = asyncpg_url(configured)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="audit_orm_bench_"))
        # Registered first, so it runs after the embedded server has stopped
        # and deleted its data (exit handlers run in reverse order).
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        admin_url = start_embedded(tmp / "pgdata", keep_data=False)
    asyncio.run(run(conf, admin_url))


if __name__ == "__main__":
    main()
