#!/usr/bin/env python3
"""Project tasks that set themselves up: ``python3 dev.py demo`` and ``python3 dev.py test``.

Each creates ``.venv`` on first use, installs the package with its development
extras (again whenever ``pyproject.toml`` changes), then runs the task. Extra
arguments go to the task (``python3 dev.py test -k trail``).
"""

from __future__ import annotations

import hashlib
import os
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


def main(argv: list[str]) -> int:
    tasks = {
        "demo": [str(BIN / "audit-orm"), "demo"],
        "test": [str(BIN / "python"), "-m", "pytest"],
        "lint": [str(BIN / "python"), "-m", "ruff", "check", "."],
    }
    if not argv or argv[0] not in tasks:
        print(f"usage: python3 dev.py {{{'|'.join(tasks)}}} [args...]", file=sys.stderr)
        return 2
    ensure_env()
    return subprocess.call([*tasks[argv[0]], *argv[1:]], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
