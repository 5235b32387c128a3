"""The whole tree keeps one style: ruff's linter and formatter, configured in pyproject.toml, report nothing.

Fix locally with `.venv/bin/ruff check --fix . && .venv/bin/ruff format .`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "args", [["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]], ids=["lint", "format"]
)
def test_ruff_reports_nothing(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ruff {' '.join(args)} found problems:\n{done.stdout}{done.stderr}"
