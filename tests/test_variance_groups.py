"""Variance groups: Winkler's v and G against independent computations, and their permutation null."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage, stats

from fcflow.permutation import permutation_test
from fcflow.stats import compute_t, f_contrast_over_groups, fit_ols, make_group_design, parse_contrast, t_to_z

LEVELS = ["placebo", "ketamine", "lamotrigine_ketamine"]
SHAPE = (7, 8, 9)


def _mask():
    mask = np.ones(SHAPE, bool)
    mask[0] = False
    mask[:, :2, :3] = False
    return mask


def _heteroscedastic_maps(rng, groups, mask, sd):
    """Smooth unit fields, each group scaled by its own standard deviation."""
    fields = [ndimage.gaussian_filter(rng.standard_normal(mask.shape), 1.0)[mask] for _ in groups]
    data = np.stack(fields)
    data /= data.std()
    return (data * np.array([sd[g] for g in groups])[:, None]).astype(np.float32)


@pytest.fixture
def hetero_study():
    rng = np.random.default_rng(11)
    groups = np.repeat(LEVELS, [9, 5, 7])
    covariates = pd.DataFrame({"age": rng.uniform(20, 50, groups.size)})
    design = make_group_design(groups, LEVELS, covariates)
    mask = _mask()
    data = _heteroscedastic_maps(rng, groups, mask, {"placebo": 1.0, "ketamine": 2.5, "lamotrigine_ketamine": 0.7})
    data[groups == "ketamine"] += 0.5
    return design, data, mask, groups


# --------------------------------------------------------------------------------------------
# Independent computation: statsmodels OLS and WLS, one voxel at a time
# --------------------------------------------------------------------------------------------
def _winkler_reference(y, design, contrast, groups):
    """v or G (Winkler et al. 2014, table 2) and dof at one voxel, from statsmodels fits.

    psi is the OLS estimate; the weights are residual_dof_g / RSS_g of the OLS residuals; the
    variance of the contrast comes from statsmodels WLS's (M' W M)^-1. v's dof is Satterthwaite's
    with the derivative of the variance taken numerically; G's dof is Winkler's formula.
    """
    import statsmodels.api as sm

    matrix = np.asarray(design, dtype=float)
    ols = sm.OLS(y, matrix).fit()
    hat = matrix @ np.linalg.pinv(matrix)
    leverage_free = 1.0 - np.diag(hat)
    names = sorted(set(groups))
    members = [np.asarray(groups) == g for g in names]
    residual_dof = np.array([leverage_free[m].sum() for m in members])
    rss = np.array([np.sum(ols.resid[m] ** 2) for m in members])
    variances = rss / residual_dof
    weights = np.zeros(len(y))
    for m, v in zip(members, variances):
        weights[m] = 1.0 / v
    wls = sm.WLS(y, matrix, weights=weights).fit()
    cov = wls.normalized_cov_params  # (M' W M)^-1
    c = np.atleast_2d(contrast)
    effect = c @ ols.params
    if c.shape[0] == 1:
        contrast_variance = float((c @ cov @ c.T)[0, 0])
        v = float(effect[0] / np.sqrt(contrast_variance))

        def variance_of(sigma2):
            w = np.zeros(len(y))
            for m, s2 in zip(members, sigma2):
                w[m] = 1.0 / s2
            return float((c @ np.linalg.inv(matrix.T @ (w[:, None] * matrix)) @ c.T)[0, 0])

        gradient = []
        for g in range(len(names)):
            step = variances.copy()
            step[g] *= 1 + 1e-6
            gradient.append((variance_of(step) - contrast_variance) / (variances[g] * 1e-6))
        spread = sum((gradient[g] * variances[g]) ** 2 / residual_dof[g] for g in range(len(names)))
        return v, contrast_variance**2 / spread
    s = c.shape[0]
    quadratic = float(effect @ np.linalg.inv(c @ cov @ c.T) @ effect)
    trace_parts = np.array([weights[m].sum() for m in members])
    spread = np.sum((1 - trace_parts / trace_parts.sum()) ** 2 / residual_dof)
    correction = 1 + 2 * (s - 1) / (s * (s + 2)) * spread
    return quadratic / (s * correction), s * (s + 2) / (3 * spread)


def test_v_and_its_dof_equal_statsmodels_wls_at_sampled_voxels(hetero_study):
    design, data, mask, groups = hetero_study
    contrast = parse_contrast("ketamine - placebo", design.columns)
    result = permutation_test(
        data, design, contrast, n_permutations=1, inference=("maxt",), variance_groups=groups,
        precision="float64",
    )  # fmt: skip
    assert result.stat_type == "v" and result.zstat and result.variance_groups == tuple(sorted(LEVELS))
    for voxel in np.random.default_rng(0).choice(data.shape[1], 12, replace=False):
        v, dof = _winkler_reference(data[:, voxel].astype(float), design, contrast, groups)
        assert result.stat[voxel] == pytest.approx(v, rel=1e-7)
        assert result.dof_map[voxel] == pytest.approx(dof, rel=1e-4)
        assert result.z[voxel] == pytest.approx(float(t_to_z(v, dof)), rel=1e-4)


def test_g_and_its_dof_equal_statsmodels_wls_at_sampled_voxels(hetero_study):
    design, data, mask, groups = hetero_study
    matrix = f_contrast_over_groups(LEVELS, design.columns)
    result = permutation_test(
        data, design, matrix, n_permutations=1, inference=("maxt",), variance_groups=groups,
        precision="float64",
    )  # fmt: skip
    assert result.stat_type == "G"
    for voxel in np.random.default_rng(1).choice(data.shape[1], 12, replace=False):
        g, dof = _winkler_reference(data[:, voxel].astype(float), design, matrix, groups)
        assert result.stat[voxel] == pytest.approx(g, rel=1e-7)
        assert result.dof_map[voxel] == pytest.approx(dof, rel=1e-7)
        tail = stats.f.sf(g, 2, dof)
        assert result.z[voxel] == pytest.approx(stats.norm.isf(tail), rel=1e-6, abs=1e-9)


def test_two_groups_v_is_welch_t_and_three_groups_g_is_welch_anova():
    rng = np.random.default_rng(5)
    mask = _mask()
    two = np.repeat(["a", "b"], [10, 4])
    data = _heteroscedastic_maps(rng, two, mask, {"a": 1.0, "b": 2.5}).astype(float)
    result = permutation_test(
        data, make_group_design(two, ["a", "b"]), "b - a", n_permutations=1, inference=("maxt",),
        variance_groups=two, precision="float64",
    )  # fmt: skip
    welch = stats.ttest_ind(data[two == "b"], data[two == "a"], equal_var=False)
    np.testing.assert_allclose(result.stat, welch.statistic, rtol=1e-8)
    np.testing.assert_allclose(result.dof_map, welch.df, rtol=1e-8)

    three = np.repeat(LEVELS, [10, 4, 6])
    data = _heteroscedastic_maps(rng, three, mask, dict(zip(LEVELS, (1.0, 2.5, 0.8)))).astype(float)
    design = make_group_design(three, LEVELS)
    result = permutation_test(
        data, design, f_contrast_over_groups(LEVELS, design.columns), n_permutations=1,
        inference=("maxt",), variance_groups=three, precision="float64",
    )  # fmt: skip
    anova = stats.f_oneway(*(data[three == g] for g in LEVELS), equal_var=False)
    np.testing.assert_allclose(result.stat, anova.statistic, rtol=1e-8)
    np.testing.assert_allclose(-np.log(stats.norm.sf(result.z)), -np.log(anova.pvalue), rtol=1e-6)


def _v_brute_force(data, design, contrast, groups, rows, stat="t", scheme="permute"):
    """Freedman-Lane by refitting: permute design rows and their variance group labels, or flip signs."""
    matrix = design.to_numpy()
    c = np.atleast_2d(contrast)
    c_perp = np.linalg.svd(c, full_matrices=True)[2][c.shape[0] :].T
    nuisance = matrix @ c_perp
    residuals = data - nuisance @ np.linalg.lstsq(nuisance, data, rcond=None)[0]
    groups = np.asarray(groups)
    z_maps = []
    for row in rows:
        if scheme == "permute":
            permuted, labels = pd.DataFrame(matrix[row]), groups[row]
        else:
            permuted, labels = pd.DataFrame(matrix * row[:, None]), groups
        values = [_winkler_reference(residuals[:, v], permuted, c, labels) for v in range(data.shape[1])]
        value, dof = np.array(values).T
        if stat == "t":
            z_maps.append(t_to_z(value, dof))
        else:
            z_maps.append(stats.norm.isf(stats.f.sf(value, c.shape[0], dof)))
    return np.array(z_maps)


@pytest.mark.parametrize("kind, scheme", [("t", "auto"), ("F", "auto"), ("t", "permute"), ("F", "permute")])
def test_permutation_null_equals_brute_force_refits(hetero_study, kind, scheme):
    design, data, mask, groups = hetero_study
    data = data[:, :40].astype(float)  # the brute force refits every voxel with statsmodels
    contrast = (parse_contrast("ketamine - placebo", design.columns) if kind == "t"
                else f_contrast_over_groups(LEVELS, design.columns))  # fmt: skip
    result = permutation_test(
        data, design, contrast, n_permutations=6, random_seed=3, inference=("maxt",),
        variance_groups=groups, precision="float64", batch_size=4, scheme=scheme, residuals="freedman_lane",
    )  # fmt: skip
    # with variance groups "auto" flips signs: each subject keeps its own variance
    assert result.scheme == ("sign_flip" if scheme == "auto" else "permute")
    z_maps = _v_brute_force(data, design, contrast, groups, result.permutations, kind, result.scheme)
    np.testing.assert_allclose(z_maps[0], result.z, rtol=1e-5)
    null = np.abs(z_maps).max(axis=1) if kind == "t" else z_maps.max(axis=1)
    np.testing.assert_allclose(result.null_max["maxt"], null, rtol=1e-5)


def test_float32_null_close_to_float64(hetero_study):
    design, data, mask, groups = hetero_study
    kwargs = dict(n_permutations=40, random_seed=4, mask=mask, variance_groups=groups,
                  inference=("maxt", "cluster_mass", "tfce"))  # fmt: skip
    single = permutation_test(data, design, "ketamine - placebo", **kwargs)
    double = permutation_test(data, design, "ketamine - placebo", precision="float64", **kwargs)
    np.testing.assert_array_equal(single.stat, double.stat)
    np.testing.assert_allclose(single.null_max["maxt"], double.null_max["maxt"], rtol=1e-4)
    np.testing.assert_allclose(single.null_max["tfce"], double.null_max["tfce"], rtol=1e-3)
    np.testing.assert_allclose(single.logp_fwe["maxt"], double.logp_fwe["maxt"], atol=0.05)


def test_identity_equivalent_permutations_count_as_ties():
    # no covariates: swapping two subjects of one group is the identity; p must count it
    rng = np.random.default_rng(2)
    groups = np.repeat(LEVELS, [6, 5, 7])
    mask = _mask()
    data = _heteroscedastic_maps(rng, groups, mask, dict(zip(LEVELS, (1.0, 2.0, 1.0))))
    swap = np.arange(groups.size)
    swap[[0, 1]] = [1, 0]
    design = make_group_design(groups, LEVELS)
    result = permutation_test(
        data, design, "ketamine - placebo", permutations=np.stack([swap] * 3), scheme="permute",
        inference=("maxt",), variance_groups=groups,
    )  # fmt: skip
    np.testing.assert_array_equal(result.p_uncorrected, 1.0)
    np.testing.assert_allclose(result.logp_fwe["maxt"][np.argmax(np.abs(result.z))], 0.0, atol=1e-12)
    # flipping every sign negates v: a tie of |v| for a two-sided test
    flipped = permutation_test(
        data, design, "ketamine - placebo", permutations=-np.ones((3, groups.size)),
        inference=("maxt",), variance_groups=groups,
    )  # fmt: skip
    assert flipped.scheme == "sign_flip"
    np.testing.assert_array_equal(flipped.p_uncorrected, 1.0)


def test_one_variance_group_is_the_t_test(hetero_study):
    design, data, mask, groups = hetero_study
    kwargs = dict(n_permutations=30, random_seed=8, mask=mask, inference=("maxt", "cluster_mass", "tfce"))
    plain = permutation_test(data, design, "ketamine - placebo", **kwargs)
    single = permutation_test(data, design, "ketamine - placebo", variance_groups=["all"] * len(groups), **kwargs)
    assert single.stat_type == "t" and not single.zstat and single.dof_map is None
    np.testing.assert_array_equal(plain.stat, single.stat)
    for key in plain.null_max:
        np.testing.assert_array_equal(plain.null_max[key], single.null_max[key])


def test_zstat_for_f_keeps_max_and_size_p_and_moves_tfce_to_z(hetero_study):
    design, data, mask, _ = hetero_study
    matrix = f_contrast_over_groups(LEVELS, design.columns)
    kwargs = dict(n_permutations=40, random_seed=9, mask=mask, precision="float64",
                  inference=("maxt", "cluster_size", "tfce"), cluster_forming_p=0.05)  # fmt: skip
    on_f = permutation_test(data, design, matrix, zstat=False, **kwargs)
    on_z = permutation_test(data, design, matrix, zstat=True, **kwargs)
    np.testing.assert_allclose(on_z.logp_fwe["maxt"], on_f.logp_fwe["maxt"], atol=1e-12)
    np.testing.assert_allclose(on_z.logp_fwe["cluster_size"], on_f.logp_fwe["cluster_size"], atol=1e-12)
    np.testing.assert_allclose(on_z.null_max["maxt"], stats.norm.isf(stats.f.sf(on_f.null_max["maxt"], 2, on_f.dof)),
                               rtol=1e-8)
    assert on_z.cluster_forming_threshold == pytest.approx(stats.norm.isf(0.05))


def test_sign_flip_with_variance_groups_matches_brute_force(hetero_study):
    design, data, mask, groups = hetero_study
    data = data[:, :30].astype(float)
    contrast = parse_contrast("ketamine", design.columns)
    result = permutation_test(
        data, design, contrast, n_permutations=5, random_seed=1, inference=("maxt",),
        variance_groups=groups, precision="float64", residuals="freedman_lane",
    )  # fmt: skip
    assert result.scheme == "sign_flip"
    matrix = design.to_numpy()
    c_perp = np.linalg.svd(contrast[None], full_matrices=True)[2][1:].T
    nuisance = matrix @ c_perp
    residuals = data - nuisance @ np.linalg.lstsq(nuisance, data, rcond=None)[0]
    null = []
    for signs in result.permutations:
        flipped = pd.DataFrame(matrix * signs[:, None])
        values = [_winkler_reference(residuals[:, v], flipped, contrast, groups) for v in range(data.shape[1])]
        value, dof = np.array(values).T
        null.append(np.abs(t_to_z(value, dof)).max())
    np.testing.assert_allclose(result.null_max["maxt"], null, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variance_groups": ["a", "b"]}, "one label per subject"),
        ({"variance_groups": ["a"] * 20 + ["b"]}, "at least 2 subjects and leave residual variance"),
        ({"variance_groups": ["a"] * 10 + ["b"] * 11, "zstat": False}, "'zstat' must be True or None"),
    ],
)
def test_variance_group_errors(hetero_study, kwargs, match):
    design, data, mask, _ = hetero_study
    with pytest.raises(ValueError, match=match):
        permutation_test(data, design, "ketamine - placebo", n_permutations=5, inference=("maxt",), **kwargs)


# --------------------------------------------------------------------------------------------
# Design diagnostics
# --------------------------------------------------------------------------------------------
def test_design_diagnostics_flag_a_covariate_that_is_a_group_in_disguise():
    import statsmodels.api as sm

    from fcflow.stats import compute_design_diagnostics

    rng = np.random.default_rng(4)
    groups = np.repeat(LEVELS, 6)
    covariates = pd.DataFrame({
        "age": rng.uniform(20, 50, groups.size),
        "mean_fd": 0.1 + 0.2 * (groups == "ketamine") + rng.normal(0, 0.01, groups.size),
    })  # fmt: skip
    design = make_group_design(groups, LEVELS, covariates)
    contrast = parse_contrast("ketamine - placebo", design.columns)
    diagnostics = compute_design_diagnostics(design, LEVELS, contrast, max_vif=5)
    exog = design.to_numpy()
    for name in ("age", "mean_fd"):
        j = list(design.columns).index(name)
        fit = sm.OLS(exog[:, j], np.delete(exog, j, axis=1)).fit()  # the groups span the constant
        assert fit.k_constant == 1
        expected = 1.0 / (1.0 - fit.rsquared)
        assert diagnostics.vif[name] == pytest.approx(expected, rel=1e-8)
        for g in LEVELS:
            r = np.corrcoef(covariates[name], groups == g)[0, 1]
            assert diagnostics.group_correlation[name][g] == pytest.approx(r, rel=1e-10)
    # brute force: the contrast's variance factor c (M'M)^-1 c with and without the covariates
    full = contrast @ np.linalg.inv(exog.T @ exog) @ contrast
    groups_only = contrast[:3] @ np.linalg.inv(exog[:, :3].T @ exog[:, :3]) @ contrast[:3]
    assert diagnostics.contrast_inflation == pytest.approx(full / groups_only, rel=1e-10)
    assert diagnostics.vif["mean_fd"] > 20 and diagnostics.vif["age"] < 2
    warnings = diagnostics.warnings
    assert len(warnings) == 2
    assert "'mean_fd' has a variance inflation factor of" in warnings[0] and "'ketamine'" in warnings[0]
    assert "multiply the variance of the contrast" in warnings[1]
    assert diagnostics.to_dict()["Warnings"] == warnings
    assert compute_design_diagnostics(design, LEVELS, contrast, max_vif=1e6).warnings == []
    f_diag = compute_design_diagnostics(design, LEVELS, f_contrast_over_groups(LEVELS, design.columns))
    assert f_diag.contrast_inflation > 1


@pytest.mark.parametrize(
    "groups, contrast, match",
    [
        (["placebo", "nope"], [1, -1, 0, 0], "'group_columns' must be design columns"),
        (LEVELS, [1, -1, 0], "one weight per design column"),
        (LEVELS, [1, -1, 0, 1], "must weigh only the group columns"),
    ],
)
def test_design_diagnostics_errors(groups, contrast, match):
    from fcflow.stats import compute_design_diagnostics

    design = make_group_design(np.repeat(LEVELS, 3), LEVELS, pd.DataFrame({"age": np.arange(9.0)}))
    with pytest.raises(ValueError, match=match):
        compute_design_diagnostics(design, groups, contrast)


# --------------------------------------------------------------------------------------------
# Recipe keys
# --------------------------------------------------------------------------------------------
def _recipe_with(**inference):
    from fcflow.config import recipe_from_dict

    return recipe_from_dict({
        "study": {"name": "toy"},
        "groups": {"levels": LEVELS},
        "sessions": {"levels": ["baseline", "infusion"], "reference": "baseline"},
        "tasks": {"rest": {"measures": ["correlation"]}},
        "seeds": {"pgACC": {"areas": ["Area p24ab (pACC)"]}},
        "contrasts": {"sessions": ["infusion - baseline"], "groups": ["ketamine - placebo"]},
        "inference": inference,
    })  # fmt: skip


def test_recipe_inference_keys_have_documented_defaults():
    inference = _recipe_with().inference
    assert (inference.variance_groups, inference.group_variances, inference.max_vif, inference.fdr_p,
            inference.family_wise) == ("auto", "brain", 5.0, "parametric", "contrasts")
    chosen = _recipe_with(variance_groups="none", group_variances="voxel", max_vif=10, fdr_p="permutation",
                          family_wise="none").inference
    assert (chosen.variance_groups, chosen.group_variances, chosen.max_vif, chosen.fdr_p,
            chosen.family_wise) == ("none", "voxel", 10.0, "permutation", "none")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("variance_groups", "groups", "variance_groups"),
        ("max_vif", 0.5, "max_vif"),
        ("fdr_p", "perm", "fdr_p"),
        ("group_variances", "local", "group_variances"),
        ("family_wise", "all", "family_wise"),
    ],
)
def test_recipe_inference_keys_are_validated(key, value, match):
    from fcflow.errors import RecipeError

    with pytest.raises(RecipeError, match=match):
        _recipe_with(**{key: value})


def test_ter_braak_null_equals_brute_force_refits(hetero_study):
    design, data, mask, groups = hetero_study
    data = data[:, :30].astype(float)
    contrast = parse_contrast("ketamine - placebo", design.columns)
    result = permutation_test(
        data, design, contrast, n_permutations=5, random_seed=2, inference=("maxt",), scheme="sign_flip",
        variance_groups=groups, residuals="ter_braak", precision="float64",
    )  # fmt: skip
    assert result.settings["residuals"] == "ter_braak"
    matrix = design.to_numpy()
    full_residuals = data - matrix @ np.linalg.lstsq(matrix, data, rcond=None)[0]
    observed = [_winkler_reference(data[:, v], design, contrast, groups) for v in range(data.shape[1])]
    np.testing.assert_allclose(result.stat, np.array(observed)[:, 0], rtol=1e-7)
    null = [np.abs(result.z).max()]
    for signs in result.permutations[1:]:
        values = [_winkler_reference(signs * full_residuals[:, v], design, contrast, groups)
                  for v in range(data.shape[1])]  # fmt: skip
        value, dof = np.array(values).T
        null.append(np.abs(t_to_z(value, dof)).max())
    np.testing.assert_allclose(result.null_max["maxt"], null, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Family-wise error over tests
# --------------------------------------------------------------------------------------------
def test_family_wise_p_equals_brute_force_over_tests(hetero_study):
    from fcflow.permutation import combine_family_wise

    design, data, mask, groups = hetero_study
    data = data[:, :30].astype(float)
    tests = [("t", parse_contrast("ketamine - placebo", design.columns)),
             ("t", parse_contrast("lamotrigine_ketamine - placebo", design.columns)),
             ("F", f_contrast_over_groups(LEVELS, design.columns))]  # fmt: skip
    results = [
        permutation_test(data, design, c, n_permutations=6, random_seed=7, inference=("maxt",),
                         variance_groups=groups, precision="float64", residuals="freedman_lane")
        for _, c in tests
    ]  # fmt: skip
    family = combine_family_wise(results)
    null_maps = [
        _v_brute_force(data, design, c, groups, results[0].permutations, kind, "sign_flip") for kind, c in tests
    ]
    largest = np.max([np.abs(z).max(axis=1) if kind == "t" else z.max(axis=1)
                      for (kind, _), z in zip(tests, null_maps)], axis=0)  # fmt: skip
    for (kind, _), result, logp in zip(tests, results, family):
        observed = np.abs(result.z) if kind == "t" else result.z
        p = (largest[None, :] >= observed[:, None] * (1 - 1e-6)).mean(axis=1)
        np.testing.assert_allclose(logp["maxt"], -np.log10(p), rtol=1e-9)
        assert np.all(logp["maxt"] <= result.logp_fwe["maxt"] + 1e-12)


def test_family_wise_needs_shared_permutations_and_z(hetero_study):
    from fcflow.permutation import combine_family_wise

    design, data, mask, groups = hetero_study
    kwargs = dict(n_permutations=10, inference=("maxt",), variance_groups=groups)
    one = permutation_test(data, design, "ketamine - placebo", random_seed=1, **kwargs)
    other = permutation_test(data, design, "ketamine - placebo", random_seed=2, **kwargs)
    plain = permutation_test(data, design, "ketamine - placebo", random_seed=1, n_permutations=10, inference=("maxt",))
    with pytest.raises(ValueError, match="must use the same permutations"):
        combine_family_wise([one, other])
    with pytest.raises(ValueError, match="must have run on z"):
        combine_family_wise([one, plain])
    with pytest.raises(ValueError, match="at least one PermutationResult"):
        combine_family_wise([])



def test_weighted_freedman_lane_is_the_default_and_equals_brute_force_refits(hetero_study):
    import statsmodels.api as sm

    design, data, mask, groups = hetero_study
    values = data[:, ::9].astype(float)  # the brute force refits every voxel with statsmodels
    contrast = parse_contrast("ketamine - placebo", design.columns)
    result = permutation_test(
        values, design, contrast, n_permutations=5, random_seed=3, inference=("maxt",),
        variance_groups=groups, precision="float64",
    )  # fmt: skip
    assert result.settings["residuals"] == "weighted_freedman_lane" and result.scheme == "sign_flip"
    matrix = design.to_numpy().astype(float)
    # one weight per group for the whole map (unit-norm voxels)
    weights = _brain_wide_weights(values, matrix, groups)
    nuisance = matrix @ np.linalg.svd(contrast[None], full_matrices=True)[2][1:].T
    residuals = np.column_stack([sm.WLS(values[:, v], nuisance, weights=weights).fit().resid
                                 for v in range(values.shape[1])])  # fmt: skip
    null = []
    for signs in result.permutations:
        refit = [_winkler_reference(signs * residuals[:, v], design, contrast, groups) for v in range(values.shape[1])]
        value, dof = np.array(refit).T
        null.append(np.abs(t_to_z(value, dof)).max())
    np.testing.assert_allclose(result.null_max["maxt"], null, rtol=1e-5)
    np.testing.assert_allclose(null[0], np.abs(result.z).max(), rtol=1e-7)
    with pytest.raises(ValueError, match="needs two or more variance groups and sign flips"):
        permutation_test(values, design, contrast, n_permutations=5, inference=("maxt",), variance_groups=groups,
                         residuals="weighted_freedman_lane", scheme="permute")


def _brain_wide_weights(values, matrix, groups):
    """residual dof of each group over the median share of the full model's residual sum of squares."""
    full = values - matrix @ np.linalg.lstsq(matrix, values, rcond=None)[0]
    full /= np.linalg.norm(full, axis=0)
    free = 1.0 - np.diag(matrix @ np.linalg.pinv(matrix))
    weights = np.zeros(len(groups))
    for g in sorted(set(groups)):
        m = groups == g
        weights[m] = free[m].sum() / np.median((full[m] ** 2).sum(axis=0))
    return weights


