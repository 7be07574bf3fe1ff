"""Seed signals and seed-to-voxel correlation maps.

Two routes give the same Pearson r:

* :func:`compute_seed_to_voxel_map` correlates already-cleaned signals.
* :func:`correlate_with_operator` (and :func:`compute_rest_connectivity`, which uses it) works
  from the raw ``(n_timepoints, n_voxels)`` float32 data and the cleaning operator ``M`` of
  :func:`fcflow.denoise.build_cleaning_operator`, without ever forming the cleaned data. With
  ``N = C M`` (``C`` centres over time), a voxel ``x`` and the cleaned, centred seed ``s``:

  - numerator ``(N x)^T s = x^T (N^T s)``: one matrix-vector product over the data;
  - norm ``||N x||^2 = x^T N^T N x = ||L^T x||^2`` with ``N^T N = L L^T`` (eigenvectors with
    eigenvalues above ``1e-12`` of the largest, scaled by their square roots; a band-passed
    300-volume run keeps about 170 of 300).

  Both run over blocks of voxels in float32 on mean-removed data (the means' contribution is
  added back exactly in float64, because float32 products on a 1e3-1e4 baseline would lose
  about 3 digits); sums are float64. Nothing of size (n_timepoints, n_voxels) is made in
  float64.

The correlation is the sample Pearson r. nilearn's documented seed-to-voxel recipe divides
``np.dot(brain.T, seed)`` of z-scored (ddof=1) series by ``n`` instead of ``n - 1``, which
shrinks its r by ``(n - 1) / n``; fcflow does not reproduce that bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from fcflow.denoise import build_cleaning_operator, correlation_dof
from fcflow.errors import InputDataError

__all__ = [
    "SeedConnectivity",
    "extract_seed_signal",
    "per_seed",
    "compute_seed_to_voxel_map",
    "fisher_z",
    "correlate_with_operator",
    "compute_rest_connectivity",
    "compute_multiseed_connectivity",
]

_BLOCK = 8192
_R_CLIP = 1.0 - 1e-7
# A cleaned voxel whose norm is below this fraction of its raw (mean-removed) norm is constant
# up to float32 rounding (e.g. pure drift or a constant voxel): its r is nan.
_CONSTANT_RTOL = 1e-5
_EIG_RTOL = 1e-12


def _seed_columns(seed_mask_in_brain, n_voxels, seed_name, run_name) -> NDArray[np.intp]:
    seed = np.asarray(seed_mask_in_brain)
    if seed.dtype != bool or seed.shape != (n_voxels,):
        raise InputDataError(
            f"'seed_mask_in_brain' must be a boolean array of shape ({n_voxels},) (one entry per "
            f"in-mask voxel). Got dtype {seed.dtype} and shape {seed.shape!r}"
            + (f" for {run_name}." if run_name else ".")
        )
    columns = np.flatnonzero(seed)
    if columns.size == 0:
        raise InputDataError(
            f"Seed '{seed_name}' has 0 voxels inside the brain mask"
            + (f" of {run_name}" if run_name else "")
            + ": check that the BOLD run and the seed are in the same space."
        )
    return columns


def extract_seed_signal(
    voxel_signals: NDArray,
    seed_mask_in_brain: NDArray[np.bool_],
    signal: Literal["mean", "eigenvariate"] = "mean",
    *,
    seed_name: str = "seed",
    run_name: str = "",
) -> NDArray[np.float64]:
    """Summarise the seed's voxels as one time series.

    Parameters
    ----------
    voxel_signals : ndarray of shape (n_timepoints, n_voxels)
        Signals of the in-mask voxels (cleaned or raw).
    seed_mask_in_brain : ndarray of bool, shape (n_voxels,)
        Which columns belong to the seed.
    signal : {"mean", "eigenvariate"}, default="mean"
        ``"mean"``: average of the seed's voxels. ``"eigenvariate"``: first principal component
        of the mean-removed seed voxels, as SPM's ``spm_regions``: ``u1 * s1 / sqrt(n_voxels)``
        (``s1`` the largest singular value), its sign chosen so that the voxel weights sum to a
        positive number, i.e. the eigenvariate follows the seed's mean.
    seed_name, run_name : str
        Used in error messages.

    Returns
    -------
    seed_signal : ndarray of shape (n_timepoints,), float64
    """
    voxel_signals = np.asarray(voxel_signals)
    columns = _seed_columns(seed_mask_in_brain, voxel_signals.shape[1], seed_name, run_name)
    seed_data = voxel_signals[:, columns].astype(np.float64)
    if signal == "mean":
        return seed_data.mean(axis=1)
    if signal == "eigenvariate":
        return _eigenvariate(seed_data)
    raise InputDataError(f"'signal' must be 'mean' or 'eigenvariate'. Got {signal!r}.")


def _eigenvariate(seed_data: NDArray[np.float64]) -> NDArray[np.float64]:
    centred = seed_data - seed_data.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    sign = 1.0 if vt[0].sum() >= 0 else -1.0
    return sign * u[:, 0] * s[0] / np.sqrt(seed_data.shape[1])


def compute_seed_to_voxel_map(
    voxel_signals: NDArray,
    seed_signal: NDArray,
) -> NDArray[np.float32]:
    """Correlate one seed time series with every voxel.

    Parameters
    ----------
    voxel_signals : ndarray of shape (n_timepoints, n_voxels)
        Cleaned voxel time series.
    seed_signal : ndarray of shape (n_timepoints,)
        Cleaned seed time series.

    Returns
    -------
    r : ndarray of shape (n_voxels,), float32
        Pearson correlation; nan where a voxel is constant.
    """
    voxel_signals = np.asarray(voxel_signals)
    seed = np.asarray(seed_signal, dtype=np.float64)
    if seed.shape != (voxel_signals.shape[0],):
        raise InputDataError(
            f"'seed_signal' must have shape ({voxel_signals.shape[0]},), one value per volume. "
            f"Got {seed.shape!r}."
        )
    seed = seed - seed.mean()
    seed_norm = np.sqrt(seed @ seed)
    if seed_norm == 0:
        raise InputDataError("'seed_signal' must vary over time. Got a constant seed signal.")
    seed32 = (seed / seed_norm).astype(np.float32)
    r = np.empty(voxel_signals.shape[1], dtype=np.float32)
    for start in range(0, voxel_signals.shape[1], _BLOCK):
        block = voxel_signals[:, start : start + _BLOCK]
        centred = (block - block.mean(axis=0, dtype=np.float64)).astype(np.float32, copy=False)
        numerator = (seed32 @ centred).astype(np.float64)
        norm = np.sqrt(np.einsum("ij,ij->j", centred, centred, dtype=np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            r[start : start + _BLOCK] = np.where(norm > 0, numerator / norm, np.nan)
    return r


def fisher_z(r: NDArray) -> NDArray[np.float32]:
    """Fisher's z, ``arctanh(r)``, with r clipped to ``±(1 - 1e-7)``; nan stays nan."""
    r = np.clip(np.asarray(r, dtype=np.float64), -_R_CLIP, _R_CLIP)
    return np.arctanh(r).astype(np.float32)


