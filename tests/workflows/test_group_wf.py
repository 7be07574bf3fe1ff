"""The group level as a nipype workflow (issue 20): the same bytes as the in-process science, and
nipype's cache as its only resume mechanism.

One unit of work per task x measure x seed x session analysis; the first-level maps are written
by the test (:func:`conftest.write_group_first_level`: 12 subjects, two sessions, 4 mm).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "FCFLOW_JULICH_URL": "http://127.0.0.1:9/", "MPLBACKEND": "Agg"}

RECIPE = """\
[study]
name = "group_workflow"
space = "MNI152NLin2009cAsym"

[groups]
levels = ["placebo", "ketamine", "lamotrigine_ketamine"]

[sessions]
levels = ["baseline", "infusion"]

[tasks.rest]
measures = ["correlation"]

[seeds.pgACC]
mask = "seed.nii.gz"

[contrasts]
sessions = ["infusion - baseline"]
groups = ["ketamine - placebo", "lamotrigine_ketamine - placebo"]

[inference]
primary = "tfce"
methods = ["tfce", "maxt"]
n_permutations = 100
random_seed = 3
covariates = []
"""


@pytest.fixture(scope="session")
def group_recipe(tmp_path_factory) -> Path:
    """One recipe (and seed mask) for every folder: the recipe recorded in the sidecars is the same."""
    import nibabel as nib
    import numpy as np

    folder = tmp_path_factory.mktemp("group_recipe")
    seed = np.zeros((18, 22, 18), dtype=np.uint8)
    seed[8:10, 8:10, 8:10] = 1
    nib.Nifti1Image(seed, np.diag([4.0, 4.0, 4.0, 1.0])).to_filename(folder / "seed.nii.gz")
    (folder / "recipe.toml").write_text(RECIPE)
    return folder / "recipe.toml"


def make_group_study(folder: Path, write_first_level, recipe: Path) -> Path:
    """``folder/bids``, ``folder/out`` (first level) and ``folder/recipe``, the shared recipe's path."""
    folder.mkdir(parents=True, exist_ok=True)
    write_first_level(folder / "bids", folder / "out")
    (folder / "recipe").write_text(str(recipe))
    return folder


