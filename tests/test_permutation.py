"""Permutation engine: same numbers as nilearn's permuted_ols and as brute-force loops."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from fcflow.permutation import make_permutations, permutation_test
from fcflow.stats import (
    compute_f,
    compute_t,
    f_contrast_over_groups,
    fit_ols,
    make_group_design,
    parse_contrast,
    t_to_z,
)

LEVELS = ["placebo", "ketamine", "lamotrigine_ketamine"]
SHAPE = (7, 8, 9)


def _mask():
    mask = np.ones(SHAPE, bool)
    mask[0] = False
    mask[:, :2, :3] = False
    return mask


def _smooth_maps(rng, n_subjects, mask, sigma=1.0):
    maps = [
        ndimage.gaussian_filter(rng.standard_normal(mask.shape), sigma) for _ in range(n_subjects)
    ]
    data = np.stack([m[mask] for m in maps])
    return (data / data.std()).astype(np.float32)


@pytest.fixture
def study():
    rng = np.random.default_rng(3)
    groups = np.repeat(LEVELS, [6, 7, 8])
    covariates = pd.DataFrame({"age": rng.uniform(20, 50, groups.size)})
    design = make_group_design(groups, LEVELS, covariates)
    mask = _mask()
    data = _smooth_maps(rng, groups.size, mask)
    data[groups == "ketamine"] += 0.4
    return design, data, mask


# --------------------------------------------------------------------------------------------
# nilearn, same permutations
# --------------------------------------------------------------------------------------------
def _nilearn_shuffles(random_seed, n_perm, n_subjects, sign_flip):
    """The permutations nilearn's permuted_ols draws with n_jobs=1 (cumulative shuffles)."""
    from sklearn.utils import check_random_state

    chunk_seed = check_random_state(random_seed).randint(1, np.iinfo(np.int32).max - 1)
    rng = check_random_state(chunk_seed)
    current = np.ones(n_subjects, int) if sign_flip else np.arange(n_subjects)
    rows = []
    for _ in range(n_perm):
        if sign_flip:
            current = current * (rng.randint(2, size=(n_subjects, 1)) * 2 - 1)[:, 0]
        else:
            current = current[rng.permutation(n_subjects)]
        rows.append(current.copy())
    return np.array(rows)


def _nilearn_masker(mask):
    import nibabel as nib
    from nilearn.maskers import NiftiMasker

    return NiftiMasker(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4), dtype=np.uint8)).fit()


# nilearn's permuted_ols builds int64 label images internally and warns about them
@pytest.mark.filterwarnings("ignore:Data array used to create a new image contains 64-bit ints")
def test_same_numbers_as_nilearn_permuted_ols(study):
    from nilearn.mass_univariate import permuted_ols

    design, data, mask = study
    n_perm, seed = 40, 5
    # nilearn tests a column against confounds: give it the same model, re-parametrised so
    # that no confound is constant (a constant one would switch nilearn to sign flipping)
    tested = design["ketamine"] - design["placebo"]
    confounds = np.column_stack(
        [design["ketamine"] + design["placebo"], design["lamotrigine_ketamine"], design["age"]]
    )
    reference = permuted_ols(
        tested.to_numpy()[:, None], data.astype(float), confounding_vars=confounds,
        model_intercept=False, n_perm=n_perm, two_sided_test=True, random_state=seed, n_jobs=1,
        masker=_nilearn_masker(mask), tfce=True, threshold=0.01, verbose=0,
    )  # fmt: skip
    shuffles = _nilearn_shuffles(seed, n_perm, data.shape[0], sign_flip=False)
    result = permutation_test(
        data, design, "ketamine - placebo", permutations=shuffles, mask=mask,
        inference=("maxt", "cluster_mass", "cluster_size", "tfce"), cluster_forming_p=0.01,
        precision="float64",
    )  # fmt: skip
    assert result.scheme == "permute"
    np.testing.assert_allclose(result.stat, reference["t"][0], rtol=1e-10)
    np.testing.assert_allclose(result.null_max["maxt"][1:], reference["h0_max_t"][0], rtol=1e-10)
    np.testing.assert_allclose(result.logp_fwe["maxt"], reference["logp_max_t"][0], rtol=1e-12)
    np.testing.assert_allclose(result.tfce, reference["tfce"][0], rtol=1e-8)
    np.testing.assert_allclose(result.null_max["tfce"][1:], reference["h0_max_tfce"][0], rtol=1e-8)
    np.testing.assert_allclose(result.logp_fwe["tfce"], reference["logp_max_tfce"][0], rtol=1e-12)
    np.testing.assert_array_equal(result.null_max["cluster_size"][1:], reference["h0_max_size"][0])
    np.testing.assert_allclose(
        result.null_max["cluster_mass"][1:], reference["h0_max_mass"][0], rtol=1e-10
    )
    np.testing.assert_allclose(result.cluster_mass, reference["mass"][0], rtol=1e-10)
    # nilearn's cluster p leaves the observed out of its null: p = #(h0 >= x) / n_perm
    for name, key in (("cluster_mass", "h0_max_mass"), ("cluster_size", "h0_max_size")):
        observed = getattr(result, name)
        inside = observed > 0
        nilearn_count = (reference[key][0][None, :] >= observed[inside, None]).sum(axis=1)
        expected = -np.log10((nilearn_count + 1) / (n_perm + 1))
        np.testing.assert_allclose(result.logp_fwe[name][inside], expected, rtol=1e-12)