def _low_rank_factor(centred_operator: NDArray[np.float64]) -> NDArray[np.float64]:
    gram = centred_operator.T @ centred_operator
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    keep = eigenvalues > _EIG_RTOL * eigenvalues.max()
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


def correlate_cleaned_seeds(
    data: NDArray,
    operator: NDArray[np.float64],
    seeds_cleaned: NDArray[np.float64],
) -> NDArray[np.float32]:
    """r of ``C M data`` with each column of ``seeds_cleaned`` (n_out, k); returns (k, V).

    One float32 GEMM per block of voxels with the rows ``L^T`` (norms), ``N^T s`` (one per
    seed) and ``(L L^T 1)^T`` (the cross term of each voxel's mean, see below), on the
    mean-removed block; everything after the GEMM is per voxel, in float64.
    """
    centred_operator = operator - operator.mean(axis=0)
    seeds = seeds_cleaned - seeds_cleaned.mean(axis=0)
    seed_norms = np.sqrt((seeds**2).sum(axis=0))
    if np.any(seed_norms <= 1e-12 * max(1.0, np.abs(seeds).max())):
        raise InputDataError(
            "The cleaned seed signal must vary over time. Got a constant seed: check the seed "
            "and the confounds (a confound equal to the seed removes it)."
        )
    u = centred_operator.T @ (seeds / seed_norms)  # (T, k)
    factor = _low_rank_factor(centred_operator)  # (T, rank)
    rank, n_seeds = factor.shape[1], u.shape[1]
    ones_factor = factor.sum(axis=0)  # L^T 1: the norm rows' response to a constant voxel
    ones_seed = u.sum(axis=0)
    # ||L^T (c + m 1)||^2 = ||L^T c||^2 + 2 m (L L^T 1)^T c + m^2 ||L^T 1||^2 for a voxel of
    # mean m and mean-removed series c: the mean's part is exact in float64, and the cross
    # term is one more row of the GEMM.
    weights = np.hstack([factor, u, (factor @ ones_factor)[:, None]])
    weights32 = np.ascontiguousarray(weights.T, dtype=np.float32)
    ones_norm2 = float(ones_factor @ ones_factor)
    n_time, n_voxels = data.shape
    sqrt_n = np.sqrt(n_time)
    width = min(_BLOCK, n_voxels)
    centred_buffer = np.empty((n_time, width), dtype=np.float32)
    projected_buffer = np.empty((weights32.shape[0], width), dtype=np.float32)
    r = np.empty((n_seeds, n_voxels), dtype=np.float32)
    for start in range(0, n_voxels, _BLOCK):
        block = data[:, start : start + _BLOCK]
        n = block.shape[1]
        mean = block.mean(axis=0, dtype=np.float64)
        # The float32 mean is subtracted, and exactly that value is added back in float64.
        mean32 = mean.astype(np.float32)
        centred = np.subtract(block, mean32, out=centred_buffer[:, :n])
        projected = np.matmul(weights32, centred, out=projected_buffer[:, :n])
        m = mean32.astype(np.float64)
        norm2 = np.einsum("ij,ij->j", projected[:rank], projected[:rank], dtype=np.float64)
        norm2 += m * (2.0 * projected[rank + n_seeds] + m * ones_norm2)
        norm = np.sqrt(np.maximum(norm2, 0.0))
        numerator = projected[rank : rank + n_seeds].astype(np.float64)
        numerator += np.outer(ones_seed, m)
        raw_norm = np.sqrt(np.einsum("ij,ij->j", centred, centred, dtype=np.float64))
        # float32 rounding touches only the mean-removed part; the mean's part is float64.
        constant = norm <= _CONSTANT_RTOL * raw_norm + 1e-10 * np.abs(mean) * sqrt_n
        constant |= norm == 0
        with np.errstate(invalid="ignore", divide="ignore"):
            values = numerator / norm
        values[:, constant] = np.nan
        r[:, start : start + n] = values
    return r


