"""Group-level general linear model: design matrices, contrasts, OLS t and F maps.

Plain numpy/scipy on ``(n_subjects, n_voxels)`` arrays; no images, no file names. The
permutation engine (:mod:`fcflow.permutation`) reuses the design and contrast helpers here.

The group design is a cell-means model: one indicator column per group and no intercept, so
that ``"ketamine - placebo"`` reads as a difference of group means and ``"ketamine"`` as the
mean change of one group. Covariates are demeaned over all subjects, so group columns estimate
group means at the sample's mean covariate. nilearn's ``make_second_level_design_matrix`` always
adds an ``intercept`` column and neither demeans nor dummy-codes covariates, so it does not fit
this model; the columns are built here directly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import special, stats

from fcflow.errors import InputDataError

__all__ = [
    "DesignDiagnostics",
    "OLSFit",
    "compute_f",
    "compute_t",
    "compute_t_threshold",
    "compute_f_threshold",
    "compute_design_diagnostics",
    "f_contrast_over_groups",
    "f_to_z",
    "fit_ols",
    "make_group_design",
    "parse_contrast",
    "t_to_z",
    "ZTable",
]


# --------------------------------------------------------------------------------------------
# Design
# --------------------------------------------------------------------------------------------
def make_group_design(
    groups: Sequence[str],
    group_levels: Sequence[str] | None = None,
    covariates: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Build a cell-means group design with demeaned covariates.

    Parameters
    ----------
    groups : sequence of str, length n_subjects
        Group of each subject, in the row order of the data.
    group_levels : sequence of str or None, default=None
        Group columns, in this order. None uses the sorted unique values of ``groups``.
        A level without subjects is an error (its column would be all zeros).
    covariates : DataFrame or None, default=None
        One row per subject, in the same order as ``groups``. Numeric columns are demeaned.
        Non-numeric columns (str, category, bool) are dummy coded against their first sorted
        level and demeaned: a two-level column such as ``sex`` becomes one column ``sex[M]``
        holding the demeaned 0/1 indicator of its second level.

    Returns
    -------
    design : DataFrame of shape (n_subjects, n_groups + n_covariate_columns)
        Group indicator columns first, then covariate columns; the index is the covariates'
        index when given, else ``range(n_subjects)``.
    """
    groups = [str(g) for g in groups]
    n_subjects = len(groups)
    if n_subjects == 0:
        raise InputDataError("'groups' must name the group of at least one subject. Got [].")
    if group_levels is None:
        group_levels = sorted(set(groups))
    group_levels = [str(level) for level in group_levels]
    if len(set(group_levels)) != len(group_levels):
        raise InputDataError(f"'group_levels' must not repeat a level. Got {group_levels!r}.")
    unknown = sorted(set(groups) - set(group_levels))
    if unknown:
        raise InputDataError(
            f"'groups' must only hold levels of 'group_levels' {group_levels!r}. Got {unknown!r}."
        )
    empty = [level for level in group_levels if level not in groups]
    if empty:
        raise InputDataError(
            f"Every group level must have at least one subject. Got no subject in {empty!r}: "
            "drop the level from 'group_levels'."
        )

    index = pd.RangeIndex(n_subjects)
    if covariates is not None:
        if len(covariates) != n_subjects:
            raise InputDataError(
                f"'covariates' must have one row per subject ({n_subjects}). "
                f"Got {len(covariates)} rows."
            )
        index = covariates.index

    group_array = np.asarray(groups)
    design = pd.DataFrame(
        {level: (group_array == level).astype(float) for level in group_levels}, index=index
    )
    if covariates is None:
        return design

    for name in covariates.columns:
        column = covariates[name]
        if column.isna().any():
            missing = list(covariates.index[column.isna().to_numpy()])
            raise InputDataError(
                f"Covariate {name!r} must have a value for every subject. Got missing values "
                f"for rows {missing!r}."
            )
        if name in design.columns:
            raise InputDataError(
                f"Covariate {name!r} must not have the name of a group column {group_levels!r}."
            )
        if pd.api.types.is_bool_dtype(column) or not pd.api.types.is_numeric_dtype(column):
            levels = sorted(column.astype(str).unique())
            if len(levels) < 2:
                raise InputDataError(
                    f"Covariate {name!r} must have at least two levels to be modelled. "
                    f"Got only {levels!r}: drop the column."
                )
            values = column.astype(str).to_numpy()
            for level in levels[1:]:
                indicator = (values == level).astype(float)
                design[f"{name}[{level}]"] = indicator - indicator.mean()
        else:
            values = column.to_numpy(dtype=float)
            design[str(name)] = values - values.mean()
    _check_full_rank(design)
    return design


