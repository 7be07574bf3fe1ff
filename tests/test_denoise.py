"""Tests for confound selection, exclusion and the cleaning operator (vs nilearn.signal.clean)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from nilearn import signal as nilearn_signal

from fcflow.denoise import (
    DENOISING_STRATEGIES,
    RunConfounds,
    apply_cleaning_operator,
    assess_run_exclusion,
    build_cleaning_operator,
    compute_effective_dof,
    count_censoring_reasons,
    load_run_confounds,
)
from fcflow.errors import InputDataError

N_TIME = 80
PREFIX = "sub-01_ses-1_task-rest"


def _write_fmriprep_confounds(folder, rng, n_time=N_TIME, fd_spikes=(30, 33), dvars_spikes=(60,)):
    """An fMRIPrep-like confounds TSV + JSON: 1 non-steady-state volume (0), planted spikes."""
    columns = {}
    for base in ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                 "global_signal", "csf", "white_matter"]:
        values = np.cumsum(rng.normal(scale=0.05, size=n_time))
        deriv = np.r_[np.nan, np.diff(values)]
        columns[base] = values
        columns[f"{base}_derivative1"] = deriv
        columns[f"{base}_power2"] = values**2
        columns[f"{base}_derivative1_power2"] = deriv**2
    fd = np.r_[np.nan, rng.uniform(0.05, 0.3, n_time - 1)]
    fd[list(fd_spikes)] = 0.9
    dvars = np.r_[np.nan, rng.uniform(0.8, 1.2, n_time - 1)]
    dvars[list(dvars_spikes)] = 2.0
    columns["framewise_displacement"] = fd
    columns["std_dvars"] = dvars
    columns["dvars"] = dvars * 20
    meta = {}
    for i in range(8):
        columns[f"a_comp_cor_{i:02d}"] = rng.normal(size=n_time)
        meta[f"a_comp_cor_{i:02d}"] = {"Mask": "combined", "Method": "aCompCor", "Retained": True}
    for i in range(3):
        columns[f"cosine{i:02d}"] = np.cos(np.pi * (i + 1) * (np.arange(n_time) + 0.5) / n_time)
    nss = np.zeros(n_time)
    nss[0] = 1
    columns["non_steady_state_outlier00"] = nss
    table = pd.DataFrame(columns)
    table.to_csv(folder / f"{PREFIX}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
    (folder / f"{PREFIX}_desc-confounds_timeseries.json").write_text(json.dumps(meta))
    return table


def _bold_name(folder, desc="preproc", ext=".nii.gz"):
    return folder / f"{PREFIX}_space-MNI152NLin2009cAsym_desc-{desc}_bold{ext}"


def test_strategy_names_are_fixed():
    assert set(DENOISING_STRATEGIES) == {"24P", "24P+aCompCor", "6P+aCompCor", "36P", "ICA-AROMA", "none"}
    from fcflow import config

    assert set(config.DENOISING_STRATEGIES) == set(DENOISING_STRATEGIES)


@pytest.mark.parametrize(
    ("strategy", "n_columns"),
    [("24P", 24), ("24P+aCompCor", 24 + 5 + 3), ("6P+aCompCor", 6 + 5 + 3), ("36P", 36), ("none", 0)],
)
def test_load_run_confounds_columns_and_censoring(tmp_path, strategy, n_columns):
    _write_fmriprep_confounds(tmp_path, np.random.default_rng(0))
    rc = load_run_confounds(_bold_name(tmp_path), strategy)
    if n_columns == 0:
        assert rc.confounds is None
    else:
        assert rc.confounds.shape == (N_TIME, n_columns)
        assert np.isfinite(rc.confounds.to_numpy()).all()
    # Volume 0 is non-steady-state; FD spikes at 30 and 33 also remove the 2-volume segment
    # between them (segment rule, scrub=5); a DVARS spike at 60.
    removed = sorted(set(range(N_TIME)) - set(rc.sample_mask))
    assert removed == [0, 30, 31, 32, 33, 60]
    assert rc.n_fd_outliers == 2
    assert rc.n_kept == N_TIME - 6
    assert rc.n_non_steady_state == 1


def test_load_run_confounds_thresholds_and_no_censoring(tmp_path):
    _write_fmriprep_confounds(tmp_path, np.random.default_rng(1))
    loose = load_run_confounds(_bold_name(tmp_path), "24P", fd_threshold_mm=1.0,
                               std_dvars_threshold=3.0)
    assert list(loose.sample_mask) == list(range(1, N_TIME))
    no_segment_rule = load_run_confounds(_bold_name(tmp_path), "24P", scrub=0)
    assert sorted(set(range(N_TIME)) - set(no_segment_rule.sample_mask)) == [0, 30, 33, 60]
    uncensored = load_run_confounds(_bold_name(tmp_path), "24P", censor=False)
    assert list(uncensored.sample_mask) == list(range(1, N_TIME))


def test_load_run_confounds_uncompressed_run_name(tmp_path):
    _write_fmriprep_confounds(tmp_path, np.random.default_rng(2))
    rc = load_run_confounds(_bold_name(tmp_path, ext=".nii"), "36P")
    assert rc.confounds.shape == (N_TIME, 36)


def test_load_run_confounds_aroma(tmp_path):
    _write_fmriprep_confounds(tmp_path, np.random.default_rng(3))
    with pytest.raises(InputDataError, match=r"'bold_file' must be fMRIPrep's non-aggressively AROMA-denoised run .*desc-preproc_bold"):
        load_run_confounds(_bold_name(tmp_path), "ICA-AROMA")
    rc = load_run_confounds(_bold_name(tmp_path, desc="smoothAROMAnonaggr"), "ICA-AROMA")
    assert sorted(rc.confounds.columns) == ["cosine00", "cosine01", "cosine02", "csf", "white_matter"]


def test_load_run_confounds_errors(tmp_path):
    with pytest.raises(InputDataError, match=r"'strategy' must be one of .*Got 'aCompCor'"):
        load_run_confounds(_bold_name(tmp_path), "aCompCor")
    with pytest.raises(InputDataError, match=r"Cannot load the '24P' confounds of .*desc-preproc_bold"):
        load_run_confounds(_bold_name(tmp_path), "24P")
    with pytest.raises(InputDataError, match=r"'fd_threshold_mm' and 'std_dvars_threshold' must be positive"):
        load_run_confounds(_bold_name(tmp_path), "24P", fd_threshold_mm=0)


@pytest.mark.parametrize(("bad", "column"), [("n/a", "rot_z"), ("1.2.3", "csf"), ("high", "a_comp_cor_03")])
def test_load_run_confounds_names_a_value_that_is_no_number(tmp_path, bad, column):
    """n/a after the first row, or text, in any column (numeric or read as text) is named with its row."""
    table = _write_fmriprep_confounds(tmp_path, np.random.default_rng(0))
    table[column] = table[column].astype(object)
    table.loc[11, column] = bad
    table.to_csv(tmp_path / f"{PREFIX}_desc-confounds_timeseries.tsv", sep="\t", index=False, na_rep="n/a")
    with pytest.raises(InputDataError, match=rf"expected numbers in every row after the first .*column '{column}' "
                                             r"at data row\(s\) \[12\] \(1 column\(s\) affected\)"):
        load_run_confounds(_bold_name(tmp_path), "24P+aCompCor")


def _run_confounds(n_kept, n_time=300, n_fd=12, fd=0.1, censored_by=None):
    return RunConfounds(
        confounds=None,
        sample_mask=np.arange(n_time - n_kept, n_time),
        n_timepoints=n_time,
        framewise_displacement=np.r_[np.nan, np.full(n_time - 1, fd)],
        n_non_steady_state=0,
        n_fd_outliers=n_fd,
        strategy="24P",
        fd_threshold_mm=0.5,
        std_dvars_threshold=1.5,
        scrub=5,
        censored_by=censored_by or {},
    )


def test_assess_run_exclusion():
    by = {"non_steady_state": 2, "fd": 12, "std_dvars": 200, "segment": 26}
    excluded, reason = assess_run_exclusion(_run_confounds(60, censored_by=by), min_volumes=120,
                                            max_mean_fd_mm=None, run_name="sub-07_ses-24h_task-rest")
    assert excluded
    assert reason == (
        "sub-07_ses-24h_task-rest: 240 of 300 volumes removed (2 non-steady-state, 12 FD > 0.5 mm, "
        "200 std DVARS > 1.5, 26 segment rule (< 5 kept in a row)); 60 volumes remain, below the "
        "minimum of 120 (min_volumes). Run excluded."
    )
    assert assess_run_exclusion(_run_confounds(200), min_volumes=120, max_mean_fd_mm=None) == (False, "")
    excluded, reason = assess_run_exclusion(_run_confounds(200, fd=0.7), min_volumes=10, max_mean_fd_mm=0.5)
    assert excluded
    assert reason == "mean FD is 0.700 mm, above the maximum of 0.5 mm (max_mean_fd_mm). Run excluded."


def test_count_censoring_reasons_each_volume_once():
    n = 20
    nss = np.zeros(n, bool)
    nss[:2] = True
    fd = np.full(n, 0.1)
    fd[[1, 5, 12]] = 0.9          # volume 1 is also non-steady: counted there
    dvars = np.full(n, 1.0)
    dvars[[5, 8, 15]] = 2.0       # volume 5 is also FD: counted there
    removed = {0, 1, 5, 12, 8, 15, 9, 16}  # 9 and 16: segment rule
    kept = np.array(sorted(set(range(n)) - removed))
    counts = count_censoring_reasons(n, kept, non_steady=nss, fd=fd, std_dvars=dvars,
                                     fd_threshold_mm=0.5, std_dvars_threshold=1.5)
    assert counts == {"non_steady_state": 2, "fd": 2, "std_dvars": 2, "segment": 2}
    assert sum(counts.values()) == n - kept.size


def test_load_run_confounds_counts_std_dvars(tmp_path):
    rng = np.random.default_rng(5)
    _write_fmriprep_confounds(tmp_path, rng)
    table_file = next(tmp_path.glob("*confounds_timeseries.tsv"))
    table = pd.read_csv(table_file, sep="\t")
    table["framewise_displacement"] = np.r_[np.nan, np.full(len(table) - 1, 0.1)]
    table["std_dvars"] = np.r_[np.nan, np.full(len(table) - 1, 1.0)]
    table.loc[40:49, "std_dvars"] = 3.0
    table.to_csv(table_file, sep="\t", index=False, na_rep="n/a")
    rc = load_run_confounds(_bold_name(tmp_path), "24P")
    assert rc.censored_by["std_dvars"] == 10
    assert rc.censored_by["fd"] == 0
    assert sum(rc.censored_by.values()) == rc.n_timepoints - rc.n_kept


# --------------------------------------------------------------------------------------------
# Operator vs nilearn.signal.clean

T_R = 2.0


def _data(rng, n_time=150, n_voxels=40, n_confounds=6, dtype=np.float64):
    trend = np.linspace(0, 5, n_time)[:, None]
    confounds = rng.normal(size=(n_time, n_confounds)).cumsum(axis=0)
    mixing = rng.normal(size=(n_confounds, n_voxels))
    signals = 1000 + trend + confounds @ mixing * 0.3 + rng.normal(size=(n_time, n_voxels))
    return signals.astype(dtype), confounds


def _sample_mask(n_time):
    keep = np.ones(n_time, bool)
    keep[[0, 1, 40, 41, 42, 90, n_time - 1]] = False
    return np.flatnonzero(keep)


FILTERS = {"rest band-pass": (0.01, 0.08), "task high-pass": (0.008, None), "none": (None, None)}


@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("with_confounds", [False, True])
@pytest.mark.parametrize("standardize", [None, "zscore_sample"])
def test_operator_reproduces_nilearn_clean(filters, with_mask, with_confounds, standardize):
    rng = np.random.default_rng(11)
    signals, confounds = _data(rng)
    high_pass, low_pass = FILTERS[filters]
    sample_mask = _sample_mask(len(signals)) if with_mask else None
    conf = confounds if with_confounds else None
    expected = nilearn_signal.clean(
        signals.copy(), confounds=conf, sample_mask=None if sample_mask is None else sample_mask.copy(),
        t_r=T_R, high_pass=high_pass, low_pass=low_pass, detrend=True, standardize=standardize,
        standardize_confounds=True, filter="butterworth",
    )
    operator = build_cleaning_operator(
        len(signals), T_R, conf, sample_mask, high_pass, low_pass,
        standardize=standardize, interpolation="nilearn", filter="butterworth",
    )
    cleaned = operator @ signals
    if standardize:
        cleaned /= cleaned.std(axis=0, ddof=1)
    assert cleaned.shape == expected.shape
    np.testing.assert_allclose(cleaned, expected, rtol=0, atol=1e-9 * np.abs(expected).max())
    # Same through the float32 path (relative 1e-5), against the operator on the same
    # float32-rounded input (rounding 1000 + x to float32 alone costs 3e-5).
    signals32 = signals.astype(np.float32)
    expected32 = operator @ signals32.astype(np.float64)
    if standardize:
        expected32 /= expected32.std(axis=0, ddof=1)
    cleaned32 = apply_cleaning_operator(operator, signals32, standardize)
    assert cleaned32.dtype == np.float32
    np.testing.assert_allclose(cleaned32, expected32, rtol=0, atol=1e-5 * np.abs(expected32).max())


def _fixed_interpolate_volumes(volumes, sample_mask, t_r, extrapolate):
    """nilearn's _interpolate_volumes with the censored volumes selected by a boolean mask."""
    from scipy.interpolate import CubicSpline

    frame_times = np.arange(volumes.shape[0]) * t_r
    censored = np.ones(volumes.shape[0], bool)
    censored[sample_mask] = False
    fitter = CubicSpline(frame_times[sample_mask], volumes[sample_mask], extrapolate=extrapolate)
    volumes[censored] = fitter(frame_times)[censored]
    return volumes