def test_sign_flips_same_as_nilearn_one_sample():
    from nilearn.mass_univariate import permuted_ols

    rng = np.random.default_rng(8)
    mask = _mask()
    data = _smooth_maps(rng, 13, mask) + 0.3
    age = rng.uniform(20, 50, 13)
    n_perm, seed = 30, 2
    reference = permuted_ols(
        np.ones((13, 1)), data.astype(float), confounding_vars=age[:, None] - age.mean(),
        model_intercept=False, n_perm=n_perm, two_sided_test=False, random_state=seed,
        n_jobs=1, masker=_nilearn_masker(mask), tfce=True, verbose=0,
    )  # fmt: skip
    design = pd.DataFrame({"mean": np.ones(13), "age": age - age.mean()})
    flips = _nilearn_shuffles(seed, n_perm, 13, sign_flip=True)
    result = permutation_test(
        data, design, "mean", permutations=flips, mask=mask, two_sided=False,
        inference=("maxt", "tfce"), precision="float64",
    )  # fmt: skip
    assert result.scheme == "sign_flip"
    np.testing.assert_allclose(result.stat, reference["t"][0], rtol=1e-10)
    np.testing.assert_allclose(result.null_max["maxt"][1:], reference["h0_max_t"][0], rtol=1e-10)
    np.testing.assert_allclose(result.logp_fwe["maxt"], reference["logp_max_t"][0], rtol=1e-12)
    np.testing.assert_allclose(result.null_max["tfce"][1:], reference["h0_max_tfce"][0], rtol=1e-8)


# --------------------------------------------------------------------------------------------
# Brute force
# --------------------------------------------------------------------------------------------
def _freedman_lane_loop(data, design, contrast, rows, scheme, stat="t"):
    """Refit the full model on shuffled nuisance residuals, one permutation at a time."""
    matrix = design.to_numpy()
    c = np.atleast_2d(contrast)
    c_perp = np.linalg.svd(c, full_matrices=True)[2][c.shape[0] :].T
    nuisance = matrix @ c_perp
    residuals = data - nuisance @ np.linalg.lstsq(nuisance, data, rcond=None)[0]
    maps = []
    for row in rows:
        permuted = matrix[row] if scheme == "permute" else matrix * row[:, None]
        fit = fit_ols(residuals, permuted)
        maps.append(compute_t(fit, c[0]) if stat == "t" else compute_f(fit, c))
    return np.array(maps)


