"""Degrees of freedom that are true: the DCT cleaning, censoring, the null spread of the maps.

The reference computations here are independent of fcflow's operator: nilearn's cosine filter,
scipy's orthonormal DCT and numpy's least squares; the null tests use pure white noise, whose
answer is known.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import scipy.fft
from nilearn import signal as nilearn_signal

from fcflow.config import Contrast, DenoisingConfig, TaskConfig
from fcflow.connectivity import correlate_with_operator
from fcflow.denoise import (
    build_cleaning_operator,
    confound_blocks,
    correlation_dof,
    dct_frequencies,
    dof_budget,
)
from fcflow.firstlevel import compute_run_maps
from fcflow.ppi import (
    build_gppi_design,
    build_task_regressors,
    check_task_design,
    compute_background_fc,
    fit_gppi,
    gppi_model_dof,
)

T_R = 1.5


def _censor_in_gaps(rng, n_time, fraction=0.4, gap=(10, 20)):
    """Boolean mask of kept volumes with ``fraction`` removed in gaps of ``gap`` volumes."""
    keep = np.ones(n_time, bool)
    while 1 - keep.mean() < fraction:
        length = int(rng.integers(gap[0], gap[1] + 1))
        start = int(rng.integers(0, n_time - length))
        keep[start : start + length] = False
    return keep


# ----------------------------------------------------------------------------------------------
# The operator against independent computations


def test_dct_high_pass_equals_nilearn_cosine_filter():
    rng = np.random.default_rng(0)
    n_time = 180
    signals = rng.normal(size=(n_time, 30)) + np.linspace(0, 4, n_time)[:, None]
    confounds = rng.normal(size=(n_time, 5))
    expected = nilearn_signal.clean(signals, confounds=confounds, detrend=True, filter="cosine",
                                    high_pass=0.01, t_r=T_R, standardize=None)
    operator = build_cleaning_operator(n_time, T_R, confounds, None, 0.01, None)
    np.testing.assert_allclose(operator @ signals, expected, atol=1e-10)


def test_dct_band_pass_equals_fft_projection_and_regression():
    rng = np.random.default_rng(1)
    n_time = 200
    signals = rng.normal(size=(n_time, 20))
    confounds = rng.normal(size=(n_time, 4)).cumsum(axis=0)
    frequencies = np.arange(n_time) / (2 * n_time * T_R)
    band = (frequencies > 0.01) & (frequencies <= 0.08)

    def band_limit(x):
        coefficients = scipy.fft.dct(x, axis=0, norm="ortho")
        coefficients[~band] = 0
        return scipy.fft.idct(coefficients, axis=0, norm="ortho")

    nuisance = band_limit(np.column_stack([confounds, np.arange(n_time, dtype=float)]))
    y = band_limit(signals)
    beta, *_ = np.linalg.lstsq(nuisance, y, rcond=None)
    expected = y - nuisance @ beta
    operator = build_cleaning_operator(n_time, T_R, confounds, None, 0.01, 0.08)
    np.testing.assert_allclose(operator @ signals, expected, atol=1e-10)
    # A projection: its rank is the degrees of freedom, one per in-band cosine less the nuisance.
    assert correlation_dof(operator) == pytest.approx(band.sum() - 5 + 1, abs=1e-6)
    np.testing.assert_array_equal(dct_frequencies(n_time, T_R), frequencies)


def test_dct_without_filter_is_regression_on_kept_volumes():
    rng = np.random.default_rng(2)
    n_time = 120
    keep = _censor_in_gaps(rng, n_time, 0.3, (3, 8))
    kept = np.flatnonzero(keep)
    signals = rng.normal(size=(n_time, 10))
    confounds = rng.normal(size=(n_time, 3))
    design = np.column_stack([np.ones(kept.size), kept.astype(float), confounds[kept]])
    beta, *_ = np.linalg.lstsq(design, signals[kept], rcond=None)
    operator = build_cleaning_operator(n_time, T_R, confounds, kept)
    np.testing.assert_allclose(operator @ signals, signals[kept] - design @ beta, atol=1e-10)
    assert np.abs(operator[:, ~keep]).max() == 0.0


# ----------------------------------------------------------------------------------------------
# Heavy censoring: nothing made by the operator, and a dof that predicts the null spread


def test_heavy_censoring_injects_no_shared_signal():
    rng = np.random.default_rng(3)
    n_time = 240
    kept = np.flatnonzero(_censor_in_gaps(rng, n_time))
    operator = build_cleaning_operator(n_time, T_R, None, kept, 0.01, 0.08)
    # An orthogonal projection on the kept volumes: no direction is amplified.
    assert np.linalg.svd(operator, compute_uv=False)[0] <= 1 + 1e-9
    # The old route (nilearn's spline fill through 10-20 volume gaps, then Butterworth) does
    # amplify: the same censoring, for comparison.
    spline = build_cleaning_operator(n_time, T_R, None, kept, 0.01, 0.08, filter="butterworth")
    assert np.linalg.svd(spline, compute_uv=False)[0] > 3


@pytest.mark.parametrize(("high_pass", "low_pass"), [(0.01, 0.08), (0.008, None)])
def test_null_correlation_spread_matches_reported_dof(high_pass, low_pass):
    rng = np.random.default_rng(4)
    n_time, n_voxels = 240, 20000
    kept = np.flatnonzero(_censor_in_gaps(rng, n_time))
    confounds = rng.normal(size=(n_time, 12))
    operator = build_cleaning_operator(n_time, T_R, confounds, kept, high_pass, low_pass)
    dof = correlation_dof(operator)
    data = (1000 + 10 * rng.normal(size=(n_time, n_voxels + 1))).astype(np.float32)
    weights = np.zeros(n_voxels + 1)
    weights[0] = 1.0
    z = np.arctanh(correlate_with_operator(data, operator, weights)[1:])
    # independent voxels: no shared signal, and the Fisher z spread predicted by the dof
    sd_error = 1 / np.sqrt(2 * (n_voxels - 1))  # relative standard error of an SD
    assert abs(z.mean()) < 4 / np.sqrt(n_voxels) / np.sqrt(dof - 3)
    assert z.std() * np.sqrt(dof - 3) == pytest.approx(1.0, abs=4 * sd_error + 0.01)


def _events(block_s=30.0, rest_s=10.0, n_time=200, t_r=T_R, identical=False):
    rows, onset = [], 10.0
    while onset + block_s < n_time * t_r:
        for condition in ("0back", "2back"):
            if onset + block_s > n_time * t_r:
                break
            rows.append((onset, block_s, condition))
            if not identical or condition == "2back":
                onset += block_s + rest_s
    return pd.DataFrame(rows, columns=["onset", "duration", "trial_type"])


def test_null_gppi_and_background_match_reported_dof():
    rng = np.random.default_rng(5)
    n_time, n_voxels = 200, 20000
    kept = np.flatnonzero(_censor_in_gaps(rng, n_time, 0.3))
    operator = build_cleaning_operator(n_time, T_R, None, kept, 0.008, None)
    task = build_task_regressors(_events(), ["0back", "2back"], n_time, T_R)
    task_prepared = pd.DataFrame(operator @ task.to_numpy(), columns=task.columns)
    confounds_prepared = operator @ rng.normal(size=(n_time, 6))
    data = rng.normal(size=(n_time, n_voxels)).astype(np.float32)
    prepared = (operator @ data).astype(np.float32)
    seed = operator @ rng.normal(size=n_time)
    design = build_gppi_design(seed, task_prepared, confounds_prepared, conditions=["0back", "2back"])
    fit = fit_gppi(prepared, design, {"2backMinus0back": "2back - 0back"},
                   error_covariance=operator @ operator.T)
    # The interaction's z is N(0, 1) under the null with the Worsley-Friston dof.
    sd_error = 1 / np.sqrt(2 * (n_voxels - 1))
    for key in ("ppi_2back", "2backMinus0back"):
        assert fit.z[key].std() == pytest.approx(1.0, abs=4 * sd_error + 0.01)
        assert np.mean(np.abs(fit.z[key]) > 1.96) == pytest.approx(0.05, abs=0.008)
    assert fit.dof < kept.size - design.shape[1]  # the filter's cost is counted
    # Background FC: the spread of z matches 1/sqrt(dof - 3) of the whole operator.
    from fcflow.ppi import background_operator

    dof = correlation_dof(background_operator(task_prepared, confounds_prepared, kept.size) @ operator)
    _, z = compute_background_fc(prepared, seed, task_prepared, confounds_prepared)
    assert z.std() * np.sqrt(dof - 3) == pytest.approx(1.0, abs=4 * sd_error + 0.01)


def test_dof_is_never_negative():
    n_time = 60
    rng = np.random.default_rng(6)
    confounds = rng.normal(size=(n_time, 40))
    operator = build_cleaning_operator(n_time, 2.0, confounds, None, 0.01, 0.08)
    assert correlation_dof(operator) == 1.0  # nothing left: the band holds 14 cosines
    design = rng.normal(size=(30, 35))
    assert gppi_model_dof(design, np.eye(30))[3] == 0.0
    assert gppi_model_dof(design)[3] == 0.0


def test_dof_budget_adds_up():
    rng = np.random.default_rng(7)
    n_time = 200
    kept = np.flatnonzero(_censor_in_gaps(rng, n_time, 0.2, (2, 6)))
    confounds = pd.DataFrame(rng.normal(size=(n_time, 9)), columns=[
        "trans_x", "trans_y", "rot_z", "a_comp_cor_00", "a_comp_cor_01", "cosine00", "csf", "white_matter",
        "global_signal"])
    blocks = {name: confounds[cols].to_numpy() for name, cols in confound_blocks(confounds.columns).items()}
    assert list(blocks) == ["motion", "compcor", "cosine", "wm_csf", "global_signal"]
    budget = dof_budget(n_time, T_R, sample_mask=kept, high_pass=0.01, low_pass=0.08, detrend=True,
                        filter="dct", blocks=blocks)
    spent = sum(v for k, v in budget.items() if k not in ("n_kept", "dof"))
    assert budget["n_kept"] == kept.size
    assert budget["n_kept"] - spent == pytest.approx(budget["dof"], abs=1e-9)
    full = build_cleaning_operator(n_time, T_R, confounds.to_numpy(), kept, 0.01, 0.08)
    assert budget["dof"] == pytest.approx(correlation_dof(full), abs=1e-9)
    assert budget["motion"] == pytest.approx(3, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Runs the data cannot answer are excluded, with the reason and the numbers


def _write_run(tmp_path, n_time, rng):
    shape = (6, 6, 6)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    brain = np.zeros(shape, bool)
    brain[1:5, 1:5, 1:5] = True
    seed = np.zeros(shape, np.uint8)
    seed[2:4, 2:4, 2:4] = 1
    data = np.zeros(shape + (n_time,), np.float32)
    data[brain] = 1000 + rng.normal(size=(int(brain.sum()), n_time))
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((4.0, 4.0, 4.0, T_R))
    bold = tmp_path / "sub-01_task-x_bold.nii.gz"
    mask = tmp_path / "sub-01_task-x_mask.nii.gz"
    nib.save(img, bold)
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), mask)
    return bold, mask, {"pgACC": nib.Nifti1Image(seed, affine)}


def test_run_below_min_dof_is_excluded_with_its_budget(tmp_path):
    rng = np.random.default_rng(8)
    n_time = 100
    bold, mask, seeds = _write_run(tmp_path, n_time, rng)
    confounds = pd.DataFrame(rng.normal(size=(n_time, 24)), columns=[f"trans_x{i}" for i in range(24)])
    rest = TaskConfig(name="rest", measures=("correlation",), high_pass=0.01, low_pass=0.08)
    result = compute_run_maps(bold, mask, seeds, t_r=T_R, task=rest, denoising=DenoisingConfig(min_dof=20),
                              confounds=confounds, sample_mask=None, run_name="sub-01_task-rest")
    assert result.excluded and not result.maps
    assert "below the minimum of 20 (min_dof)" in result.exclusion_reason
    assert "motion -" in result.exclusion_reason and "filter -" in result.exclusion_reason
    assert result.dof_budget["dof"] < 20
    # The same run with 6 regressors keeps enough.
    kept = compute_run_maps(bold, mask, seeds, t_r=T_R, task=rest, denoising=DenoisingConfig(min_dof=10),
                            confounds=confounds.iloc[:, :6], sample_mask=None, run_name="sub-01_task-rest")
    assert not kept.excluded
    assert kept.dof["correlation"] == pytest.approx(kept.dof_budget["dof"])


def test_identical_conditions_exclude_the_run(tmp_path):
    rng = np.random.default_rng(9)
    n_time = 200
    bold, mask, seeds = _write_run(tmp_path, n_time, rng)
    events = _events(identical=True)
    nback = TaskConfig(name="nback", measures=("gppi", "background"), high_pass=0.008, low_pass=None,
                       conditions=("0back", "2back"),
                       condition_contrasts=(Contrast("2backMinus0back", "2back - 0back", (("2back", 1.0), ("0back", -1.0))),))
    result = compute_run_maps(bold, mask, seeds, t_r=T_R, task=nback, denoising=DenoisingConfig(min_dof=0.0),
                              confounds=None, sample_mask=None, events=events,
                              events_file="sub-01_task-nback_events.tsv", run_name="sub-01_task-nback")
    assert result.excluded and not result.maps
    assert "identical regressors" in result.exclusion_reason
    assert "sub-01_task-nback_events.tsv" in result.exclusion_reason
    assert "'0back' and '2back'" in result.exclusion_reason


def test_condition_censored_away_is_named():
    n_time = 200
    task = build_task_regressors(_events(), ["0back", "2back"], n_time, T_R)
    two_back = task["2back"].to_numpy() > 0.05 * task["2back"].max()
    kept = np.flatnonzero(~two_back)
    operator = build_cleaning_operator(n_time, T_R, None, kept, 0.008, None)
    prepared = pd.DataFrame(operator @ task.to_numpy(), columns=task.columns)
    reason = check_task_design(task, prepared, ["0back", "2back"], events_file="ev.tsv")
    assert "['2back'] in ev.tsv have (almost) no signal left after censoring" in reason
    # The uncensored design is fine.
    full = build_cleaning_operator(n_time, T_R, None, None, 0.008, None)
    assert check_task_design(task, pd.DataFrame(full @ task.to_numpy(), columns=task.columns),
                             ["0back", "2back"]) == ""


def test_budget_text_has_no_double_minus():
    from fcflow.firstlevel import format_dof_budget

    text = format_dof_budget({"n_kept": 196, "filter": 155.0, "motion": 24.0, "cosine": -1e-15, "dof": 12.0})
    assert text == "196 volumes kept; filter -155.0, motion -24.0, cosine -0.0 -> 12.0 dof"
