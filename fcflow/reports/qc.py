"""Quality-control numbers behind the reports: carpet rows, motion by group, QC-FC.

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

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import stats

from fcflow.errors import InputDataError

__all__ = [
    "select_carpet_voxels",
    "zscore_rows",
    "summarise_motion",
    "compare_motion_between_groups",
    "compute_qcfc",
    "QCFCSummary",
    "summarise_qcfc",
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