@pytest.mark.parametrize("filters", ["rest band-pass", "task high-pass"])
def test_spline_interpolation_matches_fixed_nilearn(monkeypatch, filters):
    rng = np.random.default_rng(12)
    signals, confounds = _data(rng)
    high_pass, low_pass = FILTERS[filters]
    sample_mask = _sample_mask(len(signals))
    monkeypatch.setattr(nilearn_signal, "_interpolate_volumes", _fixed_interpolate_volumes)
    expected = nilearn_signal.clean(
        signals.copy(), confounds=confounds, sample_mask=sample_mask.copy(), t_r=T_R,
        high_pass=high_pass, low_pass=low_pass, standardize=None,
    )
    operator = build_cleaning_operator(len(signals), T_R, confounds, sample_mask, high_pass, low_pass,
                                       filter="butterworth")
    np.testing.assert_allclose(operator @ signals, expected, atol=1e-9 * np.abs(expected).max())
    censored = np.setdiff1d(np.arange(len(signals)), sample_mask)
    assert np.abs(operator[:, censored]).max() == 0.0


def test_nilearn_interpolation_quirk_leaks_censored_volumes():
    # nilearn 0.14.1 replaces volume n-1-i for each kept i. Volume 40's mirror (109) is kept,
    # so 40 is interpolated; volume 0's mirror (149) is censored, so volume 0 keeps its raw
    # value, is not trimmed, and leaks through the filter into the kept volumes.
    n_time = 150
    sample_mask = _sample_mask(n_time)
    quirky = build_cleaning_operator(n_time, T_R, None, sample_mask, 0.01, 0.08, interpolation="nilearn",
                                     filter="butterworth")
    assert np.abs(quirky[:, 0]).max() > 1e-3
    spline = build_cleaning_operator(n_time, T_R, None, sample_mask, 0.01, 0.08, filter="butterworth")
    assert np.abs(spline[:, 0]).max() == 0.0
    # Nothing censored inside the run: both agree.
    head_only = np.arange(3, n_time)
    np.testing.assert_allclose(
        build_cleaning_operator(n_time, T_R, None, head_only, 0.01, 0.08, interpolation="nilearn",
                                filter="butterworth"),
        build_cleaning_operator(n_time, T_R, None, head_only, 0.01, 0.08, filter="butterworth"),
        atol=1e-12,
    )


