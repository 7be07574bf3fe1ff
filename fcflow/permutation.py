"""Permutation inference for group maps: voxel max-T, cluster mass/size and TFCE FWE control.

Scheme
------
The design ``M`` and the contrast ``C`` (a vector for t, a matrix for F) are re-parametrised
(Winkler et al. 2014, NeuroImage 92:381, appendix A) into the tested part ``X = M C`` and the
nuisance part ``Z = M C_perp`` with ``C_perp`` spanning the null space of ``C.T``; the model
and the test are unchanged. Then Freedman-Lane: the data are residualised against ``Z``
(``R_Z Y``), and each permutation refits the full model ``[X, Z]`` to the shuffled residuals.
Shuffling the residual rows is the same as shuffling the rows of ``[X, Z]`` jointly against
fixed residuals, which is exactly what nilearn's ``permuted_ols`` does (it orthonormalises the
confounds, residualises targets and tested variates, and shuffles tested variates and
confounds together), so both give the same statistic for the same permutation.

``scheme="auto"`` uses sign flipping (independent symmetric errors) when the nuisance space
does not contain a constant, i.e. when the tested effect carries a mean (one-sample tests,
intercept-only designs, the mean of one group in a cell-means design); otherwise it permutes
rows (exchangeable errors). nilearn flips signs only when the tested variate is constant,
which is the intercept-only case of the same rule.

A permutation array row ``perm`` means "design row ``i`` is replaced by design row
``perm[i]``" (nilearn's ``tested_vars[shuffle_idx]``); a sign-flip row multiplies subject
``i`` by ``signs[i]``. The identity is always the first of the ``n_permutations``, so
p-values are ``#(null >= observed) / n_permutations`` and never 0; for voxel max-T and TFCE
these equal nilearn's ``(1 + #(h0 >= observed)) / (n_perm + 1)`` for the same
``n_perm = n_permutations - 1`` shuffles. For cluster mass and size nilearn leaves the observed
data out of the null (``#(h0 >= observed) / n_perm``, clipped to ``1 / n_perm``); here the
identity is counted for every inference, so a cluster p is never below ``1 / n_permutations``.
Cluster mass is ``sum(|t| - threshold)`` over the cluster and size its voxel count, with a
cluster-forming threshold of ``t.isf(p / 2, dof)`` (two-sided) or ``t.isf(p, dof)``, as
nilearn; see :mod:`fcflow.clusters` for these and for the TFCE definition.

Variance groups
---------------
Errors of different variance are not exchangeable between groups, so with ``variance_groups``
(two or more labels, e.g. one per study group) ``scheme="auto"`` flips signs (independent,
symmetric errors: each subject keeps its own variance) instead of permuting, and the statistic
accounts for the groups' variances in one of two ways (``variance_estimate``):

* ``"brain"``: one variance ratio per group for the whole map (the median over voxels of each
  group's share of the full model's residual sum of squares), and the weighted least-squares t
  or F with these weights: SPM's pooled non-sphericity estimate, with a permutation null. Every
  voxel's variance keeps all the residual dof.
* ``"voxel"``: each group's variance at every voxel: Winkler et al.'s (2014, table 2) v for a t
  contrast, the OLS contrast over a standard error built from one residual variance per group
  (``W = diag(residual_dof_g / RSS_g)``, ``v = c'psi / sqrt(c' (M'WM)^-1 c)``; Welch's t for two
  groups), or G for an F contrast (Welch's ANOVA for a one-way design). Their dof differ between
  voxels and permutations (Satterthwaite's for v, which is Welch-Satterthwaite for two groups
  and ignores groups the contrast does not involve; Winkler's formula for G), so every inference
  runs on z of the same tail probability (``zstat``) and the cluster-forming threshold is the
  normal quantile of ``cluster_forming_p``. The nuisance model is fitted by weighted least
  squares with the brain-wide weights before flipping (``residuals="auto"``): with OLS, a small
  high-variance group keeps only ``1 - n_g / n_pooled`` of its deviation from the common mean in
  its residuals, and no flip reproduces the observed extremes.

Measured FWE on pure-noise nulls (benchmarks/results/README.md): with groups of 10/4/6 and the
4-subject group's SD x2.5, t with free exchange (no variance groups) rejects in 96-99 % of the
data sets; v with free exchange, as PALM allows, 71 % (max-v, 100 data sets); v with sign flips
of OLS Freedman-Lane residuals 9.7 % (max-v, 1000); v with weighted residuals 6.2 % (500), but
7-8 % on the 6/6/6 nulls (150-300): where a small group's sample variance happens to be tiny, v
is huge and no flip reproduces it. The brain-wide weights kept every inference of every scenario
at 2.0-4.4 % (1000 data sets each), which is why the group level uses them by default.

Computation
-----------
All permutations of a batch are one GEMM: the ``n_batch * (k + q)`` permuted design columns
times the unit-norm residual data ``(n_subjects, n_voxels)`` in float32 (float64 optional),
giving the tested and nuisance projections from which t (or F) follows without refitting:
``t = a * sqrt(dof / (1 - |a|^2 - |z|^2))``. When rows are permuted, the nuisance space holds
the constant, whose projection is 0 for every permutation: it is left out of the GEMM. The
GEMM and the element-wise passes write into buffers reused across batches (fresh arrays of
this size cost page faults on every batch). The observed statistic is computed in float64;
null statistics computed in float32 are compared with it using a relative tolerance
(``1e-5``, or ``1e-4`` on z; ``1e-12``, or ``1e-9`` on z, in float64) so that permutations
equivalent to the identity are counted as ties, not as smaller. Cluster and TFCE statistics run
on in-mask vectors with a neighbour table (:mod:`fcflow.clusters`); TFCE uses a compiled
one-pass component tree.

With variance groups, the GEMM also projects the residuals on each group's rows of the basis
(``[B, D_1 B, ..., D_G B]``, permuted or flipped with it) and sums ``u ** 2`` per group, which
gives each group's residual sum of squares without refitting; the (c x c) ``M'WM`` of every
voxel and permutation is reduced to its Schur complement by element-wise Gaussian elimination
over the nuisance columns, in float64. This costs about three times the t statistic's work, and
the z conversion with a dof per element (``scipy.special.stdtr``, ~0.25 us each) as much again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import special

from fcflow.clusters import VoxelGraph, cluster_maxima, cluster_values, tfce_vector
from fcflow.config import PERMUTATION_INFERENCES
from fcflow.errors import InputDataError
from fcflow.stats import (
    ZTable,
    as_data_array,
    as_design_array,
    compute_f_threshold,
    compute_t_threshold,
    f_to_z,
    parse_contrast,
    t_to_z,
)

__all__ = [
    "PermutationResult",
    "combine_family_wise",
    "make_permutations",
    "permutation_memory_bytes",
    "permutation_test",
    "variance_group_shortfall",
]

#: The inferences a permutation test computes, in the order it computes them (one list for the
#: recipe and the engine: :data:`fcflow.config.PERMUTATION_INFERENCES`).
INFERENCES = PERMUTATION_INFERENCES
SCHEMES = ("auto", "permute", "sign_flip")
RESIDUALS = ("auto", "freedman_lane", "ter_braak", "weighted_freedman_lane")
#: Accelerations of the family-wise p (Winkler et al. 2016): none, or the tail approximation (fcflow.tail)
ACCELERATIONS = ("none", "tail")


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of :func:`permutation_test`.

    Attributes
    ----------
    stat : ndarray of shape (n_voxels,)
        Observed t, F, v or G map, float64.
    stat_type : {"t", "F", "v", "G"}
        v (Welch-type t) and G (generalised F) with two or more variance groups.
    dof : int
        Residual degrees of freedom of the full model.
    p_uncorrected : ndarray of shape (n_voxels,)
        Voxel-wise permutation p (``|t|`` for two-sided tests; of z when ``zstat``).
    logp_fwe : dict of str to ndarray of shape (n_voxels,)
        -log10 family-wise corrected p per inference: ``"maxt"`` (max statistic, also for
        F), ``"cluster_mass"``, ``"cluster_size"`` (the p of the cluster a voxel belongs to;
        0 outside clusters), ``"tfce"``.
    null_max : dict of str to ndarray of shape (n_permutations,)
        Largest statistic of each permutation per inference, in permutation order; entry 0
        is the identity (the observed data). In z units when ``zstat``.
    tfce : ndarray of shape (n_voxels,) or None
        Observed TFCE (signed for two-sided t tests).
    cluster_size, cluster_mass : ndarray of shape (n_voxels,) or None
        Size and mass of the observed cluster each voxel belongs to (0 outside clusters).
    cluster_forming_threshold : float or None
        In statistic units, or in z units when ``zstat``.
    scheme : {"permute", "sign_flip"}
    permutations : ndarray of shape (n_permutations, n_subjects)
        Row 0 is the identity; index rows for "permute", +-1 rows for "sign_flip".
    two_sided : bool
    contrast : ndarray of shape (n_contrasts, n_regressors)
    z : ndarray of shape (n_voxels,)
        z of the same (one-sided for F and G) tail probability as ``stat`` under its
        parametric distribution: t or F with ``dof``, v or G with ``dof_map``.
    dof_map : ndarray of shape (n_voxels,) or None
        Approximate denominator dof of v (Welch-Satterthwaite) or G (Winkler et al. 2014);
        None for t and F.
    zstat : bool
        The inferences (max, clusters, TFCE, uncorrected p) used ``z`` instead of ``stat``,
        in every permutation (PALM's ``-zstat``).
    variance_groups : tuple of str
        Variance group names (empty for one group).
    """

    stat: NDArray[np.float64]
    stat_type: str
    dof: int
    p_uncorrected: NDArray[np.float64]
    logp_fwe: dict[str, NDArray[np.float64]]
    null_max: dict[str, NDArray[np.float64]]
    scheme: str
    permutations: NDArray
    two_sided: bool
    contrast: NDArray[np.float64]
    tfce: NDArray[np.float64] | None = None
    cluster_size: NDArray[np.float64] | None = None
    cluster_mass: NDArray[np.float64] | None = None
    cluster_forming_threshold: float | None = None
    z: NDArray[np.float64] | None = None
    dof_map: NDArray[np.float64] | None = None
    zstat: bool = False
    variance_groups: tuple[str, ...] = ()
    settings: dict = field(default_factory=dict)

    @property
    def n_permutations(self) -> int:
        return self.permutations.shape[0]


