"""Confound selection, censoring and the cleaning of a run as one linear operator.

Denoising strategies
--------------------
:data:`DENOISING_STRATEGIES` maps fcflow's strategy names to the arguments of
:func:`nilearn.interfaces.fmriprep.load_confounds`:

========================  ===================================================================
``"24P"``                 motion="full" (6 motion parameters, derivatives, squares: 24)
``"24P+aCompCor"``        motion="full" + compcor="anat_combined", ``n_compcor`` (5) + the
                          fMRIPrep cosines ("high_pass"; load_confounds requires them with
                          CompCor because fMRIPrep computes CompCor after that high-pass)
``"6P+aCompCor"``         motion="basic" (6 motion parameters) + compcor="anat_combined",
                          ``n_compcor`` (5) + the cosines: the lean CompCor model (Behzadi et
                          al. 2007; Muschelli et al. 2014), about a third of 24P+aCompCor's
                          degrees of freedom
``"36P"``                 motion="full" + wm_csf="full" + global_signal="full" (GSR: 36)
``"ICA-AROMA"``           ica_aroma="full" + wm_csf="basic" + the cosines, nilearn's
                          ``ica_aroma`` preset: the input must be fMRIPrep's
                          ``desc-smoothAROMAnonaggr_bold`` (non-aggressively denoised) run
``"none"``                no confound regression: only detrending and filtering (QC-FC
                          reference)
========================  ===================================================================

Censoring (``censor=True``) adds load_confounds' ``"scrub"``: a volume is flagged when its
framewise displacement exceeds ``fd_threshold_mm`` or its standardised DVARS exceeds
``std_dvars_threshold`` (strictly greater). With ``scrub=5`` (Power et al. 2014, nilearn's
default) the *segment rule* then also flags every run of fewer than 5 consecutive unflagged
volumes between two flagged ones, and the head (tail) of the run when fewer than 5 volumes
precede the first (follow the last) flagged volume. fMRIPrep's non-steady-state volumes are
always removed. Censored volumes leave ``sample_mask`` (the indices of the kept volumes).

The default operator (``filter="dct"``): censoring that does not manufacture signal
-------------------------------------------------------------------------------------
Band and nuisance are fitted together, on the kept volumes only; censored volumes are never
filled. On the kept rows the operator is the projection onto the run's in-band DCT cosines
(those with ``high_pass < f <= low_pass``, sampled at the kept volumes) minus the projection
onto what the drift terms (the cosines below ``high_pass``, the constant, the linear trend)
and the confounds add inside the band. Why not nilearn's route (fill censored volumes with a
cubic spline, filter, drop them again; XCP-D does the same after regressing on the kept
volumes): a spline through a 12-20 volume gap extrapolates the noise at its ends, and the
filter then spreads that made-up stretch into the kept volumes. On a 240-volume run with
such gaps the Butterworth route's largest singular value is 5-13 (one time course shared by
every voxel), against 1 for a projection; and even without censoring the odd-extension padding
of ``sosfiltfilt`` leaves the edge volumes five times the variance of the others, which halves
the effective degrees of freedom (27 instead of 50 for 240 volumes at TR 1.5 s, 0.01-0.08 Hz).
The projection has neither problem and its rank is its degrees of freedom. Without censoring,
its high-pass is exactly nilearn's ``signal.clean(filter="cosine")`` (tested), and its band
is the DCT band-limited signal with the band-limited confounds regressed out (tested against
scipy's DCT). A confound with less than :data:`MIN_BAND_ENERGY` of its energy in the band
(beyond the drift terms) is left out: it would cost a degree of freedom for nothing.

Order of operations of :func:`build_cleaning_operator` with ``filter="butterworth"``
------------------------------------------------------------------------------------
The operator reproduces :func:`nilearn.signal.clean` 0.14.1 with ``filter="butterworth"`` and no
``runs``, step by step (each step is linear in the signals, so the product of the steps is one
``(n_kept, n_timepoints)`` matrix; the confounds go through the same steps):

1. **Censored volumes.** Without filtering, censored volumes are simply dropped. With a
   Butterworth filter they are first *replaced* by a cubic spline (scipy ``CubicSpline``,
   not-a-knot, no extrapolation) through the kept volumes, so the filter does not spread a
   motion spike; volumes outside the first..last kept volume cannot be interpolated and are
   dropped. ``interpolation="nilearn"`` reproduces nilearn 0.14.1 exactly, including a quirk
   of ``nilearn.signal._interpolate_volumes``: it selects the volumes to replace with
   ``~sample_mask`` on an *integer index* array, i.e. it replaces volume ``n - 1 - i`` for each
   kept index ``i`` instead of the censored volumes. Censored volumes whose mirror is also
   censored keep their raw values and still pass through the filter, and head/tail trimming
   can shift the kept indices. ``interpolation="spline"`` does what nilearn documents (replace
   exactly the censored volumes). The two agree when nothing is censored inside the run.
2. **Detrend** (``detrend=True``): remove the mean and the linear trend.
3. **Butterworth filter** (order 5, ``high_pass`` and/or ``low_pass`` in Hz), zero-phase
   (``scipy.signal.sosfiltfilt``, odd padding, scipy's default pad length), on the full-length
   series; the confounds are filtered identically so that regression does not re-introduce
   filtered-out frequencies (Lindquist et al. 2018).
4. **Censor**: keep the rows of ``sample_mask``.
5. **Confound regression**: the confounds are z-scored (``standardize_confounds=True``,
   ddof=1) or scaled by their maximum, an orthonormal basis ``Q`` of their span is found by
   pivoted QR (columns with ``|R_ii| <= 100 eps`` dropped), and ``I - Q Q^T`` is applied.
6. **Standardize** (``standardize="zscore_sample"``): the operator includes the centring; the
   division by each voxel's standard deviation (ddof=1) is not linear and is done by
   :func:`apply_cleaning_operator`. Correlations do not depend on it.

Effective degrees of freedom
----------------------------
For white noise ``x``, the cleaned series ``M x`` has covariance ``M M^T``.
:func:`compute_effective_dof` is the Satterthwaite effective number of degrees of freedom of
its sum of squares, ``tr(M M^T)^2 / tr((M M^T)^2)`` (Worsley & Friston 1995): exactly the rank
of a projection (the DCT operator). :func:`correlation_dof` is what the maps report: one more
than that of the centred operator, i.e. the number of volumes ``n`` of a plain Pearson
correlation with the same null spread (Fisher z SD ``1/sqrt(n - 3)``; tested on white noise
with 40 % of volumes censored in 10-20 volume gaps). A band of 0.01-0.08 Hz keeps 14 % of the
spectrum at a TR of 2 s (28 of 100 volumes), and each confound then costs one more:
:func:`dof_budget` says where they went.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import linalg

from fcflow.config import DenoisingConfig
from fcflow.errors import InputDataError

# the recipe's defaults are the functions' defaults: one place (fcflow.config.DenoisingConfig)
_DEFAULTS = DenoisingConfig()

__all__ = [
    "DENOISING_STRATEGIES",
    "RunConfounds",
    "load_run_confounds",
    "assess_run_exclusion",
    "build_cleaning_operator",
    "apply_cleaning_operator",
    "compute_effective_dof",
    "correlation_dof",
    "dct_basis",
    "dct_frequencies",
]

#: fcflow strategy name -> keyword arguments of nilearn's ``load_confounds`` (without scrub).
DENOISING_STRATEGIES: dict[str, dict] = {
    "24P": {"strategy": ("motion",), "motion": "full"},
    "24P+aCompCor": {
        "strategy": ("motion", "high_pass", "compcor"),
        "motion": "full",
        "compcor": "anat_combined",
    },
    "6P+aCompCor": {
        "strategy": ("motion", "high_pass", "compcor"),
        "motion": "basic",
        "compcor": "anat_combined",
    },
    "36P": {
        "strategy": ("motion", "wm_csf", "global_signal"),
        "motion": "full",
        "wm_csf": "full",
        "global_signal": "full",
    },
    "ICA-AROMA": {
        "strategy": ("high_pass", "wm_csf", "ica_aroma"),
        "wm_csf": "basic",
        "ica_aroma": "full",
    },
    "none": {"strategy": ()},
}

_AROMA_TAG = "_desc-smoothAROMAnonaggr_bold"
# Columns per block for products with (n_timepoints, n_voxels) data: 300 x 8192 float32 = 10 MB.
_BLOCK = 8192


@dataclass(frozen=True)
class RunConfounds:
    """Confounds and censoring of one run, as selected by a denoising strategy.

    Attributes
    ----------
    confounds : DataFrame of shape (n_timepoints, n_confounds) or None
        Regressors (None for ``"none"`` and for the AROMA run with no extra regressors).
    sample_mask : ndarray of int or None
        Indices of the kept volumes; None when every volume is kept.
    n_timepoints : int
        Volumes in the run.
    framewise_displacement : ndarray of shape (n_timepoints,)
        fMRIPrep's FD in mm (nan for the first volume).
    n_non_steady_state : int
        Volumes fMRIPrep flagged as non-steady-state.
    n_fd_outliers : int
        Volumes whose FD exceeds ``fd_threshold_mm`` (whether or not censoring is on).
    strategy, fd_threshold_mm, std_dvars_threshold, scrub : settings in force
    censored_by : dict of str to int
        Why each removed volume was removed, each volume counted once, under the first reason
        that applies in this order: ``non_steady_state`` (fMRIPrep's flag), ``fd`` (FD above
        its threshold), ``std_dvars`` (std DVARS above its threshold, FD below), ``segment``
        (the segment rule: too few kept volumes between two censored ones, or at an end).
        The counts add up to ``n_timepoints - n_kept``.
    """

    confounds: pd.DataFrame | None
    sample_mask: NDArray[np.int64] | None
    n_timepoints: int
    framewise_displacement: NDArray[np.float64]
    n_non_steady_state: int
    n_fd_outliers: int
    strategy: str
    fd_threshold_mm: float
    std_dvars_threshold: float
    scrub: int
    censored_by: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def n_kept(self) -> int:
        return self.n_timepoints if self.sample_mask is None else int(self.sample_mask.size)


def load_run_confounds(
    bold_file: str | os.PathLike[str],
    strategy: str,
    *,
    censor: bool = True,
    fd_threshold_mm: float = _DEFAULTS.fd_threshold_mm,
    std_dvars_threshold: float = _DEFAULTS.std_dvars_threshold,
    scrub: int = _DEFAULTS.scrub_min_segment,
    n_compcor: int | Literal["all"] = _DEFAULTS.n_compcor,
    demean: bool = True,
) -> RunConfounds:
    """Select the confounds of an fMRIPrep run for a named denoising strategy.

    Parameters
    ----------
    bold_file : str or path
        fMRIPrep BOLD run (``*_desc-preproc_bold.nii[.gz]``, or
        ``*_desc-smoothAROMAnonaggr_bold.nii.gz`` for ``"ICA-AROMA"``); its
        ``*_desc-confounds_timeseries.tsv`` (and ``.json``) are found by name.
    strategy : {"24P", "24P+aCompCor", "6P+aCompCor", "36P", "ICA-AROMA", "none"}
        See :data:`DENOISING_STRATEGIES`.
    censor : bool, default=True
        Censor high-motion volumes (load_confounds' ``scrub``).
    fd_threshold_mm : float, default=0.5
        Framewise displacement above which a volume is censored.
    std_dvars_threshold : float, default=1.5
        Standardised DVARS above which a volume is censored.
    scrub : int, default=5
        Minimum segment length of the segment rule (0 disables it); see the module docstring.
    n_compcor : int or "all", default=5
        aCompCor components (combined WM+CSF mask) for ``"24P+aCompCor"``.
    demean : bool, default=True
        Demean the confounds over the kept volumes (as load_confounds).

    Returns
    -------
    RunConfounds
    """
    from nilearn.interfaces.fmriprep import load_confounds
    from nilearn.interfaces.fmriprep.load_confounds_utils import get_confounds_file

    if strategy not in DENOISING_STRATEGIES:
        raise InputDataError(
            f"'strategy' must be one of {sorted(DENOISING_STRATEGIES)}. Got {strategy!r} "
            f"for {bold_file}."
        )
    if fd_threshold_mm <= 0 or std_dvars_threshold <= 0:
        raise InputDataError(
            "'fd_threshold_mm' and 'std_dvars_threshold' must be positive. Got "
            f"{fd_threshold_mm!r} and {std_dvars_threshold!r} for {bold_file}."
        )
    name = str(bold_file)
    kwargs = dict(DENOISING_STRATEGIES[strategy])
    if strategy == "ICA-AROMA" and _AROMA_TAG not in Path(name).name:
        raise InputDataError(
            f"'bold_file' must be fMRIPrep's non-aggressively AROMA-denoised run "
            f"(*{_AROMA_TAG}.nii.gz) for strategy 'ICA-AROMA'. Got {name!r}: run fMRIPrep "
            "with --use-aroma (fMRIPrep < 24) or fMRIPost-AROMA, or choose another strategy."
        )
    # load_confounds finds the TSV from the image name and accepts only .nii.gz names; the
    # image itself is never opened, so an uncompressed run is looked up by its .nii.gz name.
    lookup = name + ".gz" if name.endswith(".nii") else name
    strategy_tuple = tuple(kwargs.pop("strategy")) + (("scrub",) if censor else ())
    if "compcor" in strategy_tuple:
        kwargs["n_compcor"] = n_compcor
    try:
        confounds_file = get_confounds_file(lookup, flag_full_aroma=strategy == "ICA-AROMA", flag_tedana=False)
        raw = pd.read_csv(confounds_file, sep="\t", na_values="n/a")
    except (ValueError, FileNotFoundError) as exc:
        raise InputDataError(f"Cannot load the {strategy!r} confounds of {name}: {exc}") from exc
    # fcflow reads FD itself (mean FD, exclusion) and load_confounds' scrub reads both columns.
    needed = ["framewise_displacement"] + (["std_dvars"] if censor else [])
    absent = [c for c in needed if c not in raw.columns]
    if absent:
        raise InputDataError(
            f"{confounds_file}: expected fMRIPrep's motion columns {needed} (fcflow measures motion and "
            f"censors with them). Got no {absent}. Use the confounds TSV fMRIPrep wrote for this run."
        )
    # fMRIPrep writes n/a only in the first row (derivatives, FD, DVARS); anything else missing or
    # not a number would reach the regression as NaN (issue 17: it failed naming no file or column)
    # read_csv has parsed the numeric columns already: only text columns need coercing (a
    # column-wise apply over all 136 columns of a simulated run cost 13 ms a call, timed; a
    # reported rest run makes 7 calls)
    text = [column for column in raw.columns if not pd.api.types.is_numeric_dtype(raw[column])]
    numeric = raw.assign(**{column: pd.to_numeric(raw[column], errors="coerce") for column in text}) if text else raw
    values = numeric.to_numpy(dtype=np.float64)
    broken = np.isnan(values[1:]).any(axis=0) if len(values) > 1 else np.zeros(values.shape[1], dtype=bool)
    if broken.any():
        column = raw.columns[int(np.flatnonzero(broken)[0])]
        rows = np.flatnonzero(np.isnan(values[1:, int(np.flatnonzero(broken)[0])])) + 2  # 1-based, after the header
        raise InputDataError(
            f"{confounds_file}: expected numbers in every row after the first (fMRIPrep writes n/a only in the first "
            f"row). Got n/a or text in column {column!r} at data row(s) {rows[:5].tolist()}"
            f"{' and more' if rows.size > 5 else ''} ({int(broken.sum())} column(s) affected). Use the confounds "
            "TSV fMRIPrep wrote for this run."
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="strategy is empty")
            confounds, sample_mask = load_confounds(
                lookup,
                strategy=strategy_tuple,
                scrub=scrub,
                fd_threshold=fd_threshold_mm,
                std_dvars_threshold=std_dvars_threshold,
                demean=demean,
                **kwargs,
            )
    except (ValueError, FileNotFoundError) as exc:
        # nilearn lists the columns (and column families) the strategy needs and did not find.
        raise InputDataError(
            f"{confounds_file}: expected the confound columns of the denoising strategy {strategy!r}. "
            f"Got a file without some of them ({exc}). Use fMRIPrep's full confounds TSV for this run, "
            "or choose another [denoising] strategy in the recipe."
        ) from exc
    n_time = len(raw)
    if confounds is not None and confounds.shape[1] == 0:
        confounds = None
    fd = raw["framewise_displacement"].to_numpy(dtype=np.float64)
    nss_columns = [c for c in raw.columns if c.startswith("non_steady_state")]
    n_nss = len(nss_columns)
    censored_by = count_censoring_reasons(
        n_time, sample_mask, non_steady=raw[nss_columns].to_numpy(dtype=float).sum(axis=1) > 0,
        fd=fd, std_dvars=raw["std_dvars"].to_numpy(dtype=np.float64) if "std_dvars" in raw else None,
        fd_threshold_mm=fd_threshold_mm if censor else np.inf,
        std_dvars_threshold=std_dvars_threshold if censor else np.inf,
    )
    return RunConfounds(
        confounds=confounds,
        sample_mask=None if sample_mask is None else np.asarray(sample_mask, dtype=np.int64),
        n_timepoints=n_time,
        framewise_displacement=fd,
        n_non_steady_state=n_nss,
        n_fd_outliers=int(np.count_nonzero(fd > fd_threshold_mm)),
        strategy=strategy,
        fd_threshold_mm=fd_threshold_mm,
        std_dvars_threshold=std_dvars_threshold,
        scrub=scrub if censor else 0,
        censored_by=censored_by,
    )


#: The reasons a volume is removed, in the order they are attributed (see RunConfounds).
CENSORING_REASONS = ("non_steady_state", "fd", "std_dvars", "segment")


def count_censoring_reasons(
    n_timepoints: int,
    sample_mask: NDArray | None,
    *,
    non_steady: NDArray[np.bool_],
    fd: NDArray[np.float64],
    std_dvars: NDArray[np.float64] | None,
    fd_threshold_mm: float,
    std_dvars_threshold: float,
) -> dict[str, int]:
    """Count the removed volumes by reason (:data:`CENSORING_REASONS`), each volume once.

    A removed volume is counted under the first reason that applies; one that none explains
    was removed by the segment rule. The counts add up to the volumes not in ``sample_mask``.
    """
    removed = np.ones(n_timepoints, dtype=bool)
    removed[np.arange(n_timepoints) if sample_mask is None else np.asarray(sample_mask)] = False
    flags = {
        "non_steady_state": np.asarray(non_steady, dtype=bool),
        "fd": np.nan_to_num(fd, nan=0.0) > fd_threshold_mm,
        "std_dvars": (np.zeros(n_timepoints, bool) if std_dvars is None
                      else np.nan_to_num(std_dvars, nan=0.0) > std_dvars_threshold),
    }
    counts, explained = {}, np.zeros(n_timepoints, dtype=bool)
    for reason, flag in flags.items():
        counts[reason] = int(np.count_nonzero(removed & flag & ~explained))
        explained |= flag
    counts["segment"] = int(np.count_nonzero(removed & ~explained))
    return counts


def describe_censoring(censored_by: Mapping[str, int], n_timepoints: int, *, fd_threshold_mm: float | None = None,
                       std_dvars_threshold: float | None = None, scrub: int | None = None) -> str:
    """One phrase: how many volumes were removed and why, e.g. ``"96 of 240 volumes removed: ..."``."""
    labels = {
        "non_steady_state": "non-steady-state",
        "fd": "FD" + (f" > {fd_threshold_mm:g} mm" if fd_threshold_mm is not None else ""),
        "std_dvars": "std DVARS" + (f" > {std_dvars_threshold:g}" if std_dvars_threshold is not None else ""),
        "segment": "segment rule" + (f" (< {scrub} kept in a row)" if scrub else ""),
    }
    total = sum(censored_by.values())
    parts = [f"{count} {labels.get(reason, reason)}" for reason, count in censored_by.items() if count]
    return f"{total} of {n_timepoints} volumes removed" + (f" ({', '.join(parts)})" if parts else "")


def assess_run_exclusion(
    run_confounds: RunConfounds,
    *,
    min_volumes: int,
    max_mean_fd_mm: float | None,
    run_name: str = "",
) -> tuple[bool, str]:
    """Decide whether a run is excluded for motion; say why, with the thresholds in force.

    A run is excluded when fewer than ``min_volumes`` volumes remain after censoring (and the
    removal of non-steady-state volumes), or when its mean framewise displacement (over all
    volumes with a defined FD, i.e. all but the first) exceeds ``max_mean_fd_mm``.

    Returns
    -------
    excluded : bool
    reason : str
        Empty when the run is kept.
    """
    rc = run_confounds
    prefix = f"{run_name}: " if run_name else ""
    reasons = []
    if rc.n_kept < min_volumes:
        removed = describe_censoring(
            rc.censored_by, rc.n_timepoints, fd_threshold_mm=rc.fd_threshold_mm,
            std_dvars_threshold=rc.std_dvars_threshold, scrub=rc.scrub,
        )
        reasons.append(
            f"{removed}; {rc.n_kept} volumes remain, below the minimum of {min_volumes} "
            "(min_volumes)."
        )
    mean_fd = float(np.nanmean(rc.framewise_displacement)) if rc.n_timepoints > 1 else 0.0
    if max_mean_fd_mm is not None and mean_fd > max_mean_fd_mm:
        reasons.append(
            f"mean FD is {mean_fd:.3f} mm, above the maximum of {max_mean_fd_mm:g} mm "
            "(max_mean_fd_mm)."
        )
    if not reasons:
        return False, ""
    return True, prefix + " ".join(reasons) + " Run excluded."


# --------------------------------------------------------------------------------------------
# The cleaning operator


def _as_index_mask(sample_mask, n_timepoints: int) -> NDArray[np.int64] | None:
    if sample_mask is None:
        return None
    sample_mask = np.asarray(sample_mask)
    if sample_mask.dtype == bool:
        if sample_mask.shape != (n_timepoints,):
            raise InputDataError(
                f"'sample_mask' must be a boolean array of length {n_timepoints} or indices. "
                f"Got a boolean array of shape {sample_mask.shape!r}."
            )
        sample_mask = np.flatnonzero(sample_mask)
    sample_mask = sample_mask.astype(np.int64)
    if (
        sample_mask.ndim != 1
        or sample_mask.size == 0
        or sample_mask.min() < 0
        or sample_mask.max() >= n_timepoints
        or np.any(np.diff(sample_mask) <= 0)
    ):
        raise InputDataError(
            f"'sample_mask' must be increasing volume indices in [0, {n_timepoints}). "
            f"Got {sample_mask!r}."
        )
    return sample_mask


def _interpolation_matrix(
    n_timepoints: int, t_r: float, kept: NDArray[np.int64], mode: str
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Rows of the interpolated, trimmed series as combinations of the input volumes.

    Returns the (n_rows, n_timepoints) matrix and the indices of the kept volumes among those
    rows (nilearn's ``sample_mask - sample_mask[0]``).
    """
    from scipy.interpolate import CubicSpline

    frame_times = np.arange(n_timepoints) * t_r
    spline = CubicSpline(frame_times[kept], np.eye(kept.size), extrapolate=False)(frame_times)
    if mode == "nilearn":
        # ~index == -(index + 1): nilearn replaces volume n - 1 - i for each kept i.
        replaced = np.zeros(n_timepoints, dtype=bool)
        replaced[n_timepoints - 1 - kept] = True
    else:
        replaced = np.ones(n_timepoints, dtype=bool)
        replaced[kept] = False
    matrix = np.eye(n_timepoints)
    matrix[replaced] = 0.0
    matrix[np.ix_(replaced, kept)] = spline[replaced]
    dropped = np.isnan(matrix).any(axis=1)
    matrix = matrix[~dropped]
    new_index = kept - kept[0]
    if new_index[-1] >= matrix.shape[0]:
        raise InputDataError(
            "'sample_mask' cannot be used with interpolation='nilearn': nilearn 0.14.1 trims "
            f"{int(dropped.sum())} volumes and then indexes past the end of the run. Use "
            "interpolation='spline'."
        )
    return matrix, new_index


def _detrend_matrix(n: int) -> NDArray[np.float64]:
    centring = np.eye(n) - 1.0 / n
    trend = np.arange(n, dtype=np.float64)
    trend -= trend.mean()
    norm = np.sqrt((trend**2).sum())
    if norm > np.finfo(np.float64).eps:
        trend /= norm
    return centring - np.outer(trend, trend)


def _filter_matrix(n: int, t_r: float, high_pass, low_pass) -> NDArray[np.float64]:
    from nilearn.signal import butterworth

    # nilearn's own filter on the identity: same critical-frequency checks, padding and order.
    return butterworth(
        np.eye(n), sampling_rate=1.0 / t_r, low_pass=low_pass, high_pass=high_pass, copy=True
    )



# Relative size below which a direction is taken as absent: a column of the band basis on the
# kept volumes (singular value relative to the largest), or the part of a unit-norm nuisance
# regressor left inside the band after the directions before it.
_RANK_RTOL = 1e-6


def dct_frequencies(n_timepoints: int, t_r: float) -> NDArray[np.float64]:
    """Frequencies (Hz) of the DCT-II basis of a run: ``k / (2 n t_r)`` for ``k = 0..n-1``."""
    return np.arange(n_timepoints) / (2.0 * n_timepoints * t_r)


def dct_basis(n_timepoints: int, columns: NDArray[np.intp]) -> NDArray[np.float64]:
    """Orthonormal DCT-II cosines ``k`` in ``columns``, at every volume: (n_timepoints, len(columns)).

    The same cosines as nilearn's :func:`nilearn.glm.first_level.design_matrix.create_cosine_drift`
    (and fMRIPrep's ``cosine_XX`` confounds) for ``k >= 1``; ``k = 0`` is the constant.
    """
    k = np.asarray(columns, dtype=np.float64)
    t = np.arange(n_timepoints, dtype=np.float64) + 0.5
    basis = np.sqrt(2.0 / n_timepoints) * np.cos(np.pi / n_timepoints * np.outer(t, k))
    basis[:, k == 0] = 1.0 / np.sqrt(n_timepoints)
    return basis


def _orthonormal_span(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """Orthonormal basis of the column span, directions below ``_RANK_RTOL`` of the largest dropped."""
    if matrix.shape[1] == 0:
        return matrix
    u, s, _ = linalg.svd(matrix, full_matrices=False)
    return u[:, s > _RANK_RTOL * s[0]] if s.size and s[0] > 0 else u[:, :0]


#: A confound with less than this fraction of its energy (on the kept volumes) inside the band
#: is left out: regressing it would cost a whole degree of freedom to remove almost nothing (e.g.
#: fMRIPrep's 128 s cosines under a 0.01 Hz high-pass, which censoring makes not quite orthogonal).
MIN_BAND_ENERGY = 0.01


def _residual_span(
    nuisance: NDArray[np.float64], space: NDArray[np.float64] | None, n_always: int = 0
) -> NDArray[np.float64]:
    """Orthonormal basis of what the ``nuisance`` columns add inside ``space``.

    The first ``n_always`` columns (the drift terms) are always regressed. Each further column
    (a confound) is scaled to unit norm on the kept volumes, projected into the band, and
    stripped of the drift directions; what is left is its own contribution. Below
    :data:`MIN_BAND_ENERGY` of its energy it is dropped instead of being blown up to unit
    variance, and costs no degree of freedom (e.g. fMRIPrep's 128 s cosines under a 0.01 Hz
    high-pass: almost all drift, which the drift terms already remove). Pivoted QR then keeps
    the columns in order of what they add.
    """
    if nuisance.shape[1] == 0:
        return nuisance
    norms = np.sqrt((nuisance**2).sum(axis=0))
    norms[norms == 0] = 1.0
    nuisance = nuisance / norms
    if space is not None:
        nuisance = space @ (space.T @ nuisance)
    drift = _pivoted_basis(nuisance[:, :n_always])
    confounds = nuisance[:, n_always:]
    if confounds.shape[1]:
        confounds = confounds - drift @ (drift.T @ confounds)
        confounds = confounds[:, (confounds**2).sum(axis=0) >= MIN_BAND_ENERGY]
    return np.hstack([drift, _pivoted_basis(confounds)])


def _pivoted_basis(matrix: NDArray[np.float64]) -> NDArray[np.float64]:
    """Orthonormal basis of the span of unit-or-smaller columns (pivoted QR, |R_ii| > 1e-6)."""
    if matrix.shape[1] == 0:
        return matrix
    q, r, _ = linalg.qr(matrix, mode="economic", pivoting=True)
    return q[:, np.abs(np.diag(r)) > _RANK_RTOL]


def _dct_operator(
    n_timepoints: int,
    t_r: float,
    confounds: NDArray[np.float64] | None,
    kept: NDArray[np.int64] | None,
    high_pass: float | None,
    low_pass: float | None,
    detrend: bool,
) -> NDArray[np.float64]:
    """The ``filter="dct"`` operator: band and nuisance fitted together on the kept volumes.

    On the kept rows, the operator is the projection onto the band space ``S`` minus the
    projection onto what the nuisance regressors ``N`` add inside ``S``:
    ``P = Q_S Q_S^T - Q_N Q_N^T`` with ``Q_N`` an orthonormal basis of ``Q_S Q_S^T N``.

    * ``S`` is the span of the in-band DCT cosines (``high_pass < f <= low_pass``; the cosines
      of the stretch from the first to the last kept volume) sampled at the kept volumes when a
      low-pass is asked for, else every kept volume.
    * ``N`` holds the DCT cosines below ``high_pass`` (the constant included), the linear trend
      (``detrend``) and the confounds, all at the kept volumes only.

    Without censoring this is exactly the band-pass of the DCT and the regression of the
    confounds' in-band part (the simultaneous fit that Lindquist et al. 2019 ask for). With
    censoring the censored volumes are simply absent: nothing is interpolated, so nothing made
    by the operator can be shared by all voxels (``P`` is an orthogonal projection: its
    singular values are 0 or 1), and its rank is the number of degrees of freedom left.
    """
    rows = np.arange(n_timepoints) if kept is None else kept
    n_kept = rows.size
    # The cosines span the first to the last kept volume: a run whose head (non-steady-state
    # volumes) or tail is removed keeps an orthogonal basis, and only censoring inside the span
    # makes the kept samples irregular.
    span = int(rows[-1] - rows[0] + 1)
    inside = rows - rows[0]
    frequencies = dct_frequencies(span, t_r)
    low = frequencies <= high_pass if high_pass is not None else np.zeros(span, bool)
    if high_pass is None and detrend:
        low[0] = True  # the constant
    nuisance_parts = [dct_basis(span, np.flatnonzero(low))[inside]]
    if detrend:
        trend = inside.astype(np.float64)
        nuisance_parts.append(np.column_stack([np.ones(n_kept), trend - trend.mean()]))
    n_drift = sum(part.shape[1] for part in nuisance_parts)
    if confounds is not None:
        nuisance_parts.append(confounds[rows])
    nuisance = np.hstack(nuisance_parts)
    if low_pass is not None:
        band = ~low & (frequencies <= low_pass)
        band[0] = False
        space = _orthonormal_span(dct_basis(span, np.flatnonzero(band))[inside])
        projection = space @ space.T
    else:
        space = None
        projection = np.eye(n_kept)
    q = _residual_span(nuisance, space, n_always=n_drift)
    projection -= q @ q.T
    operator = np.zeros((n_kept, n_timepoints))
    operator[:, rows] = projection
    return operator


def correlation_dof(operator: NDArray[np.float64]) -> float:
    """Effective degrees of freedom of a correlation between two series cleaned by ``operator``.

    Returned as the number of volumes ``n`` of an ordinary Pearson correlation of white noise
    with the same null spread: the Fisher z of two independent cleaned series has standard
    deviation ``1 / sqrt(n - 3)``. It is ``1 +`` the Satterthwaite degrees of freedom
    (:func:`compute_effective_dof`) of the centred operator; for a projection of rank ``k`` that
    leaves no mean, exactly ``k + 1``. Never negative: 1 for an operator that leaves nothing.
    """
    centred = operator - operator.mean(axis=0)
    # Eigenvalues of the centred M M^T; those at rounding level (a projection that removed
    # everything leaves ~1e-16 entries) count as zero.
    eigenvalues = np.linalg.eigvalsh(centred @ centred.T)
    eigenvalues = eigenvalues[eigenvalues > _ZERO_EIGENVALUE]
    if eigenvalues.size == 0:
        return 1.0
    return 1.0 + float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


#: An eigenvalue of M M^T below this is rounding (the operators' are O(0.01-1)).
_ZERO_EIGENVALUE = 1e-10



def build_cleaning_operator(
    n_timepoints: int,
    t_r: float,
    confounds: NDArray | pd.DataFrame | None = None,
    sample_mask: NDArray | None = None,
    high_pass: float | None = None,
    low_pass: float | None = None,
    detrend: bool = True,
    standardize_confounds: bool = True,
    *,
    standardize: Literal["zscore_sample"] | None = None,
    interpolation: Literal["nilearn", "spline"] = "spline",
    filter: Literal["dct", "butterworth"] = "dct",
) -> NDArray[np.float64]:
    """Build the whole cleaning of a run as one matrix ``M``: ``cleaned = M @ signals``.

    Parameters
    ----------
    n_timepoints : int
        Volumes in the run (rows of the raw signals, censored ones included).
    t_r : float
        Repetition time in seconds.
    confounds : ndarray or DataFrame of shape (n_timepoints, n_confounds), optional
        Regressors, as returned by :func:`load_run_confounds`.
    sample_mask : ndarray of int or bool, optional
        Kept volumes (indices, increasing, or a boolean mask of length n_timepoints).
    high_pass, low_pass : float, optional
        Butterworth cut-offs in Hz; no filter when both are None.
    detrend : bool, default=True
        Remove mean and linear trend before filtering.
    standardize_confounds : bool, default=True
        z-score the confounds before regression (else scale by their maximum).
    standardize : {"zscore_sample", None}, default=None
        Include the centring of nilearn's final standardisation; divide by the standard
        deviation with :func:`apply_cleaning_operator`.
    interpolation : {"spline", "nilearn"}, default="spline"
        ``filter="butterworth"`` only: how censored volumes are filled before filtering; see
        the module docstring.
    filter : {"dct", "butterworth"}, default="dct"
        ``"dct"``: the band is a projection on the kept volumes, fitted simultaneously with the
        confounds; censored volumes are never filled (see the module docstring).
        ``"butterworth"``: nilearn's ``signal.clean`` (``filter="butterworth"``), step by step.

    Returns
    -------
    operator : ndarray of shape (n_kept, n_timepoints), float64
        Columns of censored volumes are zero (with ``filter="dct"`` or
        ``interpolation="spline"``).
    """
    if n_timepoints < 3:
        raise InputDataError(f"'n_timepoints' must be at least 3. Got {n_timepoints!r}.")
    if interpolation not in ("nilearn", "spline"):
        raise InputDataError(
            f"'interpolation' must be 'spline' or 'nilearn'. Got {interpolation!r}."
        )
    if filter not in ("dct", "butterworth"):
        raise InputDataError(f"'filter' must be 'dct' or 'butterworth'. Got {filter!r}.")
    if standardize not in (None, "zscore_sample"):
        raise InputDataError(
            f"'standardize' must be 'zscore_sample' or None. Got {standardize!r}."
        )
    if not t_r or t_r <= 0:
        raise InputDataError(f"'t_r' must be a positive number of seconds. Got {t_r!r}.")
    kept = _as_index_mask(sample_mask, n_timepoints)
    if confounds is not None:
        confounds = np.asarray(confounds, dtype=np.float64)
        if confounds.ndim == 1:
            confounds = confounds[:, None]
        if confounds.shape[0] != n_timepoints:
            raise InputDataError(
                f"'confounds' must have one row per volume ({n_timepoints}). Got shape "
                f"{confounds.shape!r}."
            )
        if not np.isfinite(confounds).all():
            raise InputDataError(
                f"'confounds' must be finite. Got {int((~np.isfinite(confounds)).sum())} "
                "NaN or Inf values."
            )
        if confounds.shape[1] == 0:
            confounds = None
    filtering = high_pass is not None or low_pass is not None
    if filtering and high_pass is not None and low_pass is not None and high_pass >= low_pass:
        raise InputDataError(
            f"'high_pass' must be below 'low_pass'. Got {high_pass!r} and {low_pass!r}."
        )

    if filter == "dct":
        operator = _dct_operator(n_timepoints, t_r, confounds, kept, high_pass, low_pass, detrend)
        if standardize is not None:
            operator = operator - operator.mean(axis=0)
        return operator

    # Butterworth (nilearn's signal.clean). Step 1: censoring (no filter) or interpolation.
    operator = np.eye(n_timepoints)
    late_index = None
    if kept is not None:
        if filtering:
            operator, late_index = _interpolation_matrix(n_timepoints, t_r, kept, interpolation)
        else:
            operator = operator[kept]
    conf = None if confounds is None else operator @ confounds
    # Step 2: detrend.
    if detrend:
        d = _detrend_matrix(operator.shape[0])
        operator = d @ operator
        conf = None if conf is None else d @ conf
    # Steps 3-4: filter, then censor.
    if filtering:
        f = _filter_matrix(operator.shape[0], t_r, high_pass, low_pass)
        operator = f @ operator
        conf = None if conf is None else f @ conf
        if late_index is not None:
            operator = operator[late_index]
            conf = None if conf is None else conf[late_index]
    # Step 5: confound regression.
    if conf is not None:
        if standardize_confounds:
            conf = conf - conf.mean(axis=0)
            std = conf.std(axis=0, ddof=1)
            std[std < np.finfo(np.float64).eps] = 1.0
            conf = conf / std
        else:
            peak = np.abs(conf).max(axis=0)
            peak[peak == 0] = 1.0
            conf = conf / peak
        q, r, _ = linalg.qr(conf, mode="economic", pivoting=True)
        q = q[:, np.abs(np.diag(r)) > np.finfo(np.float64).eps * 100.0]
        operator = operator - q @ (q.T @ operator)
    # Step 6: centring of the final standardisation.
    if standardize is not None:
        operator = operator - operator.mean(axis=0)
    return operator


def apply_cleaning_operator(
    operator: NDArray[np.float64],
    signals: NDArray,
    standardize: Literal["zscore_sample"] | None = None,
) -> NDArray[np.float32]:
    """Return ``operator @ signals`` in float32, z-scored per column when asked.

    ``signals`` is the raw ``(n_timepoints, n_voxels)`` array; the product is computed in
    float32 blocks of columns, so no float64 copy of the data is made. Each column's mean is
    taken out first (and its image ``(M 1) mean`` added back in float64): raw BOLD sits on a
    baseline of ~1e3-1e4, and a float32 product on it would lose about 3 digits. Constant
    columns are left at 0 (nilearn sets their standard deviation to 1).
    """
    signals = np.asarray(signals)
    operator32 = operator.astype(np.float32)
    response_to_mean = operator.sum(axis=1)
    cleaned = np.empty((operator.shape[0], signals.shape[1]), dtype=np.float32)
    for start in range(0, signals.shape[1], _BLOCK):
        block = signals[:, start : start + _BLOCK]
        # The float32 mean is subtracted, and exactly that value is added back in float64.
        mean = block.mean(axis=0, dtype=np.float64).astype(np.float32)
        centred = block.astype(np.float32, copy=False) - mean
        cleaned[:, start : start + _BLOCK] = operator32 @ centred + np.outer(
            response_to_mean, mean.astype(np.float64)
        )
    if standardize == "zscore_sample":
        std = cleaned.std(axis=0, ddof=1, dtype=np.float64)
        std[std < np.finfo(np.float64).eps] = 1.0
        cleaned /= std.astype(np.float32)
    return cleaned


def compute_effective_dof(operator: NDArray[np.float64]) -> float:
    """Satterthwaite effective degrees of freedom of a cleaning operator ``M``.

    ``tr(M M^T)^2 / tr((M M^T)^2)``: the number of independent white-noise samples whose sum
    of squares has the same mean-to-variance ratio as that of ``M x``; equals the rank of
    ``M`` when ``M`` is a projection.
    """
    gram = operator @ operator.T
    return float(np.trace(gram) ** 2 / np.sum(gram * gram))


# --------------------------------------------------------------------------------------------
# Where the degrees of freedom go

#: Confound blocks of the budget, by the prefixes of fMRIPrep's column names.
_CONFOUND_BLOCKS = (
    ("motion", ("trans_", "rot_")),
    ("compcor", ("a_comp_cor", "c_comp_cor", "w_comp_cor", "t_comp_cor")),
    ("cosine", ("cosine",)),
    ("wm_csf", ("csf", "white_matter")),
    ("global_signal", ("global_signal",)),
    ("aroma", ("aroma_motion",)),
)


def confound_blocks(columns: Sequence[str]) -> dict[str, list[str]]:
    """Group confound columns into the blocks of the DOF budget (motion, compcor, cosine, ...).

    Columns of no known family go to ``"other"``. Blocks come in a fixed order (motion, compcor,
    cosine, wm_csf, global_signal, aroma, other), the order in which the budget charges them.
    """
    blocks: dict[str, list[str]] = {}
    for column in columns:
        name = next((block for block, prefixes in _CONFOUND_BLOCKS
                     if str(column).startswith(prefixes)), "other")
        blocks.setdefault(name, []).append(str(column))
    order = [name for name, _ in _CONFOUND_BLOCKS] + ["other"]
    return {name: blocks[name] for name in order if name in blocks}


def order_budget(budget: Mapping[str, float]) -> dict[str, float]:
    """A budget (or a row of its costs) in the order it is charged: kept volumes, the band, the
    confound blocks in :func:`confound_blocks`' order, the task, anything else, and ``dof``."""
    order = ["n_kept", "filter", *(name for name, _ in _CONFOUND_BLOCKS), "other", "task"]
    keys = [k for k in order if k in budget] + [k for k in budget if k not in order and k != "dof"]
    return {k: budget[k] for k in keys} | ({"dof": budget["dof"]} if "dof" in budget else {})


def order_censoring(censored_by: Mapping[str, int]) -> dict[str, int]:
    """Censoring counts in the order of :data:`CENSORING_REASONS`."""
    return {k: censored_by[k] for k in CENSORING_REASONS if k in censored_by}


def dof_budget(
    n_timepoints: int,
    t_r: float,
    *,
    sample_mask: NDArray | None,
    high_pass: float | None,
    low_pass: float | None,
    detrend: bool,
    filter: Literal["dct", "butterworth"],
    blocks: Mapping[str, NDArray | None],
) -> dict[str, float]:
    """Where the degrees of freedom of a run go, step by step.

    Starts from the kept volumes (``n_kept``: what is left after non-steady-state removal and
    censoring), then adds the band (detrending and filtering) and each block of regressors in
    turn (the order of ``blocks``), and records what each step costs in the correlation's
    degrees of freedom (:func:`correlation_dof`). What a block costs depends on what came
    before it: regressors that share a direction are charged once, to the first.

    Parameters
    ----------
    blocks : mapping of str to ndarray of shape (n_timepoints, k) or None
        Named regressor blocks (e.g. from :func:`confound_blocks`, then the task regressors).

    Returns
    -------
    dict
        ``n_kept``, ``filter`` and one entry per block: the dof each step costs; ``dof``: what
        is left (the ``correlation_dof`` of the whole operator).
    """
    n_kept = n_timepoints if sample_mask is None else int(np.asarray(sample_mask).size)
    budget: dict[str, float] = {"n_kept": float(n_kept)}
    settings = dict(sample_mask=sample_mask, high_pass=high_pass, low_pass=low_pass, detrend=detrend,
                    filter=filter)
    current = build_cleaning_operator(n_timepoints, t_r, None, **settings)
    left = correlation_dof(current)
    budget["filter"] = float(n_kept - left)
    parts: list[NDArray] = []
    for name, block in blocks.items():
        if block is None or np.asarray(block).size == 0:
            continue
        block = np.asarray(block, dtype=np.float64)
        parts.append(block[:, None] if block.ndim == 1 else block)
        current = build_cleaning_operator(n_timepoints, t_r, np.hstack(parts), **settings)
        after = correlation_dof(current)
        budget[name] = float(left - after)
        left = after
    budget["dof"] = float(left)
    return budget