def _check_full_rank(design: pd.DataFrame) -> None:
    matrix = design.to_numpy(dtype=float)
    rank = np.linalg.matrix_rank(matrix)
    if rank < matrix.shape[1]:
        raise InputDataError(
            f"The design must have full column rank. Got rank {rank} for columns "
            f"{list(design.columns)!r}: a covariate is constant within groups or duplicates "
            "another column."
        )


# --------------------------------------------------------------------------------------------
# Contrasts
# --------------------------------------------------------------------------------------------
_TERM = re.compile(
    r"""\s*(?P<sign>[+-])?\s*
        (?:(?P<coef>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*\*\s*)?
        (?P<name>[A-Za-z0-9_][\w.:\[\]]*)\s*""",  # names may start with a digit: "2back"
    re.VERBOSE,
)


def parse_contrast(expression: str | ArrayLike, columns: Sequence[str]) -> NDArray[np.float64]:
    """Turn a contrast expression over design columns into a weight vector.

    Parameters
    ----------
    expression : str or array-like
        A sum of weighted column names: ``"ketamine - placebo"``, ``"ketamine"``,
        ``"-placebo"``, ``"0.5*ketamine + 0.5*lamotrigine_ketamine - placebo"``. A column
        named twice adds up. A numeric vector of length ``len(columns)`` is returned as is.
    columns : sequence of str
        Design matrix columns.

    Returns
    -------
    weights : ndarray of shape (n_columns,)
    """
    columns = [str(c) for c in columns]
    if not isinstance(expression, str):
        weights = np.asarray(expression, dtype=float)
        if weights.shape != (len(columns),):
            raise InputDataError(
                f"A numeric contrast must have one weight per design column ({len(columns)}: "
                f"{columns!r}). Got shape {weights.shape!r}."
            )
        if not np.any(weights):
            raise InputDataError(f"A contrast must have a non-zero weight. Got {expression!r}.")
        return weights

    weights = np.zeros(len(columns))
    position = 0
    text = expression.strip()
    if not text:
        raise InputDataError(f"A contrast must name at least one design column. Got {expression!r}.")
    first = True
    while position < len(text):
        match = _TERM.match(text, position)
        if match is None or match.end() == position or (not first and not match["sign"]):
            raise InputDataError(
                f"Contrast {expression!r} must be a sum of terms like 'name', '-name' or "
                f"'0.5*name'. Could not read it from character {position}: "
                f"{text[position:]!r}."
            )
        name = match["name"]
        if name not in columns:
            raise InputDataError(
                f"Contrast {expression!r} names {name!r}, which is not a design column. "
                f"Columns are {columns!r}."
            )
        coef = float(match["coef"]) if match["coef"] else 1.0
        weights[columns.index(name)] += -coef if match["sign"] == "-" else coef
        position = match.end()
        first = False
    if not np.any(weights):
        raise InputDataError(f"Contrast {expression!r} must have a non-zero weight. Got all zeros.")
    return weights


def f_contrast_over_groups(
    levels: Sequence[str], columns: Sequence[str] | None = None
) -> NDArray[np.float64]:
    """F contrast for "any difference between groups": successive differences of group columns.

    Parameters
    ----------
    levels : sequence of str
        The group columns to compare (at least two).
    columns : sequence of str or None, default=None
        Design columns; None means the design is exactly ``levels``.

    Returns
    -------
    contrast_matrix : ndarray of shape (n_levels - 1, n_columns)
        Row i is ``levels[i] - levels[i + 1]``.
    """
    levels = [str(level) for level in levels]
    if len(levels) < 2:
        raise InputDataError(f"'levels' must hold at least two groups. Got {levels!r}.")
    columns = levels if columns is None else [str(c) for c in columns]
    missing = [level for level in levels if level not in columns]
    if missing:
        raise InputDataError(f"'levels' must be design columns {columns!r}. Got unknown {missing!r}.")
    matrix = np.zeros((len(levels) - 1, len(columns)))
    for row, (a, b) in enumerate(zip(levels[:-1], levels[1:], strict=True)):
        matrix[row, columns.index(a)] = 1.0
        matrix[row, columns.index(b)] = -1.0
    return matrix


