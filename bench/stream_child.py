"""Stream every event of a database in a fresh process and report its peak memory.

Run by :mod:`bench.run` as ``python -m bench.stream_child URL``; prints one JSON
line: rows streamed, seconds, resident memory after imports and at its peak.
A separate process, so the peak belongs to the streaming alone, not to the
benchmark that loaded the data.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time

from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from audit_orm import AuditRepository


def _rss_kib() -> int:
    """Current resident set size (KiB), from /proc; 0 where unavailable."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


async def stream_all(url: str, chunk_size: int) -> dict[str, float]:
    engine = create_async_engine(url)
    try:
        started_rss = _rss_kib()
        rows = 0
        started = time.perf_counter()
        async with AsyncSession(engine) as session:
            async for _record in AuditRepository(session).stream(chunk_size=chunk_size):
                rows += 1
        seconds = time.perf_counter() - started
    finally:
        await engine.dispose()
    # ru_maxrss is in KiB on Linux: the high-water mark of the whole process.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"rows": rows, "seconds": seconds, "start_kib": started_rss, "peak_kib": peak}


def main() -> None:
    url = sys.argv[1]
    chunk_size = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000
    print(json.dumps(asyncio.run(stream_all(url, chunk_size))))


if __name__ == "__main__":
    main()
