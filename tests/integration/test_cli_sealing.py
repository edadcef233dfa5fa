"""The seal, verify, digest and grant subcommands."""

from __future__ import annotations

import asyncio
import io
import re

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit_orm.cli import main
from audit_orm.database import DATABASE_URL_ENV
from tests.dbutil import GUARDS_OFF


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def _execute(url: str, *statements: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


def test_seal_digest_verify(
    fresh_db: tuple[str, AsyncEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = fresh_db
    assert run("--database-url", url, "digest")[0] == 1
    assert run("--database-url", url, "demo")[0] == 0

    code, text_out = run("--database-url", url, "seal", "--block-size", "10")
    assert code == 0
    match = re.search(r"sealed (\d+) rows in (\d+) seals \(seq 1\.\.(\d+)", text_out)
    assert match is not None, text_out
    rows, seals = int(match[1]), int(match[2])
    assert rows > 10 and seals == -(-rows // 10)
    assert f"head: seal {seals}, digest {seals}:" in text_out

    code, digest = run("--database-url", url, "digest")
    assert code == 0 and re.fullmatch(rf"{seals}:[0-9a-f]{{66}}\n", digest)
    assert run("--database-url", url, "seal")[1].startswith("up to date")

    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    code, report = run("--database-url", url, "verify", "--digest", digest.strip())
    assert code == 0
    assert report.startswith(f"ok: digest matched; {rows} rows, {seals} seals, 0 rows not sealed")
    assert f"{rows:,}/{rows:,} records" in terminal.getvalue()

    asyncio.run(
        _execute(
            url,
            *GUARDS_OFF,
            "ALTER TABLE audit_events DISABLE TRIGGER USER",
            "UPDATE audit_events SET actor = 'mallory' WHERE seq IN (2, 3)",
            "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_append_only",
            "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_before_insert",
            "ALTER TABLE audit_events ENABLE ALWAYS TRIGGER audit_events_claim_xid",
        )
    )
    code, report = run("--database-url", url, "verify", "--max-problems", "1")
    assert code == 1
    lines = report.splitlines()
    assert lines[0].startswith("FAILED: 2 problems;")
    assert lines[1].startswith("  changed_row: row seq 2 ")
    assert lines[2] == "  ... and 1 more"


def test_grant_prints_its_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    # Printing needs no database: an unreachable one proves none is touched.
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://nobody@127.0.0.1:1/nothing")
    code, sql = run("grant", "--writer", "app", "--reader", "auditor", "--print-sql")
    assert code == 0
    assert sql.splitlines() == [
        'REVOKE ALL ON audit_events, audit_seals FROM "app";',
        'GRANT SELECT, INSERT ON audit_events TO "app";',
        'GRANT SELECT ON audit_seals TO "app";',
        'REVOKE ALL ON audit_events, audit_seals FROM "auditor";',
        'GRANT SELECT ON audit_events, audit_seals TO "auditor";',
    ]


def test_grant_errors_name_the_role(
    fresh_db: tuple[str, AsyncEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = fresh_db
    assert run("--database-url", url, "grant", "--writer", "nobody_by_this_name")[0] == 2
    assert "writer: no such role" in capsys.readouterr().err
    assert run("--database-url", url, "grant")[0] == 2
    assert "at least one of writer, reader and sealer" in capsys.readouterr().err


def test_bad_digest_is_an_error(
    fresh_db: tuple[str, AsyncEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = fresh_db
    assert run("--database-url", url, "verify", "--digest", "xyz")[0] == 2
    assert "digest: must be SEAL_NO:HEX or HEX" in capsys.readouterr().err
