"""One run, from fMRIPrep outputs to seed-to-voxel maps: the science the participant workflow wires.

:func:`compute_run_maps` reads the run once (:func:`fcflow.niftiio.read_masked_bold`), then per
seed and measure:

* **rest** (``correlation``): the whole cleaning (censoring, detrending, band-pass, confound
  regression) is one linear operator (:func:`fcflow.denoise.build_cleaning_operator`); the seed
  signal is the mean (or eigenvariate) of the cleaned seed voxels; the map is the Pearson r of
  every cleaned voxel with it, and its Fisher z.
* **task** (``gppi``, ``background``): the data are detrended, high-pass filtered and censored
  by the same operator built *without* confounds, and the confounds and task regressors are put
  through that same operator, so that every column of the model lives in the same filtered,
  censored time domain. gPPI fits task regressors, seed, one seed x condition interaction per
  condition and the confounds by OLS (no deconvolution: see :mod:`fcflow.ppi`), with the
  degrees of freedom and variances of Worsley & Friston (1995) for the filtered errors;
  background FC correlates seed and voxels after regressing the task regressors and confounds
  out of both.

When the data cannot answer
---------------------------
Before any voxel is touched, a run's degrees-of-freedom budget is drawn up
(:func:`fcflow.denoise.dof_budget`: kept volumes, what the band and each confound block cost,
and for a task the task regressors). A run is excluded, with the numbers in its reason, when
any of its measures would have fewer effective degrees of freedom than the recipe's
``min_dof``, or when its condition regressors are empty after censoring, identical or collinear
(:func:`fcflow.ppi.check_task_design`). An excluded run writes no map, so nothing below the
minimum reaches the group level.

Spatial smoothing
-----------------
With the recipe's ``smoothing_fwhm`` every map of the run is smoothed last, on the run's grid,
with nilearn's Gaussian kernel (:func:`fcflow.niftiio.smooth_map`, which says why the maps and
not the BOLD data); the seed signals and the degrees of freedom are those of the unsmoothed data.

Maps are vectors over the brain-mask voxels (C order of the grid); :func:`fcflow.niftiio.unmask`
puts them back on the grid.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.atlas.seedqc import SeedQC, seed_qc
from fcflow.config import DenoisingConfig, SeedConfig, TaskConfig
from fcflow.connectivity import compute_multiseed_connectivity, extract_seed_signal
from fcflow.denoise import build_cleaning_operator, confound_blocks, correlation_dof, dof_budget
from fcflow.errors import InputDataError
from fcflow.niftiio import MaskedBoldInfo, read_masked_bold, smooth_map

LOGGER = logging.getLogger("fcflow.firstlevel")


@dataclass(frozen=True)
class MapSpec:
    """What one output map is: its seed, measure (``desc``) and statistic (``stat``)."""

    seed: str
    desc: str
    stat: str


@dataclass
class RunMaps:
    """Everything computed for one run.

    Attributes
    ----------
    maps : dict of MapSpec to ndarray of shape (n_voxels,), float32
        Smoothed when ``smoothing_fwhm`` is set.
    smoothing_fwhm : float or None
        FWHM in mm of the Gaussian kernel the maps were smoothed with; None: not smoothed.
    seed_signals : dict of str to ndarray of shape (n_kept,)
        Each seed's cleaned time series (kept volumes only).
    kept_volumes : ndarray of int
        Indices of the volumes behind ``seed_signals``.
    seed_qc : dict of str to SeedQC
    dof : dict of str to float
        Effective degrees of freedom per measure (see the sidecars): for ``correlation`` and
        ``background`` :func:`fcflow.denoise.correlation_dof` (Fisher z SD ``1/sqrt(dof - 3)``),
        for ``gppi`` the t statistics' degrees of freedom.
    dof_budget : dict of str to float
        Where the degrees of freedom went (:func:`fcflow.denoise.dof_budget`).
    excluded : bool
    exclusion_reason : str
    """

    maps: dict[MapSpec, NDArray[np.float32]] = field(default_factory=dict)
    smoothing_fwhm: float | None = None
    seed_signals: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    kept_volumes: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    seed_qc: dict[str, SeedQC] = field(default_factory=dict)
    dof: dict[str, float] = field(default_factory=dict)
    dof_budget: dict[str, float] = field(default_factory=dict)
    excluded: bool = False
    exclusion_reason: str = ""


def _seed_columns(seed_img: nib.spatialimages.SpatialImage, brain: NDArray[np.bool_]) -> NDArray[np.bool_]:
    seed = np.asarray(seed_img.dataobj).reshape(brain.shape) > 0
    return seed[brain]


def compute_run_maps(
    bold_file: str | Path,
    mask_file: str | Path,
    seed_imgs: Mapping[str, nib.spatialimages.SpatialImage],
    *,
    t_r: float,
    task: TaskConfig,
    denoising: DenoisingConfig,
    confounds: pd.DataFrame | None,
    sample_mask: NDArray[np.int64] | None,
    seeds: Sequence[SeedConfig] = (),
    events: pd.DataFrame | None = None,
    events_file: str = "",
    run_name: str = "",
    masked: tuple[NDArray[np.float32], MaskedBoldInfo] | None = None,
) -> RunMaps:
    """Compute the seed-to-voxel maps of one run.

    Parameters
    ----------
    bold_file, mask_file : path
        fMRIPrep's preprocessed BOLD and its brain mask (same grid).
    seed_imgs : mapping of str to nibabel image
        Seed masks on the run's grid (before intersection with the brain mask).
    t_r : float
        Repetition time in seconds.
    task : TaskConfig
        The recipe's task: its ``measures`` (``correlation``, ``gppi``, ``background``), band
        (``high_pass``, ``low_pass``, Hz), ``conditions`` and ``condition_contrasts``.
    denoising : DenoisingConfig
        The recipe's ``[denoising]``: ``detrend``, ``standardize_confounds``, ``filter``
        (:func:`fcflow.denoise.build_cleaning_operator`), ``min_dof`` (a measure with fewer
        effective degrees of freedom excludes the run) and ``smoothing_fwhm`` (FWHM in mm of the
        Gaussian kernel every map is smoothed with, :func:`fcflow.niftiio.smooth_map`; None leaves
        the maps as computed).
    confounds : DataFrame of shape (n_timepoints, n_confounds) or None
        From :func:`fcflow.denoise.load_run_confounds`.
    sample_mask : ndarray of int or None
        Kept volumes (censoring, non-steady-state removal); None keeps all.
    seeds : sequence of SeedConfig, default=()
        The recipe's seeds: each seed of ``seed_imgs`` is summarised with its own ``signal``
        and needs its own ``min_coverage`` (a seed not listed gets :class:`SeedConfig`'s defaults).
    events, events_file :
        For task measures: the events table and its file name (in messages).
    run_name : str
        Used in messages.
    masked : (data, info) or None
        The run's in-mask voxels as :func:`fcflow.niftiio.read_masked_bold` returns them, when the
        caller has read them already (the report shares the first level's single read); None reads
        ``bold_file``.

    Returns
    -------
    RunMaps
    """
    measures, high_pass, low_pass = list(task.measures), task.high_pass, task.low_pass
    conditions = list(task.conditions)
    condition_contrasts = {c.name: c.expression for c in task.condition_contrasts}
    detrend, filter, min_dof = denoising.detrend, denoising.filter, denoising.min_dof
    # each seed's own settings; a seed the recipe does not list gets SeedConfig's defaults
    by_name = {seed.name: seed for seed in seeds}
    signals = {name: by_name[name].signal if name in by_name else SeedConfig.signal for name in seed_imgs}
    coverages = {name: by_name[name].min_coverage if name in by_name else SeedConfig.min_coverage
                 for name in seed_imgs}
    mask_img = nib.load(mask_file)
    brain = np.asarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0
    result = RunMaps()
    columns = {}
    for name, img in seed_imgs.items():
        # Coverage first: a run that loses its seed is excluded before its data are read.
        qc = seed_qc(img, mask_img, None, min_coverage=coverages[name], run_name=run_name, seed_name=name)
        result.seed_qc[name] = qc
        if qc.excluded:
            result.excluded, result.exclusion_reason = True, qc.exclusion_reason or ""
        columns[name] = _seed_columns(img, brain)
    if result.excluded:
        return result

    # Read first: a damaged run is an error even when its budget would exclude it.
    data, info = read_masked_bold(bold_file, mask_img) if masked is None else masked
    n_time = data.shape[0]
    if confounds is not None and len(confounds) != n_time:
        raise InputDataError(
            f"{run_name}: the confounds have {len(confounds)} rows but the BOLD run "
            f"{Path(bold_file).name} has {n_time} volumes. Use the confounds file of this run."
        )
    # The budget, and the exclusions it implies, before any voxel is cleaned.
    blocks = {} if confounds is None else {
        block: confounds[cols].to_numpy(dtype=np.float64) for block, cols in confound_blocks(confounds.columns).items()
    }
    task_measures = [m for m in measures if m in ("gppi", "background")]
    regressors = None
    if task_measures:
        from fcflow.ppi import build_task_regressors, check_task_design

        if events is None:
            raise InputDataError(f"{run_name}: task measures {list(measures)} need the run's events file.")
        regressors = build_task_regressors(events, conditions, n_time, t_r, events_file=events_file)
        blocks["task"] = regressors.to_numpy(dtype=np.float64)
        preparation = build_cleaning_operator(n_time, t_r, None, sample_mask, high_pass, low_pass, detrend,
                                              filter=filter)
        task_prepared = pd.DataFrame(preparation @ regressors.to_numpy(dtype=np.float64), columns=regressors.columns)
        reason = check_task_design(regressors, task_prepared, conditions, events_file=events_file, run_name=run_name)
        if reason:
            return _exclude(result, reason)
    budget = dof_budget(n_time, t_r, sample_mask=sample_mask, high_pass=high_pass, low_pass=low_pass,
                        detrend=detrend, filter=filter, blocks=blocks)
    result.dof_budget = budget
    reason = _dof_shortfall(budget, min_dof, measure=" / ".join(m for m in measures if m != "gppi") or "gppi",
                            run_name=run_name)
    if reason:
        return _exclude(result, reason)

    for name in seed_imgs:
        # tSNR of the seed on the raw (preprocessed) data, before any cleaning.
        result.seed_qc[name] = seed_qc(
            seed_imgs[name], mask_img, data, min_coverage=coverages[name], run_name=run_name, seed_name=name
        )

    if "correlation" in measures:
        # one cleaning operator and one pass over the data for all seeds
        connectivity = compute_multiseed_connectivity(
            data, columns, t_r, confounds, sample_mask, high_pass=high_pass, low_pass=low_pass,
            detrend=detrend, standardize_confounds=denoising.standardize_confounds, signal=signals,
            filter=filter, run_name=run_name,
        )
        for name, conn in connectivity.items():
            result.maps[MapSpec(name, "correlation", "r")] = conn.r
            result.maps[MapSpec(name, "correlation", "z")] = conn.z
            result.seed_signals[name] = conn.seed_signal
            result.dof["correlation"] = conn.dof

    if task_measures:
        _task_maps(result, data, columns, t_r=t_r, confounds=confounds, sample_mask=sample_mask,
                   high_pass=high_pass, low_pass=low_pass, measures=task_measures, conditions=conditions,
                   condition_contrasts=condition_contrasts, task=regressors, signal=signals,
                   detrend=detrend, filter=filter, min_dof=min_dof, run_name=run_name)
        if result.excluded:
            return result

    if denoising.smoothing_fwhm is not None:
        for spec, values in result.maps.items():
            result.maps[spec] = smooth_map(values, brain, mask_img.affine, denoising.smoothing_fwhm)
        result.smoothing_fwhm = float(denoising.smoothing_fwhm)
    result.kept_volumes = np.arange(n_time) if sample_mask is None else np.asarray(sample_mask)
    return result


def _task_maps(
    result: RunMaps,
    data: NDArray[np.float32],
    columns: Mapping[str, NDArray[np.bool_]],
    *,
    t_r: float,
    confounds: pd.DataFrame | None,
    sample_mask: NDArray[np.int64] | None,
    high_pass: float | None,
    low_pass: float | None,
    measures: Sequence[str],
    conditions: Sequence[str],
    condition_contrasts: Mapping[str, str],
    task: pd.DataFrame,
    signal: Mapping[str, str],
    detrend: bool,
    filter: str,
    min_dof: float,
    run_name: str,
) -> None:
    # here, not at the top: fcflow.ppi imports scipy.stats (about 1 s), which rest runs never use
    from fcflow.ppi import (
        background_operator,
        build_gppi_design,
        compute_background_fc,
        fit_gppi,
        gppi_model_dof,
    )

    n_time = data.shape[0]
    # Filter and censor everything with one operator and no confounds, so that the confounds can
    # enter the model as regressors (with honest degrees of freedom) instead of being projected
    # out of the data beforehand.
    operator = build_cleaning_operator(n_time, t_r, None, sample_mask, high_pass, low_pass, detrend,
                                       filter=filter)
    # The errors of the prepared data are white noise put through the operator.
    error_covariance = operator @ operator.T
    prepared = (operator.astype(np.float32) @ data).astype(np.float32, copy=False)
    task_prepared = pd.DataFrame(operator @ task.to_numpy(dtype=np.float64), columns=task.columns)
    confounds_prepared = None
    if confounds is not None:
        confounds_prepared = pd.DataFrame(
            operator @ np.nan_to_num(confounds.to_numpy(dtype=np.float64)), columns=confounds.columns
        )
    if "background" in measures:
        residual = background_operator(task_prepared, confounds_prepared, operator.shape[0])
        result.dof["background"] = correlation_dof(residual @ operator)
    for name, cols in columns.items():
        seed = extract_seed_signal(prepared, cols, signal[name], seed_name=name, run_name=run_name)
        result.seed_signals[name] = seed
        if "gppi" in measures:
            design = build_gppi_design(seed, task_prepared, confounds_prepared, conditions=list(conditions))
            dof = gppi_model_dof(design.to_numpy(dtype=np.float64), error_covariance)[3]
            reason = _dof_shortfall({**result.dof_budget, "dof": dof}, min_dof, measure="gppi",
                                    run_name=run_name)
            if reason:
                _exclude(result, reason)
                return
            fit = fit_gppi(prepared, design, dict(condition_contrasts), error_covariance=error_covariance)
            for cond in conditions:
                key = f"ppi_{cond}"
                result.maps[MapSpec(name, f"gppi{cond}", "beta")] = fit.beta[key]
                result.maps[MapSpec(name, f"gppi{cond}", "z")] = fit.z[key]
            for label in condition_contrasts:
                result.maps[MapSpec(name, f"gppi{label}", "beta")] = fit.beta[label]
                result.maps[MapSpec(name, f"gppi{label}", "z")] = fit.z[label]
            result.dof["gppi"] = float(fit.dof)
        if "background" in measures:
            r, z = compute_background_fc(prepared, seed, task_prepared, confounds_prepared)
            result.maps[MapSpec(name, "background", "r")] = r
            result.maps[MapSpec(name, "background", "z")] = z


def _exclude(result: RunMaps, reason: str) -> RunMaps:
    """Mark the run excluded (no map survives), log why, and return it."""
    result.excluded, result.exclusion_reason = True, reason
    result.maps.clear()
    LOGGER.warning(reason)
    return result


def format_dof_budget(budget: Mapping[str, float]) -> str:
    """``"300 volumes kept; filter -216.0, motion -24.0, compcor -5.0 -> 55.0 dof"``."""
    # max(): a block that costs nothing comes out of the arithmetic as -1e-15, not as "--0.0"
    costs = ", ".join(f"{name} -{max(cost, 0.0):.1f}" for name, cost in budget.items()
                      if name not in ("n_kept", "dof"))
    return f"{budget['n_kept']:g} volumes kept; {costs} -> {budget['dof']:.1f} dof"


def _dof_shortfall(budget: Mapping[str, float], min_dof: float, *, measure: str, run_name: str) -> str:
    """The exclusion reason when ``budget["dof"]`` is below ``min_dof`` ("" otherwise)."""
    if budget["dof"] >= min_dof:
        return ""
    prefix = f"{run_name}: " if run_name else ""
    where = format_dof_budget(budget) if "n_kept" in budget else f"{budget['dof']:.1f} dof"
    return (f"{prefix}{measure} would have {budget['dof']:.1f} effective degrees of freedom, below the "
            f"minimum of {min_dof:g} (min_dof). Budget: {where}. Run excluded: its map would be mostly "
            "noise. Longer runs, less censoring, a narrower confound set or a wider band leave more.")


# ----------------------------------------------------------------------------------------------
# File-level entry points (what the nipype adapters call)
# ----------------------------------------------------------------------------------------------
def select_run_confounds(
    bold_file: str | Path, denoising: DenoisingConfig, *, run_name: str = ""
) -> tuple[pd.DataFrame | None, dict]:
    """Select a run's confounds and censoring, and decide whether motion excludes it.

    Parameters
    ----------
    bold_file : path
        fMRIPrep BOLD run; its confounds TSV is found by name (nilearn's ``load_confounds``).
    denoising : DenoisingConfig
        The recipe's ``[denoising]`` settings.
    run_name : str
        Used in messages.

    Returns
    -------
    confounds : DataFrame or None
    censoring : dict
        ``sample_mask`` (list of kept volumes, or None), ``n_timepoints``, ``n_kept``,
        ``framewise_displacement`` (list, nan as None), ``mean_fd_mm``, ``percent_censored``,
        ``n_non_steady_state``, ``excluded``, ``exclusion_reason``, and the settings in force.
    """
    from fcflow.denoise import assess_run_exclusion, load_run_confounds

    fd_threshold = denoising.fd_threshold_mm
    dvars_threshold = denoising.std_dvars_threshold
    censor = fd_threshold is not None or dvars_threshold is not None
    selected = load_run_confounds(
        bold_file, denoising.strategy, censor=censor,
        fd_threshold_mm=float(fd_threshold) if fd_threshold is not None else np.inf,
        std_dvars_threshold=float(dvars_threshold) if dvars_threshold is not None else np.inf,
        scrub=denoising.scrub_min_segment, n_compcor=denoising.n_compcor,
    )
    sample_mask = selected.sample_mask
    if not denoising.drop_nonsteady and sample_mask is not None and not censor:
        sample_mask = None
    excluded, reason = assess_run_exclusion(
        selected, min_volumes=denoising.min_volumes, max_mean_fd_mm=denoising.max_mean_fd_mm, run_name=run_name,
    )
    if excluded:
        LOGGER.warning(reason)
    fd = selected.framewise_displacement
    censoring = {
        "sample_mask": None if sample_mask is None else [int(i) for i in sample_mask],
        "n_timepoints": selected.n_timepoints,
        "n_kept": selected.n_kept,
        "framewise_displacement": [None if not np.isfinite(v) else float(v) for v in fd],
        "mean_fd_mm": float(np.nanmean(fd)) if np.isfinite(fd).any() else 0.0,
        "percent_censored": 100.0 * (1 - selected.n_kept / selected.n_timepoints),
        "n_non_steady_state": selected.n_non_steady_state,
        "n_fd_outliers": selected.n_fd_outliers,
        "censored_by": dict(selected.censored_by),
        "excluded": bool(excluded),
        "exclusion_reason": reason,
        "strategy": selected.strategy,
        "n_confounds": 0 if selected.confounds is None else int(selected.confounds.shape[1]),
        "confound_names": [] if selected.confounds is None else [str(c) for c in selected.confounds.columns],
    }
    return selected.confounds, censoring
