"""Quality-control numbers behind the reports: carpet rows, motion by group, QC-FC, and each run's
report arrays (:func:`compute_run_report_data`, computed in the first level's single read of the run).

Numbers only (the science layer): :mod:`fcflow.reports` draws and renders them.

Motion that differs between groups is the classic confound of drug studies: a drug that makes
people move more also changes their "connectivity". :func:`compare_motion_between_groups` tests
mean FD and the percentage of censored volumes across groups, session by session (one-way ANOVA
and Kruskal-Wallis). QC-FC (Power et al. 2012; Ciric et al. 2017) measures how much motion is
left in the connectivity that enters the group level: for every seed-voxel edge, the Pearson
correlation across subjects between the edge's connectivity (Fisher z) and the subject's mean FD
(:func:`compute_qcfc`); :func:`summarise_qcfc` reports the share of edges with p < 0.05
(uncorrected), the median absolute r and the distance dependence (Spearman correlation of QC-FC r
with the edge's distance from the seed centroid). A denoising strategy that works leaves a
distribution centred on 0, few edges with p < 0.05, and no distance dependence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import stats

from fcflow.config import DenoisingConfig, TaskConfig
from fcflow.connectivity import per_seed
from fcflow.errors import InputDataError

__all__ = [
    "compute_run_report_data",
    "select_carpet_voxels",
    "zscore_rows",
    "summarise_motion",
    "compare_motion_between_groups",
    "compute_qcfc",
    "QCFCSummary",
    "summarise_qcfc",
    "summarise_exclusions",
]


#: Tissue classes of the carpet plot, in row order.
TISSUES = ("GM", "WM", "CSF/other")


def select_carpet_voxels(
    mask_img: nib.spatialimages.SpatialImage, *, max_rows: int = 1200
) -> tuple[NDArray[np.intp], list[str]]:
    """An even subsample of the brain-mask voxels, sorted by tissue class (GM, WM, CSF/other).

    The runs are in MNI space, so each voxel's class is the larger of nilearn's MNI152 (ICBM 2009)
    grey- and white-matter probabilities at its centre (nearest 1 mm voxel), "CSF/other" when both
    are below 0.3. No per-subject segmentation is used: the classes are a guide for reading the
    plot, not a measurement.

    Parameters
    ----------
    mask_img : nibabel image
        The run's brain mask.
    max_rows : int, default=1200

    Returns
    -------
    columns : ndarray of int
        Indices into the in-mask voxels (C order of the grid), sorted by class.
    tissue : list of str
        The class of each selected voxel.
    """
    brain = np.asarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0
    n_voxels = int(brain.sum())
    columns = np.unique(np.linspace(0, n_voxels - 1, min(max_rows, n_voxels)).round().astype(np.intp))
    xyz = nib.affines.apply_affine(mask_img.affine, np.argwhere(brain)[columns])
    probabilities = []
    for tissue_name in ("gm", "wm"):
        volume, affine = _tissue_template(tissue_name)
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), xyz)).astype(int)
        inside = np.all((ijk >= 0) & (ijk < volume.shape), axis=1)
        values = np.zeros(len(xyz))
        values[inside] = volume[tuple(ijk[inside].T)]
        probabilities.append(values)
    gm, wm = probabilities
    code = np.where(np.maximum(gm, wm) < 0.3, 2, np.where(gm >= wm, 0, 1))
    order = np.argsort(code, kind="stable")
    return columns[order], [TISSUES[c] for c in code[order]]


@cache
def _tissue_template(tissue: str) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """nilearn's 1 mm MNI152 grey- or white-matter probability (scaled to a maximum of 1), cached per process."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_wm_template

    img = (load_mni152_gm_template if tissue == "gm" else load_mni152_wm_template)(resolution=None)
    volume = np.asarray(img.dataobj, dtype=np.float32)
    return volume / max(float(volume.max()), 1e-12), np.asarray(img.affine, dtype=np.float64)


