"""The real participant level on a real SLURM cluster: SLURM and SLURMGraph give MultiProc's maps.

Skipped without a cluster (FCFLOW_TEST_SLURM=1, set by .ci/run, turns the skip into a failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> Path:
    from fcflow.simulate import simulate_study

    root = tmp_path_factory.mktemp("slurm_study") / "bids"
    simulate_study(root, n_per_group=1, resolution_mm=4, n_volumes=240, seed=5)
    return root


def _participant(study: Path, out: Path, julich_dir: Path, *extra: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fcflow", str(study), str(out), "participant", "--participant-label", "01",
         "--session-label", "baseline", "infusion", "--task", "rest", "--julich-dir", str(julich_dir),
         "--work-dir", str(out.parent / f"{out.name}_work"), *extra],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _maps(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in out.rglob("*.nii.gz")}


def _job_ids(out: Path) -> list[str | None]:
    work = out.parent / f"{out.name}_work"
    return [json.loads(p.read_text()).get("slurm_job_id") for p in work.rglob("run_maps/run_qc.json")]


@pytest.fixture(scope="module")
def multiproc_maps(small_study, tmp_path_factory) -> dict[Path, bytes]:
    value = os.environ.get("FCFLOW_TEST_JULICH_DIR")
    if not value:
        pytest.skip("FCFLOW_TEST_JULICH_DIR is not set")
    reference = tmp_path_factory.mktemp("multiproc") / "out"
    _participant(small_study, reference, Path(value), "--plugin", "MultiProc", "--nprocs", "2")
    assert _job_ids(reference) == [None] * 2
    return _maps(reference)


@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_participant_level_through_sbatch_equals_multiproc(small_study, multiproc_maps, tmp_path, julich_dir,
                                                          plugin):
    on_slurm = tmp_path / plugin.lower()
    _participant(small_study, on_slurm, julich_dir, "--plugin", plugin, "--sbatch-args=--time=10")
    ids = _job_ids(on_slurm)
    assert len(ids) == 2 and all(ids) and len(set(ids)) == 2, f"run_maps jobs did not go through sbatch: {ids}"
    expected, got = multiproc_maps, _maps(on_slurm)
    assert len(expected) >= 6 and got.keys() == expected.keys()
    assert all(got[k] == expected[k] for k in expected), "maps differ from MultiProc's"


def test_array_route_with_the_real_levels(small_study, tmp_path, julich_dir, submit_array_then_group):
    """docs/slurm/fcflow_array.sbatch: two participants as array tasks, then the group level."""
    import pandas as pd

    repo = Path(__file__).resolve().parents[2]
    participants = tmp_path / "participants.txt"
    participants.write_text("01\n02\n")
    output_dir = tmp_path / "out"
    env = {
        **os.environ,
        "BIDS_DIR": str(small_study), "OUTPUT_DIR": str(output_dir), "WORK_DIR": str(tmp_path / "work"),
        "PARTICIPANTS": str(participants), "FCFLOW_PYTHON": sys.executable,
        "FCFLOW_ARGS": f"--julich-dir {julich_dir} --task rest --session-label baseline infusion "
                       "--n-permutations 100",
    }
    resources = ["--cpus-per-task=1", "--mem=1500M", "--time=10", f"--chdir={tmp_path}"]
    script = str(repo / "docs" / "slurm" / "fcflow_array.sbatch")
    _, group = submit_array_then_group(script, env, resources, timeout_s=600)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    state = subprocess.run(["scontrol", "show", "job", group], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in state, logs[-4000:]
    for label in ("01", "02"):
        qc = pd.read_csv(output_dir / f"sub-{label}" / f"sub-{label}_desc-runs_qc.tsv", sep="\t")
        assert len(qc) == 2
        assert list((output_dir / f"sub-{label}").rglob("*stat-z_desc-correlation_statmap.nii.gz"))
    assert not (output_dir / "sub-03").exists()
    results = pd.read_csv(output_dir / "group" / "results.tsv", sep="\t")
    assert set(results["task"]) == {"rest"} and len(results) > 0