# --------------------------------------------------------------------------------------------
# Design diagnostics
# --------------------------------------------------------------------------------------------
#: Bound of :func:`compute_design_diagnostics`'s warnings (recipe key ``inference.max_vif``):
#: a variance inflation factor of 5 means a covariate shares 80 % of its variance with the
#: other columns, the usual rule of thumb for collinearity that changes conclusions.
DEFAULT_MAX_VIF = 5.0


@dataclass(frozen=True)
class DesignDiagnostics:
    """How much a design's covariates overlap with its groups, for one contrast.

    Attributes
    ----------
    vif : dict of str to float
        Variance inflation factor of each covariate column: ``1 / (1 - R^2)`` of the column
        regressed on every other column (the group columns span the intercept).
    group_correlation : dict of str to dict of str to float
        Pearson correlation of each covariate column with each group's 0/1 indicator.
    contrast_inflation : float
        Variance of the contrast estimate with the covariates over its variance in the design
        of the group columns alone (for an F contrast, the geometric mean over its rows: the
        q-th root of the ratio of the determinants).
    contrast_inflation_by_covariate : dict of str to float
        The same ratio with one covariate added to the group columns.
    max_vif : float
        The bound the warnings use.
    """

    vif: dict[str, float]
    group_correlation: dict[str, dict[str, float]]
    contrast_inflation: float
    contrast_inflation_by_covariate: dict[str, float]
    max_vif: float = DEFAULT_MAX_VIF

    @property
    def warnings(self) -> list[str]:
        """One sentence per quantity above ``max_vif``, with the value and the bound."""
        out = []
        for name, value in self.vif.items():
            if value > self.max_vif:
                group, r = max(self.group_correlation[name].items(), key=lambda item: abs(item[1]))
                out.append(
                    f"covariate {name!r} has a variance inflation factor of {value:.1f} (above "
                    f"max_vif {self.max_vif:g}); its correlation with group {group!r} is {r:.2f}"
                )
        if self.contrast_inflation > self.max_vif:
            worst = max(self.contrast_inflation_by_covariate.items(), key=lambda item: item[1])
            out.append(
                f"the covariates multiply the variance of the contrast by {self.contrast_inflation:.1f} "
                f"(above max_vif {self.max_vif:g}; {worst[0]!r} alone by {worst[1]:.1f}): a covariate "
                "that is a group in disguise removes the group effect it stands for"
            )
        return out

    def to_dict(self) -> dict:
        """JSON-ready values (sidecars)."""
        return {
            "VarianceInflationFactor": {k: round(v, 6) for k, v in self.vif.items()},
            "CorrelationWithGroups": {k: {g: round(r, 6) for g, r in v.items()}
                                      for k, v in self.group_correlation.items()},
            "ContrastVarianceInflation": round(self.contrast_inflation, 6),
            "ContrastVarianceInflationByCovariate": {k: round(v, 6)
                                                     for k, v in self.contrast_inflation_by_covariate.items()},
            "MaxVIF": self.max_vif,
            "Warnings": self.warnings,
        }  # fmt: skip


def _contrast_variance(matrix: NDArray[np.float64], contrast: NDArray[np.float64]) -> float:
    """``det(C (M'M)^-1 C')^(1/q)``: the variance factor of a t contrast, its geometric mean for F."""
    middle = contrast @ np.linalg.pinv(matrix.T @ matrix) @ contrast.T
    sign, logdet = np.linalg.slogdet(middle)
    return float(np.exp(logdet / contrast.shape[0])) if sign > 0 else float("inf")