def zscore_rows(values: NDArray[np.floating]) -> NDArray[np.float32]:
    """z-score each row over its finite entries (ddof=1); constant rows become 0, nan stays nan."""
    values = np.asarray(values, dtype=np.float64)
    mean = np.nanmean(values, axis=1, keepdims=True)
    std = np.nanstd(values, axis=1, ddof=1, keepdims=True)
    std[~(std > 0)] = 1.0
    return ((values - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Motion by group and session
# ----------------------------------------------------------------------------------------------
def summarise_motion(
    runs: pd.DataFrame, *, groups: Sequence[str], sessions: Sequence[str]
) -> pd.DataFrame:
    """Motion per group x session: subjects, mean FD and % censored (mean and SD), exclusions.

    Parameters
    ----------
    runs : DataFrame
        One row per subject x session (runs of a task already averaged), with columns
        ``participant``, ``group``, ``session``, ``mean_fd_mm``, ``percent_censored`` and
        ``n_excluded`` (runs of that subject and session excluded).

    Returns
    -------
    DataFrame
        Columns group, session, n_subjects, mean_fd_mm, sd_fd_mm, percent_censored,
        sd_percent_censored, n_excluded_runs.
    """
    rows = []
    for group in groups:
        for session in sessions:
            part = runs[(runs["group"] == group) & (runs["session"] == session)]
            fd = part["mean_fd_mm"].to_numpy(float)
            censored = part["percent_censored"].to_numpy(float)
            rows.append({
                "group": group, "session": session, "n_subjects": int(len(part)),
                "mean_fd_mm": float(np.nanmean(fd)) if np.isfinite(fd).any() else np.nan,
                "sd_fd_mm": float(np.nanstd(fd, ddof=1)) if np.isfinite(fd).sum() > 1 else np.nan,
                "percent_censored": float(np.nanmean(censored)) if np.isfinite(censored).any() else np.nan,
                "sd_percent_censored": (float(np.nanstd(censored, ddof=1)) if np.isfinite(censored).sum() > 1
                                        else np.nan),
                "n_excluded_runs": int(part["n_excluded"].sum()),
            })
    return pd.DataFrame(rows)


def compare_motion_between_groups(
    runs: pd.DataFrame, *, groups: Sequence[str], sessions: Sequence[str],
    measures: Sequence[str] = ("mean_fd_mm", "percent_censored"),
) -> pd.DataFrame:
    """Test, session by session, whether motion differs between groups.

    One-way ANOVA (:func:`scipy.stats.f_oneway`) and Kruskal-Wallis
    (:func:`scipy.stats.kruskal`) across the groups, on each measure. A group with fewer than 2
    subjects in a session leaves that session untested (nan).

    Parameters
    ----------
    runs : DataFrame
        As for :func:`summarise_motion`.

    Returns
    -------
    DataFrame
        Columns session, measure, n_per_group (text), anova_f, anova_p, kruskal_h, kruskal_p.
    """
    rows = []
    for session in sessions:
        part = runs[runs["session"] == session]
        for measure in measures:
            samples = [part.loc[part["group"] == g, measure].to_numpy(float) for g in groups]
            samples = [x[np.isfinite(x)] for x in samples]
            row = {"session": session, "measure": measure,
                   "n_per_group": ";".join(f"{g}={len(x)}" for g, x in zip(groups, samples)),
                   "anova_f": np.nan, "anova_p": np.nan, "kruskal_h": np.nan, "kruskal_p": np.nan}
            if len(samples) >= 2 and all(len(x) >= 2 for x in samples):
                pooled = np.concatenate(samples)
                if np.ptp(pooled) > 0:
                    anova = stats.f_oneway(*samples)
                    kruskal = stats.kruskal(*samples)
                    row.update(anova_f=float(anova.statistic), anova_p=float(anova.pvalue),
                               kruskal_h=float(kruskal.statistic), kruskal_p=float(kruskal.pvalue))
            rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# QC-FC
# ----------------------------------------------------------------------------------------------
def compute_qcfc(
    connectivity: NDArray[np.floating], mean_fd_mm: NDArray[np.floating]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Correlate every edge's connectivity with mean FD across subjects.

    Parameters
    ----------
    connectivity : ndarray of shape (n_subjects, n_edges)
        One row per subject (e.g. the Fisher z of each seed-voxel edge).
    mean_fd_mm : ndarray of shape (n_subjects,)

    Returns
    -------
    r : ndarray of shape (n_edges,)
        Pearson r; nan for an edge constant across subjects.
    p : ndarray of shape (n_edges,)
        Two-sided p of r (t test with n_subjects - 2 degrees of freedom).

    Raises
    ------
    ValueError
        Fewer than 3 subjects, shapes that disagree, or a constant ``mean_fd_mm``.
    """
    data = np.asarray(connectivity, dtype=np.float64)
    fd = np.asarray(mean_fd_mm, dtype=np.float64)
    if data.ndim != 2 or fd.shape != (data.shape[0],):
        raise InputDataError(
            f"'connectivity' must have shape (n_subjects, n_edges) and 'mean_fd_mm' shape (n_subjects,). "
            f"Got {data.shape!r} and {fd.shape!r}."
        )
    n = data.shape[0]
    if n < 3:
        raise InputDataError(f"QC-FC needs at least 3 subjects. Got {n}.")
    fd_c = fd - fd.mean()
    fd_norm = np.sqrt(fd_c @ fd_c)
    if fd_norm == 0:
        raise InputDataError("'mean_fd_mm' must vary across subjects. Got a constant mean FD.")
    centred = data - data.mean(axis=0)
    norms = np.sqrt(np.einsum("ij,ij->j", centred, centred))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(norms > 0, (fd_c @ centred) / (norms * fd_norm), np.nan)
    r = np.clip(r, -1.0, 1.0)
    dof = n - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(dof / np.maximum(1.0 - r**2, 1e-300))
    p = 2.0 * stats.t.sf(np.abs(t), dof)
    return r, p


@dataclass(frozen=True)
class QCFCSummary:
    """Summary of a QC-FC distribution (see :func:`summarise_qcfc`)."""

    n_subjects: int
    n_edges: int
    median_abs_r: float
    percent_p05: float
    distance_rho: float
    distance_p: float


def summarise_qcfc(
    r: NDArray[np.float64], p: NDArray[np.float64], distance_mm: NDArray[np.float64], *, n_subjects: int
) -> QCFCSummary:
    """Median absolute r, % of edges with p < 0.05 (uncorrected), and distance dependence (Spearman).

    Edges with a nan r are left out.
    """
    ok = np.isfinite(r)
    r, p, distance_mm = r[ok], p[ok], np.asarray(distance_mm)[ok]
    if r.size < 3:
        return QCFCSummary(n_subjects, int(r.size), np.nan, np.nan, np.nan, np.nan)
    rho = stats.spearmanr(r, distance_mm)
    return QCFCSummary(
        n_subjects=int(n_subjects), n_edges=int(r.size), median_abs_r=float(np.median(np.abs(r))),
        percent_p05=float(100.0 * np.mean(p < 0.05)), distance_rho=float(rho.statistic),
        distance_p=float(rho.pvalue),
    )


# ----------------------------------------------------------------------------------------------
# A run's report arrays, computed in the first level's single read of the run
# ----------------------------------------------------------------------------------------------
def compute_run_report_data(
    data: NDArray[np.floating],
    voxel_mean: NDArray[np.floating],
    mask_img: nib.spatialimages.SpatialImage,
    seed_imgs: Mapping[str, nib.spatialimages.SpatialImage],
    *,
    bold_file: str,
    confounds: pd.DataFrame | None,
    censoring: Mapping[str, Any],
    t_r: float,
    task: TaskConfig,
    denoising: DenoisingConfig,
    signal: str | Mapping[str, str],
    run_name: str,
) -> dict[str, NDArray]:
    """The arrays of a run's report, from the in-mask data the first level has already read.

    The first level calls this in its own pass over the run (:func:`fcflow.runfiles.run_maps_from_files`
    with ``report_data=True``), so a report costs no second decompression of the BOLD file: on a
    2 mm run that is the largest part of the report's cost (see benchmarks/bench_study.py).

    Parameters
    ----------
    data : ndarray of shape (n_timepoints, n_voxels)
        The run's in-mask voxels (:func:`fcflow.niftiio.read_masked_bold`).
    voxel_mean : ndarray of shape (n_voxels,)
        Their temporal mean (``MaskedBoldInfo.mean``).
    mask_img : nibabel image
    seed_imgs : mapping of str to nibabel image
        The seed masks on the run's grid.
    bold_file : str
        The run (its confounds TSV is found by name for the no-denoising reference).
    confounds : DataFrame or None
        The confounds the first level regressed (``SelectConfounds``).
    censoring : mapping
        The first level's censoring decision (``censoring.json``).
    t_r : float
    task, denoising : TaskConfig, DenoisingConfig
        The recipe's task and ``[denoising]``.
    signal : {"mean", "eigenvariate"}
    run_name : str

    Returns
    -------
    dict of str to ndarray
        ``mean`` and ``tsnr`` (per in-mask voxel), ``carpet_columns``, ``carpet_tissue``,
        ``carpet_before`` (detrended raw, rows z-scored, non-steady-state volumes nan) and, when
        the run can be cleaned, ``carpet_after`` (the first level's operator, censored volumes
        nan); for a ``correlation`` task that is not excluded, ``nodenoise_z_<seed>`` per seed:
        the seed-to-voxel Fisher z without denoising (non-steady-state volumes removed, then
        only detrending and the task's filter: no confound regression, no censoring), smoothed
        with the recipe's ``smoothing_fwhm`` as the first level's maps are.
    """
    from fcflow.connectivity import compute_multiseed_connectivity
    from fcflow.denoise import build_cleaning_operator, load_run_confounds
    from fcflow.niftiio import compute_tsnr, smooth_map

    n_time = data.shape[0]
    brain = np.asarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0
    kept = np.arange(n_time) if censoring["sample_mask"] is None else np.asarray(censoring["sample_mask"], int)
    arrays: dict[str, NDArray] = {"mean": np.asarray(voxel_mean, dtype=np.float32),
                                  "tsnr": compute_tsnr(data).astype(np.float32)}
    columns, tissue = select_carpet_voxels(mask_img)
    sample = data[:, columns].astype(np.float64)
    # Non-steady-state volumes (tens of % above the rest) would set the grey scale of the whole
    # "before" panel: they are left blank there, as they are in "after".
    first = min(int(censoring["n_non_steady_state"]), n_time - 3)
    before = np.full((columns.size, n_time), np.nan)
    detrend_only = build_cleaning_operator(n_time - first, t_r, None, None, None, None, detrend=True)
    before[:, first:] = (detrend_only @ sample[first:]).T
    arrays.update(carpet_columns=columns, carpet_tissue=np.asarray(tissue, dtype=str),
                  carpet_before=zscore_rows(before))
    try:
        operator = build_cleaning_operator(
            n_time, t_r, None if confounds is None or confounds.shape[1] == 0 else confounds.to_numpy(float),
            None if censoring["sample_mask"] is None else kept, task.high_pass, task.low_pass,
            denoising.detrend, denoising.standardize_confounds, filter=denoising.filter,
        )
        cleaned = np.full((n_time, columns.size), np.nan)
        cleaned[kept[: operator.shape[0]]] = operator @ sample
        arrays["carpet_after"] = zscore_rows(cleaned.T)
    except InputDataError:
        pass  # too few volumes left to clean (an excluded run): the report shows "before" only

    if "correlation" in task.measures and not censoring["excluded"]:
        reference = load_run_confounds(bold_file, "none", censor=False)
        sample_mask = reference.sample_mask if denoising.drop_nonsteady else None
        columns_by_seed = {name: (np.asarray(img.dataobj).reshape(brain.shape) > 0)[brain]
                           for name, img in seed_imgs.items()}
        # A seed without a voxel in the brain mask has excluded the run for coverage: no map.
        columns_by_seed = {name: cols for name, cols in columns_by_seed.items() if cols.any()}
        if columns_by_seed:
            # One cleaning operator and one pass over the data for all seeds, as the first level.
            connectivity = compute_multiseed_connectivity(
                data, columns_by_seed, t_r, None, sample_mask, high_pass=task.high_pass,
                low_pass=task.low_pass, detrend=denoising.detrend,
                signal=per_seed(signal, columns_by_seed, "signal"), filter=denoising.filter,
                run_name=run_name,
            )
            fwhm = denoising.smoothing_fwhm
            for name, conn in connectivity.items():
                # smoothed as the first level's maps are, so that QC-FC compares denoising only
                z = conn.z if fwhm is None else smooth_map(conn.z, brain, mask_img.affine, fwhm)
                arrays[f"nodenoise_z_{name}"] = z.astype(np.float32)
    if "correlation" in task.measures and denoising.compare_strategies:
        arrays.update(_strategy_arrays(data, mask_img, brain, seed_imgs, bold_file=bold_file, t_r=t_r, task=task,
                                       denoising=denoising, signal=signal, run_name=run_name))
    return arrays


def _strategy_arrays(data, mask_img, brain, seed_imgs, *, bold_file, t_r, task, denoising, signal,
                     run_name) -> dict[str, NDArray]:
    """The run's share of the strategy comparison (:mod:`fcflow.strategies`) as report arrays."""
    from fcflow.strategies import compare_run_strategies

    seeds = {name: (np.asarray(img.dataobj).reshape(brain.shape) > 0)[brain] for name, img in seed_imgs.items()}
    seeds = {name: cols for name, cols in seeds.items() if cols.any()}
    if not seeds:
        return {}
    names = list(dict.fromkeys([denoising.strategy, *denoising.compare_strategies]))
    result = compare_run_strategies(
        data, mask_img, seeds, bold_file=bold_file, strategies=names, denoising=denoising, t_r=t_r,
        high_pass=task.high_pass, low_pass=task.low_pass, signal=per_seed(signal, seeds, "signal"),
        run_name=run_name,
    )
    per = result["strategies"]
    n_points = result["points_mm"].shape[0]
    arrays = {"strategy_names": np.asarray(names, dtype=str), "strategy_points_mm": result["points_mm"],
              "strategy_dof": np.array([per[n].get("dof", np.nan) for n in names], dtype=np.float64),
              "strategy_n_kept": np.array([per[n].get("n_kept", -1) for n in names], dtype=np.int64),
              "strategy_errors": np.asarray([per[n].get("error", "") for n in names], dtype=str)}
    for seed in seeds:
        arrays[f"strategy_z_{seed}"] = np.array(
            [per[n]["z"][seed] if "z" in per[n] else np.full(n_points, np.nan, np.float32) for n in names],
            dtype=np.float32)
    return arrays


def summarise_exclusions(qc: pd.DataFrame) -> str:
    """One line on the runs of a QC table: how many were kept, and why the others were not.

    The exclusion reasons fcflow writes name the recipe parameter that excluded the run in
    parentheses (``(max_mean_fd_mm)``, ``(min_volumes)``, ``(min_dof)``, ``(min_coverage)``);
    those are counted (a run may count under two), the task-regressor checks of gPPI under
    ``events``, anything else under ``other``. The participant level prints it at its end,
    so that a study whose runs mostly failed QC says so where the user looks, not only per run.

    Parameters
    ----------
    qc : DataFrame
        Rows of :func:`fcflow.derivatives.read_runs_qc` (``excluded``, ``exclusion_reason``).

    Returns
    -------
    str
        e.g. ``"31 of 64 runs kept; 33 excluded (max_mean_fd_mm 33, min_dof 2)"``.
    """
    n_runs = len(qc)
    excluded = qc[qc["excluded"].astype(bool)]
    if excluded.empty:
        return f"{n_runs} of {n_runs} runs kept"
    counts: dict[str, int] = {}
    for reason in excluded["exclusion_reason"].fillna("").astype(str):
        keys = re.findall(r"\((min_volumes|max_mean_fd_mm|min_dof|min_coverage)\)", reason)
        if not keys:
            keys = ["events"] if "Check the events file" in reason or "no signal left after" in reason else ["other"]
        for key in dict.fromkeys(keys):
            counts[key] = counts.get(key, 0) + 1
    why = ", ".join(f"{key} {count}" for key, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{n_runs - len(excluded)} of {n_runs} runs kept; {len(excluded)} excluded ({why})"