def test_brain_wide_variances_give_statsmodels_wls_t_and_sign_flip_null(hetero_study):
    import statsmodels.api as sm

    design, data, mask, groups = hetero_study
    contrast = parse_contrast("ketamine - placebo", design.columns)
    result = permutation_test(
        data, design, contrast, n_permutations=6, random_seed=2, inference=("maxt",), variance_groups=groups,
        variance_estimate="brain", precision="float64",
    )  # fmt: skip
    assert result.stat_type == "t" and result.scheme == "sign_flip"
    assert result.settings["statistic"] == "wls-t" and result.variance_groups == tuple(sorted(LEVELS))
    matrix = design.to_numpy().astype(float)
    values = data.astype(float)
    weights = _brain_wide_weights(values, matrix, groups)
    # the ketamine group's SD is 2.5: its weight relative to placebo's is about 1 / 2.5 ** 2
    ratio = result.settings["group_weights"]["ketamine"] / result.settings["group_weights"]["placebo"]
    assert ratio == pytest.approx(weights[groups == "ketamine"][0] / weights[groups == "placebo"][0], rel=1e-9)
    assert 0.08 < ratio < 0.3
    for voxel in np.random.default_rng(3).choice(data.shape[1], 10, replace=False):
        fit = sm.WLS(values[:, voxel], matrix, weights=weights).fit()
        assert result.stat[voxel] == pytest.approx(float(fit.t_test(contrast).tvalue.squeeze()), rel=1e-7)
    # the null: sign flips of the weighted Freedman-Lane residuals, refitted by weighted least squares
    scale = np.sqrt(weights)[:, None]
    scaled, scaled_design = values * scale, matrix * scale
    nuisance = scaled_design @ np.linalg.svd(contrast[None], full_matrices=True)[2][1:].T
    residuals = scaled - nuisance @ np.linalg.lstsq(nuisance, scaled, rcond=None)[0]
    null = [np.abs(compute_t(fit_ols(signs[:, None] * residuals, scaled_design), contrast)).max()
            for signs in result.permutations]  # fmt: skip
    np.testing.assert_allclose(result.null_max["maxt"], null, rtol=1e-9)
    with pytest.raises(ValueError, match="'variance_estimate' must be 'voxel' or 'brain'"):
        permutation_test(data, design, contrast, n_permutations=2, inference=("maxt",), variance_estimate="local")


