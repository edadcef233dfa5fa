"""Output that cannot lie to its reader: what ``audit-orm`` shows a person.

Stored text is written by whoever can write an event. Shown raw, an ESC or a
BEL drives the terminal (erase the line above, print a forged one) and a
bidirectional override makes a line read in another order than it is stored.
Every human-readable output escapes them; identifiers refuse them outright.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import (
    AuditEvent,
    AuditEventType,
    AuditRecord,
    AuditRepository,
    EntityType,
    InvalidInputError,
    InvalidPayloadError,
)
from audit_orm.cli import main
from audit_orm.display import escape
from audit_orm.timeline import render_timeline

#: Anything a terminal acts on, or that reorders a line or hides: C0 but the
#: newline between lines, DEL, C1, bidirectional formatting, line separators,
#: zero-width characters.
RAW = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\u2028\u2029"
    "\u200b-\u200d\ufeff]"
)

#: A rejection reason that, printed raw, moves up a line, erases it, rings the
#: bell and prints a fill that never happened; the override then reverses the rest.
FORGERY = (
    "limit breached\x1b[1A\x1b[2K\r#41     2026-12-06 09:30:00.000000  order.filled"
    "               broker_service         ticker=ACME fill_quantity=1000\x07"
    "\n#42 order.filled \u202edellif\u202c\x9b2J broker\u200b_service"
)


async def _rejected_order(engine: AsyncEngine) -> uuid.UUID:
    order_id = uuid.uuid4()
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        await repo.order_submitted(order_id, "ACME", "buy", Decimal("10"), "market", "k-1")
        await repo.order_rejected(order_id, "ACME", FORGERY, "risk")
    return order_id


def _cli(url: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--database-url", url, *argv], out=out)
    return code, out.getvalue()


async def test_trail_text_escapes_what_would_drive_the_terminal(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """README "Command line": ``trail`` prints the order's chain, one line per event.

    A rejection reason holding ESC, BEL, CR, a newline, a C1 CSI and a bidi
    override must come out as visible escapes: no raw control character, as
    many lines as events, no line of an event type that was never recorded,
    and the stored text still recoverable from what is shown.
    """
    url, engine = fresh_db
    order_id = await _rejected_order(engine)
    code, shown = await _in_thread(url, "trail", str(order_id))
    assert code == 0
    assert RAW.search(shown) is None, repr(shown)
    lines = shown.rstrip("\n").split("\n")
    assert len(lines) == 2
    assert [line.split()[3] for line in lines] == ["order.submitted", "order.rejected"]
    assert escape(FORGERY) in lines[1]


async def test_trail_json_is_printable_and_parses_to_the_stored_text(
    fresh_db: tuple[str, AsyncEngine],
) -> None:
    """``trail --json`` is JSON, whose escapes hide nothing: C1 and bidi become ``\\uNNNN``.

    Each line parses back to exactly the stored reason; no raw character
    reaches the terminal.
    """
    url, engine = fresh_db
    order_id = await _rejected_order(engine)
    code, shown = await _in_thread(url, "trail", str(order_id), "--json")
    assert code == 0
    assert RAW.search(shown) is None, repr(shown)
    records = [json.loads(line) for line in shown.splitlines()]
    assert records[1]["data"]["reason"] == FORGERY


def test_a_rendered_timeline_escapes_keys_values_and_actor() -> None:
    """The timeline renderer itself (used by ``demo`` and ``trail``): one line per record.

    A payload that no longer fits its model is shown raw, keys included: those
    are escaped too, as is a backslash, so ``\\x1b`` typed as text and a real
    ESC look different.
    """
    now = datetime(2026, 12, 6, tzinfo=UTC)
    record = AuditRecord(
        id=uuid.uuid4(),
        seq=7,
        event_type=AuditEventType.ORDER_REJECTED,
        entity_type=EntityType.ORDER,
        entity_id=uuid.uuid4(),
        actor="legacy\x1b[2K",
        data={"ticker": "ACME", "reason\n#8 order.filled": "x\u202e", "note": "\\x1b"},
        occurred_at=now,
        recorded_at=now,
    )
    shown = render_timeline([record])
    assert RAW.search(shown) is None and "\n" not in shown
    assert "legacy\\x1b[2K" in shown
    assert "reason\\n#8 order.filled=x\\u202e" in shown
    assert "note=\\\\x1b" in shown


@pytest.mark.parametrize(
    "actor",
    [
        "ops\x9b2J",
        "ops\x85",
        "\u202eops",
        "ops\u2066x\u2069",
        "ops\u200f",
        "a\u2028b",
        "risk_engine\u200b",
        "\ufeffrisk_engine",
        "risk\u00adengine",
    ],
)
async def test_actor_refuses_c1_and_bidi_as_tickers_do(
    engine: AsyncEngine, session: AsyncSession, actor: str
) -> None:
    """README "Errors": bad input is an ``InvalidInputError`` naming the field, nothing written.

    An actor is printed on every trail line; C1 controls (CSI, NEL), bidi
    overrides, isolates and marks, and invisible characters (which make a name
    look like another: ``risk_engine`` with a zero-width space) are refused
    there as in tickers.
    """
    repo = AuditRepository(session)
    before = await session.scalar(select(func.count()).select_from(AuditEvent))
    with pytest.raises(InvalidInputError) as caught:
        await repo.order_accepted(uuid.uuid4(), "ACME", "b-1", actor=actor)
    assert caught.value.field == "actor"
    with pytest.raises(InvalidInputError) as caught:
        await repo.search(actor=actor)
    assert caught.value.field == "actor"
    assert await session.scalar(select(func.count()).select_from(AuditEvent)) == before


@pytest.mark.parametrize("ticker", ["\u202eLPAA", "AA\u2066PL", "AAPL\u200e", "AAPL\u200d"])
async def test_ticker_refuses_bidi(session: AsyncSession, ticker: str) -> None:
    """Tickers refuse control characters; bidi and invisible characters are refused the same way."""
    repo = AuditRepository(session)
    with pytest.raises(InvalidPayloadError) as caught:
        await repo.order_accepted(uuid.uuid4(), ticker, "b-1")
    assert caught.value.field == "data.ticker"


def test_error_messages_printed_by_the_cli_are_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """README "Command line": bad input exits 2 with a one-line message.

    The message quotes what it was given (here a URL that the URL parser
    repeats raw in its own message): no raw ESC, BEL or override reaches stderr.
    """
    code = main(["--database-url", "\x1b[2J\x1b]0;pwned\x07\u202enot a url", "digest"])
    assert code == 2
    err = capsys.readouterr().err
    assert RAW.search(err.rstrip("\n")) is None, repr(err)
    assert err.count("\n") == 1
    assert "--database-url" in err


def test_argument_errors_are_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's own messages: "unrecognized arguments" repeats the arguments raw.

    The CLI's parser escapes them like every other message: exit 2, no raw ESC.
    """
    with pytest.raises(SystemExit) as caught:
        main(["digest", "\x1b[2J\x1b[1;1H#1 order.filled\u202e"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err
    assert RAW.search(err.replace("\n", "")) is None, repr(err)


def test_grant_print_sql_refuses_role_names_that_drive_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``grant --print-sql`` prints SQL for review: a role name with ESC is refused, named."""
    out = io.StringIO()
    code = main(["grant", "--print-sql", "--writer", "app\x1b[2Kwriter"], out=out)
    assert code == 2
    assert out.getvalue() == ""
    err = capsys.readouterr().err
    assert "--writer" in err and RAW.search(err.rstrip("\n")) is None


async def _in_thread(url: str, *argv: str) -> tuple[int, str]:
    # main() runs its own event loop, which cannot start inside this test's.
    return await asyncio.to_thread(_cli, url, *argv)