def run_group(folder: Path, *extra: str) -> str:
    """``fcflow bids out group`` in ``folder`` (the same command line in every folder); returns its log."""
    recipe = (folder / "recipe").read_text()
    done = subprocess.run([sys.executable, "-m", "fcflow", "bids", "out", "group", "--recipe", recipe, *extra], cwd=folder, capture_output=True, text=True, env=ENV, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stderr


def group_files(out: Path) -> dict[str, bytes]:
    """The group level's own files (not the report's HTML and figures, which the workflow adds)."""
    group = out / "group"
    return {str(p.relative_to(group)): p.read_bytes() for p in sorted(group.rglob("*"))
            if p.is_file() and p.relative_to(group).parts[0] not in ("figures", ".fcflow-stale")}


@pytest.fixture(scope="module")
def through_nipype(tmp_path_factory, group_first_level, group_recipe) -> Path:
    folder = make_group_study(tmp_path_factory.mktemp("group_wf") / "A", group_first_level, group_recipe)
    run_group(folder, "--nprocs", "2")
    return folder


def test_workflow_writes_the_in_process_group_level_bytes(through_nipype, tmp_path, group_first_level,
                                                          group_recipe):
    from fcflow.config import load_recipe
    from fcflow.group.run import run_group_level

    folder = make_group_study(tmp_path / "B", group_first_level, group_recipe)
    cwd = os.getcwd()
    os.chdir(folder)  # the command recorded in the sidecars is the workflow's, without its --nprocs
    try:
        run_group_level(Path("out").resolve(), load_recipe(group_recipe), bids_dir=Path("bids").resolve(),
                        command=["fcflow", "bids", "out", "group", "--recipe", str(group_recipe)])
    finally:
        os.chdir(cwd)
    expected, got = group_files(folder / "out"), group_files(through_nipype / "out")
    assert len(expected) > 40 and sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    # one node per group test (here 1 measure x 2 session analyses x 2 contrasts) and one correction
    # over the tests of each analysis, all finished in the working directory
    work = through_nipype / "out_work" / "fcflow_group_wf"
    assert sorted(p.name for p in work.glob("test_*") if (p / f"result_{p.name}.pklz").is_file()) == [
        f"test_ses_{ses}_task_rest_seed_pgACC_desc_correlation_contrast_{c}"
        for ses in ("baseline", "infusionMinusBaseline") for c in ("ketamineMinusPlacebo", "lamotrigineKetamineMinusPlacebo")]
    assert len([p for p in work.glob("family_*") if (p / f"result_{p.name}.pklz").is_file()]) == 2


def test_rerun_reuses_every_unit_and_recomputes_only_what_changed(through_nipype):
    out = through_nipype / "out"
    before = group_files(out)
    log = run_group(through_nipype)
    assert "permutations)" not in log, "a rerun with nothing changed ran a test again"
    assert group_files(out) == before
    # an output changed after its unit finished: that unit, and only it, is computed again
    name = next(n for n in before if n.startswith("task-rest/desc-correlation/ses-baseline_") and
                n.endswith("_stat-t_desc-correlation_statmap.nii.gz"))
    (out / "group" / name).write_bytes(b"not a map")
    log = run_group(through_nipype)
    assert "computed again: test_ses_baseline_task_rest_seed_pgACC_desc_correlation_contrast_ketamineMinusPlacebo" \
        in log
    assert "ses baseline: ketamine - placebo (100 permutations)" in log
    assert "ses infusion - baseline: ketamine - placebo" not in log
    assert group_files(out) == before
    # a changed input (two subjects swap groups in participants.tsv) reruns the tests
    participants = through_nipype / "bids" / "participants.tsv"
    text = participants.read_text()
    participants.write_text(text.replace("sub-01\tplacebo", "sub-01\tX").replace("sub-02\tketamine", "sub-02\tplacebo")
                            .replace("sub-01\tX", "sub-01\tketamine"))
    try:
        log = run_group(through_nipype)
        assert "ses infusion - baseline: ketamine - placebo (100 permutations)" in log
        after = group_files(out)
        assert after["results.tsv"] != before["results.tsv"]
    finally:
        participants.write_text(text)
    # back to the original groups: the original bytes (the module's other tests compare with them)
    run_group(through_nipype)
    assert group_files(out) == before


def _slurm_job_ids(folder: Path) -> dict[str, str | None]:
    """The SLURM job each test node ran in (nipype keeps the node's environment in its result)."""
    from nipype.utils.filemanip import loadpkl

    work = folder / "out_work" / "fcflow_group_wf"
    return {path.parent.name: (loadpkl(path).runtime.environ or {}).get("SLURM_JOB_ID")
            for path in sorted(work.glob("test_*/result_test_*.pklz"))}


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("plugin", ["SLURM", "SLURMGraph"])
def test_group_level_through_sbatch_equals_multiproc(through_nipype, tmp_path, group_first_level, group_recipe,
                                                    plugin):
    """Issue 20: the group level spreads over SLURM jobs, one per group test, and writes MultiProc's bytes."""
    folder = make_group_study(tmp_path / plugin, group_first_level, group_recipe)
    run_group(folder, "--plugin", plugin, "--sbatch-args=--time=10")
    jobs = _slurm_job_ids(folder)
    assert len(jobs) == 4 and all(jobs.values()) and len(set(jobs.values())) == 4, \
        f"the group level's tests did not each run in a SLURM job of their own: {jobs}"
    assert all(job is None for job in _slurm_job_ids(through_nipype).values())
    expected, got = group_files(through_nipype / "out"), group_files(folder / "out")
    assert len(expected) > 40 and sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
