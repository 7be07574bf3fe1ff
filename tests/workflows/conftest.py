"""Fixtures of the workflow tests: a real SLURM cluster, when there is one."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def _slurm_problem(required: bool) -> str | None:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "SLURM's sbatch/scontrol are not on PATH"
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    if not required and not conf.is_file():  # scontrol would retry for 60 s
        return f"no {conf}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "'scontrol ping' timed out"
    if "is UP" not in ping.stdout:
        return f"'scontrol ping' does not report a controller UP: {(ping.stdout + ping.stderr).strip()!r}"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    required = os.environ.get("FCFLOW_TEST_SLURM") == "1"
    problem = _slurm_problem(required)
    if problem is None:
        return
    if required:
        pytest.fail(f"FCFLOW_TEST_SLURM=1 but no SLURM cluster answers: {problem}. Run .ci/slurm/up.sh.")
    pytest.skip(f"no SLURM cluster ({problem}); CI starts one with .ci/slurm/up.sh")