def compute_design_diagnostics(
    design: pd.DataFrame,
    group_columns: Sequence[str],
    contrast: ArrayLike,
    *,
    max_vif: float = DEFAULT_MAX_VIF,
) -> DesignDiagnostics:
    """Variance inflation of each covariate and of the contrast, and covariate-group correlations.

    Parameters
    ----------
    design : DataFrame of shape (n_subjects, n_regressors)
        From :func:`make_group_design`: group indicator columns and covariate columns.
    group_columns : sequence of str
        The group indicator columns; every other column is a covariate.
    contrast : array-like of shape (n_regressors,) or (n_contrasts, n_regressors)
        Weights over ``design``'s columns; only the group columns may be non-zero.
    max_vif : float, default=5.0
        Bound of the warnings (see :data:`DEFAULT_MAX_VIF`).

    Returns
    -------
    diagnostics : DesignDiagnostics
    """
    columns = [str(c) for c in design.columns]
    group_columns = [str(g) for g in group_columns]
    missing = [g for g in group_columns if g not in columns]
    if missing:
        raise InputDataError(f"'group_columns' must be design columns {columns!r}. Got unknown {missing!r}.")
    weights = np.atleast_2d(np.asarray(contrast, dtype=float))
    if weights.shape[1] != len(columns):
        raise InputDataError(
            f"'contrast' must have one weight per design column ({len(columns)}). Got shape "
            f"{np.shape(contrast)!r}."
        )
    covariates = [c for c in columns if c not in group_columns]
    if np.any(weights[:, [columns.index(c) for c in covariates]]):
        raise InputDataError(
            f"'contrast' must weigh only the group columns {group_columns!r}. Got weights on "
            f"covariates {covariates!r}."
        )
    matrix = design.to_numpy(dtype=float)
    group_index = [columns.index(g) for g in group_columns]
    vif, correlation, by_covariate = {}, {}, {}
    base = _contrast_variance(matrix[:, group_index], weights[:, group_index])
    for name in covariates:
        j = columns.index(name)
        x = matrix[:, j]
        others = np.delete(matrix, j, axis=1)
        residual = x - others @ np.linalg.lstsq(others, x, rcond=None)[0]
        centred = x - x.mean()
        vif[name] = float(centred @ centred / max(residual @ residual, np.finfo(float).tiny))
        correlation[name] = {
            g: float(np.corrcoef(x, matrix[:, columns.index(g)])[0, 1]) if np.ptp(matrix[:, columns.index(g)]) else 0.0
            for g in group_columns
        }  # fmt: skip
        pair = group_index + [j]
        by_covariate[name] = _contrast_variance(matrix[:, pair], weights[:, pair]) / base
    return DesignDiagnostics(
        vif=vif, group_correlation=correlation, contrast_inflation=_contrast_variance(matrix, weights) / base,
        contrast_inflation_by_covariate=by_covariate, max_vif=float(max_vif),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# OLS
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OLSFit:
    """Voxel-wise ordinary least squares fit of one design.

    Attributes
    ----------
    beta : ndarray of shape (n_regressors, n_voxels), float64
    residual_variance : ndarray of shape (n_voxels,), float64
        Residual sum of squares divided by ``dof``.
    dof : int
        Residual degrees of freedom, ``n_subjects - rank(design)``.
    xtx_inv : ndarray of shape (n_regressors, n_regressors)
        Pseudo-inverse of ``design.T @ design``.
    """

    beta: NDArray[np.float64]
    residual_variance: NDArray[np.float64]
    dof: int
    xtx_inv: NDArray[np.float64]


def as_design_array(design: pd.DataFrame | ArrayLike, n_subjects: int) -> NDArray[np.float64]:
    """``design`` as a float (n_subjects, n_regressors) array; a clear error for any other shape."""
    matrix = np.asarray(design, dtype=float)
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or matrix.shape[0] != n_subjects:
        raise InputDataError(
            f"The design must have shape (n_subjects={n_subjects}, n_regressors). "
            f"Got {matrix.shape!r}."
        )
    if not np.all(np.isfinite(matrix)):
        raise InputDataError("The design must be finite. Got NaN or inf values.")
    return matrix


def as_data_array(data: ArrayLike) -> NDArray:
    """``data`` as a 2-D (n_subjects, n_voxels) float array (float32 kept); a clear error otherwise."""
    data = np.asarray(data)
    if data.ndim != 2:
        raise InputDataError(
            f"The data must have shape (n_subjects, n_voxels). Got shape {data.shape!r}."
        )
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float64)
    return data


