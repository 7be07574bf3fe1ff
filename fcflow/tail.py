"""Tail approximation of permutation p-values: a generalised Pareto fit to the null's upper tail.

With N permutations the smallest p a permutation test can give is 1/N, and a p near 0.001 needs
thousands of permutations to be estimated within a few tens of percent. Winkler et al. (2016,
"Faster permutation inference in brain imaging", NeuroImage 141:502-516; PALM's ``-accel tail``)
fit a generalised Pareto distribution (GPD) to the upper tail of the permutation distribution
and read small p-values from the fit, which a few hundred permutations support. fcflow follows
their recipe (after Knijnenburg et al. 2009, Bioinformatics 25:i161), written here from the
papers:

1. the empirical p stays wherever it is at least ``p_threshold`` (0.1): only statistics in the
   tail are refined;
2. the tail starts at the 75th percentile of the null; the GPD is fitted to the exceedances over
   it by the method of moments (Hosking & Wallis 1987, Technometrics 29:339) and its fit tested
   with the Anderson-Darling statistic; while the fit is rejected (p <= 0.05) the start moves up
   by 1 percentile, up to the 97th. fcflow computes the Anderson-Darling p by a parametric
   bootstrap (samples from the fitted GPD, refitted the same way) instead of Choulakian &
   Stephens' (2001) table, so no table lookup or extrapolation is needed;
3. a statistic ``x`` above the tail's start ``u`` gets ``p = (n_tail / N) * S(x - u)``, ``S`` the
   fitted GPD survival function. No accepted fit: every p stays empirical.

The identity permutation is part of the null, as in the empirical p. One deviation from PALM: a
bounded fit (shape ``k > 0`` in Hosking's sign convention, upper end ``u + scale / k``) would give
p = 0 to every statistic beyond its end, so fcflow fits the exponential tail (``k = 0``) instead,
the lightest unbounded GPD, which errs towards larger p (measured in tests/test_tail.py). p is
floored at :data:`P_FLOOR`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from fcflow.errors import InputDataError

#: The smallest p the tail approximation reports (a statistic beyond a bounded tail's end)
P_FLOOR = 1e-16
#: Tail starts tried, as quantiles of the null (Winkler et al. 2016: from 0.75 by 0.01)
TAIL_STARTS = tuple(np.round(np.arange(0.75, 0.9701, 0.01), 2))
#: Fits with an Anderson-Darling p at or below this are rejected
FIT_ALPHA = 0.05
#: Only empirical p below this are refined (Winkler et al. 2016, PALM's default)
P_THRESHOLD = 0.1


@dataclass(frozen=True)
class ParetoTail:
    """A generalised Pareto fit to the upper tail of a null distribution (:func:`fit_pareto_tail`).

    ``threshold`` is the tail's start ``u``, ``scale`` and ``shape`` the GPD's ``a`` and ``k`` in
    Hosking & Wallis' convention (survival ``(1 - k y / a) ** (1 / k)``; ``k = -xi`` of the
    Pickands form, ``k > 0`` a bounded tail), ``n_tail`` of ``n_null`` values exceed ``u``,
    ``quantile`` is the start's quantile and ``fit_p`` the Anderson-Darling p of the fit.
    """

    threshold: float
    scale: float
    shape: float
    n_tail: int
    n_null: int
    quantile: float
    fit_p: float

    def survival(self, excess: ArrayLike) -> NDArray[np.float64]:
        """``S(y)`` of the fitted GPD at excesses ``y >= 0`` over the threshold."""
        return gpd_survival(np.asarray(excess, dtype=float), self.scale, self.shape)

    def p_values(self, values: ArrayLike) -> NDArray[np.float64]:
        """``(n_tail / n_null) * S(x - u)`` for each ``x`` (meaningful for ``x > u``), floored at
        :data:`P_FLOOR`."""
        excess = np.maximum(np.asarray(values, dtype=float) - self.threshold, 0.0)
        return np.maximum(self.n_tail / self.n_null * self.survival(excess), P_FLOOR)

    def to_dict(self) -> dict[str, Any]:
        return {k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in asdict(self).items()}


def gpd_survival(excess: NDArray[np.float64], scale: float | NDArray, shape: float | NDArray) -> NDArray[np.float64]:
    """Survival function of the GPD in Hosking & Wallis' parametrisation (0 beyond a bounded end)."""
    scale = np.asarray(scale, dtype=float)
    shape = np.asarray(shape, dtype=float)
    small = np.abs(shape) < 1e-10
    safe = np.where(small, 1.0, shape)
    base = 1.0 - safe * excess / scale
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        power = np.where(base > 0, np.power(np.where(base > 0, base, 1.0), 1.0 / safe), 0.0)
    return np.where(small, np.exp(-excess / scale), power)