def test_max_t_equals_brute_force(study):
    from nilearn.mass_univariate._utils import calculate_cluster_measures, calculate_tfce

    design, data, mask = study
    contrast = parse_contrast("ketamine - placebo", design.columns)
    result = permutation_test(
        data, design, contrast, n_permutations=30, random_seed=1, mask=mask,
        inference=("maxt", "cluster_mass", "tfce"), cluster_forming_p=0.05, batch_size=7,
        precision="float64",
    )  # fmt: skip
    maps = _freedman_lane_loop(data.astype(float), design, contrast, result.permutations, "permute")
    np.testing.assert_allclose(maps[0], result.stat, rtol=1e-10)
    null = np.abs(maps).max(axis=1)
    np.testing.assert_allclose(result.null_max["maxt"], null, rtol=1e-10)
    # the loop's identity map equals the observed one only to rounding: compare with 1e-9
    p_fwe = (null[None, :] >= np.abs(result.stat)[:, None] * (1 - 1e-9)).mean(axis=1)
    np.testing.assert_allclose(result.logp_fwe["maxt"], -np.log10(p_fwe), rtol=1e-12)
    p_unc = (np.abs(maps) >= np.abs(result.stat)[None, :] * (1 - 1e-9)).mean(axis=0)
    np.testing.assert_allclose(result.p_uncorrected, p_unc)

    structure = ndimage.generate_binary_structure(3, 1)
    volumes = np.zeros((*SHAPE, len(maps)))
    volumes[mask] = maps.T
    threshold = result.cluster_forming_threshold
    _, masses = calculate_cluster_measures(volumes, threshold, structure, two_sided_test=True)
    np.testing.assert_allclose(result.null_max["cluster_mass"], masses, rtol=1e-10)
    tfce = calculate_tfce(volumes, structure, two_sided_test=True)
    np.testing.assert_allclose(result.null_max["tfce"], np.abs(tfce).max(axis=(0, 1, 2)), rtol=1e-8)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_zstat_null_equals_brute_force_on_z(study, precision):
    """A z-scored t test (family-wise correction over tests) converts t to z by a table: same null."""
    from nilearn.mass_univariate._utils import calculate_cluster_measures, calculate_tfce

    design, data, mask = study
    contrast = parse_contrast("ketamine - placebo", design.columns)
    result = permutation_test(
        data, design, contrast, n_permutations=30, random_seed=5, mask=mask, zstat=True,
        inference=("maxt", "cluster_mass", "tfce"), cluster_forming_p=0.05, batch_size=7, precision=precision,
    )  # fmt: skip
    maps = _freedman_lane_loop(data.astype(float), design, contrast, result.permutations, "permute")
    z_maps = t_to_z(maps, result.dof)  # the exact conversion of every map
    rtol = 1e-6 if precision == "float64" else 1e-4
    np.testing.assert_allclose(result.z, z_maps[0], rtol=1e-10)
    np.testing.assert_allclose(result.null_max["maxt"], np.abs(z_maps).max(axis=1), rtol=rtol)
    p_unc = (np.abs(z_maps) >= np.abs(z_maps[0])[None, :] * (1 - 1e-9)).mean(axis=0)
    np.testing.assert_allclose(result.p_uncorrected, p_unc)
    volumes = np.zeros((*SHAPE, len(maps)))
    volumes[mask] = z_maps.T
    structure = ndimage.generate_binary_structure(3, 1)
    assert result.cluster_forming_threshold == pytest.approx(stats.norm.isf(0.025))
    _, masses = calculate_cluster_measures(volumes, result.cluster_forming_threshold, structure, two_sided_test=True)
    np.testing.assert_allclose(result.null_max["cluster_mass"], masses, rtol=rtol)
    tfce = calculate_tfce(volumes, structure, two_sided_test=True)
    np.testing.assert_allclose(result.null_max["tfce"], np.abs(tfce).max(axis=(0, 1, 2)), rtol=rtol)


def test_float32_engine_close_to_float64(study):
    design, data, mask = study
    kwargs = dict(n_permutations=50, random_seed=4, mask=mask, inference=("maxt", "cluster_size"))
    single = permutation_test(data, design, "ketamine - placebo", **kwargs)
    double = permutation_test(data, design, "ketamine - placebo", precision="float64", **kwargs)
    np.testing.assert_array_equal(single.stat, double.stat)
    np.testing.assert_allclose(single.null_max["maxt"], double.null_max["maxt"], rtol=1e-5)
    np.testing.assert_allclose(single.logp_fwe["maxt"], double.logp_fwe["maxt"], atol=0.05)


def test_f_contrast_equals_brute_force(study):
    design, data, mask = study
    matrix = f_contrast_over_groups(LEVELS, design.columns)
    result = permutation_test(
        data, design, matrix, n_permutations=25, random_seed=2, mask=mask,
        inference=("maxt", "cluster_size"), precision="float64",
    )  # fmt: skip
    assert result.stat_type == "F" and result.scheme == "permute" and not result.two_sided
    np.testing.assert_allclose(result.stat, compute_f(fit_ols(data, design), matrix), rtol=1e-8)
    maps = _freedman_lane_loop(
        data.astype(float), design, matrix, result.permutations, "permute", "F"
    )
    np.testing.assert_allclose(result.null_max["maxt"], maps.max(axis=1), rtol=1e-10)


def test_forced_permutation_without_a_constant_nuisance_matches_brute_force(study):
    # "ketamine" alone leaves no constant in the nuisance space: nothing is left out of the GEMM
    design, data, _ = study
    result = permutation_test(
        data, design, "ketamine", n_permutations=20, random_seed=5, scheme="permute",
        inference=("maxt",), precision="float64",
    )  # fmt: skip
    contrast = parse_contrast("ketamine", design.columns)
    maps = _freedman_lane_loop(data.astype(float), design, contrast, result.permutations, "permute")
    np.testing.assert_allclose(result.null_max["maxt"], np.abs(maps).max(axis=1), rtol=1e-10)