def fit_ols(
    data: ArrayLike, design: pd.DataFrame | ArrayLike, *, chunk_size: int = 32768
) -> OLSFit:
    """Fit ``data = design @ beta + error`` at every voxel.

    Parameters
    ----------
    data : ndarray of shape (n_subjects, n_voxels)
        float32 is fine: blocks of ``chunk_size`` voxels are computed in float64.
    design : DataFrame or ndarray of shape (n_subjects, n_regressors)
    chunk_size : int, default=32768
        Voxels per float64 block (bounds the float64 temporary memory).

    Returns
    -------
    fit : OLSFit
    """
    data = as_data_array(data)
    n_subjects, n_voxels = data.shape
    matrix = as_design_array(design, n_subjects)
    pinv = np.linalg.pinv(matrix)
    rank = np.linalg.matrix_rank(matrix)
    dof = n_subjects - rank
    if dof < 1:
        raise InputDataError(
            f"The design must leave at least one residual degree of freedom. Got {n_subjects} "
            f"subjects and rank {rank}."
        )
    beta = np.empty((matrix.shape[1], n_voxels))
    rss = np.empty(n_voxels)
    for start in range(0, n_voxels, chunk_size):
        block = np.asarray(data[:, start : start + chunk_size], dtype=np.float64)
        b = pinv @ block
        resid = block - matrix @ b
        beta[:, start : start + chunk_size] = b
        block_rss = np.einsum("ij,ij->j", resid, resid)
        # a perfect fit leaves rounding noise, not variance: call it 0 so that t is 0, not 1e15
        block_rss[block_rss <= 1e-24 * np.einsum("ij,ij->j", block, block)] = 0.0
        rss[start : start + chunk_size] = block_rss
    return OLSFit(beta=beta, residual_variance=rss / dof, dof=dof, xtx_inv=pinv @ pinv.T)


def compute_t(fit: OLSFit, contrast: ArrayLike) -> NDArray[np.float64]:
    """t statistic of a contrast vector at every voxel.

    Parameters
    ----------
    fit : OLSFit
    contrast : array-like of shape (n_regressors,)

    Returns
    -------
    t : ndarray of shape (n_voxels,)
        0 where the residual variance is 0 (a voxel the design fits exactly).
    """
    c = np.asarray(contrast, dtype=float)
    if c.shape != (fit.beta.shape[0],):
        raise InputDataError(
            f"'contrast' must have one weight per regressor ({fit.beta.shape[0]}). "
            f"Got shape {c.shape!r}."
        )
    effect = c @ fit.beta
    variance = fit.residual_variance * float(c @ fit.xtx_inv @ c)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(variance > 0, effect / np.sqrt(variance), 0.0)
    return t


def compute_f(fit: OLSFit, contrast_matrix: ArrayLike) -> NDArray[np.float64]:
    """F statistic of a contrast matrix at every voxel.

    Parameters
    ----------
    fit : OLSFit
    contrast_matrix : array-like of shape (n_contrasts, n_regressors)
        Rows must be linearly independent.

    Returns
    -------
    f : ndarray of shape (n_voxels,)
        0 where the residual variance is 0.
    """
    c = np.atleast_2d(np.asarray(contrast_matrix, dtype=float))
    if c.shape[1] != fit.beta.shape[0]:
        raise InputDataError(
            f"'contrast_matrix' must have one column per regressor ({fit.beta.shape[0]}). "
            f"Got shape {c.shape!r}."
        )
    q = np.linalg.matrix_rank(c)
    if q < c.shape[0]:
        raise InputDataError(
            f"The rows of 'contrast_matrix' must be linearly independent. Got rank {q} for "
            f"{c.shape[0]} rows."
        )
    effect = c @ fit.beta
    middle = np.linalg.inv(c @ fit.xtx_inv @ c.T)
    numerator = np.einsum("iv,ij,jv->v", effect, middle, effect) / q
    with np.errstate(divide="ignore", invalid="ignore"):
        f = np.where(fit.residual_variance > 0, numerator / fit.residual_variance, 0.0)
    return f