def test_effective_dof_of_projection_is_exact():
    rng = np.random.default_rng(13)
    _, confounds = _data(rng, n_confounds=7)
    sample_mask = _sample_mask(150)
    operator = build_cleaning_operator(150, T_R, confounds, sample_mask)
    assert compute_effective_dof(operator) == pytest.approx(sample_mask.size - 2 - 7, abs=1e-8)
    assert compute_effective_dof(build_cleaning_operator(150, T_R)) == pytest.approx(148, abs=1e-8)


def test_effective_dof_of_band_pass():
    n_time = 600
    operator = build_cleaning_operator(n_time, T_R, high_pass=0.01, low_pass=0.08, filter="butterworth")
    # Pass band 0.01-0.08 Hz of a 0.25 Hz Nyquist band: about 28 % of the spectrum.
    fraction = compute_effective_dof(operator) / n_time
    assert 0.22 < fraction < 0.34
    # Regression on white noise: the Satterthwaite DOF predicts the spread of the sum of squares.
    rng = np.random.default_rng(14)
    noise = rng.normal(size=(n_time, 4000))
    ss = ((operator @ noise) ** 2).sum(axis=0)
    empirical = 2 * ss.mean() ** 2 / ss.var()
    assert empirical == pytest.approx(compute_effective_dof(operator), rel=0.1)


