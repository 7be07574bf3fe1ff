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




@pytest.fixture
def submit_array_then_group():
    """Submit a job script as a 2-task array, then once more after it; wait until both left the queue.

    Returns a function ``(script, env, resources, timeout_s) -> (array_id, group_id)``.
    """
    import time

    def submit(script: str, env: dict, resources: list[str], timeout_s: float) -> tuple[str, str]:
        def sbatch(*args: str) -> str:
            done = subprocess.run(["sbatch", "--parsable", *args, *resources, script],
                                  capture_output=True, text=True, env=env, check=True)
            return done.stdout.strip().split(";")[0]

        array_id = sbatch("--array=0-1")
        group_id = sbatch(f"--dependency=afterok:{array_id}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            queued = subprocess.run(["squeue", "-h", "-j", f"{array_id},{group_id}", "-o", "%i"],
                                    capture_output=True, text=True).stdout
            if not queued.strip():
                break
            time.sleep(0.5)
        return array_id, group_id

    return submit
