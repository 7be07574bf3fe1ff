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


def write_group_first_level(bids: Path, out: Path) -> None:
    """First-level outputs as the participant level writes them, for 12 subjects x 2 sessions.

    4 mm maps, 4 subjects per group (placebo, ketamine, lamotrigine_ketamine), rest at baseline and
    infusion, a blob of +1.5 in ketamine at infusion; ``bids`` gets participants.tsv.
    """
    import json

    import nibabel as nib
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(5)
    shape, affine = (18, 22, 18), np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-34, -42, -34]
    ijk = np.indices(shape).transpose(1, 2, 3, 0)
    brain = ((((ijk - (np.array(shape) - 1) / 2) / (np.array(shape) / 2)) ** 2).sum(-1) <= 1.0)
    blob = np.linalg.norm(ijk - [6, 8, 10], axis=-1) <= 2.5
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "group", "BIDSVersion": "1.9.0"}))
    rows = []
    for i, group in enumerate(["placebo", "ketamine", "lamotrigine_ketamine"] * 4):
        sub = f"{i + 1:02d}"
        rows.append({"participant_id": f"sub-{sub}", "group": group})
        trait = rng.normal(0, 0.3, shape)
        qc = []
        for session in ("baseline", "infusion"):
            values = trait + rng.normal(0, 0.3, shape) + (1.5 * blob if (group, session) == ("ketamine", "infusion")
                                                           else 0)
            func = out / f"sub-{sub}" / f"ses-{session}" / "func"
            func.mkdir(parents=True)
            name = (f"sub-{sub}_ses-{session}_task-rest_space-MNI152NLin2009cAsym_res-4_seed-pgACC_"
                    "stat-z_desc-correlation_statmap")
            nib.Nifti1Image(np.where(brain, values, 0).astype(np.float32), affine).to_filename(func / f"{name}.nii.gz")
            (func / f"{name}.json").write_text("{}")
            qc.append({"participant_id": f"sub-{sub}", "session": session, "task": "rest", "run": "n/a",
                       "n_timepoints": 60, "n_kept": 57, "mean_fd_mm": round(float(rng.uniform(0.05, 0.3)), 4),
                       "percent_censored": 5.0, "excluded": False, "exclusion_reason": "", "pgACC_n_voxels": 20,
                       "pgACC_coverage": 1.0, "pgACC_tsnr": 50.0, "dof_correlation": 20.0})
        pd.DataFrame(qc).to_csv(out / f"sub-{sub}" / f"sub-{sub}_desc-runs_qc.tsv", sep="\t", index=False)
    pd.DataFrame(rows).to_csv(bids / "participants.tsv", sep="\t", index=False)


@pytest.fixture(scope="session")
def group_first_level():
    """:func:`write_group_first_level`: a group level's inputs without running the participant level."""
    return write_group_first_level
