"""``audit-orm`` as an unlucky operator meets it: odd ``--output`` targets, errors named.

README "Exports": ``-o`` replaces only a regular file or creates a new one,
through a file written beside it and renamed at the end. README "Command
line": bad input exits 2 with a message naming the option as typed.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit_orm.cli import main


def _cli(url: str, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["--database-url", url, *argv], out=out)
    return code, out.getvalue()


def _device(path: Path) -> None:
    # The same device as /dev/null, made in the test's own folder: the test
    # never points an export at a shared device node.
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))


def _fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


def _directory(path: Path) -> None:
    path.mkdir()


def _link_to_device(path: Path) -> None:
    _device(path.with_name("device"))
    path.symlink_to(path.with_name("device"))


def _link_to_file(path: Path) -> None:
    path.with_name("real.jsonl").write_text("kept\n")
    path.symlink_to(path.with_name("real.jsonl"))


def _dangling_link(path: Path) -> None:
    path.symlink_to(path.with_name("nowhere.jsonl"))


TARGETS: dict[str, Callable[[Path], None]] = {
    "a character device": _device,
    "a FIFO": _fifo,
    "a directory": _directory,
    "a symbolic link to a device": _link_to_device,
    "a symbolic link to a regular file": _link_to_file,
    "a dangling symbolic link": _dangling_link,
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.lstat().st_mode, p.lstat().st_ino) for p in folder.iterdir()}


@pytest.mark.parametrize("kind", list(TARGETS))
async def test_export_output_refuses_anything_but_a_regular_file_or_a_new_path(
    fresh_db: tuple[str, AsyncEngine],
    tmp_path: Path,
    kind: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """``export -o`` onto a device, FIFO, directory or symbolic link: exit 2, nothing replaced.

    The message names ``--output``; every entry in the folder keeps its kind
    and inode, and no partial file is left beside it.
    """
    url, _ = fresh_db
    assert (await asyncio.to_thread(_cli, url, "demo"))[0] == 0
    target = tmp_path / "out.jsonl"
    TARGETS[kind](target)
    before = await asyncio.to_thread(_snapshot, tmp_path)
    capfd.readouterr()
    code, shown = await asyncio.to_thread(_cli, url, "export", "-o", str(target))
    err = capfd.readouterr().err
    assert (code, shown) == (2, "")
    assert "--output" in err and err.count("\n") == 1, err
    assert await asyncio.to_thread(_snapshot, tmp_path) == before


async def test_export_output_into_a_missing_directory_names_the_option(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A target in a folder that does not exist: exit 2 naming ``--output``, not a bare OSError."""
    url, _ = fresh_db
    code, _ = await asyncio.to_thread(_cli, url, "export", "-o", str(tmp_path / "no" / "x.csv"))
    assert code == 2
    assert "--output" in capfd.readouterr().err


async def test_export_output_replaces_a_regular_file_whole(
    fresh_db: tuple[str, AsyncEngine], tmp_path: Path
) -> None:
    """The ordinary case still works: an existing regular file is replaced by the whole export."""
    url, _ = fresh_db
    assert (await asyncio.to_thread(_cli, url, "demo"))[0] == 0
    target = tmp_path / "out.jsonl"
    await asyncio.to_thread(target.write_text, "the previous export\n")
    code, shown = await asyncio.to_thread(_cli, url, "export", "-o", str(target))
    assert code == 0 and shown.startswith("exported ")
    text = await asyncio.to_thread(target.read_text)
    assert "previous" not in text and text.count("\n") == int(shown.split()[1])
    assert await asyncio.to_thread(lambda: [p.name for p in tmp_path.iterdir()]) == ["out.jsonl"]


OPTION_CASES = [
    (["export", "--since", "0001-01-01T00:00+14:00"], "--since"),
    (["export", "--until", "9999-12-31T23:00-14:00"], "--until"),
    (["export", "--since", "2026-12-02", "--until", "2026-12-01"], "--until"),
    (["export", "--ticker", "\u202eLPAA"], "--ticker"),
    (["export", "--event-type", "order.teleported"], "--event-type"),
    (["replay", "spool.jsonl", "--chunk-size", "0"], "--chunk-size"),
    (["replay", "spool.jsonl", "--attempts", "0"], "--attempts"),
    (["seal", "--block-size", "0"], "--block-size"),
    (["verify", "--max-problems", "0"], "--max-problems"),
    (["verify", "--digest", "zz"], "--digest"),
    (["grant", "--writer", "app\x1b[2K"], "--writer"),
    (["grant"], "--writer"),
]


@pytest.mark.parametrize(
    ("argv", "option"), OPTION_CASES, ids=[" ".join(a) for a, _ in OPTION_CASES]
)
async def test_every_cli_error_names_its_option(
    db_url: str, argv: list[str], option: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """README "Command line": bad input exits 2 with a one-line message naming the option.

    Including a date that is valid where it was written but overflows in UTC,
    and values the library checks under its own parameter names.
    """
    code, shown = await asyncio.to_thread(_cli, db_url, *argv)
    err = capfd.readouterr().err
    assert (code, shown) == (2, ""), err
    assert err.startswith(f"audit-orm: error: {option}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
