"""The participant level: graph building, maps against nilearn's recipe, resume after a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fcflow.bids import collect_runs
from fcflow.config import load_recipe

RECIPE = load_recipe("weigner2025_pgacc")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A small simulated study: 3 subjects (one per group), 3 sessions, rest + n-back, 4 mm.

    240 volumes at TR 2 s: enough for the shipped recipe's band and 29 confounds to leave more
    than min_dof (100 would be excluded; tests/workflows/test_dof_study.py checks that).
    """
    from fcflow.simulate import simulate_study

    root = tmp_path_factory.mktemp("study") / "bids"
    simulate_study(root, n_per_group=1, resolution_mm=4, n_volumes=240, seed=11)
    return root


def _runs(study: Path, **filters):
    return collect_runs(
        study, study / "derivatives" / "fmriprep", space=RECIPE.space, group_column="group",
        groups=RECIPE.groups, sessions=RECIPE.sessions, tasks_with_events=["nback"], tasks=["rest", "nback"],
        **filters,
    ).runs


def test_participant_graph_builds(study, tmp_path):
    from fcflow.workflows.participant import init_fcflow_participant_wf

    runs = _runs(study)
    workflow = init_fcflow_participant_wf(runs=runs, recipe=RECIPE, atlas_dir=tmp_path, output_dir=tmp_path / "out",
                                          work_dir=tmp_path / "work", command=["fcflow"])
    graph = workflow._create_flat_graph()
    names = {node.fullname for node in graph.nodes()}
    assert len([n for n in names if n.endswith(".run_maps")]) == len(runs) == 18
    assert len([n for n in names if n.endswith(".qc_table")]) == 3
    run_maps = next(node for node in graph.nodes() if node.fullname.endswith("run_maps"))
    assert 0.4 < run_maps.mem_gb < 2


def test_participant_graph_has_report_nodes_unless_disabled(study, tmp_path):
    from fcflow.workflows.participant import init_fcflow_participant_wf

    runs = _runs(study, participant_labels=["01"])
    for reports, expected in ((True, len(runs) + 1), (False, 0)):
        workflow = init_fcflow_participant_wf(runs=runs, recipe=RECIPE, atlas_dir=tmp_path, output_dir=tmp_path / "out",
                                              work_dir=tmp_path / "work", command=["fcflow"], reports=reports)
        names = [node.fullname for node in workflow._create_flat_graph().nodes()]
        # one ComputeRunReport per run and one WriteParticipantReport per participant
        assert len([n for n in names if n.endswith(".report")]) == expected