def test_threads_do_not_change_the_result(study):
    design, data, mask = study
    kwargs = dict(
        n_permutations=30, random_seed=6, mask=mask, batch_size=7,
        inference=("maxt", "cluster_mass", "cluster_size", "tfce"),
    )  # fmt: skip
    one = permutation_test(data, design, "ketamine - placebo", n_jobs=1, **kwargs)
    two = permutation_test(data, design, "ketamine - placebo", n_jobs=2, **kwargs)
    for key in one.null_max:
        np.testing.assert_array_equal(one.null_max[key], two.null_max[key])


def test_sign_flip_one_sample_matches_brute_force():
    rng = np.random.default_rng(9)
    mask = _mask()
    data = _smooth_maps(rng, 11, mask) + 0.5
    design = make_group_design(["ketamine"] * 11)
    result = permutation_test(
        data, design, "ketamine", n_permutations=40, random_seed=0, precision="float64",
        inference=("maxt",),
    )  # fmt: skip
    assert result.scheme == "sign_flip"
    assert set(np.unique(result.permutations)) == {-1, 1}
    assert (result.permutations[0] == 1).all()
    maps = _freedman_lane_loop(
        data.astype(float), design, np.array([1.0]), result.permutations, "sign_flip"
    )
    np.testing.assert_allclose(result.null_max["maxt"], np.abs(maps).max(axis=1), rtol=1e-10)
    assert result.logp_fwe["maxt"].max() == pytest.approx(-np.log10(1 / 40))


def test_auto_scheme_follows_the_tested_effect(study):
    design, data, _ = study
    kwargs = dict(n_permutations=3, inference=("maxt",))
    assert permutation_test(data, design, "ketamine", **kwargs).scheme == "sign_flip"
    assert permutation_test(data, design, "age", **kwargs).scheme == "permute"
    difference = permutation_test(data, design, "ketamine - placebo", **kwargs)
    assert difference.scheme == "permute"


# --------------------------------------------------------------------------------------------
# Planted truth
# --------------------------------------------------------------------------------------------
def test_cluster_mass_finds_a_planted_blob():
    rng = np.random.default_rng(21)
    shape = (12, 13, 14)
    mask = np.ones(shape, bool)
    groups = np.repeat(LEVELS, 8)
    design = make_group_design(groups, LEVELS)
    data = _smooth_maps(rng, groups.size, mask, sigma=1.5)
    ii, jj, kk = np.indices(shape)
    blob = ((ii - 4) ** 2 + (jj - 5) ** 2 + (kk - 6) ** 2 <= 6)[mask]
    data[np.ix_(groups == "ketamine", blob)] += 1.5
    result = permutation_test(
        data, design, "ketamine - placebo", n_permutations=200, random_seed=0, mask=mask,
        inference=("maxt", "cluster_mass", "cluster_size", "tfce"),
    )  # fmt: skip
    alpha = -np.log10(0.05)
    for name in ("cluster_mass", "cluster_size", "tfce"):
        assert result.logp_fwe[name][blob].max() > alpha, name
    assert result.logp_fwe["cluster_mass"][blob].mean() > alpha
    far = ((ii - 10) ** 2 + (jj - 11) ** 2 + (kk - 12) ** 2 <= 4)[mask]
    assert result.logp_fwe["cluster_mass"][far].max() < alpha
    assert result.stat[blob].mean() > 3


def test_reproducible_for_a_seed(study):
    design, data, mask = study
    kwargs = dict(n_permutations=20, mask=mask, inference=("maxt", "tfce"))
    first = permutation_test(data, design, "ketamine - placebo", random_seed=7, **kwargs)
    again = permutation_test(data, design, "ketamine - placebo", random_seed=7, **kwargs)
    other = permutation_test(data, design, "ketamine - placebo", random_seed=8, **kwargs)
    np.testing.assert_array_equal(first.permutations, again.permutations)
    for key in first.null_max:
        np.testing.assert_array_equal(first.null_max[key], again.null_max[key])
    assert not np.array_equal(first.permutations, other.permutations)
    np.testing.assert_array_equal(first.permutations[0], np.arange(data.shape[0]))


