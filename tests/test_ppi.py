"""Tests for task regressors, gPPI and background FC (planted effects, statsmodels reference)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import signal as sp_signal

from fcflow.errors import InputDataError
from fcflow.ppi import (
    build_gppi_design,
    build_task_regressors,
    compute_background_fc,
    fit_gppi,
    parse_condition_contrast,
    t_to_z,
)

T_R = 2.0
N_TIME = 240
CONDITIONS = ["0back", "2back"]


def _events():
    """Alternating 30 s blocks of 0-back and 2-back separated by 20 s of fixation."""
    rows = []
    onset = 10.0
    for i in range(8):
        rows.append({"onset": onset, "duration": 30.0, "trial_type": CONDITIONS[i % 2]})
        onset += 50.0
    rows.append({"onset": 2.0, "duration": 4.0, "trial_type": "instructions"})
    return pd.DataFrame(rows)


def _seed(rng):
    sos = sp_signal.butter(3, [0.01, 0.1], btype="band", fs=1 / T_R, output="sos")
    seed = sp_signal.sosfiltfilt(sos, rng.normal(size=N_TIME + 100))[50:-50]
    return seed / seed.std()


def test_build_task_regressors():
    task = build_task_regressors(_events(), CONDITIONS, N_TIME, T_R, ignore_conditions=["instructions"])
    assert list(task.columns) == CONDITIONS
    assert task.shape == (N_TIME, 2)
    # The 2-back regressor peaks during 2-back blocks (60-90 s) and is ~0 before the first.
    times = np.arange(N_TIME) * T_R
    assert task["2back"][(times > 70) & (times < 90)].min() > 0.5 * task["2back"].max()
    assert abs(task["2back"][times < 50]).max() < 1e-3
    with_derivative = build_task_regressors(_events(), CONDITIONS, N_TIME, T_R, "spm + derivative",
                                            ignore_conditions=["instructions"])
    assert list(with_derivative.columns) == ["0back", "0back_derivative", "2back", "2back_derivative"]


def test_build_task_regressors_errors():
    events = _events()
    kwargs = dict(events_file="sub-01_task-nback_events.tsv")
    with pytest.raises(InputDataError, match=r"unknown trial types \['instructions'\] in sub-01_task-nback_events\.tsv"):
        build_task_regressors(events, CONDITIONS, N_TIME, T_R, **kwargs)
    with pytest.raises(InputDataError, match=r"Got no events of \['1back'\] in sub-01_task-nback_events\.tsv"):
        build_task_regressors(events, [*CONDITIONS, "1back"], N_TIME, T_R,
                              ignore_conditions=["instructions"], **kwargs)
    with pytest.raises(InputDataError, match=r"'events' must lie within the run \(100 volumes x 2 s = 200 s\). Got 4 events in sub-01_task-nback_events\.tsv"):
        build_task_regressors(events, CONDITIONS, 100, T_R, ignore_conditions=["instructions"], **kwargs)
    with pytest.raises(InputDataError, match=r"'events' must have columns onset, duration and trial_type.*missing \['trial_type'\]"):
        build_task_regressors(events.drop(columns="trial_type"), CONDITIONS, N_TIME, T_R, **kwargs)
    bad = events.copy()
    bad.loc[1, "onset"] = np.nan
    with pytest.raises(InputDataError, match=r"finite onsets.*Got 1 invalid rows in sub-01_task-nback_events\.tsv \(first: row 1\)"):
        build_task_regressors(bad, CONDITIONS, N_TIME, T_R, **kwargs)


def _planted_dataset(rng, ppi_2back=0.8, n_voxels=50):
    task = build_task_regressors(_events(), CONDITIONS, N_TIME, T_R, ignore_conditions=["instructions"])
    seed = _seed(rng)
    confounds = np.cumsum(rng.normal(size=(N_TIME, 3)), axis=0) * 0.1
    centred = seed - seed.mean()
    interaction = centred * task["2back"].to_numpy()
    truth = np.zeros(n_voxels)
    truth[: n_voxels // 2] = ppi_2back
    data = (
        500
        + np.outer(task["0back"], rng.uniform(0, 2, n_voxels))
        + np.outer(task["2back"], rng.uniform(0, 3, n_voxels))
        + np.outer(seed, rng.uniform(0.2, 0.6, n_voxels))
        + np.outer(interaction, truth)
        + confounds @ rng.normal(size=(3, n_voxels))
        + rng.normal(size=(N_TIME, n_voxels)) * 0.5
    )
    return data.astype(np.float32), seed, task, confounds, truth


def test_gppi_recovers_planted_interaction_and_matches_statsmodels():
    rng = np.random.default_rng(0)
    data, seed, task, confounds, truth = _planted_dataset(rng)
    design = build_gppi_design(seed, task, confounds)
    assert list(design.columns[:5]) == ["0back", "2back", "seed", "ppi_0back", "ppi_2back"]
    assert design.columns[-1] == "constant"
    result = fit_gppi(data, design, {"2back-0back": "2back - 0back"})
    assert result.dof == N_TIME - design.shape[1]

    # Planted effect recovered; no effect where none was planted.
    beta, t = result.beta["ppi_2back"], result.t["ppi_2back"]
    standard_error = beta / t
    assert np.all(np.abs(beta[:25] - 0.8) < 4 * standard_error[:25])
    assert abs(beta[:25].mean() - 0.8) < 0.05
    assert np.all(np.abs(beta[25:]) < 4 * standard_error[25:])
    assert result.z["ppi_2back"][:25].min() > 3
    assert np.abs(result.z["ppi_0back"]).max() < 4
    assert result.z["2back-0back"][:25].min() > 3

    # statsmodels OLS as the independent reference at sampled voxels.
    for voxel in [0, 7, 30, 49]:
        fit = sm.OLS(data[:, voxel].astype(np.float64), design.to_numpy()).fit()
        i2, i0 = design.columns.get_loc("ppi_2back"), design.columns.get_loc("ppi_0back")
        assert abs(result.beta["ppi_2back"][voxel] - fit.params[i2]) < 1e-4
        assert abs(result.t["ppi_2back"][voxel] - fit.tvalues[i2]) < 1e-4
        contrast = np.zeros(design.shape[1])
        contrast[i2], contrast[i0] = 1, -1
        t_test = fit.t_test(contrast)
        assert abs(result.t["2back-0back"][voxel] - float(np.squeeze(t_test.tvalue))) < 1e-4
        assert abs(result.beta["2back-0back"][voxel] - float(np.squeeze(t_test.effect))) < 1e-4
        assert fit.df_resid == result.dof


def test_gppi_with_sample_mask():
    rng = np.random.default_rng(1)
    data, seed, task, confounds, _ = _planted_dataset(rng)
    design = build_gppi_design(seed, task, confounds)
    keep = np.setdiff1d(np.arange(N_TIME), [0, 1, 100, 101, 102])
    result = fit_gppi(data, design, sample_mask=keep)
    fit = sm.OLS(data[keep, 3].astype(np.float64), design.to_numpy()[keep]).fit()
    i2 = design.columns.get_loc("ppi_2back")
    assert result.dof == fit.df_resid
    assert abs(result.t["ppi_2back"][3] - fit.tvalues[i2]) < 1e-4


def test_interaction_beta_does_not_depend_on_centring():
    rng = np.random.default_rng(2)
    data, seed, task, confounds, _ = _planted_dataset(rng)
    shifted = build_gppi_design(seed + 100.0, task, confounds)
    plain = build_gppi_design(seed, task, confounds)
    a = fit_gppi(data, shifted).beta["ppi_2back"]
    b = fit_gppi(data, plain).beta["ppi_2back"]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_background_fc_removes_task_coactivation():
    rng = np.random.default_rng(3)
    task = build_task_regressors(_events(), CONDITIONS, N_TIME, T_R, ignore_conditions=["instructions"])
    evoked = task.to_numpy() @ np.array([1.0, 2.0])
    intrinsic = _seed(rng)
    seed = 3 * evoked + intrinsic + rng.normal(size=N_TIME) * 0.3
    coactivated = 3 * evoked + rng.normal(size=N_TIME)  # shares only the task with the seed
    connected = intrinsic + rng.normal(size=N_TIME) * 0.5  # shares only the intrinsic signal
    data = (np.column_stack([coactivated, connected]) + 800).astype(np.float32)
    raw = np.corrcoef(seed, coactivated)[0, 1]
    r, z = compute_background_fc(data, seed, task)
    assert raw > 0.5
    assert abs(r[0]) < 0.15
    assert r[1] > 0.6
    # Reference: residuals from statsmodels, then np.corrcoef.
    x = np.column_stack([task.to_numpy(), np.ones(N_TIME)])
    res_seed = sm.OLS(seed, x).fit().resid
    for v in range(2):
        res_voxel = sm.OLS(data[:, v].astype(np.float64), x).fit().resid
        assert r[v] == pytest.approx(np.corrcoef(res_seed, res_voxel)[0, 1], abs=1e-5)
    np.testing.assert_allclose(z, np.arctanh(r), rtol=1e-5)


def test_background_fc_with_confounds_and_mask():
    rng = np.random.default_rng(4)
    data, seed, task, confounds, _ = _planted_dataset(rng, n_voxels=6)
    keep = np.setdiff1d(np.arange(N_TIME), [5, 6, 7])
    r, _ = compute_background_fc(data, seed, task, confounds, sample_mask=keep)
    x = np.column_stack([task.to_numpy(), confounds, np.ones(N_TIME)])[keep]
    res_seed = sm.OLS(seed[keep], x).fit().resid
    for v in range(6):
        res_voxel = sm.OLS(data[keep, v].astype(np.float64), x).fit().resid
        assert r[v] == pytest.approx(np.corrcoef(res_seed, res_voxel)[0, 1], abs=1e-5)


def test_contrast_parsing():
    assert list(parse_condition_contrast("2back - 0back", CONDITIONS)) == [-1.0, 1.0]
    assert list(parse_condition_contrast("0.5*2back+0.5*0back", CONDITIONS)) == [0.5, 0.5]
    with pytest.raises(InputDataError, match=r"'contrasts' must be sums of conditions \['0back', '2back'\].*Got '2back - 1back'"):
        parse_condition_contrast("2back - 1back", CONDITIONS)


def test_t_to_z():
    np.testing.assert_allclose(t_to_z(np.array([0.0, 2.0, -2.0]), 1e6), [0.0, 2.0, -2.0], atol=1e-4)
    assert t_to_z(np.array([-40.0]), 30)[0] < -8  # no underflow to -inf or 0 for large |t|
    assert np.isfinite(t_to_z(np.array([-40.0]), 30)[0])


def test_gppi_design_errors():
    rng = np.random.default_rng(5)
    task = build_task_regressors(_events(), CONDITIONS, N_TIME, T_R, ignore_conditions=["instructions"])
    with pytest.raises(InputDataError, match=r"'seed_signal' must have shape \(240,\)"):
        build_gppi_design(np.ones(10), task)
    with pytest.raises(NotImplementedError, match=r"'deconvolve' must be False"):
        build_gppi_design(_seed(rng), task, deconvolve=True)
    with pytest.raises(InputDataError, match=r"'conditions' must be columns of the task regressors"):
        build_gppi_design(_seed(rng), task, conditions=["1back"])
    with pytest.raises(InputDataError, match=r"'confounds' must have one row per volume \(240\)"):
        build_gppi_design(_seed(rng), task, np.ones((10, 2)))
    design = build_gppi_design(_seed(rng), task)
    with pytest.raises(InputDataError, match=r"'design' must have one row per volume"):
        fit_gppi(np.ones((10, 3), np.float32), design)
    with pytest.raises(InputDataError, match=r"'design' must contain seed x condition columns"):
        fit_gppi(np.ones((N_TIME, 3), np.float32), task)