# --------------------------------------------------------------------------------------------
# Conversions and parametric thresholds
# --------------------------------------------------------------------------------------------
def _log_betainc_lower(a: float, b: float, x: NDArray[np.float64]) -> NDArray[np.float64]:
    """log of the regularised incomplete beta I_x(a, b), finite where I_x underflows.

    For the far tail (x close to 0) uses the first two terms of the series
    ``I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * (1 + (a + b) / (a + 1) x + ...)``.
    """
    a, b, x = np.broadcast_arrays(np.asarray(a, dtype=float), np.asarray(b, dtype=float), x)
    with np.errstate(divide="ignore"):
        direct = np.log(special.betainc(a, b, x))
    tail = ~np.isfinite(direct) | (direct < -700)
    if np.any(tail):
        at, bt, xt = a[tail], b[tail], x[tail]
        direct[tail] = (
            at * np.log(xt)
            + bt * np.log1p(-xt)
            - np.log(at)
            - special.betaln(at, bt)
            + np.log1p((at + bt) / (at + 1) * xt)
        )
    return direct


def _t_logsf(t: NDArray[np.float64], dof: ArrayLike) -> NDArray[np.float64]:
    """log P(T > t) for t >= 0; ``dof`` a scalar or an array broadcasting with ``t``."""
    x = dof / (dof + t**2)
    return np.log(0.5) + _log_betainc_lower(np.asarray(dof) / 2, 0.5, x)


def _t_log_tail(magnitude: NDArray[np.float64], dof: ArrayLike) -> NDArray[np.float64]:
    """log P(T > magnitude) for magnitude >= 0, per element when ``dof`` is an array.

    ``scipy.special.stdtr`` is about twice as fast as ``stats.t.logsf`` with a different dof
    per element (the permutation null of the v statistic converts every permutation's map);
    where its tail underflows, a series of the incomplete beta function takes over.
    """
    magnitude, dof = np.broadcast_arrays(np.asarray(magnitude, dtype=float), np.asarray(dof, dtype=float))
    with np.errstate(divide="ignore"):
        log_tail = np.log(special.stdtr(dof, -magnitude))
    far = ~np.isfinite(log_tail) | (log_tail < -700)
    if np.any(far):
        log_tail[far] = _t_logsf(magnitude[far], dof[far])
    return log_tail


def t_to_z(t: ArrayLike, dof: ArrayLike) -> NDArray[np.float64]:
    """Convert t to z with the same tail probability, accurate far in the tails.

    Works on log tail probabilities (``scipy.special.ndtri_exp`` and a series for the
    incomplete beta function where it underflows), so t = 1e20 with 20 dof gives a finite z
    instead of inf.

    Parameters
    ----------
    t : array-like
    dof : float or array-like broadcasting with ``t``
        Degrees of freedom; an array gives each element its own, e.g. the Welch-Satterthwaite
        dof of the v statistic (:func:`compute_welch_v`).
    """
    t = np.asarray(t, dtype=float)
    return np.sign(t) * -special.ndtri_exp(_t_log_tail(np.abs(t), dof))


def f_to_z(f: ArrayLike, dfn: float, dfd: ArrayLike) -> NDArray[np.float64]:
    """Convert F to a one-sided z with the same upper-tail probability (log scale).

    ``dfd`` may be an array broadcasting with ``f`` (e.g. the per-voxel dof of Winkler's G).
    """
    f, dfd = np.broadcast_arrays(np.asarray(f, dtype=float), np.asarray(dfd, dtype=float))
    with np.errstate(divide="ignore"):
        log_tail = np.log(special.fdtrc(dfn, dfd, np.maximum(f, 0.0)))
    far = ~np.isfinite(log_tail) | (log_tail < -700)
    if np.any(far):
        x = dfd[far] / (dfd[far] + dfn * f[far])
        log_tail[far] = _log_betainc_lower(dfd[far] / 2, dfn / 2, x)
    return -special.ndtri_exp(log_tail)


