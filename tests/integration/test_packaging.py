"""The built wheel carries the migrations and can migrate a database on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from audit_orm import migrate
from tests.dbutil import create_database, drop_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("audit_orm-*.whl")
    return built


@pytest.fixture
async def empty_url(admin_url: str) -> AsyncIterator[str]:
    url = await create_database(admin_url, "audit_orm_wheel")
    yield url
    await drop_database(admin_url, url)


def test_wheel_ships_migrations_and_types(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "audit_orm/_migrations/env.py" in names
    assert "audit_orm/_migrations/versions/0001_seed_table.py" in names
    assert "audit_orm/py.typed" in names
    assert not any(name.startswith("tests/") for name in names)


async def test_installed_wheel_migrates_without_the_checkout(
    wheel: Path, empty_url: str, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Run from an unrelated folder with only the extracted wheel (and the
    # environment's dependencies) importable: nothing from this checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "AUDIT_ORM_DATABASE_URL": empty_url}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import audit_orm, audit_orm.migrate as m; print(audit_orm.__file__);"
            " print(m.script_location())",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(site) in result.stdout and "_migrations" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "audit_orm", "migrate"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    engine = create_async_engine(empty_url)
    try:
        async with engine.connect() as conn:
            version = await conn.scalar(text("SELECT version_num FROM audit_orm_alembic_version"))
            columns = await conn.scalar(
                text(
                    "SELECT count(*) FROM information_schema.columns"
                    " WHERE table_name = 'audit_events'"
                )
            )
    finally:
        await engine.dispose()
    assert version is not None
    assert columns and columns >= 12


async def test_host_application_finds_the_revisions_in_the_installed_package(
    wheel: Path, empty_url: str, tmp_path: Path
) -> None:
    """The README's ``alembic.ini`` line for hosts: ``audit_orm:_migrations/versions``."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    hostapp = ROOT / "tests" / "hostapp"
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        "[alembic]\n"
        f"script_location = {hostapp / 'migrations'}\n"
        "path_separator = space\n"
        f"version_locations = {hostapp / 'migrations' / 'versions'} "
        "audit_orm:_migrations/versions\n"
    )
    # The installed package first; the checkout only for the host application.
    env = {
        **os.environ,
        "PYTHONPATH": f"{site}{os.pathsep}{ROOT}",
        "HOSTAPP_DATABASE_URL": empty_url,
    }

    def alembic(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(ini), *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    heads = alembic("heads", "--verbose")
    assert heads.returncode == 0, heads.stderr
    assert str(site / "audit_orm" / "_migrations" / "versions") in heads.stdout
    assert "Branch names: hostapp" in heads.stdout
    (audit_head,) = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
    assert f"Rev: {audit_head} (head)" in heads.stdout
    done = alembic("upgrade", "heads")
    assert done.returncode == 0, done.stderr
    engine = create_async_engine(empty_url)
    try:
        async with engine.connect() as conn:
            versions = set(
                (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalars()
            )
    finally:
        await engine.dispose()
    assert versions == {"h001_orders", audit_head}