def correlate_with_operator(
    data: NDArray,
    operator: NDArray[np.float64],
    seed_weights: NDArray,
) -> NDArray[np.float32]:
    """Correlate cleaned seeds with every cleaned voxel without forming the cleaned data.

    Parameters
    ----------
    data : ndarray of shape (n_timepoints, n_voxels), float32
        Raw in-mask signals, as returned by :func:`fcflow.niftiio.read_masked_bold`.
    operator : ndarray of shape (n_kept, n_timepoints)
        Cleaning operator from :func:`fcflow.denoise.build_cleaning_operator`.
    seed_weights : ndarray of shape (n_voxels,) or (n_voxels, n_seeds)
        The raw seed signal is ``data @ seed_weights`` (e.g. ``1 / n`` on the seed's voxels
        for the mean); cleaning is linear, so its cleaned signal is ``operator @ data @ w``.

    Returns
    -------
    r : ndarray of shape (n_voxels,) or (n_seeds, n_voxels), float32
        Pearson r between the cleaned seed and each cleaned voxel; nan for voxels that are
        constant after cleaning.
    """
    data = np.asarray(data)
    weights = np.asarray(seed_weights, dtype=np.float64)
    single = weights.ndim == 1
    weights = weights[:, None] if single else weights
    if weights.shape[0] != data.shape[1] or operator.shape[1] != data.shape[0]:
        raise InputDataError(
            f"'seed_weights' must have one row per voxel ({data.shape[1]}) and 'operator' one "
            f"column per volume ({data.shape[0]}). Got {weights.shape!r} and {operator.shape!r}."
        )
    used = np.flatnonzero(np.any(weights != 0, axis=1))
    # Only the seed's voxels are needed in float64.
    raw_seeds = data[:, used].astype(np.float64) @ weights[used]
    r = correlate_cleaned_seeds(data, operator, operator @ raw_seeds)
    return r[0] if single else r


@dataclass(frozen=True)
class SeedConnectivity:
    """Result of :func:`compute_rest_connectivity`.

    Attributes
    ----------
    r, z : ndarray of shape (n_voxels,), float32
        Pearson r and Fisher z (``arctanh``) of the seed with each voxel.
    seed_signal : ndarray of shape (n_kept,)
        Cleaned (not standardised) seed time series.
    n_volumes : int
        Volumes kept after censoring.
    dof : float
        Effective degrees of freedom of the correlation (:func:`fcflow.denoise.correlation_dof`):
        the Fisher z of two independent cleaned series has SD ``1 / sqrt(dof - 3)``.
    """

    r: NDArray[np.float32]
    z: NDArray[np.float32]
    seed_signal: NDArray[np.float64]
    n_volumes: int
    dof: float


def compute_rest_connectivity(
    data: NDArray,
    seed_mask_in_brain: NDArray[np.bool_],
    t_r: float,
    confounds=None,
    sample_mask=None,
    *,
    high_pass: float | None = 0.01,
    low_pass: float | None = 0.08,
    detrend: bool = True,
    standardize_confounds: bool = True,
    signal: Literal["mean", "eigenvariate"] = "mean",
    interpolation: Literal["spline", "nilearn"] = "spline",
    filter: Literal["dct", "butterworth"] = "dct",
    seed_name: str = "seed",
    run_name: str = "",
) -> SeedConnectivity:
    """Seed-to-voxel connectivity of one run, from raw masked data to r and z maps.

    Parameters
    ----------
    data : ndarray of shape (n_timepoints, n_voxels), float32
        Raw in-mask signals (:func:`fcflow.niftiio.read_masked_bold`).
    seed_mask_in_brain : ndarray of bool, shape (n_voxels,)
        The seed's columns.
    t_r : float
        Repetition time in seconds.
    confounds, sample_mask :
        From :func:`fcflow.denoise.load_run_confounds`.
    high_pass, low_pass : float or None, default=0.01 and 0.08
        Band in Hz (rest); set ``low_pass=None`` for a high-pass only.
    detrend, standardize_confounds, interpolation, filter :
        See :func:`fcflow.denoise.build_cleaning_operator`.
    signal : {"mean", "eigenvariate"}, default="mean"
        See :func:`extract_seed_signal`; the eigenvariate is taken from the cleaned seed voxels.

    Returns
    -------
    SeedConnectivity
    """
    return compute_multiseed_connectivity(
        data, {seed_name: seed_mask_in_brain}, t_r, confounds, sample_mask, high_pass=high_pass,
        low_pass=low_pass, detrend=detrend, standardize_confounds=standardize_confounds,
        signal=signal, interpolation=interpolation, filter=filter, run_name=run_name,
    )[seed_name]  # fmt: skip


