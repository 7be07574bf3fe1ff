"""Tests for seed signals and seed-to-voxel maps, including nilearn's documented recipe."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
from scipy import signal as sp_signal

from fcflow.connectivity import (
    compute_multiseed_connectivity,
    compute_rest_connectivity,
    compute_seed_to_voxel_map,
    correlate_with_operator,
    extract_seed_signal,
    fisher_z,
)
from fcflow.denoise import apply_cleaning_operator, build_cleaning_operator
from fcflow.errors import InputDataError
from fcflow.niftiio import read_masked_bold

T_R = 2.0


def _band_limited(rng, n_time, n_series, low=0.01, high=0.08):
    sos = sp_signal.butter(4, [low, high], btype="band", fs=1 / T_R, output="sos")
    return sp_signal.sosfiltfilt(sos, rng.normal(size=(n_time + 100, n_series)), axis=0)[50:-50]


def _synthetic_run(rng, n_time=200, n_voxels=300, n_confounds=8):
    """Raw float32 data on a 1000 baseline: network signal, confound leakage, drift, noise."""
    network = _band_limited(rng, n_time, 1)[:, 0]
    network /= network.std()
    loading = rng.uniform(-0.8, 0.8, n_voxels)
    loading[:10] = 1.0  # the seed
    confounds = np.cumsum(rng.normal(size=(n_time, n_confounds)), axis=0) * 0.2
    data = (
        1000
        + np.outer(network, loading) * 2
        + confounds @ rng.normal(size=(n_confounds, n_voxels))
        + np.linspace(0, 3, n_time)[:, None] * rng.normal(size=n_voxels)
        + rng.normal(size=(n_time, n_voxels)) * 2
    )
    seed = np.zeros(n_voxels, bool)
    seed[:10] = True
    return data.astype(np.float32), confounds, seed


def test_seed_to_voxel_map_matches_corrcoef():
    rng = np.random.default_rng(0)
    data, _, seed = _synthetic_run(rng)
    data[:, 20] = 7.0  # a constant voxel
    seed_signal = extract_seed_signal(data, seed)
    r = compute_seed_to_voxel_map(data, seed_signal)
    expected = np.array([np.corrcoef(seed_signal, data[:, v].astype(np.float64))[0, 1]
                         for v in range(data.shape[1]) if v != 20])
    np.testing.assert_allclose(np.delete(r, 20), expected, atol=2e-6)
    assert np.isnan(r[20])
    assert r.dtype == np.float32


@pytest.mark.parametrize(
    ("high_pass", "low_pass", "with_mask"),
    [(0.01, 0.08, False), (0.01, 0.08, True), (0.008, None, True), (None, None, False)],
)
def test_correlate_with_operator_matches_cleaned_corrcoef(high_pass, low_pass, with_mask):
    rng = np.random.default_rng(1)
    data, confounds, seed = _synthetic_run(rng)
    sample_mask = np.setdiff1d(np.arange(len(data)), [0, 1, 50, 51, 120]) if with_mask else None
    operator = build_cleaning_operator(len(data), T_R, confounds, sample_mask, high_pass, low_pass)
    cleaned = operator @ data.astype(np.float64)
    seed_signal = cleaned[:, seed].mean(axis=1)
    expected = np.corrcoef(np.column_stack([seed_signal, cleaned]).T)[0, 1:]
    weights = seed / seed.sum()
    r = correlate_with_operator(data, operator, weights)
    np.testing.assert_allclose(r, expected, atol=5e-6)
    # Two seeds at once.
    both = correlate_with_operator(data, operator, np.column_stack([weights, np.eye(len(seed))[5]]))
    assert both.shape == (2, data.shape[1])
    np.testing.assert_allclose(both[0], r, atol=2e-6)
    assert both[1, 5] == pytest.approx(1.0, abs=1e-5)


def test_correlate_with_operator_constant_and_drift_voxels():
    rng = np.random.default_rng(2)
    data, confounds, seed = _synthetic_run(rng)
    data[:, 30] = 1234.5
    data[:, 31] = (1000 + 0.5 * np.arange(len(data))).astype(np.float32)  # detrended away
    operator = build_cleaning_operator(len(data), T_R, confounds, None, 0.01, 0.08)
    r = correlate_with_operator(data, operator, seed / seed.sum())
    assert np.isnan(r[30]) and np.isnan(r[31])
    assert np.isfinite(np.delete(r, [30, 31])).all()


def test_compute_rest_connectivity_eigenvariate():
    rng = np.random.default_rng(3)
    data, confounds, seed = _synthetic_run(rng)
    result = compute_rest_connectivity(data, seed, T_R, confounds, signal="eigenvariate")
    operator = build_cleaning_operator(len(data), T_R, confounds, None, 0.01, 0.08)
    cleaned = operator @ data.astype(np.float64)
    eig = extract_seed_signal(cleaned, seed, "eigenvariate")
    np.testing.assert_allclose(result.seed_signal, eig, atol=1e-9)
    expected = np.corrcoef(np.column_stack([eig, cleaned]).T)[0, 1:]
    np.testing.assert_allclose(result.r, expected, atol=5e-6)
    # The eigenvariate follows the mean of the seed.
    assert np.corrcoef(eig, cleaned[:, seed].mean(axis=1))[0, 1] > 0.9


def test_multiseed_connectivity_equals_one_seed_at_a_time():
    rng = np.random.default_rng(4)
    data, confounds, seed = _synthetic_run(rng)
    other = np.zeros_like(seed)
    other[100:130] = True
    seeds = {"a": seed, "b": other}
    both = compute_multiseed_connectivity(data, seeds, T_R, confounds)
    assert list(both) == ["a", "b"]
    for name, mask in seeds.items():
        alone = compute_rest_connectivity(data, mask, T_R, confounds, seed_name=name)
        np.testing.assert_allclose(both[name].r, alone.r, rtol=0, atol=1e-7)
        np.testing.assert_allclose(both[name].seed_signal, alone.seed_signal)
        assert both[name].dof == alone.dof and both[name].n_volumes == alone.n_volumes
    operator = build_cleaning_operator(len(data), T_R, confounds, None, 0.01, 0.08)
    cleaned = operator @ data.astype(np.float64)
    expected = np.corrcoef(np.column_stack([cleaned[:, other].mean(axis=1), cleaned]).T)[0, 1:]
    np.testing.assert_allclose(both["b"].r, expected, atol=5e-6)
    with pytest.raises(InputDataError, match="'signal' of seed 'a' must be 'mean' or 'eigenvariate'. Got 'pca'"):
        compute_multiseed_connectivity(data, seeds, T_R, confounds, signal="pca")
    # each seed its own summary: the same as one seed at a time with that summary
    mixed = compute_multiseed_connectivity(data, seeds, T_R, confounds, signal={"a": "mean", "b": "eigenvariate"})
    alone = compute_rest_connectivity(data, seeds["b"], T_R, confounds, signal="eigenvariate", seed_name="b")
    np.testing.assert_allclose(mixed["b"].seed_signal, alone.seed_signal)
    np.testing.assert_allclose(mixed["a"].seed_signal, both["a"].seed_signal)
    with pytest.raises(InputDataError, match="'signal' of seed 'b' must be 'mean' or 'eigenvariate'. Got None"):
        compute_multiseed_connectivity(data, seeds, T_R, confounds, signal={"a": "mean"})
    with pytest.raises(InputDataError, match="Seed 'b' has 0 voxels inside the brain mask"):
        compute_multiseed_connectivity(data, {"a": seed, "b": np.zeros_like(seed)}, T_R)


def test_eigenvariate_scaling_and_sign_like_spm():
    rng = np.random.default_rng(4)
    component = rng.normal(size=50)
    weights = np.array([1.0, 2.0, 0.5, 1.5])
    seed_data = np.outer(component, weights) + 3.0
    eig = extract_seed_signal(seed_data, np.ones(4, bool), "eigenvariate")
    # Rank one: u1 s1 / sqrt(n) = centred component * ||w|| / sqrt(n).
    centred = component - component.mean()
    np.testing.assert_allclose(eig, centred * np.linalg.norm(weights) / 2.0, atol=1e-10)
    flipped = extract_seed_signal(-seed_data, np.ones(4, bool), "eigenvariate")
    np.testing.assert_allclose(flipped, -eig, atol=1e-10)


def test_fisher_z():
    r = np.array([0.0, 0.5, -0.5, 1.0, -1.0, np.nan])
    z = fisher_z(r)
    assert z.dtype == np.float32
    np.testing.assert_allclose(z[:3], np.arctanh(r[:3]), rtol=1e-6)
    assert np.isfinite(z[3:5]).all() and z[3] == pytest.approx(np.arctanh(1 - 1e-7), rel=1e-6)
    assert np.isnan(z[5])


def test_seed_errors():
    data = np.ones((20, 5), np.float32)
    with pytest.raises(InputDataError, match=r"Seed 'pgACC' has 0 voxels inside the brain mask of sub-07_ses-24h_task-rest"):
        extract_seed_signal(data, np.zeros(5, bool), seed_name="pgACC", run_name="sub-07_ses-24h_task-rest")
    with pytest.raises(InputDataError, match=r"'seed_mask_in_brain' must be a boolean array of shape \(5,\)"):
        extract_seed_signal(data, np.ones(4, bool))
    with pytest.raises(InputDataError, match=r"'signal' must be 'mean' or 'eigenvariate'"):
        extract_seed_signal(data, np.ones(5, bool), "median")
    with pytest.raises(InputDataError, match=r"'seed_signal' must vary over time"):
        compute_seed_to_voxel_map(data, np.ones(20))
    with pytest.raises(InputDataError, match=r"'seed_signal' must have shape \(20,\)"):
        compute_seed_to_voxel_map(data, np.ones(19))
    with pytest.raises(InputDataError, match=r"'seed_weights' must have one row per voxel \(5\)"):
        correlate_with_operator(data, np.eye(20), np.ones(4))
    with pytest.raises(InputDataError, match=r"The cleaned seed signal must vary over time"):
        correlate_with_operator(data, np.eye(20), np.ones(5) / 5)


# --------------------------------------------------------------------------------------------
# End to end against nilearn's documented seed-to-voxel recipe

SHAPE = (7, 8, 9)


def _write_image_run(tmp_path, rng, n_time=200):
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    brain = np.zeros(SHAPE, bool)
    brain[1:6, 1:7, 1:8] = True
    seed_img_data = np.zeros(SHAPE, np.int16)
    seed_img_data[2:4, 3:5, 3:5] = 1
    n_voxels = int(brain.sum())
    network = _band_limited(rng, n_time, 2)
    network /= network.std(axis=0)
    loadings = rng.uniform(-0.7, 0.7, size=(2, n_voxels))
    seed_in_brain = seed_img_data[brain] == 1
    loadings[0, seed_in_brain] = 1.0
    confounds = np.cumsum(rng.normal(size=(n_time, 6)), axis=0) * 0.2
    values = (
        1000
        + network @ loadings * 3
        + confounds @ rng.normal(size=(6, n_voxels))
        + np.linspace(0, 4, n_time)[:, None] * rng.normal(size=n_voxels)
        + rng.normal(size=(n_time, n_voxels)) * 2
    )
    data4d = np.zeros(SHAPE + (n_time,), np.float32)
    data4d[brain] = values.T
    bold_file = tmp_path / "sub-01_task-rest_bold.nii.gz"
    img = nib.Nifti1Image(data4d, affine)
    img.header.set_zooms((3.0, 3.0, 3.0, T_R))
    nib.save(img, bold_file)
    mask_img = nib.Nifti1Image(brain.astype(np.uint8), affine)
    seed_img = nib.Nifti1Image(seed_img_data, affine)
    return bold_file, mask_img, seed_img, confounds


def _nilearn_recipe(bold_file, mask_img, seed_img, confounds, sample_mask):
    from nilearn.maskers import NiftiLabelsMasker, NiftiMasker

    common = dict(detrend=True, standardize="zscore_sample", standardize_confounds=True,
                  low_pass=0.08, high_pass=0.01, t_r=T_R)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seed_masker = NiftiLabelsMasker(labels_img=seed_img, **common)
        seed_ts = seed_masker.fit_transform(str(bold_file), confounds=confounds, sample_mask=sample_mask)
        brain_masker = NiftiMasker(mask_img=mask_img, **common)
        brain_ts = brain_masker.fit_transform(str(bold_file), confounds=confounds, sample_mask=sample_mask)
    n = seed_ts.shape[0]
    return np.dot(brain_ts.T, seed_ts)[:, 0] / n, n


@pytest.mark.parametrize("with_mask", [False, True])
def test_end_to_end_against_nilearn_recipe(tmp_path, with_mask):
    rng = np.random.default_rng(5)
    bold_file, mask_img, seed_img, confounds = _write_image_run(tmp_path, rng)
    n_time = confounds.shape[0]
    # Non-steady-state head volumes only: nilearn 0.14.1's interpolation quirk (see
    # fcflow.denoise) does not arise, so both routes censor the same way.
    sample_mask = np.arange(3, n_time) if with_mask else None
    recipe_r, n = _nilearn_recipe(bold_file, mask_img, seed_img, confounds,
                                  None if sample_mask is None else sample_mask.copy())
    recipe_z = np.arctanh(recipe_r)

    data, info = read_masked_bold(bold_file, mask_img)
    seed_in_brain = (seed_img.get_fdata()[info.mask] == 1)
    # The reference recipe is nilearn's Butterworth signal.clean.
    result = compute_rest_connectivity(data, seed_in_brain, info.t_r, confounds, sample_mask,
                                       filter="butterworth")
    assert result.n_volumes == n

    # The literal recipe divides z-scored (ddof=1) products by n, shrinking r by (n - 1) / n:
    # near r = 0.99 (the seed's own voxels) that alone moves z by ~0.05. Up to that factor
    # the two routes agree to float32 precision.
    assert np.corrcoef(result.z, recipe_z)[0, 1] >= 0.999
    np.testing.assert_allclose(result.r * (n - 1) / n, recipe_r, atol=2e-5)
    pearson_recipe_z = np.arctanh(recipe_r * n / (n - 1))
    assert np.corrcoef(result.z, pearson_recipe_z)[0, 1] >= 0.999
    assert np.max(np.abs(result.z - pearson_recipe_z)) <= 0.01
    assert np.max(np.abs(result.z - pearson_recipe_z)) <= 1e-3
    # Away from r = 1 (|r| < 0.75, n = 200) the literal recipe is within 0.01 too.
    moderate = np.abs(recipe_r) < 0.75
    assert np.max(np.abs(result.z - recipe_z)[moderate]) <= 0.01
    assert 0.15 * n < result.dof < 0.35 * n


def test_apply_cleaning_operator_then_map_equals_fast_path():
    rng = np.random.default_rng(6)
    data, confounds, seed = _synthetic_run(rng)
    operator = build_cleaning_operator(len(data), T_R, confounds, None, 0.01, 0.08)
    cleaned = apply_cleaning_operator(operator, data)
    slow = compute_seed_to_voxel_map(cleaned, cleaned[:, seed].mean(axis=1, dtype=np.float64))
    fast = correlate_with_operator(data, operator, seed / seed.sum())
    np.testing.assert_allclose(fast, slow, atol=1e-5)
