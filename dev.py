#!/usr/bin/env python3
"""Project tasks that set themselves up: ``python3 dev.py demo``, ``test``, ``lint``,
``coverage`` and ``mutate``.

Each creates ``.venv`` on first use, installs the package with its development
extras (again whenever ``pyproject.toml`` changes), then runs the task. Extra
arguments go to the task (``python3 dev.py test -k trail``).

``coverage`` runs the suite with branch coverage of ``audit_orm`` and prints the
lines and branches not taken. ``mutate MODULE`` runs mutation testing (mutmut) on
one module of ``audit_orm`` with the tests that cover it; see tests/MUTATION.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".audit-orm-installed"


def ensure_env() -> None:
    """Create the virtual environment and install the project if needed."""
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    print("installing audit-orm and its development tools into .venv ...", flush=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-e", f"{ROOT}[dev,example]"], check=True)
    STAMP.write_text(wanted)


#: Where ``mutate`` works: a copy of the project per module, so a run never
#: touches the working tree and several modules can be kept side by side.
MUTATION_ROOT = ROOT / ".mutmut"

#: The tests that cover each module, run against its mutants. Fast unit tests
#: where they pin the module; a module missing here uses tests/unit.
MUTATION_TESTS = {
    "hashing": ["tests/unit/test_hashing.py", "tests/unit/test_vectors.py"],
    "payloads": ["tests/unit/test_payloads.py", "tests/unit/test_payload_edges.py"],
    "jsonb": ["tests/unit/test_jsonb.py"],
    "spool": ["tests/unit/test_spool.py"],
}

#: mutmut's verdicts that count as the tests noticing the mutant (a timeout is a
#: mutant that made the code loop: a test run would never pass).
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}


def mutate(argv: list[str]) -> int:
    """Mutation testing of one module; prints the score and every surviving mutant."""
    parser = argparse.ArgumentParser(prog="python3 dev.py mutate")
    parser.add_argument("module", help="a module of audit_orm: hashing, payloads, jsonb, ...")
    parser.add_argument(
        "--tests",
        nargs="+",
        metavar="PATH",
        help="the tests to run against each mutant (default: the module's own tests)",
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="REGEX",
        help="do not mutate source lines matching any of these regular expressions",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="NAME",
        help="mutate only these functions (NAME or Class.method)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel mutants")
    args = parser.parse_args(argv)
    module = Path(args.module).stem
    source = ROOT / "audit_orm" / f"{module}.py"
    if not source.is_file():
        parser.error(f"no module audit_orm/{module}.py")
    tests = args.tests or MUTATION_TESTS.get(module, ["tests/unit"])
    work = MUTATION_ROOT / module
    # A fresh copy each run: mutmut keeps results between runs and would report
    # verdicts reached on older code or older tests.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.spool", ".hypothesis")
    for name in ("audit_orm", "tests", "alembic"):
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    shutil.copy2(ROOT / "alembic.ini", work / "alembic.ini")
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    config += (
        "\n[tool.mutmut]\n"
        'source_paths = ["audit_orm/"]\n'
        # The tests that use a database migrate it with the scripts in alembic/.
        'also_copy = ["alembic/", "alembic.ini"]\n'
        f'only_mutate = ["audit_orm/{module}.py"]\n'
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        f"do_not_mutate_patterns = {_toml_list(args.exclude)}\n"
    )
    (work / "pyproject.toml").write_text(config, encoding="utf-8")
    mutmut = str(BIN / "mutmut")
    # mutmut names a mutant after its function: x_NAME, or xǁClassǁmethod for a method.
    patterns = [
        f"audit_orm.{module}.x"
        + ("ǁ" + name.replace(".", "ǁ") if "." in name else "_" + name)
        + "__mutmut_*"
        for name in args.only
    ]
    code = subprocess.call([mutmut, "run", "--max-children", str(args.jobs), *patterns], cwd=work)
    if code != 0:
        return code
    listing = subprocess.run(
        [mutmut, "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=True
    ).stdout
    verdicts = dict(re.findall(r"^\s*(\S+): (.+?)\s*$", listing, re.MULTILINE))
    if patterns:
        verdicts = {
            name: verdict
            for name, verdict in verdicts.items()
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
        }
    counts: dict[str, int] = {}
    for verdict in verdicts.values():
        counts[verdict] = counts.get(verdict, 0) + 1
    counted = sum(n for verdict, n in counts.items() if verdict != "skipped")
    detected = sum(counts.get(verdict, 0) for verdict in DETECTED)
    print()
    print(f"audit_orm/{module}.py with {' '.join(tests)}")
    print("  " + ", ".join(f"{verdict}: {n}" for verdict, n in sorted(counts.items())))
    if counted:
        print(f"  score: {detected}/{counted} = {100 * detected / counted:.1f}% detected")
    undetected = sorted(
        (name for name, verdict in verdicts.items() if verdict not in DETECTED | {"skipped"}),
        key=_natural,
    )
    for name in undetected:
        print(f"  {verdicts[name]}: {name}")
    if undetected:
        print(f"  see one: cd {work.relative_to(ROOT)} && ../../.venv/bin/mutmut show NAME")
    return 0


def _toml_list(items: list[str]) -> str:
    # A JSON list of strings is also a TOML array of basic strings.
    return json.dumps(items)


def _natural(name: str) -> tuple[str, int]:
    stem, _, number = name.rpartition("_")
    return (stem, int(number)) if number.isdigit() else (name, 0)


def main(argv: list[str]) -> int:
    python = str(BIN / "python")
    tasks = {
        "demo": [str(BIN / "audit-orm"), "demo"],
        "test": [python, "-m", "pytest"],
        "lint": [python, "-m", "ruff", "check", "."],
        "coverage": [
            python,
            "-m",
            "pytest",
            "--cov=audit_orm",
            "--cov-branch",
            "--cov-report=term-missing:skip-covered",
        ],
        "mutate": [],
    }
    if not argv or argv[0] not in tasks:
        print(f"usage: python3 dev.py {{{'|'.join(tasks)}}} [args...]", file=sys.stderr)
        return 2
    ensure_env()
    if argv[0] == "mutate":
        return mutate(argv[1:])
    return subprocess.call([*tasks[argv[0]], *argv[1:]], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
