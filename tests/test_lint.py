"""Lint (ruff, import order included) and the type check (mypy over the modules listed in
pyproject.toml) are part of the test command, so `python -m pytest -q` — what `.ci/run` runs —
fails on either. Both come with the `test` extra."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)


def test_ruff_is_clean():
    done = run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean():
    done = run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr
