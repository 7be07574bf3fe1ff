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
(``1e-5``; ``1e-12`` in float64) so that permutations equivalent to the identity are counted
as ties, not as smaller. Cluster and TFCE statistics run on in-mask vectors with a neighbour
table (:mod:`fcflow.clusters`); TFCE uses a compiled one-pass component tree.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from fcflow.clusters import VoxelGraph, _cluster_maxima, _cluster_values, _tfce_vector
from fcflow.stats import (
    _as_data_array,
    _as_design_array,
    compute_f_threshold,
    compute_t_threshold,
    parse_contrast,
)

__all__ = ["PermutationResult", "make_permutations", "permutation_test"]

INFERENCES = ("maxt", "cluster_mass", "cluster_size", "tfce")
SCHEMES = ("auto", "permute", "sign_flip")


@dataclass(frozen=True)
class PermutationResult:
    """Outcome of :func:`permutation_test`.

    Attributes
    ----------
    stat : ndarray of shape (n_voxels,)
        Observed t (or F) map, float64.
    stat_type : {"t", "F"}
    dof : int
        Residual degrees of freedom of the full model.
    p_uncorrected : ndarray of shape (n_voxels,)
        Voxel-wise permutation p (``|t|`` for two-sided tests).
    logp_fwe : dict of str to ndarray of shape (n_voxels,)
        -log10 family-wise corrected p per inference: ``"maxt"`` (max statistic, also for
        F), ``"cluster_mass"``, ``"cluster_size"`` (the p of the cluster a voxel belongs to;
        0 outside clusters), ``"tfce"``.
    null_max : dict of str to ndarray of shape (n_permutations,)
        Largest statistic of each permutation per inference, in permutation order; entry 0
        is the identity (the observed data).
    tfce : ndarray of shape (n_voxels,) or None
        Observed TFCE (signed for two-sided t tests).
    cluster_size, cluster_mass : ndarray of shape (n_voxels,) or None
        Size and mass of the observed cluster each voxel belongs to (0 outside clusters).
    cluster_forming_threshold : float or None
        In statistic units.
    scheme : {"permute", "sign_flip"}
    permutations : ndarray of shape (n_permutations, n_subjects)
        Row 0 is the identity; index rows for "permute", +-1 rows for "sign_flip".
    two_sided : bool
    contrast : ndarray of shape (n_contrasts, n_regressors)
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
        raise ValueError(
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
            raise ValueError(
                "The contrast must be estimable from the design. Got a contrast whose effect "
                "lies in the span of the other columns."
            )
        tested = tested / norm  # keep the sign of the contrast
    else:
        tested = _orthonormal_basis(tested)
        if tested.shape[1] < contrast.shape[0]:
            raise ValueError(
                f"The F contrast's {contrast.shape[0]} rows must be estimable and independent "
                f"in the design. Got only {tested.shape[1]} estimable directions."
            )
    return tested, nuisance, dof


def _auto_scheme(nuisance: NDArray[np.float64]) -> str:
    ones = np.ones(nuisance.shape[0]) / np.sqrt(nuisance.shape[0])
    residual = ones - nuisance @ (nuisance.T @ ones)
    return "permute" if np.linalg.norm(residual) < 1e-8 else "sign_flip"


# --------------------------------------------------------------------------------------------
# Permutations
# --------------------------------------------------------------------------------------------
def make_permutations(
    n_subjects: int,
    n_permutations: int,
    *,
    scheme: str = "permute",
    random_state: int | np.random.Generator | None = None,
) -> NDArray:
    """Random permutations (or sign flips) with the identity as row 0.

    Parameters
    ----------
    n_subjects : int
    n_permutations : int
        Rows, including the identity.
    scheme : {"permute", "sign_flip"}, default="permute"
    random_state : int, Generator or None, default=None
        Seed for ``np.random.default_rng``.

    Returns
    -------
    permutations : ndarray of shape (n_permutations, n_subjects)
        int32 indices for "permute", int8 +-1 for "sign_flip".
    """
    if n_permutations < 1:
        raise ValueError(f"'n_permutations' must be at least 1. Got {n_permutations!r}.")
    rng = np.random.default_rng(random_state)
    if scheme == "permute":
        out = np.tile(np.arange(n_subjects, dtype=np.int32), (n_permutations, 1))
        if n_permutations > 1:
            out[1:] = rng.permuted(out[1:], axis=1)
        return out
    if scheme == "sign_flip":
        out = np.ones((n_permutations, n_subjects), dtype=np.int8)
        out[1:] = rng.integers(0, 2, size=(n_permutations - 1, n_subjects), dtype=np.int8) * 2 - 1
        return out
    raise ValueError(f"'scheme' must be 'permute' or 'sign_flip'. Got {scheme!r}.")


def _check_explicit(permutations: ArrayLike, n_subjects: int, scheme: str) -> NDArray:
    rows = np.asarray(permutations)
    if rows.ndim != 2 or rows.shape[1] != n_subjects:
        raise ValueError(
            f"'permutations' must have shape (n, n_subjects={n_subjects}). "
            f"Got {rows.shape!r}."
        )
    if scheme == "permute":
        expected = np.tile(np.arange(n_subjects), (len(rows), 1))
        if not np.array_equal(np.sort(rows, axis=1), expected):
            raise ValueError(
                "Each row of 'permutations' must be a permutation of range(n_subjects) for "
                "the 'permute' scheme."
            )
        identity = np.arange(n_subjects, dtype=np.int32)[None]
        return np.vstack([identity, rows.astype(np.int32)])
    if not np.all(np.abs(rows) == 1):
        raise ValueError("Each row of 'permutations' must hold only -1 and 1 for 'sign_flip'.")
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


def permutation_test(
    data: ArrayLike,
    design: pd.DataFrame | ArrayLike,
    contrast: str | ArrayLike,
    *,
    n_permutations: int = 5000,
    two_sided: bool = True,
    random_state: int | np.random.Generator | None = None,
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
    random_state : int, Generator or None, default=None
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
        which is prepended. Overrides ``n_permutations`` and ``random_state``.
    batch_size : int or None, default=None
        Permutations per GEMM; None keeps the batch buffers near 160 MB.
    precision : {"float32", "float64"}, default="float32"
        Arithmetic of the null statistics.
    n_jobs : int or None, default=None
        Threads for the cluster and TFCE statistics of the permutations of a batch (the
        compiled TFCE kernel releases the GIL); None uses the CPUs this process may run on.
        The GEMMs use BLAS's own threads. Results do not depend on it.

    Returns
    -------
    result : PermutationResult
    """
    data = _as_data_array(data)
    n_subjects, n_voxels = data.shape
    if not np.all(np.isfinite(data)):
        bad = int(np.sum(~np.all(np.isfinite(data), axis=0)))
        raise ValueError(
            f"The data must be finite. Got NaN or inf in {bad} of {n_voxels} voxels: restrict "
            "the mask to voxels covered in every subject."
        )
    columns = list(design.columns) if isinstance(design, pd.DataFrame) else None
    design_array = _as_design_array(design, n_subjects)
    contrast_matrix = _as_contrast_matrix(contrast, columns, design_array.shape[1])
    stat_type = "t" if contrast_matrix.shape[0] == 1 else "F"
    two_sided = bool(two_sided) and stat_type == "t"

    inference = tuple(inference)
    unknown = [name for name in inference if name not in INFERENCES]
    if unknown or not inference:
        raise ValueError(
            f"'inference' must be a non-empty subset of {INFERENCES!r}. Got {inference!r}."
        )
    if scheme not in SCHEMES:
        raise ValueError(f"'scheme' must be one of {SCHEMES!r}. Got {scheme!r}.")
    if precision not in ("float32", "float64"):
        raise ValueError(f"'precision' must be 'float32' or 'float64'. Got {precision!r}.")
    if n_jobs is None:
        n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if not isinstance(n_jobs, int) or n_jobs < 1:
        raise ValueError(f"'n_jobs' must be a positive integer or None. Got {n_jobs!r}.")
    dtype = np.dtype(precision)
    needs_graph = any(name != "maxt" for name in inference)
    graph = None
    if needs_graph:
        if mask is None:
            raise ValueError(
                f"'mask' must be given for cluster or TFCE inference. Got inference={inference!r} "
                "and mask=None."
            )
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 3 or int(mask.sum()) != n_voxels:
            raise ValueError(
                f"'mask' must be a 3D boolean array with one True voxel per data column "
                f"({n_voxels}). Got shape {mask.shape!r} with {int(mask.sum())} True voxels."
            )
        graph = VoxelGraph.from_mask(mask, connectivity)
    if not 0 < cluster_forming_p < 1:
        raise ValueError(f"'cluster_forming_p' must be in (0, 1). Got {cluster_forming_p!r}.")

    tested, nuisance, dof = _partition_design(design_array, contrast_matrix)
    n_tested = tested.shape[1]
    if scheme == "auto":
        scheme = _auto_scheme(nuisance)
    if permutations is not None:
        rows = _check_explicit(permutations, n_subjects, scheme)
    else:
        rows = make_permutations(
            n_subjects, n_permutations, scheme=scheme, random_state=random_state
        )
    n_total = rows.shape[0]
    permuted_nuisance = nuisance
    if scheme == "permute" and _auto_scheme(nuisance) == "permute":
        # The nuisance space holds the constant, and a permuted constant is the constant:
        # its projection on the residuals is 0 for every permutation. Leave it out of the
        # products (a third fewer for a 3-group design).
        constant = np.full((n_subjects, 1), 1.0 / np.sqrt(n_subjects))
        permuted_nuisance = _orthonormal_basis(nuisance - constant @ (constant.T @ nuisance))
    basis = np.hstack([tested, permuted_nuisance])  # (n, k + q), less the constant
    n_columns = basis.shape[1]

    # unit-norm residuals in the null's precision; the observed statistic in float64
    unit = np.empty((n_subjects, n_voxels), dtype=dtype)
    observed = np.empty(n_voxels)
    chunk = 32768
    for begin in range(0, n_voxels, chunk):
        block = np.asarray(data[:, begin : begin + chunk], dtype=np.float64)
        scale = np.sqrt(np.einsum("ij,ij->j", block, block))
        if nuisance.shape[1]:
            block = block - nuisance @ (nuisance.T @ block)
        norm = np.sqrt(np.einsum("ij,ij->j", block, block))
        # a voxel whose residual is rounding noise of its data is constant: statistic 0
        block = np.divide(block, norm, out=np.zeros_like(block), where=norm > 1e-10 * scale)
        unit[:, begin : begin + chunk] = block
        observed[begin : begin + chunk] = _statistic(
            (basis.T @ block)[None], n_tested, dof, stat_type
        )[0]

    if stat_type == "t":
        threshold = compute_t_threshold(cluster_forming_p, dof, two_sided=two_sided)
    else:
        threshold = compute_f_threshold(cluster_forming_p, n_tested, dof)

    keys = [name for name in INFERENCES if name in inference]
    graph_keys = [name for name in keys if name != "maxt"]

    def summarise(stat_vector: NDArray, names: list[str]) -> dict[str, float]:
        out = {}
        if "maxt" in names:
            out["maxt"] = float(np.max(np.abs(stat_vector)) if two_sided else np.max(stat_vector))
        if "cluster_mass" in names or "cluster_size" in names:
            size, mass = _cluster_maxima(stat_vector, threshold, graph, two_sided)
            out["cluster_size"], out["cluster_mass"] = size, mass
        if "tfce" in names:
            out["tfce"] = _tfce_vector(
                stat_vector, graph, two_sided=two_sided,
                extent_exponent=tfce_extent_exponent, height_exponent=tfce_height_exponent,
                dh=tfce_dh, per_voxel=False,
            )  # fmt: skip
        return out

    null_max = {name: np.empty(n_total) for name in keys}
    observed_tfce = observed_size = observed_mass = None
    if "tfce" in inference:
        observed_tfce = _tfce_vector(
            observed, graph, two_sided=two_sided,
            extent_exponent=tfce_extent_exponent, height_exponent=tfce_height_exponent, dh=tfce_dh,
        )  # fmt: skip
    if "cluster_mass" in inference or "cluster_size" in inference:
        observed_size, observed_mass = _cluster_values(observed, threshold, graph, two_sided)
    first = summarise(observed, keys)
    for key in keys:
        null_max[key][0] = first[key]

    rtol = 1e-5 if dtype == np.float32 else 1e-12
    observed_abs = np.abs(observed) if two_sided else observed
    tie_floor = (observed_abs - rtol * np.abs(observed_abs)).astype(dtype)
    exceed = np.ones(n_voxels, dtype=np.int64)  # the identity

    if batch_size is None:
        # about 160 MB of buffers (projections, statistic, work, flags): a wide GEMM that
        # reads the residuals once per ~30 permutations on the 2 mm MNI mask
        batch_size = int(max(1, min(512, 160e6 / ((n_columns + 3) * n_voxels * dtype.itemsize))))
    if batch_size < 1:
        raise ValueError(f"'batch_size' must be a positive integer. Got {batch_size!r}.")
    executor = ThreadPoolExecutor(n_jobs) if graph_keys and n_jobs > 1 and n_total > 2 else None
    # buffers reused by every batch (the last one uses the leading part)
    size = min(batch_size, max(n_total - 1, 1))
    projection_buffer = np.empty((size * n_columns, n_voxels), dtype=dtype)
    stat_buffer = np.empty((size, n_voxels), dtype=dtype)
    work_buffer = np.empty((size, n_voxels), dtype=dtype)
    abs_buffer = np.empty((size, n_voxels), dtype=dtype) if two_sided and graph_keys else None
    exceeds = np.empty((size, n_voxels), dtype=bool)
    try:
        for start in range(1, n_total, batch_size):
            batch_rows = rows[start : start + batch_size]
            n_batch = len(batch_rows)
            weights = _batch_design(basis, batch_rows, scheme, dtype)
            projections = np.matmul(weights, unit, out=projection_buffer[: n_batch * n_columns])
            stats_batch = _statistic(
                projections.reshape(n_batch, n_columns, n_voxels), n_tested, dof, stat_type,
                out=stat_buffer[:n_batch], work=work_buffer[:n_batch],
            )  # fmt: skip
            if not two_sided:
                compared = stats_batch
            elif graph_keys:
                compared = np.abs(stats_batch, out=abs_buffer[:n_batch])
            else:
                compared = np.abs(stats_batch, out=stats_batch)
            np.greater_equal(compared, tie_floor, out=exceeds[:n_batch])
            exceed += np.count_nonzero(exceeds[:n_batch], axis=0)
            if "maxt" in keys:
                null_max["maxt"][start : start + n_batch] = compared.max(axis=1)
            if graph_keys:
                summaries = (executor.map if executor else map)(
                    lambda vector: summarise(vector, graph_keys), stats_batch
                )
                for offset, summary in enumerate(summaries):
                    for key in graph_keys:
                        null_max[key][start + offset] = summary[key]
    finally:
        if executor:
            executor.shutdown()
    p_uncorrected = exceed / n_total

    logp_fwe = {}
    if "maxt" in keys:
        logp_fwe["maxt"] = _fwe_logp(observed_abs, null_max["maxt"], rtol)
    observed_maps = {
        "cluster_mass": observed_mass,
        "cluster_size": observed_size,
        "tfce": None if observed_tfce is None else np.abs(observed_tfce),
    }
    for name in graph_keys:
        logp_fwe[name] = _fwe_logp(observed_maps[name], null_max[name], rtol, zero_is_null=True)

    return PermutationResult(
        stat=observed,
        stat_type=stat_type,
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
        settings={
            "connectivity": connectivity,
            "cluster_forming_p": cluster_forming_p,
            "tfce_extent_exponent": tfce_extent_exponent,
            "tfce_height_exponent": tfce_height_exponent,
            "tfce_dh": tfce_dh,
            "precision": precision,
        },
    )


def _fwe_logp(
    values: NDArray, null: NDArray, rtol: float, *, zero_is_null: bool = False
) -> NDArray[np.float64]:
    """-log10 of ``#(null >= value) / n`` with a relative tie tolerance."""
    ordered = np.sort(null)
    floor = values - rtol * np.abs(values)
    count = ordered.size - np.searchsorted(ordered, floor, side="left")
    p = count / ordered.size
    if zero_is_null:
        p = np.where(values > 0, p, 1.0)
    return -np.log10(np.clip(p, 1.0 / ordered.size, 1.0))


def _as_contrast_matrix(
    contrast: str | ArrayLike, columns: list[str] | None, n_regressors: int
) -> NDArray[np.float64]:
    if isinstance(contrast, str):
        if columns is None:
            raise ValueError(
                f"A contrast expression like {contrast!r} needs a design DataFrame with named "
                "columns. Got an unnamed array: pass weights instead."
            )
        return parse_contrast(contrast, columns)[None, :]
    matrix = np.atleast_2d(np.asarray(contrast, dtype=float))
    if matrix.ndim != 2 or matrix.shape[1] != n_regressors:
        raise ValueError(
            f"'contrast' must have one weight per design column ({n_regressors}). Got shape "
            f"{np.shape(contrast)!r}."
        )
    if np.linalg.matrix_rank(matrix) < matrix.shape[0]:
        raise ValueError(
            f"The rows of an F contrast must be linearly independent. Got rank "
            f"{np.linalg.matrix_rank(matrix)} for {matrix.shape[0]} rows."
        )
    return matrix