@pytest.mark.parametrize("seed", range(6))
def test_group_level_falls_back_to_one_variance_exactly_when_a_group_has_too_little_residual(seed, caplog):
    """Small groups with covariates (a high-motion study: 3/2/2 subjects, age, sex, mean FD) leave a
    group less than 0.5 residual dof: the group level must fall back (with a note) exactly when
    permutation_test would refuse the variance groups, instead of aborting."""

    rng = np.random.default_rng(seed)
    groups = ["placebo"] * 3 + ["ketamine"] * 2 + ["lamotrigine_ketamine"] * 2
    design = pd.DataFrame({g: [float(x == g) for x in groups] for g in dict.fromkeys(groups)})
    for name in ["age", "sex", "mean_fd"][: 1 + seed % 3]:
        design[name] = rng.normal(size=len(groups))
    data = rng.normal(size=(len(groups), 30))
    from fcflow.group.inference import variance_group_labels

    labels, note = variance_group_labels("auto", pd.Series(groups), "test", design)
    try:
        permutation_test(data, design, "ketamine - placebo", n_permutations=20, random_seed=0,
                         inference=("maxt",), variance_groups=groups, zstat=True)
        refused = False
    except ValueError as exc:
        assert "Each variance group must" in str(exc)
        refused = True
    assert (labels is None) == refused
    assert ("fell back to one common variance" in note) == refused
    if refused:
        assert "residual dof" in note and "fell back" in caplog.text
        # and the fallback runs
        permutation_test(data, design, "ketamine - placebo", n_permutations=20, random_seed=0,
                         inference=("maxt",), variance_groups=None)