def _fcflow(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fcflow", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **kwargs)


def _run_ok(*args: str) -> str:
    proc = _fcflow(*args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    return out


def _nilearn_recipe_z(bold_file, mask_file, seed_file, confounds, sample_mask, t_r, high_pass, low_pass):
    """nilearn's documented seed-to-voxel recipe (NiftiLabelsMasker seed, NiftiMasker brain)."""
    from nilearn.maskers import NiftiLabelsMasker, NiftiMasker

    options = dict(detrend=True, standardize="zscore_sample", standardize_confounds=True, t_r=t_r,
                   high_pass=high_pass, low_pass=low_pass)
    seed_masker = NiftiLabelsMasker(labels_img=seed_file, **options)
    brain_masker = NiftiMasker(mask_img=mask_file, **options)
    seed = seed_masker.fit_transform(bold_file, confounds=confounds, sample_mask=sample_mask)
    brain = brain_masker.fit_transform(bold_file, confounds=confounds, sample_mask=sample_mask)
    # The example divides by n; with zscore_sample (ddof=1) the Pearson r needs n - 1.
    r = (brain.T @ seed)[:, 0] / (seed.shape[0] - 1)
    return brain_masker.inverse_transform(np.arctanh(np.clip(r, -1 + 1e-7, 1 - 1e-7))).get_fdata()


@pytest.mark.slow
def test_rest_maps_equal_nilearn_recipe(study, tmp_path, julich_dir):
    from nilearn.interfaces.fmriprep import load_confounds

    from fcflow.resources import recipe_file

    # Censoring off: nilearn 0.14.1 interpolates the wrong volumes when it censors inside a filtered
    # run (fcflow.denoise documents it), so only head volumes (non-steady-state) are dropped here.
    text = recipe_file("weigner2025_pgacc").read_text()
    text = text.replace("fd_threshold_mm = 0.5", "fd_threshold_mm = 0")
    text = text.replace("std_dvars_threshold = 1.5", "std_dvars_threshold = 0")
    text = text.replace('filter = "dct"', 'filter = "butterworth"')  # nilearn's filter, not the default projection
    # nilearn's recipe does not smooth: compare the unsmoothed maps (tests/test_smoothing.py checks the smoothing)
    assert "smoothing_fwhm = 6 " in text
    text = text.replace("smoothing_fwhm = 6 ", "smoothing_fwhm = 0 ")
    recipe = tmp_path / "no_censoring.toml"
    recipe.write_text(text)
    out = tmp_path / "out"
    _run_ok(str(study), str(out), "participant", "--participant-label", "02", "--task", "rest",
            "--session-label", "infusion", "--julich-dir", str(julich_dir), "--work-dir", str(tmp_path / "work"),
            "--recipe", str(recipe))
    (run,) = _runs(study, participant_labels=["02"], session_labels=["infusion"], task_labels=["rest"])
    func = out / "sub-02" / "ses-infusion" / "func"
    (z_file,) = func.glob("*task-rest*_seed-pgACC_stat-z_desc-correlation_statmap.nii.gz")
    (seed_file,) = func.glob("*task-rest*_seed-pgACC_mask.nii.gz")
    confounds, sample_mask = load_confounds(
        str(run.bold_file), strategy=("motion", "high_pass", "compcor"), motion="full",
        compcor="anat_combined", n_compcor=5,
    )
    assert sample_mask is not None and sample_mask[0] > 0, "the simulation has non-steady-state volumes"
    task = RECIPE.task("rest")
    reference = _nilearn_recipe_z(run.bold_file, run.mask_file, seed_file, confounds, sample_mask, run.t_r,
                                  task.high_pass, task.low_pass)
    ours = nib.load(z_file).get_fdata()
    brain = nib.load(run.mask_file).get_fdata() > 0
    a, b = ours[brain], reference[brain]
    assert np.corrcoef(a, b)[0, 1] >= 0.999
    assert np.max(np.abs(a - b)) <= 0.01


@pytest.mark.slow
def test_killed_participant_run_resumes_without_recomputing(study, tmp_path, julich_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    args = [str(study), str(out), "participant", "--participant-label", "01", "--julich-dir", str(julich_dir),
            "--work-dir", str(work), "--nprocs", "1"]
    _run_ok(*args)
    def outputs() -> dict[Path, bytes]:  # logs/ records when and how each invocation ran: not compared
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*")
                if p.is_file() and p.relative_to(out).parts[0] != "logs"}

    reference = outputs()
    assert len(reference) > 20
    for path in (out, work):
        subprocess.run(["rm", "-rf", str(path)], check=True)

    proc = _fcflow(*args, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and len(list(work.rglob("run_maps/result_run_maps.pklz"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in work.rglob("run_maps/result_run_maps.pklz")}
    assert 2 <= len(finished) < 6, "the kill should land halfway"
    _run_ok(*args)
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path.parent.name} was recomputed"
    resumed = outputs()
    assert resumed.keys() == reference.keys()
    # the killed invocation finished nothing, so only the two complete ones left a record
    assert len(list((out / "logs").glob("participant-*_execution.json"))) >= 1
    assert all(resumed[k] == reference[k] for k in reference)


@pytest.mark.slow
def test_excluded_runs_have_a_reason_and_no_maps(study, tmp_path, julich_dir):
    import pandas as pd

    from fcflow.resources import recipe_file

    recipe = tmp_path / "strict.toml"
    recipe.write_text(recipe_file("weigner2025_pgacc").read_text().replace("min_volumes = 50 ", "min_volumes = 1000 "))
    out = tmp_path / "out"
    _run_ok(str(study), str(out), "participant", "--participant-label", "01", "--session-label", "baseline",
            "--task", "rest", "--julich-dir", str(julich_dir), "--recipe", str(recipe),
            "--work-dir", str(tmp_path / "work"))
    qc = pd.read_csv(out / "sub-01" / "sub-01_desc-runs_qc.tsv", sep="\t")
    assert qc["excluded"].tolist() == [True]
    assert qc["exclusion_reason"].item().endswith("below the minimum of 1000 (min_volumes). Run excluded.")
    assert not list(out.rglob("*_statmap.nii.gz"))


def test_a_changed_input_changes_the_nodes_hash_even_with_size_and_mtime_restored(study, tmp_path):
    # issue 17: a confounds value changed with size and mtime kept reused the cached maps
    import os
    import shutil

    from fcflow.workflows.participant import init_run_wf

    copy = tmp_path / "bids"
    shutil.copytree(study, copy)
    run = _runs(copy, participant_labels=["01"], session_labels=["baseline"], task_labels=["rest"])[0]

    def hashes():
        workflow = init_run_wf(run=run, recipe=RECIPE, atlas_dir=tmp_path, output_dir=tmp_path / "out",
                               command=["fcflow"], name="run_wf", reports=True)
        # each node's own inputs, hashed as nipype's cache check does (size and mtime for files)
        return {node.name: node.inputs.get_hashval(hash_method="timestamp")[1]
                for node in workflow._create_flat_graph().nodes()}

    before = hashes()
    assert hashes() == before  # nothing changed: every node would be reused
    confounds = run.confounds_file
    stat = confounds.stat()
    text = confounds.read_text()
    lines = text.split("\n")
    header, first = lines[0].split("\t"), lines[1].split("\t")
    column = header.index("framewise_displacement")
    first[column] = first[column][::-1] if first[column] != first[column][::-1] else first[column]
    changed = "\n".join([lines[0], "\t".join(first), *lines[2:]])
    assert len(changed) == len(text)
    confounds.write_text(changed)
    os.utime(confounds, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before
    after = hashes()
    for name in ("confounds", "run_maps", "report", "derivatives"):
        assert after[name] != before[name], name