def per_seed(value: Any, seeds: Mapping[str, Any], parameter: str) -> dict[str, Any]:
    """``value`` for every seed, or each seed's own value from a mapping that names every seed.

    How the recipe's per-seed settings (``signal``, ``min_coverage``) reach functions that also take
    one value for all seeds.
    """
    if not isinstance(value, Mapping):
        return {name: value for name in seeds}
    missing = [name for name in seeds if name not in value]
    if missing:
        raise InputDataError(f"'{parameter}' names no value for the seed(s) {missing}; it has {sorted(value)}.")
    return {name: value[name] for name in seeds}


def compute_multiseed_connectivity(
    data: NDArray,
    seed_masks_in_brain: Mapping[str, NDArray[np.bool_]],
    t_r: float,
    confounds=None,
    sample_mask=None,
    *,
    high_pass: float | None = 0.01,
    low_pass: float | None = 0.08,
    detrend: bool = True,
    standardize_confounds: bool = True,
    signal: Literal["mean", "eigenvariate"] | Mapping[str, str] = "mean",
    interpolation: Literal["spline", "nilearn"] = "spline",
    filter: Literal["dct", "butterworth"] = "dct",
    run_name: str = "",
) -> dict[str, SeedConnectivity]:
    """:func:`compute_rest_connectivity` for several seeds of one run at once.

    The cleaning operator is built once, and all seeds are correlated in the same pass over
    the data: each extra seed costs one more row of the GEMM, not another pass.

    Parameters
    ----------
    seed_masks_in_brain : mapping of str to ndarray of bool, shape (n_voxels,)
        Each seed's columns, by seed name.
    signal : {"mean", "eigenvariate"} or mapping of seed name to it
        One summary for every seed, or each seed's own (the recipe's per-seed ``signal``).
    data, t_r, confounds, sample_mask, high_pass, low_pass, detrend, standardize_confounds,
    interpolation, filter, run_name :
        As :func:`compute_rest_connectivity`.

    Returns
    -------
    dict of str to SeedConnectivity
        In the order of ``seed_masks_in_brain``.
    """
    data = np.asarray(data)
    methods = (dict(signal) if isinstance(signal, Mapping)
               else dict.fromkeys(seed_masks_in_brain, signal))
    for name in seed_masks_in_brain:
        if methods.get(name) not in ("mean", "eigenvariate"):
            raise InputDataError(
                f"'signal' of seed {name!r} must be 'mean' or 'eigenvariate'. Got {methods.get(name)!r}."
            )
    columns = {
        name: _seed_columns(mask, data.shape[1], name, run_name)
        for name, mask in seed_masks_in_brain.items()
    }
    operator = build_cleaning_operator(
        data.shape[0], t_r, confounds, sample_mask, high_pass, low_pass, detrend,
        standardize_confounds, interpolation=interpolation, filter=filter,
    )
    seeds = {}
    for name, cols in columns.items():
        cleaned_seed_voxels = operator @ data[:, cols].astype(np.float64)
        seeds[name] = (
            cleaned_seed_voxels.mean(axis=1)
            if methods[name] == "mean"
            else _eigenvariate(cleaned_seed_voxels)
        )
    r = correlate_cleaned_seeds(data, operator, np.column_stack(list(seeds.values())))
    dof = correlation_dof(operator)
    return {
        name: SeedConnectivity(
            r=r[i], z=fisher_z(r[i]), seed_signal=seed, n_volumes=operator.shape[0], dof=dof
        )
        for i, (name, seed) in enumerate(seeds.items())
    }
