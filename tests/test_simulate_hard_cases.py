"""The simulator's hard cases: motion level, run length per task, missing sessions, std DVARS.

Censoring is measured the way fcflow censors (``fcflow.denoise.load_run_confounds``: FD > 0.5 mm
or std DVARS > 1.5, then the segment rule) on confounds tables the simulator writes, and std
DVARS is compared with nipype's own ``compute_dvars`` run on the written NIfTI and mask.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fcflow.errors import RecipeError
from fcflow.io import write_json, write_tsv
from fcflow.simulate import (
    NbackDesign,
    NoiseModel,
    SimulationError,
    build_anatomy,
    build_regions,
    compute_confounds,
    load_simulation_definition,
    preset_effects,
    simulate_run,
    simulate_study,
)
from fcflow.simulate.study import check_nback_fits, choose_missing_sessions

SPACE = "space-MNI152NLin2009cAsym_res-4"
FD_MM, STD_DVARS = 0.5, 1.5  # fcflow's default censoring thresholds


@pytest.fixture(scope="module")
def anatomy():
    return build_anatomy(4)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# --- motion level -----------------------------------------------------------------------------

def test_motion_level_multiplies_the_motion_of_every_run(anatomy):
    # without spikes the motion draws do not depend on the level: a pure scaling
    effects = preset_effects("weigner2025")
    regions = build_regions(anatomy, effects)
    runs = {}
    for level in (1.0, 2.5):
        noise = NoiseModel(spike_rate=0.0, motion_level=level)
        runs[level] = simulate_run(anatomy, regions, subject="01", session="infusion",
                                   task="rest", group="ketamine", n_volumes=40, t_r=2.0, seed=2,
                                   effects=effects, noise=noise, nback=NbackDesign())
    np.testing.assert_allclose(runs[2.5].motion, 2.5 * runs[1.0].motion, rtol=1e-12, atol=0)
    assert runs[2.5].motion_scale == pytest.approx(2.5 * runs[1.0].motion_scale)
    # on top of the group x session scale
    assert NoiseModel(motion_level=2.0).scale_for("ketamine", "infusion") == pytest.approx(
        2.0 * NoiseModel().scale_for("ketamine", "infusion"))
    assert NoiseModel(motion_level=0.0).scale_for("placebo", "baseline") == 0.0


def _censoring(anatomy, tmp_path, level, t_r, seed=11):
    """fcflow's censoring of four rest runs simulated at one motion level.

    The confounds tables are those simulate_study writes (same functions); the BOLD images
    are not written because load_run_confounds only reads the tables.
    """
    from fcflow.denoise import load_run_confounds

    effects = preset_effects("weigner2025")
    regions = build_regions(anatomy, effects)
    noise = NoiseModel(motion_level=level)
    counts = {"n": 0, "censored": 0, "fd": 0, "dvars": 0, "fd_only": 0, "dvars_only": 0}
    for sub, group in (("01", "placebo"), ("02", "ketamine")):
        for session in ("baseline", "infusion"):
            run = simulate_run(anatomy, regions, subject=sub, session=session, task="rest",
                               group=group, n_volumes=64, t_r=t_r, seed=seed, effects=effects,
                               noise=noise, nback=NbackDesign())
            confounds, meta = compute_confounds(run.data, anatomy, run.motion, t_r,
                                                run.n_non_steady)
            func = tmp_path / f"lvl{level}" / f"sub-{sub}" / f"ses-{session}" / "func"
            ent = f"sub-{sub}_ses-{session}_task-rest"
            write_tsv(func / f"{ent}_desc-confounds_timeseries.tsv", confounds)
            write_json(func / f"{ent}_desc-confounds_timeseries.json", meta)
            rc = load_run_confounds(func / f"{ent}_{SPACE}_desc-preproc_bold.nii.gz", "24P",
                                    censor=True)
            fd = np.nan_to_num(confounds["framewise_displacement"].to_numpy()) > FD_MM
            dvars = np.nan_to_num(confounds["std_dvars"].to_numpy()) > STD_DVARS
            counts["n"] += rc.n_timepoints
            counts["censored"] += rc.n_timepoints - rc.n_kept
            counts["fd"] += int(fd.sum())
            counts["dvars"] += int(dvars.sum())
            counts["fd_only"] += int((fd & ~dvars).sum())
            counts["dvars_only"] += int((dvars & ~fd).sum())
    return counts


# at the highest level a restless subject's run can lose every volume (nilearn says so)
@pytest.mark.filterwarnings("ignore:All volumes were marked as motion outliers")
@pytest.mark.parametrize("t_r", [2.0, 1.5])
def test_higher_motion_level_censors_more_by_fd_and_std_dvars(anatomy, tmp_path, t_r):
    levels = (0.5, 1.5, 3.0)
    counts = [_censoring(anatomy, tmp_path, level, t_r) for level in levels]
    censored = [c["censored"] / c["n"] for c in counts]
    assert censored == sorted(censored) and censored[0] < censored[-1]
    # the still sample keeps most volumes, the restless one loses a large part of them
    assert censored[0] < 0.2 < censored[-1]
    for key in ("fd", "dvars"):
        flagged = [c[key] for c in counts]
        assert flagged == sorted(flagged) and flagged[0] < flagged[-1], key
    # at the highest level each criterion censors volumes the other does not
    high = counts[-1]
    assert high["fd_only"] > 0 and high["dvars_only"] > 0
    assert high["dvars"] > 0.05 * high["n"] and high["fd"] > 0.05 * high["n"]


# --- one study with every new option, through the command line --------------------------------

N_REST, N_NBACK, T_R = 52, 60, 1.5


@pytest.fixture(scope="module")
def hard_study(tmp_path_factory):
    from fcflow.cli import main

    out = tmp_path_factory.mktemp("hard") / "bids"
    status = main(["simulate", str(out), "--n-per-group", "1", "--resolution", "4",
                   "--tr", str(T_R), "--n-volumes", "40", "--n-volumes-rest", str(N_REST),
                   "--n-volumes-nback", str(N_NBACK), "--motion-level", "2",
                   "--missing-sessions", "0.34", "--seed", "6", "--quiet"])
    assert status == 0
    return out


def test_run_lengths_per_task_are_honoured(hard_study):
    bolds = sorted(hard_study.rglob("*_desc-preproc_bold.nii.gz"))
    assert bolds
    for bold in bolds:
        expected = N_REST if "_task-rest_" in bold.name else N_NBACK
        img = nib.load(bold)
        assert img.shape[3] == expected and img.header.get_zooms()[3] == pytest.approx(T_R)
        confounds = pd.read_csv(str(bold).split("_space-")[0]
                                + "_desc-confounds_timeseries.tsv", sep="\t")
        assert len(confounds) == expected
    events = sorted(hard_study.glob("sub-*/ses-*/func/*_task-nback_events.tsv"))
    assert events
    for file in events:
        table = pd.read_csv(file, sep="\t")
        assert set(table["trial_type"]) == {"0back", "2back"}
        assert (table["onset"] >= 0).all()
        assert ((table["onset"] + table["duration"]) <= N_NBACK * T_R).all()
    params = json.loads((hard_study / "derivatives/ground_truth/simulation.json")
                        .read_text())["parameters"]
    assert (params["n_volumes_rest"], params["n_volumes_nback"]) == (N_REST, N_NBACK)
    assert params["noise"]["motion_level"] == 2.0 and params["t_r"] == T_R
    assert f"rest {N_REST} / nback {N_NBACK} volumes" in (hard_study / "README").read_text()


def test_missing_sessions_are_left_out_and_recorded(hard_study):
    gt = hard_study / "derivatives/ground_truth"
    missing = pd.read_csv(gt / "missing_sessions.tsv", sep="\t")
    participants = pd.read_csv(hard_study / "participants.tsv", sep="\t")
    n_pairs = len(participants) * 3
    assert len(missing) == round(0.34 * n_pairs)
    assert "baseline" not in set(missing["session"])
    runs = pd.read_csv(gt / "runs.tsv", sep="\t")
    assert len(runs) == 2 * (n_pairs - len(missing))
    for row in missing.itertuples():
        assert not (hard_study / row.participant_id / f"ses-{row.session}").exists()
        assert not ((runs["participant_id"] == row.participant_id)
                    & (runs["session"] == row.session)).any()
        assert row.group == participants.set_index("participant_id").loc[row.participant_id,
                                                                          "group"]
    # everyone keeps a baseline
    assert set(runs.loc[runs["session"] == "baseline", "participant_id"]) == set(
        participants["participant_id"])


def test_missing_sessions_are_seeded_and_never_a_baseline():
    subjects = [(f"{i:02d}", "placebo") for i in range(1, 21)]
    first = choose_missing_sessions(subjects, 0.5, seed=3)
    assert first == choose_missing_sessions(subjects, 0.5, seed=3)
    assert first != choose_missing_sessions(subjects, 0.5, seed=4)
    assert len(first) == 30 and all(ses != "baseline" for _, ses in first)
    assert choose_missing_sessions(subjects, 0.0, seed=3) == []


def test_defaults_written_out_give_the_same_bytes(tmp_path):
    plain = tmp_path / "plain"
    explicit = tmp_path / "explicit"
    simulate_study(plain, n_per_group=1, resolution_mm=4, n_volumes=40, seed=9)
    simulate_study(explicit, n_per_group=1, resolution_mm=4, n_volumes=40, seed=9,
                   noise=NoiseModel(motion_level=1.0), n_volumes_rest=40, n_volumes_nback=40,
                   missing_sessions=0.0)
    first, second = _files(plain), _files(explicit)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    params = json.loads((plain / "derivatives/ground_truth/simulation.json")
                        .read_text())["parameters"]
    assert "motion_level" not in params["noise"] and "missing_sessions" not in params
    assert not (plain / "derivatives/ground_truth/missing_sessions.tsv").exists()


# --- n-back design ----------------------------------------------------------------------------

def test_short_nback_run_warns_that_it_has_no_2back_block(caplog):
    with caplog.at_level(logging.WARNING, logger="fcflow.simulate"):
        check_nback_fits(30, 2.0, NbackDesign())
    assert ("The n-back runs of 30 volumes at TR 2 s (60 s) hold 1 0back and 0 2back blocks: "
            "'n_volumes_nback' must give at least lead_in_s + 2 x block_s + fixation_s = 80 s "
            "(40 volumes)") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fcflow.simulate"):
        check_nback_fits(54, 1.5, NbackDesign())
    assert caplog.text == ""


# --- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"noise": NoiseModel(motion_level=-1.0)},
     r"'motion_level' must be a number >= 0 \(1 for the default motion\). Got -1.0."),
    ({"noise": NoiseModel(motion_level=float("nan"))}, "'motion_level' must be a number >= 0"),
    ({"n_volumes_rest": 20}, r"'n_volumes_rest' must be an integer >= 30 \(or unset: "
                             r"n_volumes\). Got 20."),
    ({"n_volumes_nback": 40.5}, "'n_volumes_nback' must be an integer >= 30"),
    ({"missing_sessions": 0.9}, "'missing_sessions' must be a fraction from 0 to 0.6667 "
                                r"\(every subject keeps its baseline\). Got 0.9."),
    ({"missing_sessions": -0.1}, "'missing_sessions' must be a fraction"),
])
def test_bad_hard_case_parameters_raise(tmp_path, kwargs, match):
    with pytest.raises(SimulationError, match=match):
        simulate_study(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("text, match", [
    ("[noise]\nmotion_level = 'high'\n", "'noise.motion_level' must be a number"),
    ("[noise]\nmotion_level = -2\n", "'motion_level' must be a number >= 0"),
    ("[study]\nn_volumes_rest = 10\n", "'n_volumes_rest' must be an integer >= 30"),
    ("[study]\nmissing_sessions = 1\n", "'missing_sessions' must be a fraction"),
])
def test_bad_hard_case_definitions_raise(tmp_path, text, match):
    path = tmp_path / "def.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match) as info:
        load_simulation_definition(path)
    assert str(path) in str(info.value)


def test_definition_reads_the_hard_case_keys(tmp_path):
    path = tmp_path / "def.toml"
    path.write_text("[study]\nt_r = 1.5\nn_volumes_rest = 240\nn_volumes_nback = 200\n"
                    "missing_sessions = 0.2\n[noise]\nmotion_level = 2\n")
    definition = load_simulation_definition(path)
    assert (definition.n_volumes_rest, definition.n_volumes_nback) == (240, 200)
    assert definition.missing_sessions == 0.2 and definition.noise.motion_level == 2.0
    assert {**definition}["n_volumes_nback"] == 200


@pytest.mark.parametrize("argv, text", [
    (["--motion-level", "-1"], "'motion_level' must be a number >= 0"),
    (["--n-volumes-nback", "12"], "'n_volumes_nback' must be an integer >= 30"),
    (["--missing-sessions", "0.8"], "'missing_sessions' must be a fraction"),
])
def test_cli_rejects_bad_hard_case_options(tmp_path, capsys, argv, text):
    from fcflow.cli import main

    code = main(["simulate", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 1 and text in err and err.startswith("fcflow: error:")
    assert not (tmp_path / "out" / "derivatives").exists()


# --- std DVARS as nipype (and so fMRIPrep) computes it ----------------------------------------

def test_std_dvars_equals_nipypes_compute_dvars(hard_study):
    # nipype's compute_dvars estimates the AR(1) with nitime (a test dependency)
    from nipype.algorithms import confounds as nipype_confounds
    # one run of each task (different lengths), of a subject who moves
    bolds = sorted((hard_study / "derivatives" / "fmriprep").glob(
        "sub-*/ses-baseline/func/*_desc-preproc_bold.nii.gz"))[:2]
    assert ["_task-nback_" in b.name for b in bolds] == [True, False]
    for bold in bolds:
        mask = str(bold).replace("_desc-preproc_bold", "_desc-brain_mask")
        table = pd.read_csv(str(bold).split("_space-")[0] + "_desc-confounds_timeseries.tsv",
                            sep="\t", na_values="n/a")
        # fMRIPrep's ComputeDVARS: remove_zerovariance=True, variance_tol=1e-7, intensity
        # normalisation to 1000; fMRIPrep writes n/a for the first volume
        std, nstd, _ = nipype_confounds.compute_dvars(
            str(bold), mask, remove_zerovariance=True, variance_tol=1e-7,
            intensity_normalization=1000)
        assert np.isnan(table["std_dvars"].iloc[0]) and np.isnan(table["dvars"].iloc[0])
        # float32 arithmetic in both (nipype casts the detrended data to float32)
        np.testing.assert_allclose(table["std_dvars"].to_numpy()[1:], std, rtol=1e-4)
        np.testing.assert_allclose(table["dvars"].to_numpy()[1:], nstd, rtol=1e-4)