# --------------------------------------------------------------------------------------------
# Design partitioning
# --------------------------------------------------------------------------------------------
def _orthonormal_basis(matrix: NDArray[np.float64], tol: float = 1e-10) -> NDArray[np.float64]:
    if matrix.size == 0 or matrix.shape[1] == 0:
        return np.zeros((matrix.shape[0], 0))
    u, s, _ = np.linalg.svd(matrix, full_matrices=False)
    keep = s > tol * max(s[0], 1.0)
    return u[:, keep]


def _partition_design(
    design: NDArray[np.float64], contrast: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], int]:
    """Tested columns (orthonormal, orthogonal to Z) and nuisance columns (orthonormal).

    Returns ``tested`` of shape (n, k), ``nuisance`` of shape (n, q) and the dof.
    """
    n_subjects = design.shape[0]
    rank = np.linalg.matrix_rank(design)
    dof = n_subjects - rank
    if dof < 1:
        raise InputDataError(
            f"The design must leave at least one residual degree of freedom. Got "
            f"{n_subjects} subjects and rank {rank}."
        )
    c = contrast.T  # (p, k)
    _, s, vt = np.linalg.svd(c.T, full_matrices=True)
    rank_c = int(np.sum(s > 1e-10 * s[0]))
    c_perp = vt[rank_c:].T  # (p, p - k), spans the null space of C.T
    nuisance = _orthonormal_basis(design @ c_perp)
    tested = design @ c
    tested = tested - nuisance @ (nuisance.T @ tested)
    if contrast.shape[0] == 1:
        norm = np.linalg.norm(tested)
        if norm < 1e-10 * max(np.linalg.norm(design), 1.0):
            raise InputDataError(
                "The contrast must be estimable from the design. Got a contrast whose effect "
                "lies in the span of the other columns."
            )
        tested = tested / norm  # keep the sign of the contrast
    else:
        tested = _orthonormal_basis(tested)
        if tested.shape[1] < contrast.shape[0]:
            raise InputDataError(
                f"The F contrast's {contrast.shape[0]} rows must be estimable and independent "
                f"in the design. Got only {tested.shape[1]} estimable directions."
            )
    return tested, nuisance, dof


def _auto_scheme(nuisance: NDArray[np.float64]) -> str:
    ones = np.ones(nuisance.shape[0]) / np.sqrt(nuisance.shape[0])
    residual = ones - nuisance @ (nuisance.T @ ones)
    return "permute" if np.linalg.norm(residual) < 1e-8 else "sign_flip"


# --------------------------------------------------------------------------------------------
# Variance groups: Welch-type v and Winkler's G (Winkler et al. 2014, NeuroImage 92:381)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _VarianceGroups:
    """The variance-group structure that every permutation shares.

    ``gram[g]`` is ``F_g.T @ F_g`` for the rows of the full orthonormal basis ``F`` (tested
    columns first) in group ``g``, and ``residual_dof[g]`` the sum over the group of the
    diagonal of the residual-forming matrix ``I - F F.T``. A permutation moves a design row
    together with its variance group (the data stay, as in the rest of the engine), and a sign
    flip leaves both unchanged, so neither quantity depends on the permutation.
    """

    names: tuple[str, ...]
    index: NDArray[np.intp]
    indicator: NDArray[np.float64]
    gram: NDArray[np.float64]
    residual_dof: NDArray[np.float64]
    n_per_group: NDArray[np.float64]


#: A variance group needs this many residual dof (the sum over its subjects of 1 - leverage).
MIN_GROUP_RESIDUAL_DOF = 0.5


def variance_group_shortfall(labels: ArrayLike, design: ArrayLike) -> list[str]:
    """The variance groups that cannot estimate a variance of their own under ``design``.

    A group needs at least 2 subjects and :data:`MIN_GROUP_RESIDUAL_DOF` residual dof, the sum
    over its subjects of ``1 - leverage`` of the design (covariates can use up a small group's).

    Parameters
    ----------
    labels : array-like of shape (n_subjects,)
    design : array-like of shape (n_subjects, n_regressors)

    Returns
    -------
    list of str
        ``"<group> (<n> subject(s), <dof> residual dof)"`` per failing group; empty if none fails.
    """
    labels = np.asarray(labels).astype(str)
    matrix = np.asarray(design, dtype=float)
    u, singular, _ = np.linalg.svd(matrix, full_matrices=False)
    rank = int(np.sum(singular > singular[0] * 1e-10)) if singular.size and singular[0] > 0 else 0
    free = 1.0 - np.einsum("ij,ij->i", u[:, :rank], u[:, :rank])
    out = []
    for name in np.unique(labels):
        member = labels == name
        n, dof = int(member.sum()), float(free[member].sum())
        if n < 2 or dof < MIN_GROUP_RESIDUAL_DOF:
            out.append(f"{name!s} ({n} subject(s), {dof:.2f} residual dof)")
    return out


