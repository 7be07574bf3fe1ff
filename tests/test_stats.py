"""Group design, contrasts and OLS maps, checked against statsmodels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from fcflow.stats import (
    ZTable,
    compute_f,
    compute_f_threshold,
    compute_t,
    compute_t_threshold,
    f_contrast_over_groups,
    f_to_z,
    fit_ols,
    make_group_design,
    parse_contrast,
    t_to_z,
)

LEVELS = ["placebo", "ketamine", "lamotrigine_ketamine"]


@pytest.fixture
def study():
    """7 + 8 + 9 subjects (axes differ so a swap fails), age and sex, 50 voxels."""
    rng = np.random.default_rng(7)
    groups = np.repeat(LEVELS, [7, 8, 9])
    rng.shuffle(groups)
    n = groups.size
    covariates = pd.DataFrame(
        {"age": rng.uniform(20, 50, n), "sex": rng.choice(["F", "M"], n)},
        index=[f"sub-{i:02d}" for i in range(n)],
    )
    design = make_group_design(groups, LEVELS, covariates)
    data = rng.standard_normal((n, 50)).astype(np.float32)
    data[groups == "ketamine"] += 0.8
    data += 0.03 * covariates["age"].to_numpy()[:, None]
    return groups, covariates, design, data


def test_make_group_design_columns_and_coding(study):
    groups, covariates, design, _ = study
    assert list(design.columns) == [*LEVELS, "age", "sex[M]"]
    assert list(design.index) == list(covariates.index)
    for level in LEVELS:
        np.testing.assert_array_equal(design[level], (groups == level).astype(float))
    np.testing.assert_allclose(design["age"], covariates["age"] - covariates["age"].mean())
    male = (covariates["sex"] == "M").to_numpy(float)
    np.testing.assert_allclose(design["sex[M]"], male - male.mean())
    np.testing.assert_allclose(design[["age", "sex[M]"]].mean(), 0, atol=1e-12)


def test_make_group_design_defaults_to_sorted_levels():
    design = make_group_design(["b", "a", "b"])
    assert list(design.columns) == ["a", "b"]
    assert list(design.index) == [0, 1, 2]


@pytest.mark.parametrize(
    ("groups", "levels", "covariates", "match"),
    [
        (["a", "c"], ["a", "b"], None, "'groups' must only hold levels"),
        (["a", "a"], ["a", "b"], None, "no subject in \\['b'\\]"),
        (["a", "b"], ["a", "a"], None, "must not repeat"),
        ([], None, None, "at least one subject"),
        (["a", "b", "b"], None, pd.DataFrame({"age": [1.0, np.nan, 3.0]}), "missing values"),
        (["a", "b", "b"], None, pd.DataFrame({"age": [1.0, 2.0]}), "one row per subject"),
        (["a", "b", "b"], None, pd.DataFrame({"sex": ["F", "F", "F"]}), "at least two levels"),
        (["a", "b", "b"], None, pd.DataFrame({"dose": [0.0, 1.0, 1.0]}), "full column rank"),
        (["a", "b", "b"], None, pd.DataFrame({"a": [0.0, 1.0, 3.0]}), "name of a group column"),
    ],
)
def test_make_group_design_errors(groups, levels, covariates, match):
    with pytest.raises(ValueError, match=match):
        make_group_design(groups, levels, covariates)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("ketamine - placebo", [-1, 1, 0, 0]),
        ("ketamine", [0, 1, 0, 0]),
        ("-placebo", [-1, 0, 0, 0]),
        ("0.5*ketamine + 0.5*lamotrigine_ketamine - placebo", [-1, 0.5, 0.5, 0]),
        ("2 * age", [0, 0, 0, 2]),
        ("ketamine - placebo + placebo", [0, 1, 0, 0]),
    ],
)
def test_parse_contrast(expression, expected):
    np.testing.assert_array_equal(parse_contrast(expression, [*LEVELS, "age"]), expected)


@pytest.mark.parametrize(
    ("expression", "match"),
    [
        ("ketamine - esketamine", "names 'esketamine', which is not a design column"),
        ("ketamine placebo", "must be a sum of terms"),
        ("ketamine - ", "must be a sum of terms"),
        ("", "at least one design column"),
        ("ketamine - ketamine", "non-zero weight"),
        ([1, 0], "one weight per design column"),
        ([0, 0, 0], "must have a non-zero weight"),
    ],
)
def test_parse_contrast_errors(expression, match):
    with pytest.raises(ValueError, match=match):
        parse_contrast(expression, LEVELS)


def test_f_contrast_over_groups():
    matrix = f_contrast_over_groups(LEVELS, [*LEVELS, "age"])
    np.testing.assert_array_equal(matrix, [[1, -1, 0, 0], [0, 1, -1, 0]])
    with pytest.raises(ValueError, match="at least two groups"):
        f_contrast_over_groups(["placebo"])
    with pytest.raises(ValueError, match="unknown \\['esketamine'\\]"):
        f_contrast_over_groups(["placebo", "esketamine"], LEVELS)


def test_t_and_f_match_statsmodels(study):
    sm = pytest.importorskip("statsmodels.api")
    _, _, design, data = study
    fit = fit_ols(data, design)
    contrast = parse_contrast("ketamine - placebo", design.columns)
    f_matrix = f_contrast_over_groups(LEVELS, design.columns)
    t_map = compute_t(fit, contrast)
    f_map = compute_f(fit, f_matrix)
    assert fit.dof == data.shape[0] - design.shape[1]
    for voxel in (0, 17, 49):
        result = sm.OLS(data[:, voxel].astype(float), design.to_numpy()).fit()
        assert abs(t_map[voxel] - float(result.t_test(contrast).tvalue.item())) < 1e-4
        assert abs(f_map[voxel] - float(result.f_test(f_matrix).fvalue)) < 1e-4
        np.testing.assert_allclose(fit.beta[:, voxel], result.params, rtol=1e-6, atol=1e-8)
        assert fit.residual_variance[voxel] == pytest.approx(result.scale, rel=1e-6)


def test_constant_voxel_gives_zero(study):
    _, _, design, data = study
    data = data.copy()
    data[:, 3] = 2.0 * design["ketamine"].to_numpy()
    fit = fit_ols(data, design)
    assert compute_t(fit, parse_contrast("ketamine - placebo", design.columns))[3] == 0
    assert compute_f(fit, f_contrast_over_groups(LEVELS, design.columns))[3] == 0


def test_fit_ols_errors(study):
    _, _, design, data = study
    with pytest.raises(ValueError, match="shape \\(n_subjects, n_voxels\\)"):
        fit_ols(data[0], design)
    with pytest.raises(ValueError, match="The design must have shape"):
        fit_ols(data[:5], design)
    with pytest.raises(ValueError, match="residual degree of freedom"):
        fit_ols(data[:5], np.eye(5))
    with pytest.raises(ValueError, match="The design must be finite"):
        fit_ols(data, design.to_numpy() * np.nan)
    fit = fit_ols(data, design)
    with pytest.raises(ValueError, match="one column per regressor"):
        compute_f(fit, [[1, -1]])
    with pytest.raises(ValueError, match="one weight per regressor"):
        compute_t(fit, [1, -1])
    with pytest.raises(ValueError, match="linearly independent"):
        compute_f(fit, [[1, -1, 0, 0, 0], [2, -2, 0, 0, 0]])


def test_t_to_z_accurate_in_the_tails():
    t = np.array([-3.0, 0.0, 2.5, 40.0, 1e20])
    z = t_to_z(t, 20)
    np.testing.assert_allclose(z[:4], stats.norm.isf(stats.t.sf(t[:4], 20)), rtol=1e-9)
    # P(T > 1e20) underflows float64; the log route still gives a finite z
    assert stats.norm.isf(stats.t.sf(1e20, 20)) == np.inf
    assert np.isfinite(z[4]) and z[4] > 30
    # Student tail asymptote: P(T > t) ~ c nu^((nu+1)/2) t^-nu / nu, c the density's constant
    nu = 20
    log_c = special.gammaln((nu + 1) / 2) - special.gammaln(nu / 2) - 0.5 * np.log(nu * np.pi)
    log_sf = log_c + (nu + 1) / 2 * np.log(nu) - nu * np.log(1e20) - np.log(nu)
    assert stats.norm.logsf(z[4]) == pytest.approx(log_sf, rel=1e-9)
    f_z = f_to_z(np.array([4.0, 400.0]), 2, 30)
    assert f_z[0] == pytest.approx(stats.norm.isf(stats.f.sf(4.0, 2, 30)), rel=1e-9)
    assert np.isfinite(f_z[1])


def test_parametric_thresholds():
    assert compute_t_threshold(0.001, 72) == pytest.approx(stats.t.isf(0.0005, 72))
    assert compute_t_threshold(0.001, 72, two_sided=False) == pytest.approx(stats.t.isf(0.001, 72))
    assert compute_f_threshold(0.01, 2, 72) == pytest.approx(stats.f.isf(0.01, 2, 72))
    with pytest.raises(ValueError, match="'p' must be in \\(0, 1\\)"):
        compute_t_threshold(1.5, 10)
    with pytest.raises(ValueError, match="'p' must be in \\(0, 1\\)"):
        compute_f_threshold(0.0, 1, 10)


def test_t_and_f_to_z_take_a_dof_per_element():
    rng = np.random.default_rng(0)
    t = rng.normal(0, 3, 200)
    dof = rng.uniform(2.5, 40, 200)
    np.testing.assert_allclose(t_to_z(t, dof), np.sign(t) * stats.norm.isf(stats.t.sf(np.abs(t), dof)), rtol=1e-9,
                               atol=1e-12)
    f = rng.uniform(0, 30, 200)
    np.testing.assert_allclose(f_to_z(f, 2, dof), stats.norm.isf(stats.f.sf(f, 2, dof)), rtol=1e-9, atol=1e-12)
    # far tails stay finite with their own dof
    far = t_to_z(np.array([1e20, -1e20]), np.array([5.0, 30.0]))
    assert np.all(np.isfinite(far)) and far[0] > 8 and far[1] < -30


@pytest.mark.parametrize(("stat_type", "dfn"), [("t", 1), ("F", 1), ("F", 2), ("F", 5)])
@pytest.mark.parametrize("dof", [3.0, 7.5, 22.0, 150.0])
def test_z_table_equals_the_exact_conversion(stat_type, dfn, dof):
    """The permutation null's table: within 2.5e-7 of t_to_z / f_to_z, exact off its grid."""
    rng = np.random.default_rng(int(dof * 10) + dfn)
    if stat_type == "t":
        values = np.concatenate([rng.standard_normal(50_000) * 3, rng.uniform(-60, 60, 5000),
                                 [0.0, 15.999, 16.0, -16.0, 1e6, -1e20]])
        exact = t_to_z(values, dof)
    else:
        values = np.concatenate([rng.f(dfn, dof, 50_000), rng.uniform(0, 400, 5000), [0.0, 1e-9, 256.0, 1e6]])
        exact = f_to_z(values, dfn, dof)
    table = ZTable(stat_type, dof, dfn)
    z = table(values)
    finite = np.isfinite(exact)
    np.testing.assert_array_equal(np.isfinite(z), finite)
    np.testing.assert_allclose(z[finite], exact[finite], rtol=0, atol=2.5e-7)
    np.testing.assert_array_equal(z[~finite], exact[~finite])
    # float32 maps convert in place of a buffer, as in the permutation null
    single = values[:50_000].astype(np.float32).reshape(5, -1)
    out = np.empty_like(single)
    assert table(single, out=out) is out
    np.testing.assert_allclose(out, table.exact(single), rtol=1e-6, atol=2.5e-7)
