"""The version number: one value in pyproject and the package, semantic, in the changelog."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import audit_orm

ROOT = Path(__file__).resolve().parents[2]
#: Semantic Versioning 2.0.0's own grammar, pre-release and build metadata included.
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


def test_pyproject_and_package_agree() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == audit_orm.__version__


def test_version_is_semantic() -> None:
    assert SEMVER.match(audit_orm.__version__)
    for bad in ("1.0", "01.0.0", "1.0.0.0", "v1.0.0", "1.0.0-"):
        assert not SEMVER.match(bad), bad


def test_changelog_names_the_version_as_the_latest_release() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\](?: - (\d{4}-\d\d-\d\d))?$", changelog, re.MULTILINE)
    names = [name for name, _ in releases]
    assert names[0] == "Unreleased"
    assert names[1] == audit_orm.__version__
    # Every release is dated, newest first.
    dated = [(name, date) for name, date in releases[1:]]
    assert all(date for _, date in dated)
    assert [date for _, date in dated] == sorted((date for _, date in dated), reverse=True)