def test_make_permutations():
    rows = make_permutations(6, 10, random_seed=0)
    assert rows.shape == (10, 6)
    np.testing.assert_array_equal(rows[0], np.arange(6))
    np.testing.assert_array_equal(np.sort(rows, axis=1), np.tile(np.arange(6), (10, 1)))
    flips = make_permutations(6, 10, scheme="sign_flip", random_seed=0)
    assert set(np.unique(flips)) == {-1, 1} and (flips[0] == 1).all()
    with pytest.raises(ValueError, match="'n_permutations' must be at least 1"):
        make_permutations(6, 0)
    with pytest.raises(ValueError, match="'scheme' must be 'permute' or 'sign_flip'"):
        make_permutations(6, 3, scheme="shuffle")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(inference=("tfce",)), "'mask' must be given for cluster or TFCE inference"),
        (dict(inference=("voxel",)), "'inference' must be a non-empty subset"),
        (dict(scheme="bootstrap"), "'scheme' must be one of"),
        (dict(precision="float16"), "'precision' must be 'float32' or 'float64'"),
        (
            dict(inference=("tfce",), mask=np.ones((3, 4, 5), bool)),
            "one True voxel per data column",
        ),
        (dict(permutations=np.zeros((2, 3), int)), "'permutations' must have shape"),
        (dict(permutations=np.zeros((2, 21), int)), "must be a permutation of range"),
        (dict(cluster_forming_p=2.0), "'cluster_forming_p' must be in \\(0, 1\\)"),
        (dict(batch_size=0), "'batch_size' must be a positive integer"),
        (dict(n_jobs=0), "'n_jobs' must be a positive integer or None"),
    ],
)
def test_permutation_test_errors(study, kwargs, match):
    design, data, _ = study
    kwargs = {"inference": ("maxt",), **kwargs}
    with pytest.raises(ValueError, match=match):
        permutation_test(data, design, "ketamine - placebo", n_permutations=5, **kwargs)


def test_default_inference_is_all_four_and_needs_a_mask(study):
    design, data, mask = study
    result = permutation_test(data, design, "ketamine - placebo", n_permutations=4, mask=mask)
    assert set(result.logp_fwe) == {"maxt", "cluster_mass", "cluster_size", "tfce"}
    with pytest.raises(ValueError, match="'mask' must be given for cluster or TFCE inference"):
        permutation_test(data, design, "ketamine - placebo", n_permutations=4)


def test_input_errors(study):
    design, data, _ = study
    maxt = dict(n_permutations=5, inference=("maxt",))
    with pytest.raises(ValueError, match="The contrast must be estimable"):
        permutation_test(data, design.assign(copy=design["age"]), [0, 0, 0, 1, -1], **maxt)
    with pytest.raises(ValueError, match="rows of an F contrast must be linearly independent"):
        permutation_test(data, design, [[1, -1, 0, 0], [2, -2, 0, 0]], **maxt)
    with pytest.raises(ValueError, match="at least one residual degree of freedom"):
        subset = [0, 6, 13, 14]  # one or two per group: 4 subjects for 4 columns
        permutation_test(data[subset], design.iloc[subset], [1, -1, 0, 0], **maxt)
    bad = data.copy()
    bad[0, 4] = np.nan
    with pytest.raises(ValueError, match="The data must be finite. Got NaN or inf in 1 of"):
        permutation_test(bad, design, "ketamine - placebo", n_permutations=5)
    with pytest.raises(ValueError, match="needs a design DataFrame"):
        permutation_test(data, design.to_numpy(), "ketamine - placebo", n_permutations=5)
    with pytest.raises(ValueError, match="The F contrast's 2 rows must be estimable"):
        permutation_test(
            data, design, [[1, -1, 0, 0], [2, -2, 0, 1e-12]], n_permutations=5,
            inference=("maxt",),
        )  # fmt: skip
    with pytest.raises(ValueError, match="one weight per design column"):
        permutation_test(data, design, [1, -1], n_permutations=5)
    with pytest.raises(ValueError, match="must hold only -1 and 1"):
        permutation_test(
            data, design, "ketamine", permutations=np.zeros((2, 21)), inference=("maxt",)
        )


@pytest.mark.slow
def test_family_wise_error_rate_reduced_validation():
    """The reduced benchmarks/validate_fwe.py run, balanced groups: rates consistent with alpha = 0.05."""
    import importlib.util
    import sys
    from pathlib import Path

    from scipy import stats

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "validate_fwe.py"
    spec = importlib.util.spec_from_file_location("validate_fwe", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    n_repetitions = 30
    table = module.run_scenario(
        "balanced", repetitions=n_repetitions, n_permutations=60, shape=(12, 14, 12), seed=0,
        variance_groups=("none",),
    )  # fmt: skip
    assert list(table["inference"]) == ["maxt", "cluster_mass", "cluster_size", "tfce"]
    # Under H0 each count is Binomial(30, <= 0.05); reaching the bound has probability < 1e-3
    upper = stats.binom.ppf(0.999, n_repetitions, 0.05)
    for row in table.itertuples():
        assert row.rejections <= upper, row
