"""The tail approximation of permutation p-values (fcflow.tail; Winkler et al. 2016), against planted truths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fcflow.errors import InputDataError
from fcflow.tail import fit_gpd_moments, fit_pareto_tail, gpd_survival, tail_p_values


def test_survival_is_scipys_generalised_pareto_with_hoskings_sign():
    excess = np.linspace(0, 4, 41)
    for shape in (-0.3, 0.0, 0.2):
        # scipy's c is the Pickands xi = -k
        expected = stats.genpareto.sf(excess, c=-shape, scale=1.5)
        np.testing.assert_allclose(gpd_survival(excess, 1.5, shape), expected, rtol=1e-10, atol=1e-300)


def test_method_of_moments_recovers_the_planted_parameters():
    rng = np.random.default_rng(0)
    for shape, scale in ((0.2, 1.0), (-0.1, 2.0), (0.0, 0.5)):
        sample = stats.genpareto.rvs(c=-shape, scale=scale, size=200_000, random_state=rng)
        fitted_scale, fitted_shape = fit_gpd_moments(sample)
        assert fitted_scale[0] == pytest.approx(scale, rel=0.03)
        assert fitted_shape[0] == pytest.approx(shape, abs=0.03)


def _truth(kind: str):
    """A null distribution to draw from, and its exact quantile function at upper-tail p."""
    if kind == "exponential":
        return (lambda rng, n: rng.exponential(size=n)), (lambda p: np.log(1 / p))
    if kind == "gumbel":
        return (lambda rng, n: rng.gumbel(size=n)), (lambda p: -np.log(-np.log1p(-p)))
    # the maximum of 3000 independent z: a max-statistic null with a slowly converging tail
    return ((lambda rng, n: rng.standard_normal((n, 3000)).max(axis=1)),
            (lambda p: stats.norm.isf(-np.expm1(np.log1p(-p) / 3000))))


@pytest.mark.parametrize("kind", ["exponential", "gumbel", "max-of-normals"])
def test_500_permutations_estimate_small_p_without_going_anticonservative(kind):
    """With 500 null draws the empirical p cannot go below 0.002; the tail fit reads p = 0.01 and
    0.001 from the planted distribution, centred on the truth or above it (conservative), never far below."""
    draw, quantile = _truth(kind)
    planted = np.array([0.05, 0.01, 0.001])
    ratios = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        null = draw(rng, 500)
        values = quantile(planted)
        empirical = np.maximum([(null >= v).mean() for v in values], 1 / 500)
        p, tail = tail_p_values(values, null, empirical, random_seed=seed)
        assert tail is not None and 0.75 <= tail.quantile <= 0.97 and tail.fit_p > 0.05
        ratios.append(p / planted)
    ratios = np.array(ratios)
    median = np.median(ratios, axis=0)
    assert np.all(median > 0.85) and median[0] < 1.2 and median[1] < 1.3 and median[2] < 2.5
    # no draw puts p = 0.001 below a fifth of it (a bounded fit would have put it at 1e-16)
    assert ratios[:, 2].min() > 1 / 5
    # at p = 0.05 the fit is at least as precise as the empirical p of the same 500 draws
    empirical_spread = 2 * np.sqrt(0.05 * 0.95 / 500) / 0.05
    assert np.quantile(ratios[:, 0], 0.95) - np.quantile(ratios[:, 0], 0.05) < 2 * empirical_spread


def test_p_at_or_above_the_threshold_and_rejected_fits_stay_empirical():
    rng = np.random.default_rng(3)
    null = rng.gumbel(size=1000)
    values = np.array([0.0, 2.0, 9.0])
    empirical = np.maximum([(null >= v).mean() for v in values], 1 / 1000)
    p, tail = tail_p_values(values, null, empirical, p_threshold=0.1)
    assert tail is not None
    assert p[0] == empirical[0] and empirical[0] >= 0.1  # not in the tail: untouched
    # beyond every permutation: below what 1000 permutations can say, near the Gumbel truth
    truth = -np.expm1(-np.exp(-9.0))
    assert p[2] < 1 / 1000 and truth / 3 < p[2] < truth * 3
    # a null the GPD cannot describe (a few repeated values): no fit is accepted, p stays empirical
    steps = np.repeat([0.0, 1.0, 2.0, 3.0], [700, 200, 80, 20]).astype(float)
    p, tail = tail_p_values(np.array([3.0]), steps, np.array([0.02]))
    assert tail is None and p[0] == 0.02


def test_fit_refuses_a_null_too_small_to_have_a_tail():
    with pytest.raises(InputDataError, match="at least 20 finite values"):
        fit_pareto_tail(np.arange(10.0))


def test_permutation_test_refines_only_the_family_wise_tail_and_records_its_fits():
    from fcflow.permutation import permutation_test

    rng = np.random.default_rng(5)
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[1:7, 1:7, 1:7] = True
    n_voxels = int(mask.sum())
    data = rng.normal(size=(24, n_voxels))
    data[:12, :20] += 1.6  # a strong effect in 20 voxels
    design = np.column_stack([np.r_[np.ones(12), np.zeros(12)], np.r_[np.zeros(12), np.ones(12)]])
    plain = permutation_test(data, design, np.array([1.0, -1.0]), n_permutations=200, random_seed=1, mask=mask,
                             inference=("maxt", "tfce"))
    reference = permutation_test(data, design, np.array([1.0, -1.0]), n_permutations=5000, random_seed=2, mask=mask,
                                 inference=("maxt", "tfce"))
    tail = permutation_test(data, design, np.array([1.0, -1.0]), n_permutations=200, random_seed=1, mask=mask,
                            inference=("maxt", "tfce"), accel="tail")
    np.testing.assert_array_equal(plain.stat, tail.stat)
    np.testing.assert_array_equal(plain.p_uncorrected, tail.p_uncorrected)  # uncorrected p stay empirical
    for name in ("maxt", "tfce"):
        untouched = 10.0 ** -plain.logp_fwe[name] >= 0.1
        np.testing.assert_array_equal(plain.logp_fwe[name][untouched], tail.logp_fwe[name][untouched])
        # the strong voxels beat every permutation: plainly p = 1/200, from the tail smaller, and
        # near what 5000 permutations say wherever those resolve p in [0.002, 0.1]
        assert plain.logp_fwe[name].max() == pytest.approx(np.log10(200))
        assert tail.logp_fwe[name].max() > np.log10(200)
        resolved = (reference.logp_fwe[name] > 1) & (reference.logp_fwe[name] < -np.log10(0.002))
        assert resolved.sum() >= 3
        ratio = 10.0 ** (reference.logp_fwe[name][resolved] - tail.logp_fwe[name][resolved])
        assert np.all((ratio > 1 / 3) & (ratio < 3)), ratio
        fit = tail.settings["tail_fits"][name]
        assert fit is not None and fit["n_null"] == 200 and fit["shape"] <= 0
    assert tail.settings["accel"] == "tail" and plain.settings["accel"] == "none"
    with pytest.raises(InputDataError, match="'accel' must be one of"):
        permutation_test(data, design, np.array([1.0, -1.0]), n_permutations=20, accel="fast")


def test_recipe_accel_reaches_the_methods_and_references():
    from fcflow.config import load_recipe
    from fcflow.errors import RecipeError
    from fcflow.reports.methods import references_for

    recipe = load_recipe("weigner2025_pgacc")
    assert recipe.inference.accel == "none"
    import dataclasses

    accelerated = recipe.replace(inference=dataclasses.replace(recipe.inference, accel="tail"))
    keys = [r.key for r in references_for(accelerated)]
    assert "Winkler2016faster" in keys and "Winkler2016faster" not in [r.key for r in references_for(recipe)]
    import tomllib

    from fcflow.config import recipe_from_dict

    data = tomllib.loads(Path(recipe.source_file).read_text())
    data["inference"]["accel"] = "fast"
    with pytest.raises(RecipeError, match=r"\[inference\] 'accel' must be one of"):
        recipe_from_dict(data)


def test_sidecars_say_why_a_null_has_no_fit():
    from fcflow.permutation import permutation_test

    rng = np.random.default_rng(11)
    data = rng.normal(size=(16, 40))
    design = np.column_stack([np.r_[np.ones(8), np.zeros(8)], np.r_[np.zeros(8), np.ones(8)]])
    result = permutation_test(data, design, np.array([1.0, -1.0]), n_permutations=100, random_seed=0,
                              inference=("maxt",), accel="tail")
    assert 10.0 ** -result.logp_fwe["maxt"].max() >= 0.1  # pure noise: nothing in the tail
    assert result.settings["tail_fits"] == {"maxt": "not needed: no p below 0.1"}