class ZTable:
    """t or F to z at one dof, fast enough for every map of a permutation null.

    :func:`t_to_z` and :func:`f_to_z` evaluate the incomplete beta function per element: on
    the 2 mm MNI mask that is 90 ms a map, most of a z-scored permutation's cost (measured in
    benchmarks/results/README.md). At one dof z is a smooth increasing function of
    r = |t| (the sign kept) or r = log F, so fcflow tabulates it once with the exact functions
    on a uniform grid of r (``step``) and interpolates linearly in one compiled pass (1.8 ms a
    map for t, 50x faster). Cells whose midpoint is off by more than ``tolerance`` in z, and
    r off the grid (|t| > ``top``; F outside [e**-12, ``top``**2]), get the exact conversion,
    so the error is at most about ``tolerance``, the rounding error of the float32 maps it
    converts (``tests/test_stats.py`` checks it against the exact functions).

    Parameters
    ----------
    stat_type : {"t", "F"}
    dof : float
        Error degrees of freedom, one value for the whole map.
    dfn : int, default=1
        Numerator degrees of freedom of F.
    step : float or None, default=None
        Grid step in r; None is 1/512 for t and 1/1024 for F (log F curves more).
    top : float, default=16.0
        Largest tabulated |t| (sqrt F).
    tolerance : float, default=2e-7
        Largest interpolation error in z accepted at a cell's midpoint.
    """

    def __init__(self, stat_type: str, dof: float, dfn: int = 1, *, step: float | None = None, top: float = 16.0,
                 tolerance: float = 2e-7):
        if stat_type not in ("t", "F"):
            raise InputDataError(f"'stat_type' must be 't' or 'F'. Got {stat_type!r}.")
        self.stat_type, self.dof, self.dfn = stat_type, float(dof), int(dfn)
        self.origin = 0.0 if stat_type == "t" else -12.0
        if step is None:
            step = 1 / 512 if stat_type == "t" else 1 / 1024
        end = top if stat_type == "t" else 2 * np.log(top)
        r = np.arange(self.origin, end + 2 * step, step)
        z = self._exact_of_r(r)
        # the grid serves r above the last cell whose midpoint is off by more than
        # ``tolerance`` (F near 0, where z falls steeply to -inf); below it, the exact values
        middle = r[:-1] + step / 2
        with np.errstate(invalid="ignore"):
            error = np.abs(self._exact_of_r(middle) - (z[:-1] + z[1:]) / 2)
        bad = np.flatnonzero(~(error <= tolerance))
        self.lower = float(r[bad[-1] + 1]) if bad.size else self.origin
        self.scale = 1.0 / step
        z = np.where(np.isfinite(z), z, 0.0)  # never read: below ``lower``
        self.z_grid, self.slope = z, np.diff(z)

    def _exact_of_r(self, r: NDArray[np.float64]) -> NDArray[np.float64]:
        return self.exact(r if self.stat_type == "t" else np.exp(r))

    def exact(self, values: ArrayLike) -> NDArray[np.float64]:
        """The exact conversion, :func:`t_to_z` or :func:`f_to_z`."""
        if self.stat_type == "t":
            return t_to_z(values, self.dof)
        return f_to_z(values, self.dfn, self.dof)

    def __call__(self, values: NDArray, out: NDArray | None = None) -> NDArray:
        """z of ``values`` (any shape), written to ``out`` (default a new array of their dtype)."""
        from fcflow._z_kernel import interpolate

        values = np.ascontiguousarray(values)
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        if out is None:
            out = np.empty_like(values)
        if out.shape != values.shape or not out.flags.c_contiguous:
            raise InputDataError(f"'out' must be C-contiguous of shape {values.shape}. Got {out.shape}.")
        flat, flat_out = values.reshape(-1), out.reshape(-1)
        if interpolate(flat, self.stat_type == "t", self.origin, self.lower, self.scale, self.z_grid, self.slope,
                       flat_out):
            outside = np.flatnonzero(np.isnan(flat_out))
            flat_out[outside] = self.exact(flat[outside])
        return out


def compute_t_threshold(p: float, dof: float, *, two_sided: bool = True) -> float:
    """t value whose (two-sided if asked) uncorrected p equals ``p``.

    Matches nilearn's cluster-forming threshold in ``permuted_ols``:
    ``t.isf(p / 2, dof)`` for two-sided tests and ``t.isf(p, dof)`` otherwise.
    """
    if not 0 < p < 1:
        raise InputDataError(f"'p' must be in (0, 1). Got {p!r}.")
    return float(stats.t.isf(p / 2 if two_sided else p, dof))


def compute_f_threshold(p: float, dfn: float, dfd: float) -> float:
    """F value whose uncorrected p equals ``p``."""
    if not 0 < p < 1:
        raise InputDataError(f"'p' must be in (0, 1). Got {p!r}.")
    return float(stats.f.isf(p, dfn, dfd))