def _variance_groups(
    labels: ArrayLike | None, full_basis: NDArray[np.float64], n_subjects: int
) -> _VarianceGroups | None:
    """Validate the labels; None when there is at most one group (the t and F statistics)."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n_subjects,):
        raise InputDataError(
            f"'variance_groups' must give one label per subject ({n_subjects}). Got shape "
            f"{labels.shape!r}."
        )
    names, index = np.unique(labels.astype(str), return_inverse=True)
    if len(names) < 2:
        return None
    indicator = np.zeros((n_subjects, len(names)))
    indicator[np.arange(n_subjects), index] = 1.0
    leverage = np.einsum("ij,ij->i", full_basis, full_basis)
    residual_dof = indicator.T @ (1.0 - leverage)
    n_per_group = indicator.sum(axis=0)
    short = variance_group_shortfall(labels, full_basis)
    if short:
        raise InputDataError(
            "Each variance group must have at least 2 subjects and leave residual variance to "
            f"estimate (at least 0.5 residual dof). Got {'; '.join(short)}: merge the group "
            "with another or set variance_groups to 'none'."
        )
    gram = np.einsum("ni,nj,ng->gij", full_basis, full_basis, indicator)
    return _VarianceGroups(
        names=tuple(str(n) for n in names), index=index, indicator=indicator, gram=gram,
        residual_dof=residual_dof, n_per_group=n_per_group,
    )  # fmt: skip


def _weighted_nuisance_residuals(
    unit: NDArray, tested: NDArray[np.float64], nuisance: NDArray[np.float64], groups: _VarianceGroups
) -> NDArray[np.float64]:
    """Freedman-Lane residuals with the nuisance fitted by weighted least squares.

    One weight per variance group for the whole map, ``residual_dof_g`` over the median (across
    voxels) of the group's share of the full model's residual sum of squares: a brain-wide,
    stable estimate of each group's precision. Under the null, a common mean is then estimated
    mostly from the precise groups, so a small, high-variance group keeps nearly all of its
    deviation in its residuals, where sign flips can reproduce it (with OLS it keeps
    ``1 - n_g / n_pooled`` of it). Unit norm per voxel.
    """
    residual = np.asarray(unit, dtype=np.float64)
    full = residual - tested @ (tested.T @ residual)
    squares = np.square(full)
    total = squares.sum(axis=0)
    varying = total > 0
    share = (np.median(groups.indicator.T @ squares[:, varying] / total[varying], axis=1) if varying.any()
             else groups.residual_dof)  # fmt: skip
    weights = (groups.residual_dof / np.maximum(share, 1e-12))[groups.index]
    if nuisance.shape[1]:
        weighted = nuisance * weights[:, None]
        residual = residual - nuisance @ np.linalg.solve(nuisance.T @ weighted, weighted.T @ residual)
    norm = np.sqrt(np.einsum("ij,ij->j", residual, residual))
    return np.divide(residual, norm, out=np.zeros_like(residual), where=norm > 1e-10)


def _brain_wide_group_weights(
    data: NDArray, full_basis: NDArray[np.float64], groups: _VarianceGroups, chunk: int = 32768
) -> NDArray[np.float64]:
    """One precision weight per variance group for the whole map.

    ``residual_dof_g`` over the median, across voxels, of the group's share of the full model's
    residual sum of squares (each voxel's residuals at unit norm, so that every voxel counts
    once whatever its scale). Proportional to the inverse of the group's variance.
    """
    shares = []
    for begin in range(0, data.shape[1], chunk):
        block = np.asarray(data[:, begin : begin + chunk], dtype=np.float64)
        residual = block - full_basis @ (full_basis.T @ block)
        squares = np.square(residual)
        total = squares.sum(axis=0)
        varying = total > 1e-20 * np.maximum(np.square(block).sum(axis=0), np.finfo(float).tiny)
        shares.append(groups.indicator.T @ squares[:, varying] / total[varying])
    share = np.concatenate(shares, axis=1)
    if share.shape[1] == 0:
        return np.ones(len(groups.names))
    return groups.residual_dof / np.maximum(np.median(share, axis=1), 1e-12)


def _welch_statistic(
    tested_and_nuisance: NDArray[np.float64],
    group_projections: NDArray[np.float64],
    group_sums_of_squares: NDArray[np.float64],
    groups: _VarianceGroups,
    n_tested: int,
    stat_type: str,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """v (one tested column) or G (several) and their approximate dof, element-wise.

    Parameters
    ----------
    tested_and_nuisance : ndarray of shape (c0, ...)
        Projections ``a = B.T u`` of unit-norm (Freedman-Lane) residuals ``u`` on the permuted
        basis ``B`` (tested columns first; a constant whose projection is 0 may be left out,
        so ``c0`` is at most the basis size ``c`` of ``groups.gram``).
    group_projections : ndarray of shape (n_groups, c0, ...)
        ``(D_g B).T u``: the same projections restricted to the rows of each variance group.
    group_sums_of_squares : ndarray of shape (n_groups, ...)
        ``sum over the group of u ** 2``.
    groups : _VarianceGroups
    n_tested : int
    stat_type : {"t", "F"}

    Returns
    -------
    stat : ndarray of shape (...)
        ``v = a_0 / sqrt([A^-1]_00)`` with ``A = sum_g w_g B_g.T B_g`` and
        ``w_g = residual_dof_g / RSS_g`` (the design's OLS fit; Winkler et al. 2014, table 2),
        or ``G = a_X.T ([A^-1]_XX)^-1 a_X / (Lambda s)`` for ``s`` tested columns.
    dof : ndarray of shape (...)
        For v, Satterthwaite's ``V^2 / sum_g (w_g u.T K_g u)^2 / residual_dof_g`` with
        ``u = A^-1 e_0`` and ``V = u_0`` the estimated variance of the contrast: for a
        difference of two group means this is Welch-Satterthwaite, and groups the contrast
        does not involve add nothing (Winkler's formula, which PALM uses for v too, also
        counts them). For G, Winkler's ``s (s + 2) / (3 sum_g (1 - W_g / tr W)^2 /
        residual_dof_g)``, Welch's (1951) ANOVA dof for a one-way design.
    """
    # explicit loops over the few columns and groups: einsum/tensordot over (b, v) trailing
    # axes copy their operands, and these element-wise passes cost as much as the GEMM
    a = tested_and_nuisance
    c0 = a.shape[0]
    gram = groups.gram
    n_groups, c = gram.shape[:2]
    shape = np.broadcast_shapes(a.shape[1:], group_sums_of_squares.shape[1:])
    weights = []
    for g in range(n_groups):
        rss = np.array(group_sums_of_squares[g], dtype=np.float64)
        for i in range(c0):
            a_i = np.asarray(a[i], dtype=np.float64)
            rss -= 2.0 * a_i * group_projections[g, i]
            inner = gram[g, i, i] * a_i
            for j in range(c0):
                if j != i:
                    inner += gram[g, i, j] * a[j]
            rss += a_i * inner
        # unit-norm residuals: 1e-12 is rounding noise of a group that the model fits exactly
        weights.append(groups.residual_dof[g] / np.maximum(rss, 1e-12))
    matrix = [[None] * c for _ in range(c)]
    for i in range(c):
        for j in range(i, c):
            entry = np.zeros(shape)
            for g in range(n_groups):
                if gram[g, i, j] != 0.0:
                    entry += gram[g, i, j] * weights[g]
            matrix[i][j] = matrix[j][i] = entry
    # Gaussian elimination of the nuisance pivots leaves the Schur complement
    # A_XX - A_XZ A_ZZ^-1 A_ZX = ([A^-1]_XX)^-1 in the tested block; a pivot's row is not
    # changed once it is eliminated, which the back substitution below uses
    remaining = list(range(c))
    pivots = list(range(n_tested, c))
    for pivot in pivots:
        remaining.remove(pivot)
        inverse = 1.0 / matrix[pivot][pivot]
        for position, i in enumerate(remaining):
            factor = matrix[i][pivot] * inverse
            for j in remaining[position:]:
                updated = matrix[i][j] - factor * matrix[pivot][j]
                matrix[i][j] = updated
                if j != i:
                    matrix[j][i] = updated
    if stat_type == "t":
        schur = matrix[0][0]
        stat = a[0] * np.sqrt(schur)
        # u = A^-1 e_0 by back substitution through the pivot rows
        u = [None] * c
        u[0] = 1.0 / schur
        for position in range(len(pivots) - 1, -1, -1):
            pivot = pivots[position]
            total = matrix[pivot][0] * u[0]
            for j in pivots[position + 1 :]:
                total += matrix[pivot][j] * u[j]
            u[pivot] = -total / matrix[pivot][pivot]
        variance = u[0]
        spread = np.zeros(shape)
        for g in range(n_groups):
            form = np.zeros(shape)
            for i in range(c):
                for j in range(i, c):
                    if gram[g, i, j] != 0.0:
                        form += (1.0 if i == j else 2.0) * gram[g, i, j] * u[i] * u[j]
            spread += np.square(weights[g] * form) / groups.residual_dof[g]
        dof = np.square(variance) / np.maximum(spread, np.finfo(float).tiny)
        return stat, dof
    s = n_tested
    quadratic = np.zeros(shape)
    for i in range(s):
        for j in range(s):
            quadratic += a[i] * matrix[i][j] * a[j]
    trace_parts = [weights[g] * groups.n_per_group[g] for g in range(n_groups)]
    trace = sum(trace_parts)
    spread = sum(np.square(1.0 - part / trace) / groups.residual_dof[g] for g, part in enumerate(trace_parts))
    spread = np.maximum(spread, np.finfo(float).tiny)
    correction = 1.0 + 2.0 * (s - 1) / (s * (s + 2)) * spread
    return quadratic / (s * correction), s * (s + 2) / (3.0 * spread)


# --------------------------------------------------------------------------------------------
# Permutations
# --------------------------------------------------------------------------------------------
def permutation_memory_bytes(
    n_permutations: int, n_subjects: int, n_inferences: int, n_tests: int = 1
) -> int:
    """Memory that grows with the number of permutations, for ``n_tests`` tests kept together.

    The permutation (or sign-flip) rows, int32 per subject, and each inference's null maxima,
    float64, of every test a family-wise correction keeps; plus the batch buffers (about 160 MB,
    whatever the count). An estimate to refuse a count that cannot fit before allocating it.
    """
    per_permutation = 4 * n_subjects + 8 * max(n_inferences, 1) * max(n_tests, 1)
    return int(n_permutations) * per_permutation + 160 * 2**20


def make_permutations(
    n_subjects: int,
    n_permutations: int,
    *,
    scheme: str = "permute",
    random_seed: int | np.random.Generator | None = None,
) -> NDArray:
    """Random permutations (or sign flips) with the identity as row 0.

    Parameters
    ----------
    n_subjects : int
    n_permutations : int
        Rows, including the identity.
    scheme : {"permute", "sign_flip"}, default="permute"
    random_seed : int, Generator or None, default=None
        Seed for ``np.random.default_rng``.

    Returns
    -------
    permutations : ndarray of shape (n_permutations, n_subjects)
        int32 indices for "permute", int8 +-1 for "sign_flip".
    """
    if n_permutations < 1:
        raise InputDataError(f"'n_permutations' must be at least 1. Got {n_permutations!r}.")
    rng = np.random.default_rng(random_seed)
    if scheme == "permute":
        out = np.tile(np.arange(n_subjects, dtype=np.int32), (n_permutations, 1))
        if n_permutations > 1:
            out[1:] = rng.permuted(out[1:], axis=1)
        return out
    if scheme == "sign_flip":
        out = np.ones((n_permutations, n_subjects), dtype=np.int8)
        out[1:] = rng.integers(0, 2, size=(n_permutations - 1, n_subjects), dtype=np.int8) * 2 - 1
        return out
    raise InputDataError(f"'scheme' must be 'permute' or 'sign_flip'. Got {scheme!r}.")


def _check_explicit(permutations: ArrayLike, n_subjects: int, scheme: str) -> NDArray:
    rows = np.asarray(permutations)
    if rows.ndim != 2 or rows.shape[1] != n_subjects:
        raise InputDataError(
            f"'permutations' must have shape (n, n_subjects={n_subjects}). "
            f"Got {rows.shape!r}."
        )
    if scheme == "permute":
        expected = np.tile(np.arange(n_subjects), (len(rows), 1))
        if not np.array_equal(np.sort(rows, axis=1), expected):
            raise InputDataError(
                "Each row of 'permutations' must be a permutation of range(n_subjects) for "
                "the 'permute' scheme."
            )
        identity = np.arange(n_subjects, dtype=np.int32)[None]
        return np.vstack([identity, rows.astype(np.int32)])
    if not np.all(np.abs(rows) == 1):
        raise InputDataError("Each row of 'permutations' must hold only -1 and 1 for 'sign_flip'.")
    return np.vstack([np.ones((1, n_subjects), dtype=np.int8), rows.astype(np.int8)])


# --------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------
def _statistic(
    projections: NDArray,
    n_tested: int,
    dof: int,
    stat_type: str,
    *,
    out: NDArray | None = None,
    work: NDArray | None = None,
) -> NDArray:
    """t or F from projections of unit-norm residuals on [tested, nuisance] columns.

    ``projections`` has shape (n_batch, n_tested + n_nuisance, n_voxels). Works in place on
    two (n_batch, n_voxels) buffers, ``out`` (returned) and ``work``, reused across batches
    by the caller: this element-wise pass costs about as much as the GEMM, and fresh
    buffers of this size would cost page faults on every batch.
    """
    n_columns = projections.shape[1]
    square = np.empty_like(projections[:, 0, :]) if work is None else work
    explained_tested = np.square(projections[:, 0, :], out=out)
    for column in range(1, n_tested):
        np.square(projections[:, column, :], out=square)
        explained_tested += square
    rss = explained_tested.copy() if stat_type == "F" else explained_tested
    for column in range(n_tested, n_columns):
        np.square(projections[:, column, :], out=square)
        rss += square
    np.subtract(1.0, rss, out=rss)
    np.maximum(rss, np.finfo(projections.dtype).eps, out=rss)
    if stat_type == "t":
        np.divide(dof, rss, out=rss)
        np.sqrt(rss, out=rss)
        rss *= projections[:, 0, :]
        return rss
    np.divide(explained_tested, rss, out=explained_tested)
    explained_tested *= dof / n_tested
    return explained_tested


def _batch_design(
    basis: NDArray[np.float64], rows: NDArray, scheme: str, dtype
) -> NDArray:
    """(n_batch * n_columns, n_subjects) matrix of permuted (or sign-flipped) design columns."""
    if scheme == "permute":
        permuted = basis[rows]  # (b, n, c): design row i <- row perm[i]
    else:
        permuted = basis[None, :, :] * rows[:, :, None]
    stacked = permuted.transpose(0, 2, 1).reshape(-1, basis.shape[0])
    return np.ascontiguousarray(stacked, dtype=dtype)


def _check_options(
    *, inference: Sequence[str], scheme: str, residuals: str, precision: str, n_jobs: int | None,
    mask: ArrayLike | None, connectivity: int, cluster_forming_p: float, n_voxels: int,
) -> tuple[tuple[str, ...], int, VoxelGraph | None]:
    """Check :func:`permutation_test`'s options; return the inferences, the thread count and the
    voxel graph (None when only max-T is asked for).

    Raises
    ------
    InputDataError
        An unknown inference, scheme, residuals or precision, a bad ``n_jobs``, a missing or
        mismatched ``mask`` for cluster or TFCE inference, ``cluster_forming_p`` outside (0, 1).
    """
    inference = tuple(inference)
    unknown = [name for name in inference if name not in INFERENCES]
    if unknown or not inference:
        raise InputDataError(
            f"'inference' must be a non-empty subset of {INFERENCES!r}. Got {inference!r}."
        )
    if scheme not in SCHEMES:
        raise InputDataError(f"'scheme' must be one of {SCHEMES!r}. Got {scheme!r}.")
    if residuals not in RESIDUALS:
        raise InputDataError(f"'residuals' must be one of {RESIDUALS!r}. Got {residuals!r}.")
    if precision not in ("float32", "float64"):
        raise InputDataError(f"'precision' must be 'float32' or 'float64'. Got {precision!r}.")
    if n_jobs is None:
        n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not isinstance(n_jobs, int) or n_jobs < 1:
        raise InputDataError(f"'n_jobs' must be a positive integer or None. Got {n_jobs!r}.")
    graph = None
    if any(name != "maxt" for name in inference):
        if mask is None:
            raise InputDataError(
                f"'mask' must be given for cluster or TFCE inference. Got inference={inference!r} "
                "and mask=None."
            )
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3 or int(mask.sum()) != n_voxels:
            raise InputDataError(
                f"'mask' must be a 3D boolean array with one True voxel per data column "
                f"({n_voxels}). Got shape {mask.shape!r} with {int(mask.sum())} True voxels."
            )
        graph = VoxelGraph.from_mask(mask, connectivity)
    if not 0 < cluster_forming_p < 1:
        raise InputDataError(f"'cluster_forming_p' must be in (0, 1). Got {cluster_forming_p!r}.")
    return inference, n_jobs, graph


def permutation_test(
    data: ArrayLike,
    design: pd.DataFrame | ArrayLike,
    contrast: str | ArrayLike,
    *,
    n_permutations: int = 5000,
    two_sided: bool = True,
    random_seed: int | np.random.Generator | None = None,
    inference: Sequence[str] = INFERENCES,
    mask: ArrayLike | None = None,
    connectivity: int = 6,
    cluster_forming_p: float = 0.001,
    tfce_extent_exponent: float = 0.5,
    tfce_height_exponent: float = 2.0,
    tfce_dh: float | str = "auto",
    scheme: str = "auto",
    permutations: ArrayLike | None = None,
    batch_size: int | None = None,
    precision: str = "float32",
    n_jobs: int | None = None,
    variance_groups: ArrayLike | None = None,
    zstat: bool | None = None,
    residuals: str = "auto",
    variance_estimate: str = "voxel",
    accel: str = "none",
) -> PermutationResult:
    """Permutation test of one t or F contrast with family-wise error control.

    Parameters
    ----------
    data : ndarray of shape (n_subjects, n_voxels)
        One map per subject (e.g. infusion - baseline change maps), in-mask voxels in the C
        order of ``mask[mask]``. float32 is fine.
    design : DataFrame or ndarray of shape (n_subjects, n_regressors)
        Full model, e.g. from :func:`fcflow.stats.make_group_design`.
    contrast : str, ndarray of shape (n_regressors,) or (n_contrasts, n_regressors)
        A t contrast (expression or vector, see :func:`fcflow.stats.parse_contrast`) or an F
        contrast matrix with two or more rows. A one-row matrix is a t contrast.
    n_permutations : int, default=5000
        Number of permutations including the identity (ignored if ``permutations`` given).
    two_sided : bool, default=True
        Test |t| (both signs; clusters of each sign separately). Ignored for F.
    random_seed : int, Generator or None, default=None
        Seed of ``np.random.default_rng``; fix it for reproducible p-values.
    inference : sequence of {"maxt", "cluster_mass", "cluster_size", "tfce"}, default=all four
        Which family-wise corrections to compute; all but "maxt" need ``mask``.
    mask : ndarray of bool, 3D, or None, default=None
        Places the voxels on the grid; required for cluster and TFCE inference.
    connectivity : {6, 18, 26}, default=6
        Cluster neighbourhood; 6 (faces) is nilearn's.
    cluster_forming_p : float, default=0.001
        Uncorrected parametric p of the cluster-forming threshold (two-sided for two-sided t
        tests, as nilearn).
    tfce_extent_exponent, tfce_height_exponent : float, default=0.5, 2.0
        TFCE's E and H.
    tfce_dh : float or "auto", default="auto"
        TFCE step; "auto" uses 100 steps up to each map's own maximum (nilearn, fslmaths).
    scheme : {"auto", "permute", "sign_flip"}, default="auto"
        See the module docstring.
    permutations : ndarray of shape (n, n_subjects) or None, default=None
        Explicit shuffles (index rows) or sign flips (+-1 rows), without the identity,
        which is prepended. Overrides ``n_permutations`` and ``random_seed``.
    batch_size : int or None, default=None
        Permutations per GEMM; None keeps the batch buffers near 160 MB.
    precision : {"float32", "float64"}, default="float32"
        Arithmetic of the null statistics.
    n_jobs : int or None, default=None
        Threads for the cluster and TFCE statistics of the permutations of a batch (the
        compiled TFCE kernel releases the GIL); None uses the CPUs this process may run on.
        The GEMMs use BLAS's own threads. Results do not depend on it.
    variance_groups : array-like of shape (n_subjects,) or None, default=None
        Variance group label of each subject (e.g. the study group). With two or more groups
        the statistic is Winkler et al.'s (2014) v (Welch-type t) for a t contrast or G for an
        F contrast, with the residual variance estimated in each group, and the same
        permutations (free exchange, or sign flips) as without groups: v and G are
        asymptotically pivotal, which keeps the permutation test valid when the groups differ
        in variance. None or one label: t and F (one common variance).
    zstat : bool or None, default=None
        Run every inference on z (the statistic's tail probability as a z) instead of the
        statistic, in the observed data and in every permutation. None means True for v and G,
        whose dof differs between voxels and permutations, and False otherwise. With a
        constant dof, z is a monotone map of t or F: max-statistic and cluster-size p are
        unchanged, cluster mass and TFCE are computed on z (TFCE's E and H are tuned for
        z-like maps, not for F). The cluster-forming threshold is then the normal quantile of
        ``cluster_forming_p``.
    residuals : {"auto", "freedman_lane", "weighted_freedman_lane", "ter_braak"}, default="auto"
        What the permutations shuffle: the residuals of the nuisance model fitted by OLS
        (Freedman & Lane 1983), or by weighted least squares with one brain-wide weight per
        variance group (sign flips with variance groups only), or the residuals of the full
        model (ter Braak 1992; Winkler et al. 2014, table 2). The observed statistic is the
        same. "auto": weighted Freedman-Lane with variance groups and sign flips, otherwise
        Freedman-Lane. The module docstring and benchmarks/results/README.md give the FWE of
        each on heteroscedastic nulls.
    variance_estimate : {"voxel", "brain"}, default="voxel"
        With variance groups: "voxel" estimates each group's variance at every voxel (v, G);
        "brain" estimates one variance ratio per group for the whole map (the median over voxels
        of each group's share of the full model's residual sum of squares, scaled by its residual
        dof) and tests the weighted least squares t or F with these weights, by sign flips (SPM's
        pooled non-sphericity estimate, with permutation instead of a parametric null). Its
        per-voxel variance has all the residual dof, so small groups do not make its tail heavy.
    accel : {"none", "tail"}, default="none"
        "tail": the family-wise p below 0.1 come from a generalised Pareto fit to the upper tail
        of each inference's null of maxima (Winkler et al. 2016; :mod:`fcflow.tail`), so a few
        hundred permutations estimate small p; the fits are in ``settings["tail_fits"]``. The
        uncorrected p stay empirical.

    Returns
    -------
    result : PermutationResult
    """
    data = as_data_array(data)
    n_subjects, n_voxels = data.shape
    if accel not in ACCELERATIONS:
        raise InputDataError(f"'accel' must be one of {ACCELERATIONS!r}. Got {accel!r}.")
    if variance_estimate not in ("voxel", "brain"):
        raise InputDataError(f"'variance_estimate' must be 'voxel' or 'brain'. Got {variance_estimate!r}.")
    if not np.all(np.isfinite(data)):
        bad = int(np.sum(~np.all(np.isfinite(data), axis=0)))
        raise InputDataError(
            f"The data must be finite. Got NaN or inf in {bad} of {n_voxels} voxels: restrict "
            "the mask to voxels covered in every subject."
        )
    columns = list(design.columns) if isinstance(design, pd.DataFrame) else None
    design_array = as_design_array(design, n_subjects)
    contrast_matrix = _as_contrast_matrix(contrast, columns, design_array.shape[1])
    stat_type = "t" if contrast_matrix.shape[0] == 1 else "F"
    two_sided = bool(two_sided) and stat_type == "t"

    inference, n_jobs, graph = _check_options(
        inference=inference, scheme=scheme, residuals=residuals, precision=precision, n_jobs=n_jobs, mask=mask,
        connectivity=connectivity, cluster_forming_p=cluster_forming_p, n_voxels=n_voxels,
    )
    dtype = np.dtype(precision)
    needs_graph = graph is not None

    tested, nuisance, dof = _partition_design(design_array, contrast_matrix)
    n_tested = tested.shape[1]
    if variance_estimate == "brain" and variance_groups is not None:
        labels = np.asarray(variance_groups)
        full_basis = np.hstack([tested, nuisance])
        groups = _variance_groups(labels, full_basis, n_subjects)
        if groups is not None:
            weights = _brain_wide_group_weights(data, full_basis, groups)
            scale = np.sqrt(weights[groups.index])
            result = permutation_test(
                np.asarray(data, dtype=np.float64) * scale[:, None], design_array * scale[:, None], contrast_matrix,
                n_permutations=n_permutations, two_sided=two_sided, random_seed=random_seed,
                inference=inference, mask=mask, connectivity=connectivity, cluster_forming_p=cluster_forming_p,
                tfce_extent_exponent=tfce_extent_exponent, tfce_height_exponent=tfce_height_exponent,
                tfce_dh=tfce_dh, scheme="sign_flip" if scheme == "auto" else scheme, permutations=permutations,
                batch_size=batch_size, precision=precision, n_jobs=n_jobs, zstat=zstat,
                residuals="freedman_lane" if residuals == "auto" else residuals, accel=accel,
            )  # fmt: skip
            return dataclasses.replace(result, variance_groups=groups.names, settings={
                **result.settings, "statistic": f"wls-{stat_type}", "variance_groups": list(groups.names),
                "variance_estimate": "brain",
                "group_weights": {name: float(w) for name, w in zip(groups.names, weights / weights.max())},
            })  # fmt: skip
    several_groups = variance_groups is not None and len(np.unique(np.asarray(variance_groups).astype(str))) > 1
    if scheme == "auto":
        # errors of different variance are not exchangeable between groups, but a sign flip
        # keeps every subject's own variance (independent symmetric errors, Winkler et al.
        # 2014): free exchange of v inflated max-v FWE to 71 % with groups of 10/4/6 and one
        # SD x2.5 (benchmarks/results/README.md)
        scheme = "sign_flip" if several_groups else _auto_scheme(nuisance)
    if permutations is not None:
        rows = _check_explicit(permutations, n_subjects, scheme)
    else:
        rows = make_permutations(
            n_subjects, n_permutations, scheme=scheme, random_seed=random_seed
        )
    n_total = rows.shape[0]
    permuted_nuisance = nuisance
    left_out = np.zeros((n_subjects, 0))
    if scheme == "permute" and _auto_scheme(nuisance) == "permute":
        # The nuisance space holds the constant, and a permuted constant is the constant:
        # its projection on the residuals is 0 for every permutation. Leave it out of the
        # products (a third fewer for a 3-group design).
        constant = np.full((n_subjects, 1), 1.0 / np.sqrt(n_subjects))
        permuted_nuisance = _orthonormal_basis(nuisance - constant @ (constant.T @ nuisance))
        left_out = constant
    basis = np.hstack([tested, permuted_nuisance])  # (n, k + q), less the constant
    n_columns = basis.shape[1]
    groups = _variance_groups(variance_groups, np.hstack([basis, left_out]), n_subjects)
    welch = groups is not None
    if zstat is None:
        zstat = welch
    if welch and not zstat:
        raise InputDataError(
            "'zstat' must be True or None with two or more variance groups: the v and G "
            "statistics have a different dof at every voxel and permutation, so inference and "
            "thresholds work on z. Got zstat=False."
        )
    zstat = bool(zstat)
    result_type = {"t": "v", "F": "G"}[stat_type] if welch else stat_type
    if welch:
        # permuted with the basis: [B, D_1 B, ..., D_G B] against u, and D_g against u ** 2
        masked = basis[:, None, :] * groups.indicator[:, :, None]  # (n, G, c0)
        gemm_basis = np.hstack([basis, masked.reshape(n_subjects, -1)])
    else:
        gemm_basis = basis
    # z at one dof is monotone in t or F: the null then compares and maximises t or F and
    # converts only what needs z (the maxima; for clusters and TFCE the map, by ZTable),
    # instead of the exact conversion of every map (11x the cost of max-T; benchmarks/results)
    statistic = _NullStatistic(gemm_basis=gemm_basis, n_columns=n_columns, n_tested=n_tested, dof=dof,
                               stat_type=stat_type, groups=groups if welch else None, zstat=zstat,
                               table=ZTable(stat_type, dof, n_tested) if zstat and not welch else None)
    to_z = statistic.to_z

    chunk = 32768 if not welch else 4096
    unit, observed, observed_dof = _residuals_and_statistic(data, tested, nuisance, statistic, basis=basis,
                                                            ter_braak=residuals == "ter_braak", dtype=dtype,
                                                            chunk=chunk)
    if residuals == "auto":
        residuals = "weighted_freedman_lane" if welch and scheme == "sign_flip" else "freedman_lane"
    if residuals == "weighted_freedman_lane":
        if not (welch and scheme == "sign_flip"):
            raise InputDataError(
                "'residuals' = 'weighted_freedman_lane' needs two or more variance groups and sign flips. "
                f"Got {len(groups.names) if welch else 1} variance group(s) and scheme {scheme!r}."
            )
        unit[:] = _weighted_nuisance_residuals(unit, tested, nuisance, groups)
    observed_z = to_z(observed, observed_dof)
    # the statistic every inference uses
    inferred = observed_z if zstat else observed

    threshold = _cluster_forming_threshold(cluster_forming_p, statistic, two_sided=two_sided)

    keys = [name for name in INFERENCES if name in inference]
    graph_keys = [name for name in keys if name != "maxt"]

    def summarise(stat_vector: NDArray, names: list[str]) -> dict[str, float]:
        out = {}
        if "maxt" in names:
            out["maxt"] = float(np.max(np.abs(stat_vector)) if two_sided else np.max(stat_vector))
        if "cluster_mass" in names or "cluster_size" in names:
            size, mass = cluster_maxima(stat_vector, threshold, graph, two_sided)
            out["cluster_size"], out["cluster_mass"] = size, mass
        if "tfce" in names:
            out["tfce"] = tfce_vector(
                stat_vector, graph, two_sided=two_sided,
                extent_exponent=tfce_extent_exponent, height_exponent=tfce_height_exponent,
                dh=tfce_dh, per_voxel=False,
            )  # fmt: skip
        return out

    null_max = {name: np.empty(n_total) for name in keys}
    observed_tfce = observed_size = observed_mass = None
    if "tfce" in inference:
        observed_tfce = tfce_vector(
            inferred, graph, two_sided=two_sided,
            extent_exponent=tfce_extent_exponent, height_exponent=tfce_height_exponent, dh=tfce_dh,
        )  # fmt: skip
    if "cluster_mass" in inference or "cluster_size" in inference:
        observed_size, observed_mass = cluster_values(inferred, threshold, graph, two_sided)
    first = summarise(inferred, keys)
    for key in keys:
        null_max[key][0] = first[key]

    rtol = _tie_rtol(dtype, on_z=zstat)
    observed_abs = np.abs(inferred) if two_sided else inferred
    # with a table the null compares t or F (at their tolerance), otherwise the inferred statistic
    null_scale = observed if statistic.table is not None else inferred
    null_rtol = _tie_rtol(dtype, on_z=False) if statistic.table is not None else rtol
    null_abs = np.abs(null_scale) if two_sided else null_scale
    tie_floor = (null_abs - null_rtol * np.abs(null_abs)).astype(dtype)

    exceed = _null_distribution(
        statistic, unit, rows, null_max, scheme=scheme, tie_floor=tie_floor, two_sided=two_sided,
        summarise=lambda vector: summarise(vector, graph_keys), graph_keys=graph_keys, batch_size=batch_size,
        n_jobs=n_jobs, chunk=chunk, dtype=dtype,
    )
    p_uncorrected = exceed / n_total

    logp_fwe = {}
    tail_fits: dict[str, Any] = {}
    if "maxt" in keys:
        logp_fwe["maxt"] = _fwe_logp(observed_abs, null_max["maxt"], rtol, accel=accel, fits=tail_fits, key="maxt")
    observed_maps = {
        "cluster_mass": observed_mass,
        "cluster_size": observed_size,
        "tfce": None if observed_tfce is None else np.abs(observed_tfce),
    }
    for name in graph_keys:
        logp_fwe[name] = _fwe_logp(observed_maps[name], null_max[name], rtol, zero_is_null=True, accel=accel,
                                   fits=tail_fits, key=name)

    return PermutationResult(
        stat=observed,
        stat_type=result_type,
        dof=dof,
        p_uncorrected=p_uncorrected,
        logp_fwe=logp_fwe,
        null_max=null_max,
        scheme=scheme,
        permutations=rows,
        two_sided=two_sided,
        contrast=contrast_matrix,
        tfce=observed_tfce,
        cluster_size=observed_size,
        cluster_mass=observed_mass,
        cluster_forming_threshold=threshold if needs_graph else None,
        z=observed_z,
        dof_map=observed_dof if welch else None,
        zstat=zstat,
        variance_groups=groups.names if welch else (),
        settings={
            "connectivity": connectivity,
            "cluster_forming_p": cluster_forming_p,
            "tfce_extent_exponent": tfce_extent_exponent,
            "tfce_height_exponent": tfce_height_exponent,
            "tfce_dh": tfce_dh,
            "precision": precision,
            "statistic": result_type,
            "zstat": zstat,
            "variance_groups": list(groups.names) if welch else [],
            "residuals": residuals,
            "accel": accel,
            **({"tail_fits": tail_fits} if accel == "tail" else {}),
        },
    )


@dataclass(frozen=True)
class _NullStatistic:
    """How a statistic is computed from the residuals' projections on the (permuted) design.

    ``gemm_basis`` is the tested columns and the permuted nuisance (``n_columns``), followed,
    with variance groups, by the same columns masked to each group: one product gives every
    group's projections (Winkler et al. 2014's v and G). ``table`` converts a t or F null to z
    at the one dof of a test without variance groups (``zstat``).
    """

    gemm_basis: NDArray[np.float64]
    n_columns: int
    n_tested: int
    dof: float
    stat_type: str
    groups: _VarianceGroups | None
    zstat: bool
    table: ZTable | None = None

    @property
    def n_gemm(self) -> int:
        return self.gemm_basis.shape[1]

    @property
    def n_groups(self) -> int:
        return 0 if self.groups is None else len(self.groups.names)

    def welch(self, projections: NDArray, squares: NDArray | None) -> tuple[NDArray, NDArray]:
        """v or G and their dof from (b, n_gemm, v) projections and (b, G, v) sums, float64."""
        a = np.moveaxis(projections[:, : self.n_columns], 1, 0)  # views: (c0, b, v)
        per_group = projections[:, self.n_columns :].reshape(len(projections), self.n_groups, self.n_columns, -1)
        return _welch_statistic(
            a, np.moveaxis(per_group, (1, 2), (0, 1)), np.moveaxis(squares, 1, 0),
            self.groups, self.n_tested, self.stat_type,
        )  # fmt: skip

    def to_z(self, values: NDArray, dof_values: NDArray | float) -> NDArray[np.float64]:
        """The z of the same tail probability as ``values`` (t or F) at ``dof_values``."""
        if self.stat_type == "t":
            return t_to_z(values, dof_values)
        return f_to_z(values, self.n_tested, dof_values)


def _residuals_and_statistic(
    data: NDArray, tested: NDArray[np.float64], nuisance: NDArray[np.float64], statistic: _NullStatistic, *,
    basis: NDArray[np.float64], ter_braak: bool, dtype: np.dtype, chunk: int,
) -> tuple[NDArray, NDArray[np.float64], NDArray[np.float64]]:
    """The unit-norm residuals the permutations shuffle, and the observed statistic and its dof.

    Residuals of the nuisance model (Freedman-Lane), or of the full model with ``ter_braak``,
    scaled to unit norm per voxel, in the null's precision ``dtype``; the observed statistic in
    float64. Voxels in chunks of ``chunk`` (smaller with variance groups).
    """
    n_subjects, n_voxels = data.shape
    groups, n_tested, dof, stat_type = statistic.groups, statistic.n_tested, statistic.dof, statistic.stat_type
    unit = np.empty((n_subjects, n_voxels), dtype=dtype)
    observed = np.empty(n_voxels)
    observed_dof = np.full(n_voxels, float(dof))
    for begin in range(0, n_voxels, chunk):
        block = np.asarray(data[:, begin : begin + chunk], dtype=np.float64)
        scale = np.sqrt(np.einsum("ij,ij->j", block, block))
        if nuisance.shape[1]:
            block = block - nuisance @ (nuisance.T @ block)
        norm = np.sqrt(np.einsum("ij,ij->j", block, block))
        # a voxel whose residual is rounding noise of its data is constant: statistic 0
        block = np.divide(block, norm, out=np.zeros_like(block), where=norm > 1e-10 * scale)
        if ter_braak:
            full = block - tested @ (tested.T @ block)  # R_M = R_Z - P_X, X orthogonal to Z
            full_norm = np.sqrt(np.einsum("ij,ij->j", full, full))
            unit[:, begin : begin + chunk] = np.divide(
                full, full_norm, out=np.zeros_like(full), where=full_norm > 1e-10
            )
        else:
            unit[:, begin : begin + chunk] = block
        if groups is not None:
            stat_block, dof_block = statistic.welch(
                (statistic.gemm_basis.T @ block)[None], (groups.indicator.T @ np.square(block))[None]
            )
            observed[begin : begin + chunk] = stat_block[0]
            observed_dof[begin : begin + chunk] = dof_block[0]
        else:
            observed[begin : begin + chunk] = _statistic(
                (basis.T @ block)[None], n_tested, dof, stat_type
            )[0]
    return unit, observed, observed_dof


def _cluster_forming_threshold(cluster_forming_p: float, statistic: _NullStatistic, *, two_sided: bool) -> float:
    """The statistic (or z) value of ``cluster_forming_p``: two-sided for two-sided t, as nilearn."""
    if statistic.zstat:
        return float(special.ndtri(1.0 - (cluster_forming_p / 2 if two_sided else cluster_forming_p)))
    if statistic.stat_type == "t":
        return compute_t_threshold(cluster_forming_p, statistic.dof, two_sided=two_sided)
    return compute_f_threshold(cluster_forming_p, statistic.n_tested, statistic.dof)


def _null_distribution(
    statistic: _NullStatistic, unit: NDArray, rows: NDArray, null_max: dict[str, NDArray], *, scheme: str,
    tie_floor: NDArray, two_sided: bool, summarise: Callable[[NDArray], dict[str, float]],
    graph_keys: Sequence[str], batch_size: int | None, n_jobs: int, chunk: int, dtype: np.dtype,
) -> NDArray[np.int64]:
    """Every permutation of ``rows`` but the identity (row 0), in batches of one matrix product.

    Fills ``null_max`` (each inference's maximum per permutation; row 0 is the observed one)
    and returns, per voxel, how many permutations (the identity included) reach the observed
    statistic (``tie_floor``). Cluster and TFCE maxima are computed in ``n_jobs`` threads.
    """
    gemm_basis, n_gemm, n_groups = statistic.gemm_basis, statistic.n_gemm, statistic.n_groups
    n_columns, n_tested, dof, stat_type = statistic.n_columns, statistic.n_tested, statistic.dof, statistic.stat_type
    groups, welch = statistic.groups, statistic.groups is not None
    to_statistic, to_z, table = statistic.welch, statistic.to_z, statistic.table
    n_total = rows.shape[0]
    n_voxels = unit.shape[1]
    exceed = np.ones(n_voxels, dtype=np.int64)  # the identity
    if batch_size is None:
        # about 160 MB of buffers (projections, statistic, work, flags): a wide GEMM that
        # reads the residuals once per ~30 permutations on the 2 mm MNI mask
        batch_size = int(max(1, min(512, 160e6 / ((n_gemm + n_groups + 3) * n_voxels * dtype.itemsize))))
    if batch_size < 1:
        raise InputDataError(f"'batch_size' must be a positive integer. Got {batch_size!r}.")
    executor = ThreadPoolExecutor(n_jobs) if graph_keys and n_jobs > 1 and n_total > 2 else None
    # buffers reused by every batch (the last one uses the leading part)
    size = min(batch_size, max(n_total - 1, 1))
    projection_buffer = np.empty((size * n_gemm, n_voxels), dtype=dtype)
    stat_buffer = np.empty((size, n_voxels), dtype=dtype)
    work_buffer = np.empty((size, n_voxels), dtype=dtype)
    abs_buffer = np.empty((size, n_voxels), dtype=dtype) if two_sided and graph_keys and table is None else None
    exceeds = np.empty((size, n_voxels), dtype=bool)
    if welch:
        unit_squares = np.square(unit)
        fixed_squares = None
        if scheme == "sign_flip":  # a sign flip leaves every u ** 2 in its group
            fixed_squares = (groups.indicator.T @ unit_squares.astype(np.float64))[None]
        square_buffer = np.empty((size * n_groups, n_voxels), dtype=dtype)
    try:
        for start in range(1, n_total, batch_size):
            batch_rows = rows[start : start + batch_size]
            n_batch = len(batch_rows)
            weights = _batch_design(gemm_basis, batch_rows, scheme, dtype)
            projections = np.matmul(weights, unit, out=projection_buffer[: n_batch * n_gemm])
            if welch:
                if fixed_squares is None:
                    indicators = _batch_design(groups.indicator, batch_rows, "permute", dtype)
                    squares = np.matmul(indicators, unit_squares, out=square_buffer[: n_batch * n_groups])
                    squares = squares.reshape(n_batch, n_groups, n_voxels)
                else:
                    squares = None
                projections = projections.reshape(n_batch, n_gemm, n_voxels)
                stats_batch = stat_buffer[:n_batch]
                for begin in range(0, n_voxels, chunk):
                    part = slice(begin, begin + chunk)
                    if squares is None:
                        fixed_part = fixed_squares[:, :, part]
                        group_squares = np.broadcast_to(fixed_part, (n_batch, *fixed_part.shape[1:]))
                    else:
                        group_squares = squares[:, :, part]
                    values, dofs = to_statistic(projections[:, :, part], group_squares)
                    stats_batch[:, part] = to_z(values, dofs)
            else:
                stats_batch = _statistic(
                    projections.reshape(n_batch, n_columns, n_voxels), n_tested, dof, stat_type,
                    out=stat_buffer[:n_batch], work=work_buffer[:n_batch],
                )  # fmt: skip
            # with a table, stats_batch stays t or F: z only for the maxima and the graph maps
            graph_batch = stats_batch
            if table is not None and graph_keys:
                graph_batch = table(stats_batch, out=work_buffer[:n_batch])
            if not two_sided:
                compared = stats_batch
            elif graph_keys and graph_batch is stats_batch:
                compared = np.abs(stats_batch, out=abs_buffer[:n_batch])
            else:
                compared = np.abs(stats_batch, out=stats_batch)
            np.greater_equal(compared, tie_floor, out=exceeds[:n_batch])
            exceed += np.count_nonzero(exceeds[:n_batch], axis=0)
            if "maxt" in null_max:
                maxima = compared.max(axis=1)
                null_max["maxt"][start : start + n_batch] = maxima if table is None else to_z(maxima, dof)
            if graph_keys:
                summaries = (executor.map if executor else map)(summarise, graph_batch)
                for offset, summary in enumerate(summaries):
                    for key in graph_keys:
                        null_max[key][start + offset] = summary[key]
    finally:
        if executor:
            executor.shutdown()
    return exceed


def combine_family_wise(results: Sequence[PermutationResult]) -> list[dict[str, NDArray[np.float64]]]:
    """-log10 p corrected over voxels and over a family of tests that shared their permutations.

    The family's null distribution is, for each permutation, the largest statistic over every
    voxel of every test (Winkler et al. 2016, Hum Brain Mapp 37:1486, PALM's ``-corrcon``);
    each test's maps are then compared with it, as :func:`permutation_test` does with its own
    null. For the tests to be comparable they must have run on z (``zstat``), with the same
    permutation rows (same subjects, scheme, ``n_permutations`` and seed) and inferences.

    Parameters
    ----------
    results : sequence of PermutationResult
        One per test of the family (e.g. every contrast and F test of a measure and session
        contrast).

    Returns
    -------
    logp : list of dict of str to ndarray of shape (n_voxels,)
        Per test, in ``results`` order: -log10 family-wise p per inference, with the same keys
        as its ``logp_fwe``.
    """
    results = list(results)
    if not results:
        raise InputDataError("'results' must hold at least one PermutationResult. Got none.")
    first = results[0]
    for number, result in enumerate(results):
        if not result.zstat:
            raise InputDataError(
                f"Every test of a family must have run on z (zstat=True) to share one null "
                f"distribution. Got zstat=False for test {number} ({result.stat_type})."
            )
        if result.scheme != first.scheme or not np.array_equal(result.permutations, first.permutations):
            raise InputDataError(
                f"Every test of a family must use the same permutations. Test {number} "
                f"({result.scheme}, {result.n_permutations} rows) differs from test 0 "
                f"({first.scheme}, {first.n_permutations} rows): give them the same subjects, "
                "scheme, n_permutations and random_seed."
            )
        if set(result.null_max) != set(first.null_max):
            raise InputDataError(
                f"Every test of a family must compute the same inferences. Got {sorted(result.null_max)} "
                f"for test {number} and {sorted(first.null_max)} for test 0."
            )
    family_null = {key: np.max([r.null_max[key] for r in results], axis=0) for key in first.null_max}
    rtol = _tie_rtol(np.dtype(first.settings.get("precision", "float32")), on_z=True)
    out = []
    for result in results:
        observed = {
            "maxt": np.abs(result.z) if result.two_sided else result.z,
            "cluster_mass": result.cluster_mass,
            "cluster_size": result.cluster_size,
            "tfce": None if result.tfce is None else np.abs(result.tfce),
        }
        accel = result.settings.get("accel", "none")
        out.append({
            key: _fwe_logp(observed[key], family_null[key], rtol, zero_is_null=key != "maxt", accel=accel)
            for key in result.logp_fwe
        })  # fmt: skip
    return out


def _tie_rtol(dtype: np.dtype, *, on_z: bool) -> float:
    """Relative tolerance under which a permuted statistic ties the observed one.

    v, G and z pass through more float32 products and a dof of their own than t and F:
    permutations equivalent to the identity then differ from it by about 1e-5.
    """
    if dtype == np.float32:
        return 1e-4 if on_z else 1e-5
    return 1e-9 if on_z else 1e-12


def _fwe_logp(
    values: NDArray, null: NDArray, rtol: float, *, zero_is_null: bool = False, accel: str = "none",
    fits: dict[str, Any] | None = None, key: str = "",
) -> NDArray[np.float64]:
    """-log10 of ``#(null >= value) / n`` with a relative tie tolerance.

    With ``accel="tail"`` the p of values in the null's upper tail come from a generalised Pareto
    fit to it (:func:`fcflow.tail.tail_p_values`); the fit (or None) is stored in ``fits[key]``.
    """
    ordered = np.sort(null)
    floor = values - rtol * np.abs(values)
    count = ordered.size - np.searchsorted(ordered, floor, side="left")
    p = np.clip(count / ordered.size, 1.0 / ordered.size, 1.0)
    if zero_is_null:
        p = np.where(values > 0, p, 1.0)
    if accel == "tail":
        from fcflow.tail import P_THRESHOLD, tail_p_values

        refinable = bool(np.any(p < P_THRESHOLD))
        p, tail = tail_p_values(values, ordered, p)
        if fits is not None:
            # what the sidecars say: the fit, or why there is none (the p are then the empirical ones)
            fits[key] = (tail.to_dict() if tail is not None else "no accepted fit: empirical p kept" if refinable
                         else f"not needed: no p below {P_THRESHOLD:g}")
    return -np.log10(p)


def _as_contrast_matrix(
    contrast: str | ArrayLike, columns: list[str] | None, n_regressors: int
) -> NDArray[np.float64]:
    if isinstance(contrast, str):
        if columns is None:
            raise InputDataError(
                f"A contrast expression like {contrast!r} needs a design DataFrame with named "
                "columns. Got an unnamed array: pass weights instead."
            )
        return parse_contrast(contrast, columns)[None, :]
    matrix = np.atleast_2d(np.asarray(contrast, dtype=float))
    if matrix.ndim != 2 or matrix.shape[1] != n_regressors:
        raise InputDataError(
            f"'contrast' must have one weight per design column ({n_regressors}). Got shape "
            f"{np.shape(contrast)!r}."
        )
    if np.linalg.matrix_rank(matrix) < matrix.shape[0]:
        raise InputDataError(
            f"The rows of an F contrast must be linearly independent. Got rank "
            f"{np.linalg.matrix_rank(matrix)} for {matrix.shape[0]} rows."
        )
    return matrix
