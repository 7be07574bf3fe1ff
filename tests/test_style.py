"""The code style CI holds the project to: ruff with the configuration in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    # ruff is a test dependency (pip install -e ".[test]"); python -m ruff works without it on PATH
    command = [sys.executable, "-m", "ruff"] if shutil.which("ruff") is None else ["ruff"]
    done = subprocess.run([*command, "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
