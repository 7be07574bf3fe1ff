"""Tests of the synthetic study generator (fcflow.simulate and ``fcflow simulate``)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fcflow.errors import FcflowError, RecipeError
from fcflow.simulate import (
    GROUPS,
    SESSIONS,
    TASKS,
    NbackDesign,
    NoiseModel,
    SimulationError,
    build_anatomy,
    build_regions,
    draw_subject_traits,
    load_simulation_definition,
    preset_effects,
    simulate_run,
    simulate_study,
)
from fcflow.templates import mni_grid

N_VOLUMES = 40
SPACE = "space-MNI152NLin2009cAsym_res-4"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "bids"
    result = simulate_study(out, n_per_group=3, resolution_mm=4, n_volumes=N_VOLUMES, seed=1)
    return out, result


@pytest.fixture(scope="module")
def cli_study(tmp_path_factory):
    from fcflow.cli import main

    out = tmp_path_factory.mktemp("cli") / "bids"
    status = main(["simulate", str(out), "--n-per-group", "1", "--resolution", "4",
                   "--n-volumes", str(N_VOLUMES), "--seed", "3", "--quiet"])
    return out, status


@pytest.fixture(scope="module")
def anatomy():
    return build_anatomy(4)


def _run(anatomy, group, session, task, *, effects=None, noise=None, n_volumes=120, seed=7,
         subject="01"):
    effects = effects or preset_effects("weigner2025")
    noise = noise or NoiseModel()
    regions = build_regions(anatomy, effects)
    return simulate_run(anatomy, regions, subject=subject, session=session, task=task,
                        group=group, n_volumes=n_volumes, t_r=2.0, seed=seed, effects=effects,
                        noise=noise, nback=NbackDesign())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- layout and formats -----------------------------------------------------------------------

def test_study_has_every_run_with_bids_names(study):
    out, result = study
    participants = pd.read_csv(out / "participants.tsv", sep="\t")
    assert list(participants.columns) == ["participant_id", "group", "age", "sex"]
    assert participants["group"].value_counts().to_dict() == {g: 3 for g in GROUPS}
    subjects = [f"{i:02d}" for i in range(1, 10)]
    assert participants["participant_id"].tolist() == [f"sub-{s}" for s in subjects]
    for sub in subjects:
        for ses in SESSIONS:
            func = out / "derivatives" / "fmriprep" / f"sub-{sub}" / f"ses-{ses}" / "func"
            raw = out / f"sub-{sub}" / f"ses-{ses}" / "func"
            for task in TASKS:
                ent = f"sub-{sub}_ses-{ses}_task-{task}"
                assert (raw / f"{ent}_bold.json").is_file()
                assert (raw / f"{ent}_events.tsv").is_file() == (task == "nback")
                for name in (f"{ent}_{SPACE}_desc-preproc_bold.nii.gz",
                             f"{ent}_{SPACE}_desc-preproc_bold.json",
                             f"{ent}_{SPACE}_desc-brain_mask.nii.gz",
                             f"{ent}_desc-confounds_timeseries.tsv",
                             f"{ent}_desc-confounds_timeseries.json"):
                    assert (func / name).is_file(), name
    assert len(list(out.rglob("*_desc-preproc_bold.nii.gz"))) == 54
    assert len(result.runs) == result.n_runs == 54
    sidecar = json.loads((out / "sub-01/ses-24h/func/sub-01_ses-24h_task-rest_bold.json")
                         .read_text())
    assert sidecar["RepetitionTime"] == 2.0 and sidecar["TaskName"] == "rest"
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and "BIDSVersion" in description
    assert "stand-in" in description["Name"]
    deriv = json.loads((out / "derivatives/fmriprep/dataset_description.json").read_text())
    assert deriv["DatasetType"] == "derivative"
    assert deriv["GeneratedBy"][0]["Name"] == "fcflow simulate"


def test_raw_names_are_valid_bids_and_pybids_indexes_derivatives(study):
    from bids import BIDSLayout, BIDSValidator

    out, _ = study
    validator = BIDSValidator()
    raw_files = [p for p in out.rglob("*") if p.is_file() and "derivatives" not in p.parts]
    invalid = [str(p) for p in raw_files if not validator.is_bids("/" + str(p.relative_to(out)))]
    assert raw_files and not invalid
    layout = BIDSLayout(out, derivatives=True)
    assert sorted(layout.get_sessions()) == ["24h", "baseline", "infusion"]
    assert sorted(layout.get_tasks()) == ["nback", "rest"]
    bold = layout.get(scope="derivatives", suffix="bold", desc="preproc",
                      space="MNI152NLin2009cAsym", extension=".nii.gz")
    assert len(bold) == 54
    assert bold[0].get_metadata()["RepetitionTime"] == 2.0
    confounds = layout.get(scope="derivatives", desc="confounds", suffix="timeseries",
                           extension=".tsv")
    assert len(confounds) == 54
    events = layout.get(suffix="events", extension=".tsv", task="nback")
    assert len(events) == 27


def test_bold_and_mask_images(study, tmp_path):
    out, _ = study
    func = out / "derivatives/fmriprep/sub-02/ses-infusion/func"
    bold = nib.load(func / f"sub-02_ses-infusion_task-nback_{SPACE}_desc-preproc_bold.nii.gz")
    mask = nib.load(func / f"sub-02_ses-infusion_task-nback_{SPACE}_desc-brain_mask.nii.gz")
    shape, affine = mni_grid(4)
    assert bold.shape == (*shape, N_VOLUMES)
    assert bold.get_data_dtype() == np.float32
    assert bold.header.get_zooms() == (4.0, 4.0, 4.0, 2.0)
    assert bold.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(bold.affine, affine)
    assert mask.get_data_dtype() == np.uint8 and mask.shape == shape
    np.testing.assert_allclose(mask.affine, affine)
    data = np.asanyarray(bold.dataobj)
    in_brain = np.asanyarray(mask.dataobj).astype(bool)
    mean = data[in_brain].mean(axis=1)
    assert 500 < np.median(mean) < 1500
    # the streamed file holds exactly what nibabel writes for the same image
    ours = gzip.decompress(Path(bold.get_filename()).read_bytes())
    nib.save(nib.Nifti1Image(data, bold.affine, bold.header), tmp_path / "theirs.nii.gz")
    assert ours == gzip.decompress((tmp_path / "theirs.nii.gz").read_bytes())


def test_events_alternate_0back_and_2back_blocks(study):
    out, _ = study
    events = pd.read_csv(out / "sub-01/ses-baseline/func/sub-01_ses-baseline_task-nback_events.tsv",
                         sep="\t")
    assert list(events.columns) == ["onset", "duration", "trial_type"]
    assert events["trial_type"].tolist()[:2] == ["0back", "2back"]
    assert (events["duration"] == 30).all()
    gaps = events["onset"].diff().dropna()
    assert (gaps == 40).all()  # 30 s block + 10 s fixation
    assert events["onset"].iloc[-1] + 30 <= N_VOLUMES * 2.0


# --- confounds --------------------------------------------------------------------------------

def _confounds(out: Path, sub="02", ses="infusion", task="rest"):
    func = out / f"derivatives/fmriprep/sub-{sub}/ses-{ses}/func"
    ent = f"sub-{sub}_ses-{ses}_task-{task}"
    table = pd.read_csv(func / f"{ent}_desc-confounds_timeseries.tsv", sep="\t",
                        na_values="n/a")
    meta = json.loads((func / f"{ent}_desc-confounds_timeseries.json").read_text())
    return func / f"{ent}_{SPACE}_desc-preproc_bold.nii.gz", table, meta


def test_confounds_have_fmriprep_columns_and_values(study):
    out, _ = study
    _, table, meta = _confounds(out)
    motion = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    for base in [*motion, "global_signal", "csf", "white_matter"]:
        for suffix in ("", "_derivative1", "_power2", "_derivative1_power2"):
            assert base + suffix in table.columns
    for name in ("framewise_displacement", "dvars", "std_dvars", "rmsd", "a_comp_cor_00",
                 "c_comp_cor_00", "w_comp_cor_00", "non_steady_state_outlier00",
                 "non_steady_state_outlier01"):
        assert name in table.columns, name
    # DCT basis up to 1/128 Hz over the steady-state volumes, without the constant (nipype)
    n_cosine = int(np.floor(2 * (N_VOLUMES - 2) * 2.0 / 128)) - 1
    assert [c for c in table.columns if c.startswith("cosine")] == [
        f"cosine{k:02d}" for k in range(n_cosine)]
    assert table.loc[0, ["framewise_displacement", "dvars", "std_dvars", "rmsd",
                         "trans_x_derivative1"]].isna().all()
    # Power's FD from the motion columns (rotations on a 50 mm sphere)
    diffs = table[motion].diff().abs()
    fd = diffs[motion[:3]].sum(axis=1) + 50 * diffs[motion[3:]].sum(axis=1)
    np.testing.assert_allclose(table["framewise_displacement"][1:], fd[1:], rtol=1e-6)
    np.testing.assert_allclose(table["trans_x_power2"], table["trans_x"] ** 2, rtol=1e-6)
    # motion outliers: one-hot at FD > 0.5 or std_dvars > 1.5
    flagged = ((table["framewise_displacement"] > 0.5) | (table["std_dvars"] > 1.5)).to_numpy()
    outlier_cols = [c for c in table.columns if c.startswith("motion_outlier")]
    one_hot = table[outlier_cols].to_numpy()
    assert (one_hot.sum(axis=0) == 1).all()
    np.testing.assert_array_equal(one_hot.sum(axis=1) > 0, flagged)
    # non-steady volumes are really brighter, and flagged one-hot
    assert table["global_signal"][:2].min() > 1.05 * table["global_signal"][2:].max()
    assert table["non_steady_state_outlier00"].tolist()[:2] == [1, 0]
    # CompCor metadata as fMRIPrep writes it
    acomp = [c for c in table.columns if c.startswith("a_comp_cor")]
    for name in acomp:
        assert meta[name]["Method"] == "aCompCor" and meta[name]["Mask"] == "combined"
        assert meta[name]["Retained"] is True
        assert {"SingularValue", "VarianceExplained", "CumulativeVarianceExplained"} <= set(
            meta[name])
    assert meta["c_comp_cor_00"]["Mask"] == "CSF" and meta["w_comp_cor_00"]["Mask"] == "WM"
    assert meta[acomp[-1]]["CumulativeVarianceExplained"] >= 0.5
    if len(acomp) > 1:
        assert meta[acomp[-2]]["CumulativeVarianceExplained"] < 0.5


@pytest.mark.parametrize("strategy, kwargs", [
    (("motion", "high_pass", "wm_csf"), {"motion": "full", "wm_csf": "full"}),
    (("motion", "high_pass", "global_signal", "scrub"),
     {"motion": "derivatives", "global_signal": "basic", "scrub": 0, "fd_threshold": 0.5}),
    (("motion", "high_pass", "wm_csf", "global_signal", "compcor", "scrub",
      "non_steady_state"),
     {"compcor": "anat_combined", "n_compcor": "all"}),
    (("high_pass", "compcor"), {"compcor": "anat_separated", "n_compcor": 2}),
])
def test_load_confounds_reads_the_files(study, strategy, kwargs):
    from nilearn.interfaces.fmriprep import load_confounds

    out, _ = study
    bold_file, table, meta = _confounds(out, task="nback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non_steady_state is always detected"
        confounds, sample_mask = load_confounds(str(bold_file), strategy=strategy, **kwargs)
    assert len(confounds) == N_VOLUMES
    assert not confounds.isna().any().any()
    assert sample_mask is not None and 0 not in sample_mask and 1 not in sample_mask
    if "compcor" in strategy and kwargs["compcor"] == "anat_combined":
        retained = [k for k, v in meta.items() if k.startswith("a_comp_cor") and v["Retained"]]
        assert sorted(c for c in confounds.columns if "comp_cor" in c) == sorted(retained)
    if kwargs.get("compcor") == "anat_separated":
        assert {"c_comp_cor_00", "w_comp_cor_00", "c_comp_cor_01"} <= set(confounds.columns)


@pytest.mark.parametrize("denoise_strategy", ["simple", "scrubbing", "compcor"])
def test_load_confounds_strategy_reads_the_files(study, denoise_strategy):
    from nilearn.interfaces.fmriprep import load_confounds_strategy

    out, _ = study
    bold_file, _, _ = _confounds(out, sub="05", ses="baseline")
    confounds, _ = load_confounds_strategy(str(bold_file), denoise_strategy=denoise_strategy)
    assert len(confounds) == N_VOLUMES and not confounds.isna().any().any()
    if denoise_strategy == "compcor":
        assert any(c.startswith("a_comp_cor") for c in confounds.columns)


# --- determinism ------------------------------------------------------------------------------

def test_cli_writes_the_study(cli_study):
    out, status = cli_study
    assert status == 0
    assert len(list(out.rglob("*_desc-preproc_bold.nii.gz"))) == 18
    assert (out / "derivatives/ground_truth/effects.tsv").is_file()


def test_same_seed_same_bytes_different_seed_different_bytes(cli_study, study, tmp_path):
    out, _ = cli_study
    again = tmp_path / "again"
    simulate_study(again, n_per_group=1, resolution_mm=4, n_volumes=N_VOLUMES, seed=3)
    first, second = _files(out), _files(again)
    assert len(first) > 100 and first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []
    # the seed-1 study has the same file names for sub-01..03: every image differs
    other = _files(study[0])
    bold = [n for n in first if n.endswith("desc-preproc_bold.nii.gz")]
    assert bold and all(first[n] != other[n] for n in bold)


def test_runs_do_not_depend_on_order(anatomy):
    a = _run(anatomy, "placebo", "24h", "rest", n_volumes=40, subject="04")
    _run(anatomy, "ketamine", "baseline", "nback", n_volumes=40, subject="02")
    b = _run(anatomy, "placebo", "24h", "rest", n_volumes=40, subject="04")
    np.testing.assert_array_equal(a.data, b.data)
    c = _run(anatomy, "placebo", "24h", "rest", n_volumes=40, subject="04", seed=8)
    assert not np.array_equal(a.data, c.data)


def test_groups_are_balanced_and_seeded():
    from fcflow.simulate import assign_groups

    first = assign_groups(4, seed=11)
    assert [g for _, g in first].count("ketamine") == 4
    assert first == assign_groups(4, seed=11)
    assert first != assign_groups(4, seed=12)


# --- planted truth ----------------------------------------------------------------------------

def _exact_effects():
    return dataclasses.replace(preset_effects("weigner2025"), subject_coupling_sd=0.0,
                               run_coupling_sd=0.0, effect_subject_sd=0.0)


def test_planted_rest_coupling_is_exact_and_only_in_ketamine_infusion(anatomy):
    effects = _exact_effects()
    changed = effects.insula_coupling + effects.insula_rest_change
    label = effects.insula.label
    for group in GROUPS:
        for session in SESSIONS:
            run = _run(anatomy, group, session, "rest", effects=effects, n_volumes=40)
            r = np.corrcoef(run.seed_signal, run.target_signals[label])[0, 1]
            expected = (changed if (group, session) == ("ketamine", "infusion")
                        else effects.insula_coupling)
            assert r == pytest.approx(expected, abs=1e-6), (group, session)
            assert run.couplings[label] == pytest.approx(expected, abs=1e-12)
            control = np.corrcoef(run.seed_signal,
                                  run.target_signals[effects.control.label])[0, 1]
            assert control == pytest.approx(0.0, abs=1e-6)


def test_planted_coupling_includes_subject_offsets(anatomy):
    effects = preset_effects("weigner2025")
    run = _run(anatomy, "placebo", "baseline", "rest", effects=effects, n_volumes=60)
    traits = draw_subject_traits(7, "01", effects, NoiseModel())
    r = np.corrcoef(run.seed_signal, run.target_signals[effects.insula.label])[0, 1]
    assert r == pytest.approx(run.couplings[effects.insula.label], abs=1e-6)
    assert r != pytest.approx(effects.insula_coupling, abs=1e-3)
    assert abs(r - effects.insula_coupling - traits.insula_offset) < 4 * effects.run_coupling_sd


def _block_slope(run, target, condition):
    box = run.boxcars[condition].astype(bool)
    s = run.seed_signal[box]
    y = run.target_signals[target][box]
    return np.polyfit(s, y, 1)[0]


def test_ppi_effect_only_in_2back_of_ketamine_infusion(anatomy):
    effects = _exact_effects()
    label = effects.dmpfc.label
    for group in GROUPS:
        for session in SESSIONS:
            run = _run(anatomy, group, session, "nback", effects=effects, n_volumes=80)
            diff = _block_slope(run, label, "2back") - _block_slope(run, label, "0back")
            if (group, session) == ("ketamine", "infusion"):
                assert run.ppi[label] == effects.dmpfc_ppi_change
                assert diff > 0.6 * effects.dmpfc_ppi_change
                # exact PPI coefficient on the regression design
                x = np.column_stack([np.ones(80), run.seed_signal, run.psy["0back"],
                                     run.psy["2back"], run.seed_signal * run.psy["0back"],
                                     run.seed_signal * run.psy["2back"]])
                beta = np.linalg.lstsq(x, run.target_signals[label], rcond=None)[0]
                assert beta[5] == pytest.approx(effects.dmpfc_ppi_change, abs=1e-6)
                assert beta[1] == pytest.approx(effects.dmpfc_coupling, abs=1e-6)
                assert beta[4] == pytest.approx(0.0, abs=1e-6)
            else:
                assert run.ppi[label] == 0.0
                assert diff == pytest.approx(0.0, abs=1e-6), (group, session)


def test_null_preset_plants_nothing(anatomy):
    effects = dataclasses.replace(preset_effects("null"), run_coupling_sd=0.0)
    assert effects.insula_coupling == effects.insula_rest_change == 0
    assert effects.dmpfc_coupling == effects.dmpfc_ppi_change == 0
    label = effects.insula.label
    # couplings are only each subject's random offset: the same at every session
    during = _run(anatomy, "ketamine", "infusion", "rest", effects=effects, n_volumes=60)
    before = _run(anatomy, "ketamine", "baseline", "rest", effects=effects, n_volumes=60)
    r_during = np.corrcoef(during.seed_signal, during.target_signals[label])[0, 1]
    r_before = np.corrcoef(before.seed_signal, before.target_signals[label])[0, 1]
    assert r_during == pytest.approx(r_before, abs=1e-6)
    run = _run(anatomy, "ketamine", "infusion", "nback", effects=effects, n_volumes=120)
    assert run.ppi[effects.dmpfc.label] == 0.0
    diff = (_block_slope(run, effects.dmpfc.label, "2back")
            - _block_slope(run, effects.dmpfc.label, "0back"))
    assert diff == pytest.approx(0.0, abs=1e-6)


def _volume_residual_variance(run, anatomy):
    brain = run.data[2:, : anatomy.n_brain].astype(np.float64)
    t = np.arange(brain.shape[0])
    basis = np.column_stack([np.ones_like(t), t, t**2])
    beta = np.linalg.lstsq(basis, brain, rcond=None)[0]
    resid = (brain - basis @ beta) / brain.mean(axis=0)
    return resid.var(axis=1), run.fd[2:]


@pytest.mark.parametrize("artefacts", [True, False])
def test_fd_spikes_raise_volume_variance(anatomy, artefacts):
    noise = NoiseModel(spike_rate=0.1)
    if not artefacts:
        noise = dataclasses.replace(noise, spike_global_pct_per_mm=0.0,
                                    spike_edge_pct_per_mm=0.0, motion_residual_fraction=0.0)
    run = _run(anatomy, "placebo", "baseline", "rest", noise=noise, n_volumes=150)
    var, fd = _volume_residual_variance(run, anatomy)
    high, low = var[fd > 0.5], var[fd < 0.2]
    assert len(high) >= 3 and len(low) >= 30
    ratio = np.median(high) / np.median(low)
    if artefacts:
        assert ratio > 1.5
        # and the motion parameters explain part of the signal (the 24P target)
    else:
        assert ratio < 1.2


def test_task_activation_in_dlpfc_but_not_in_the_seed_coupling(anatomy):
    effects = preset_effects("weigner2025")
    run = _run(anatomy, "placebo", "baseline", "nback", effects=effects, n_volumes=120)
    regions = build_regions(anatomy, effects)
    control = run.data[2:, regions.control].mean(axis=1)
    design = np.column_stack([np.ones(118), run.psy["2back"][2:], run.psy["0back"][2:],
                              np.linspace(-1, 1, 118)])
    beta = np.linalg.lstsq(design, control, rcond=None)[0]
    assert beta[1] > 0.5 / 100 * control.mean()  # at least 0.5% signal change in 2-back
    assert beta[1] > beta[2] > 0


# --- ground truth -----------------------------------------------------------------------------

def test_ground_truth_tables_masks_and_seed_label(study):
    out, result = study
    gt = out / "derivatives/ground_truth"
    effects = pd.read_csv(gt / "effects.tsv", sep="\t")
    for column in ("name", "task", "measure", "seed", "target", "group", "session",
                   "condition", "value", "baseline_value", "x_mm", "y_mm", "z_mm",
                   "radius_mm"):
        assert column in effects.columns
    planted = effects[effects["kind"] == "effect"].set_index("measure")
    assert planted.loc["correlation", "target"] == "leftInsula"
    assert planted.loc["correlation", "value"] == pytest.approx(0.70)
    assert planted.loc["ppi", "target"] == "dmPFC"
    assert planted.loc["ppi", "condition"] == "2back"
    assert set(planted["group"]) == {"ketamine"} and set(planted["session"]) == {"infusion"}
    shape, affine = mni_grid(4)
    for label in ("pgACC", "leftInsula", "dmPFC", "leftdlPFC"):
        img = nib.load(gt / f"{SPACE}_desc-{label}_mask.nii.gz")
        assert img.shape == shape and img.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img.affine, affine)
        assert 10 < np.asanyarray(img.dataobj).sum() < 200
    sidecar = json.loads((gt / f"{SPACE}_desc-pgACC_mask.json").read_text())
    assert sidecar["Type"] == "stand-in sphere"
    sim = json.loads((gt / "simulation.json").read_text())
    assert sim["seed_source"] == "stand-in" and "STAND-IN" in sim["seed_description"]
    assert sim["parameters"]["effects"]["insula_rest_change"] == 0.45
    runs = pd.read_csv(gt / "runs.tsv", sep="\t")
    assert len(runs) == 54
    in_effect = (runs["group"] == "ketamine") & (runs["session"] == "infusion")
    nback = runs["task"] == "nback"
    assert (runs.loc[in_effect & nback, "ppi_dmPFC"] > 0).all()
    assert (runs.loc[~(in_effect & nback), "ppi_dmPFC"] == 0).all()
    rest = runs["task"] == "rest"
    assert (runs.loc[in_effect & rest, "coupling_leftInsula"].mean()
            > runs.loc[~in_effect & rest, "coupling_leftInsula"].mean() + 0.3)


# --- validation and CLI errors ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"n_per_group": 0}, "'n_per_group' must be an integer >= 1. Got 0."),
    ({"resolution_mm": 0}, "'resolution_mm' must be a whole number of mm"),
    ({"resolution_mm": 2.5}, "'resolution_mm' must be a whole number of mm"),
    ({"n_volumes": 10}, "'n_volumes' must be an integer >= 30. Got 10."),
    ({"t_r": -1.0}, "'t_r' must be a repetition time"),
    ({"preset": "weigner"}, r"'preset' must be one of \('weigner2025', 'null'\)"),
    ({"seed": -1}, "'seed' must be a non-negative integer"),
])
def test_bad_parameters_raise(tmp_path, kwargs, match):
    with pytest.raises(SimulationError, match=match):
        simulate_study(tmp_path / "x", **kwargs)


def test_bad_effects_raise(tmp_path):
    effects = dataclasses.replace(preset_effects("weigner2025"), insula_rest_change=0.9)
    with pytest.raises(SimulationError, match="'insula_coupling \\+ insula_rest_change' must be"):
        simulate_study(tmp_path / "x", effects=effects)
    effects = dataclasses.replace(preset_effects("weigner2025"), effect_group="ketamin")
    with pytest.raises(SimulationError, match="'effect_group' must be one of"):
        simulate_study(tmp_path / "x", effects=effects)


def test_refuses_a_folder_with_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SimulationError, match="'out_dir' must be empty or hold an earlier"):
        simulate_study(tmp_path, n_per_group=1, n_volumes=30)


def test_rewrites_an_identical_simulation_but_not_a_different_one(tmp_path):
    from fcflow.simulate.study import _check_out_dir

    params = {"seed": 1, "effects": {"sites": (1, 2)}}
    gt = tmp_path / "derivatives" / "ground_truth"
    gt.mkdir(parents=True)
    (gt / "simulation.json").write_text(json.dumps({"parameters": params}))
    _check_out_dir(tmp_path, params)
    with pytest.raises(SimulationError, match="'out_dir' must be empty"):
        _check_out_dir(tmp_path, {**params, "seed": 2})


def test_bad_julich_dir_raises(tmp_path):
    with pytest.raises(SimulationError, match="'julich_dir' must be a folder"):
        simulate_study(tmp_path / "x", julich_dir=tmp_path / "missing")


@pytest.mark.parametrize("argv, status, text", [
    (["--resolution", "0"], 1, "'resolution_mm' must be a whole number"),
    (["--n-per-group", "0"], 1, "'n_per_group' must be an integer >= 1"),
    (["--preset", "nope"], 2, "invalid choice: 'nope'"),
    (["--n-volumes", "many"], 2, "invalid int value"),
])
def test_cli_rejects_bad_options(tmp_path, capsys, argv, status, text):
    from fcflow.cli import main

    try:
        code = main(["simulate", str(tmp_path / "out"), *argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert code == status
    assert text in err
    if status == 1:
        assert err.strip().count("\n") == 0 and err.startswith("fcflow: error:")
    assert not (tmp_path / "out" / "derivatives").exists()


# --- definitions ------------------------------------------------------------------------------

def test_sample_study_definition_loads():
    definition = load_simulation_definition(REPO / "sample_data" / "sample_study.toml")
    assert definition.preset == "weigner2025"
    assert definition.resolution_mm == 4 and definition.t_r == 2.0
    assert definition.n_per_group >= 5
    effects = definition.effects
    assert effects.insula_rest_change >= 0.3 and effects.dmpfc_ppi_change >= 0.3
    kwargs = definition.as_kwargs()
    assert set(kwargs) >= {"n_per_group", "resolution_mm", "n_volumes", "t_r", "seed", "preset",
                           "effects", "noise", "julich_dir"}
    # the demo unpacks it: simulate_study(out, **definition, julich_dir=...)
    unpacked = {**definition}
    assert "julich_dir" not in unpacked and unpacked["seed"] == definition.seed


@pytest.mark.parametrize("text, match", [
    ("[study]\nn_per_group = 2\nbogus = 1\n", r"'\[study\]' key must be one of"),
    ("[effects]\ninsula_coupling = 'high'\n", "'effects.insula_coupling' must be a number"),
    ("[study]\npreset = 'other'\n", "'preset' must be one of"),
    ("[study]\nresolution_mm = 0\n", "'resolution_mm' must be a whole number"),
    ("[effects]\ndmpfc = {label = 'dmPFC', centre_mm = [0, 48]}\n",
     "'effects.dmpfc.centre_mm' must be a list of 3 numbers"),
    ("[study\n", "is not valid TOML"),
    ("[extra]\na = 1\n", "Top-level tables must be"),
])
def test_bad_definitions_raise(tmp_path, text, match):
    path = tmp_path / "def.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match) as info:
        load_simulation_definition(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, FcflowError)


def test_definition_overrides_fields(tmp_path):
    path = tmp_path / "def.toml"
    path.write_text("[study]\npreset = 'null'\nseed = 5\n[effects]\ndmpfc_ppi_change = 0.2\n"
                    "[noise]\nmotion_scale = [['placebo', '24h', 2.0]]\n")
    definition = load_simulation_definition(path)
    assert definition.seed == 5
    assert definition.effects.dmpfc_ppi_change == 0.2
    assert definition.effects.insula_coupling == 0.0  # from the null preset
    assert definition.noise.scale_for("placebo", "24h") == 2.0
    assert definition.noise.scale_for("ketamine", "infusion") == 1.0


# --- layering and the real atlas --------------------------------------------------------------

@pytest.mark.julich
def test_julich_seed(tmp_path):
    julich = os.environ.get("FCFLOW_TEST_JULICH_DIR") or os.environ.get("FCFLOW_JULICH_TEST_DIR")
    if not julich:
        pytest.skip("set FCFLOW_TEST_JULICH_DIR to the Julich-Brain 3.1 folder")
    pytest.importorskip("fcflow.atlas.seeds")
    result = simulate_study(tmp_path / "j", n_per_group=1, resolution_mm=4, n_volumes=30,
                            seed=1, julich_dir=julich)
    assert result.seed_source == "julich-brain"
    gt = result.ground_truth_dir
    sidecar = json.loads((gt / f"{SPACE}_desc-pgACC_mask.json").read_text())
    assert sidecar["Type"] == "Julich-Brain"
    mask = np.asanyarray(nib.load(gt / f"{SPACE}_desc-pgACC_mask.nii.gz").dataobj)
    assert mask.sum() > 5
    ijk = np.argwhere(mask)
    _, affine = mni_grid(4)
    centre = (affine[:3, :3] @ ijk.mean(axis=0)) + affine[:3, 3]
    assert abs(centre[0]) < 8 and 25 < centre[1] < 60 and -10 < centre[2] < 30
    description = json.loads((tmp_path / "j" / "dataset_description.json").read_text())
    assert "julich-brain" in description["Name"]


def test_a_finished_simulation_is_reused_untouched(tmp_path):
    # issue 17: rerunning a finished `fcflow demo` re-simulated every run, so its analysis recomputed
    out = tmp_path / "study"
    first = simulate_study(out, n_per_group=1, resolution_mm=6, n_volumes=30, seed=4)
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in out.rglob("*") if p.is_file()}
    again = simulate_study(out, n_per_group=1, resolution_mm=6, n_volumes=30, seed=4)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ctime_ns) for p in out.rglob("*") if p.is_file()} == stamps
    pd.testing.assert_frame_equal(again.runs, first.runs, check_dtype=False)
    assert again.seed_source == first.seed_source and len(again.participants) == 3
    # a damaged file (another size) makes it simulate again, and so does an interrupted run
    bold = next(out.rglob("*_desc-preproc_bold.nii.gz"))
    bold.write_bytes(bold.read_bytes()[:100])
    simulate_study(out, n_per_group=1, resolution_mm=6, n_volumes=30, seed=4)
    assert bold.stat().st_size > 100
    with pytest.raises(SimulationError, match="'out_dir' must be empty"):
        simulate_study(out, n_per_group=1, resolution_mm=6, n_volumes=30, seed=5)
