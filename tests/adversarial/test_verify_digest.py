"""Adversarial: the digest vouches only for what holds, and only well-formed digests are read.

README, Sealing: ``verify --digest`` proves nothing sealed up to that seal has
changed; "digest matched" must never be said while something it covers was
found wrong.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from dataclasses import dataclass

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit_orm import AuditRepository, Digest, InvalidInputError, ProblemKind, seal, verify
from audit_orm.cli import main
from tests.dbutil import triggers_disabled

HEX = "01" + "ab" * 32


@dataclass(frozen=True)
class Sealed:
    url: str
    engine: AsyncEngine
    digest: Digest


async def _write(engine: AsyncEngine, count: int) -> None:
    async with AsyncSession(engine) as session, session.begin():
        repo = AuditRepository(session)
        for _ in range(count):
            await repo.order_accepted(uuid.uuid4(), "ACME", "brk")


async def _tamper(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn, triggers_disabled(conn):
        for statement in statements:
            await conn.execute(text(statement))


@pytest.fixture
async def sealed(fresh_db: tuple[str, AsyncEngine]) -> Sealed:
    """Seals 1..4 over seq 1..12 (three rows each), then two rows not sealed yet."""
    url, engine = fresh_db
    await _write(engine, 12)
    result = await seal(engine, block_size=3)
    assert result.head is not None and result.head.seal_no == 4
    await _write(engine, 2)
    return Sealed(url, engine, result.head.digest)


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out=out), out.getvalue()


async def test_a_removed_middle_seal_means_the_digest_of_a_later_seal_does_not_match(
    sealed: Sealed,
) -> None:
    """Attack: delete seal 2 and keep seal 4, whose hash the digest names.

    Before, verify reported ``removed_seal`` and still said the digest matched.
    The digest covers seals 1..4: it matches only when nothing there is wrong.
    """
    await _tamper(sealed.engine, "DELETE FROM audit_seals WHERE seal_no = 2")
    report = await verify(sealed.engine, digest=sealed.digest)
    assert ProblemKind.REMOVED_SEAL in {p.kind for p in report.problems}
    assert report.digest_matched is False
    code, out = await asyncio.to_thread(
        _run, "--database-url", sealed.url, "verify", "--digest", str(sealed.digest)
    )
    assert code == 1 and "digest NOT matched" in out


async def test_a_changed_row_under_the_digest_means_no_match(sealed: Sealed) -> None:
    """A row changed inside the digest's seals: the seal is present, the digest still
    must not be reported matched."""
    await _tamper(sealed.engine, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 7")
    report = await verify(sealed.engine, digest=sealed.digest)
    assert [p.kind for p in report.problems] == [ProblemKind.CHANGED_ROW]
    assert report.digest_matched is False


async def test_a_problem_after_the_digests_seal_leaves_the_match_standing(sealed: Sealed) -> None:
    """A row written after the digest's seal changed: that is a problem, but not one the
    digest vouched for; the report says both, and the command line says which."""
    await _tamper(sealed.engine, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 14")
    report = await verify(sealed.engine, digest=sealed.digest)
    assert [(p.kind, p.seq) for p in report.problems] == [(ProblemKind.CHANGED_ROW, 14)]
    assert report.digest_matched is True
    code, out = await asyncio.to_thread(
        _run, "--database-url", sealed.url, "verify", "--digest", str(sealed.digest)
    )
    assert code == 1 and "digest matched (the problems lie after its seal)" in out


@pytest.mark.parametrize(
    "text_form",
    [
        "\u0661\u0662:" + HEX,  # Arabic-Indic digits: int() reads them as 12
        "\uff11:" + HEX,  # a fullwidth 1
        "1:" + HEX[:-1] + "\uff10",  # a fullwidth 0 among the hex digits
        "\u2003" + HEX,  # an em space
        "0:" + HEX,  # seal numbers start at 1
        "9223372036854775808:" + HEX,  # beyond bigint
        "1:" + HEX + "00",  # too long
        "1:" + HEX[:-2],  # too short
        "-1:" + HEX,
        "1 :" + HEX,
        "",
    ],
)
def test_a_malformed_digest_is_refused_with_a_typed_error(text_form: str) -> None:
    """``Digest.parse`` accepted any Unicode digit and any seal number."""
    with pytest.raises(InvalidInputError) as caught:
        Digest.parse(text_form)
    assert caught.value.field == "digest"


@pytest.mark.parametrize(
    "built",
    [Digest(b"\x01" * 5, 1), Digest(b"\x01" * 33, 0), Digest(b"\x01" * 33, True)],  # type: ignore[arg-type]
)
async def test_a_malformed_digest_object_is_refused(
    fresh_db: tuple[str, AsyncEngine], built: Digest
) -> None:
    """A :class:`Digest` built by hand with a short hash or an impossible seal number is
    bad input, not a digest that silently never matches."""
    _, engine = fresh_db
    with pytest.raises(InvalidInputError, match="digest"):
        await verify(engine, digest=built)


def test_the_verify_command_names_the_digest_option(
    fresh_db: tuple[str, AsyncEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    """``verify --digest`` with non-ASCII digits exits 2 naming ``--digest``."""
    url, _ = fresh_db
    assert _run("--database-url", url, "verify", "--digest", "\u0661:" + HEX)[0] == 2
    assert "error: --digest:" in capsys.readouterr().err