def test_build_cleaning_operator_errors():
    with pytest.raises(InputDataError, match=r"'sample_mask' must be increasing volume indices in \[0, 50\)"):
        build_cleaning_operator(50, T_R, sample_mask=np.array([3, 2, 60]))
    with pytest.raises(InputDataError, match=r"'sample_mask' must be a boolean array of length 50"):
        build_cleaning_operator(50, T_R, sample_mask=np.ones(40, bool))
    with pytest.raises(InputDataError, match=r"'confounds' must have one row per volume \(50\)"):
        build_cleaning_operator(50, T_R, confounds=np.ones((49, 2)))
    with pytest.raises(InputDataError, match=r"'confounds' must be finite. Got 1 NaN"):
        build_cleaning_operator(50, T_R, confounds=np.r_[[np.nan], np.ones(49)])
    with pytest.raises(InputDataError, match=r"'high_pass' must be below 'low_pass'"):
        build_cleaning_operator(50, T_R, high_pass=0.1, low_pass=0.08)
    with pytest.raises(InputDataError, match=r"'interpolation' must be 'spline' or 'nilearn'"):
        build_cleaning_operator(50, T_R, interpolation="linear")
    with pytest.raises(InputDataError, match=r"'t_r' must be a positive number of seconds"):
        build_cleaning_operator(50, 0)
    with pytest.raises(InputDataError, match=r"'standardize' must be 'zscore_sample' or None"):
        build_cleaning_operator(50, T_R, standardize="psc")


def test_boolean_sample_mask_equals_indices():
    keep = np.ones(60, bool)
    keep[[5, 6, 30]] = False
    np.testing.assert_array_equal(
        build_cleaning_operator(60, T_R, sample_mask=keep, high_pass=0.01),
        build_cleaning_operator(60, T_R, sample_mask=np.flatnonzero(keep), high_pass=0.01),
    )
