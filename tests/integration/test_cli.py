"""The command line, against real databases."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from audit_orm.cli import main
from tests.dbutil import create_database, drop_database


@pytest.fixture(scope="module")
async def demo_url(admin_url: str) -> AsyncIterator[str]:
    url = await create_database(admin_url, "audit_orm_cli")
    yield url
    await drop_database(admin_url, url)


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_demo_then_trail(demo_url: str) -> None:
    code, text = run("--database-url", demo_url, "demo")
    assert code == 0
    for event in (
        "recommendation.generated",
        "approval.approved",
        "order.filled",
        "position.opened",
    ):
        assert event in text
    short_order = text.rsplit("audit-orm trail ", 1)[1].strip()

    code, timeline = run("--database-url", demo_url, "trail", short_order)
    assert code == 0
    assert "order.submitted" in timeline
    assert "position.opened" in timeline
    assert "quantity_after=-50" in timeline

    code, lines = run("--database-url", demo_url, "trail", short_order, "--json")
    events = [json.loads(line) for line in lines.splitlines()]
    assert [e["event_type"] for e in events] == [
        "order.submitted",
        "order.filled",
        "position.opened",
    ]
    assert events[1]["data"]["fill_price"] == 24.10
    assert all(e["order_id"] == short_order for e in events)


def test_trail_of_unknown_order_exits_1(demo_url: str) -> None:
    code, text = run("--database-url", demo_url, "trail", str(uuid.uuid4()))
    assert code == 1
    assert "no audit events" in text


def test_trail_refuses_a_malformed_id(demo_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run("--database-url", demo_url, "trail", "'; DROP TABLE audit_events; --")
    assert code == 2
    assert "ORDER_ID" in capsys.readouterr().err


def test_migrate_defaults_to_an_embedded_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AUDIT_ORM_DATABASE_URL"}
    env["AUDIT_ORM_EMBEDDED_DIR"] = str(tmp_path / "pgdata")
    result = subprocess.run(
        [sys.executable, "-m", "audit_orm", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "migrated" in result.stdout
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()
    # The data directory is kept and reused by the next run.
    again = subprocess.run(
        [sys.executable, "-m", "audit_orm", "trail", str(uuid.uuid4())],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert again.returncode == 1, again.stderr