def fit_gpd_moments(excess: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Method-of-moments GPD fit (Hosking & Wallis 1987) of each row of ``excess`` (or one vector).

    With mean ``m`` and variance ``v`` (n - 1 denominator): scale ``a = m (m**2 / v + 1) / 2``,
    shape ``k = (m**2 / v - 1) / 2``.
    """
    excess = np.atleast_2d(np.asarray(excess, dtype=float))
    mean = excess.mean(axis=1)
    var = excess.var(axis=1, ddof=1)
    ratio = np.divide(mean**2, var, out=np.full_like(mean, np.inf), where=var > 0)
    return mean * (ratio + 1.0) / 2.0, (ratio - 1.0) / 2.0


def anderson_darling(excess: NDArray[np.float64], scale: NDArray[np.float64],
                     shape: NDArray[np.float64]) -> NDArray[np.float64]:
    """Anderson-Darling statistic of each row of ``excess`` against its fitted GPD."""
    excess = np.sort(np.atleast_2d(excess), axis=1)
    n = excess.shape[1]
    cdf = 1.0 - gpd_survival(excess, scale[:, None], shape[:, None])
    cdf = np.clip(cdf, 1e-12, 1.0 - 1e-12)
    i = np.arange(1, n + 1)
    return -n - np.mean((2 * i - 1) * (np.log(cdf) + np.log1p(-cdf[:, ::-1])), axis=1)


def _gpd_sample(rng: np.random.Generator, scale: float, shape: float, size: tuple[int, int]) -> NDArray[np.float64]:
    """Draws from the GPD by its inverse cdf: ``y = a (1 - U**k) / k`` (``-a log U`` for k = 0)."""
    uniform = rng.uniform(size=size)
    if abs(shape) < 1e-10:
        return -scale * np.log(uniform)
    return scale * (1.0 - uniform**shape) / shape


def fit_pareto_tail(
    null: ArrayLike,
    *,
    n_bootstrap: int = 200,
    random_seed: int = 0,
    starts: tuple[float, ...] = TAIL_STARTS,
    fit_alpha: float = FIT_ALPHA,
) -> ParetoTail | None:
    """Fit a GPD to the upper tail of ``null``; None when no tail start gives an accepted fit.

    Parameters
    ----------
    null : array-like of shape (n,)
        The permutation distribution (e.g. the maximum statistic of each permutation, the
        identity included).
    n_bootstrap : int, default=200
        Parametric-bootstrap samples for each Anderson-Darling p.
    random_seed : int, default=0
        Seed of the bootstrap (the fit is reproducible).
    starts : tuple of float
        Quantiles of ``null`` where the tail may start, tried in order.
    fit_alpha : float, default=0.05
        A fit whose Anderson-Darling p is at or below it is rejected.
    """
    values = np.sort(np.asarray(null, dtype=float).ravel())
    if values.size < 20 or not np.all(np.isfinite(values)):
        raise InputDataError(
            f"'null' must hold at least 20 finite values for a tail fit. Got {values.size} values"
            f"{'' if np.all(np.isfinite(values)) else ' with NaN or inf'}."
        )
    n = values.size
    rng = np.random.default_rng(random_seed)
    # empirical cdf with ties at their highest rank
    cdf = np.searchsorted(values, values, side="right") / n
    for quantile in starts:
        first = int(np.argmax(cdf >= quantile))
        if first == 0 or n - first < 10:
            continue
        threshold = float((values[first - 1] + values[first]) / 2.0)
        excess = values[first:] - threshold
        if np.ptp(excess) == 0:
            continue
        scale, shape = (float(x[0]) for x in fit_gpd_moments(excess))
        if not (np.isfinite(scale) and scale > 0 and np.isfinite(shape)):
            continue
        if shape > 0:
            # A bounded fit would give p = 0 beyond its end: in 5 % of fits to 500 draws of an
            # exponential null (unbounded) it put p = 1e-3 at 1e-16. The exponential tail (k = 0,
            # scale = mean excess) is the lightest unbounded one: it errs towards larger p.
            scale, shape = float(np.mean(excess)), 0.0
        observed = float(anderson_darling(excess, np.array([scale]), np.array([shape]))[0])
        samples = _gpd_sample(rng, scale, shape, (n_bootstrap, excess.size))
        boot_scale, boot_shape = fit_gpd_moments(samples)
        ok = np.isfinite(boot_scale) & (boot_scale > 0)
        boot = anderson_darling(samples[ok], boot_scale[ok], boot_shape[ok])
        fit_p = float((1 + np.sum(boot >= observed)) / (1 + boot.size))
        if fit_p > fit_alpha:
            return ParetoTail(threshold=threshold, scale=scale, shape=shape, n_tail=int(excess.size), n_null=n,
                              quantile=float(quantile), fit_p=fit_p)
    return None


def tail_p_values(
    values: ArrayLike,
    null: ArrayLike,
    empirical_p: ArrayLike,
    *,
    p_threshold: float = P_THRESHOLD,
    random_seed: int = 0,
) -> tuple[NDArray[np.float64], ParetoTail | None]:
    """Refine the empirical p of ``values`` against ``null`` in its tail (see the module docstring).

    Parameters
    ----------
    values : array-like
        Observed statistics (e.g. every voxel's statistic, compared with the null of maxima).
    null : array-like of shape (n,)
        The permutation distribution, identity included.
    empirical_p : array-like, same shape as ``values``
        Their permutation p.
    p_threshold : float, default=0.1
        Only values with ``empirical_p < p_threshold`` (and above the tail's start) are refined.
    random_seed : int, default=0
        Seed of the fit's bootstrap.

    Returns
    -------
    p : ndarray
        The refined p (the empirical one where not refined or when no fit is accepted).
    tail : ParetoTail or None
        The fit used (None: none accepted, or nothing to refine).
    """
    values = np.asarray(values, dtype=float)
    p = np.array(empirical_p, dtype=float, copy=True)
    candidates = p < p_threshold
    if not candidates.any():
        return p, None
    tail = fit_pareto_tail(null, random_seed=random_seed)
    if tail is None:
        return p, None
    refine = candidates & (values > tail.threshold)
    p[refine] = tail.p_values(values[refine])
    return p, tail


__all__ = ["P_FLOOR", "P_THRESHOLD", "ParetoTail", "fit_pareto_tail", "tail_p_values", "gpd_survival",
           "fit_gpd_moments", "anderson_darling"]
