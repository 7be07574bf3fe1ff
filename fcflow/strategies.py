"""Denoising strategies compared on the study's own data, so that none is chosen silently.

The benchmarks of Ciric et al. (2017, NeuroImage 154:174-187) and Parkes et al. (2018,
NeuroImage 171:415-436), as fMRIDenoise (Finc et al. 2020) runs them, adapted to seed-based
connectivity:

* per run (:func:`compare_run_strategies`), for every candidate strategy: the seed-to-voxel
  Fisher z at *probe points* (a fixed 8 mm grid in MNI millimetres, the same points for every
  run whatever its grid), and the correlation degrees of freedom the strategy leaves
  (:func:`fcflow.denoise.correlation_dof`). Censoring, band, filter and seed are the recipe's;
  only the confound set changes.
* over runs (:func:`summarise_strategies`): **QC-FC**, the correlation across runs of each
  seed-probe edge with mean framewise displacement (median |r|, % of edges with p < 0.05, which
  is 5 % when motion leaves no trace), its **distance dependence** (Spearman rho of QC-FC with
  the edge's length), and the **degrees of freedom** left (median and the share of runs below the
  recipe's ``min_dof``: the tDOF-loss of Parkes et al., in the units fcflow excludes by).

A strategy is better when its QC-FC is closer to chance *and* it leaves enough degrees of
freedom; the group report shows the table and lets the reader weigh the two.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.config import DenoisingConfig
from fcflow.errors import InputDataError

__all__ = ["PROBE_SPACING_MM", "probe_points", "compare_run_strategies", "StrategySummary",
           "summarise_strategies"]

#: Spacing of the probe grid in MNI millimetres (a multiple of 2 and 4 mm grids).
PROBE_SPACING_MM = 8.0


def probe_points(
    mask_img: nib.spatialimages.SpatialImage, spacing_mm: float = PROBE_SPACING_MM
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Brain-mask voxels at the points of a regular MNI grid.

    Returns
    -------
    columns : ndarray of int
        Indices into the brain-mask voxels (C order), one per grid point inside the mask.
    points_mm : ndarray of shape (n_points, 3)
        The grid points, in MNI mm (multiples of ``spacing_mm``): the same for every run.
    """
    brain = np.asarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0
    ijk = np.argwhere(brain)
    xyz = nib.affines.apply_affine(mask_img.affine, ijk)
    grid = np.round(xyz / spacing_mm) * spacing_mm
    half = np.abs(np.diag(mask_img.affine)[:3]) / 2 + 1e-6
    near = np.flatnonzero(np.all(np.abs(xyz - grid) <= half, axis=1))
    # One voxel per grid point: the nearest (a grid point halfway between voxels has several).
    distance = np.linalg.norm(xyz[near] - grid[near], axis=1)
    order = np.lexsort((distance, *grid[near].T[::-1]))
    _, first = np.unique(grid[near][order], axis=0, return_index=True)
    chosen = np.sort(near[order][first])
    return chosen, grid[chosen]


def compare_run_strategies(
    data: NDArray,
    mask_img: nib.spatialimages.SpatialImage,
    seed_masks_in_brain: Mapping[str, NDArray[np.bool_]],
    *,
    bold_file: str | os.PathLike[str],
    strategies: Sequence[str],
    denoising: DenoisingConfig,
    t_r: float,
    high_pass: float | None,
    low_pass: float | None,
    signal: str | Mapping[str, str],
    run_name: str = "",
) -> dict[str, object]:
    """Seed-to-probe Fisher z and degrees of freedom of one run under each candidate strategy.

    Parameters
    ----------
    data : ndarray of shape (n_timepoints, n_voxels)
        The run's in-mask voxels (:func:`fcflow.niftiio.read_masked_bold`).
    seed_masks_in_brain : mapping of str to ndarray of bool
        Each seed's columns.
    strategies : sequence of str
        Candidate strategies (:data:`fcflow.denoise.DENOISING_STRATEGIES`); one that the run's
        files cannot serve (e.g. ``ICA-AROMA`` on a non-AROMA run) is reported, not raised.
    denoising : DenoisingConfig
        The recipe's ``[denoising]`` (censoring thresholds, ``n_compcor``, ``detrend``, ``filter``).
    signal : {"mean", "eigenvariate"} or mapping of seed name to it
        One summary for every seed, or each seed's own.

    Returns
    -------
    dict
        ``points_mm`` (n_points, 3); per strategy ``dof``, ``n_kept`` and ``z`` (a dict of seed
        to an array over the points), or ``error`` (why it could not be computed).
    """
    from fcflow.connectivity import compute_multiseed_connectivity
    from fcflow.denoise import load_run_confounds

    columns, points = probe_points(mask_img)
    seed_columns = {name: np.flatnonzero(mask) for name, mask in seed_masks_in_brain.items()}
    used = np.unique(np.concatenate([columns, *seed_columns.values()]))
    position = {c: i for i, c in enumerate(used)}
    subset = np.asarray(data)[:, used]
    seeds = {}
    for name, cols in seed_columns.items():
        mask = np.zeros(used.size, dtype=bool)
        mask[[position[c] for c in cols]] = True
        seeds[name] = mask
    probe = np.array([position[c] for c in columns], dtype=np.intp)
    fd, dvars = denoising.fd_threshold_mm, denoising.std_dvars_threshold
    censor = fd is not None or dvars is not None
    out: dict[str, object] = {"points_mm": points, "strategies": {}}
    for strategy in strategies:
        try:
            selected = load_run_confounds(
                bold_file, strategy, censor=censor,
                fd_threshold_mm=float(fd) if fd is not None else np.inf,
                std_dvars_threshold=float(dvars) if dvars is not None else np.inf,
                scrub=denoising.scrub_min_segment, n_compcor=denoising.n_compcor,
            )
            connectivity = compute_multiseed_connectivity(
                subset, seeds, t_r, selected.confounds, selected.sample_mask, high_pass=high_pass,
                low_pass=low_pass, detrend=denoising.detrend, filter=denoising.filter,
                signal=signal, run_name=run_name,
            )
        except InputDataError as exc:
            out["strategies"][strategy] = {"error": str(exc)}
            continue
        first = next(iter(connectivity.values()))
        out["strategies"][strategy] = {
            "dof": float(first.dof), "n_kept": int(first.n_volumes),
            "z": {name: conn.z[probe].astype(np.float32) for name, conn in connectivity.items()},
        }
    return out


@dataclass(frozen=True)
class StrategySummary:
    """One strategy over the runs of a task x seed (see :func:`summarise_strategies`)."""

    strategy: str
    n_runs: int
    median_dof: float
    percent_below_min_dof: float
    median_abs_qcfc: float
    percent_qcfc_p05: float
    distance_rho: float


def summarise_strategies(
    tables: Sequence[pd.DataFrame],
    mean_fd_mm: Sequence[float],
    dof: Sequence[Mapping[str, float]],
    *,
    seed_centre_mm: NDArray[np.float64],
    min_dof: float,
) -> tuple[list[StrategySummary], dict[str, NDArray[np.float64]], NDArray[np.float64]]:
    """QC-FC, distance dependence and degrees of freedom of each strategy over runs.

    Parameters
    ----------
    tables : sequence of DataFrame
        One per run: columns ``x``, ``y``, ``z`` (the probe points, mm) and one column of Fisher z
        per strategy (the per-run TSV the participant level writes).
    mean_fd_mm : sequence of float
        Each run's mean FD.
    dof : sequence of mapping
        Each run's degrees of freedom per strategy.
    seed_centre_mm : ndarray of shape (3,)
        Where edge lengths are measured from.
    min_dof : float

    Returns
    -------
    summaries : list of StrategySummary
    qcfc_r : dict of str to ndarray
        Per strategy, the QC-FC r of every probe edge common to all runs.
    distance_mm : ndarray
        Those edges' lengths.
    """
    from fcflow.qc import compute_qcfc, summarise_qcfc

    if len(tables) != len(mean_fd_mm) or len(tables) != len(dof):
        raise InputDataError("'tables', 'mean_fd_mm' and 'dof' must have one entry per run.")
    keys = None
    for table in tables:
        points = set(map(tuple, table[["x", "y", "z"]].to_numpy()))
        keys = points if keys is None else keys & points
    common = np.array(sorted(keys or ()), dtype=np.float64).reshape(-1, 3)
    strategies = [c for c in tables[0].columns if c not in ("x", "y", "z")] if tables else []
    distance = np.linalg.norm(common - np.asarray(seed_centre_mm, dtype=np.float64), axis=1)
    fd = np.asarray(mean_fd_mm, dtype=np.float64)
    summaries, qcfc = [], {}
    for strategy in strategies:
        rows = []
        for table in tables:
            indexed = table.set_index(["x", "y", "z"])[strategy]
            rows.append(indexed.reindex(pd.MultiIndex.from_arrays(common.T)).to_numpy(dtype=np.float64))
        values = np.array(rows)
        run_dof = np.array([d.get(strategy, np.nan) for d in dof], dtype=np.float64)
        usable = np.isfinite(values).all(axis=1) if values.size else np.zeros(len(tables), bool)
        r = np.full(common.shape[0], np.nan)
        summary = None
        if usable.sum() >= 3 and np.unique(fd[usable]).size > 1:
            r, p = compute_qcfc(values[usable], fd[usable])
            summary = summarise_qcfc(r, p, distance, n_subjects=int(usable.sum()))
        qcfc[strategy] = r
        summaries.append(StrategySummary(
            strategy=strategy, n_runs=int(usable.sum()),
            median_dof=float(np.nanmedian(run_dof)) if np.isfinite(run_dof).any() else np.nan,
            percent_below_min_dof=float(100 * np.mean(run_dof[np.isfinite(run_dof)] < min_dof))
            if np.isfinite(run_dof).any() else np.nan,
            median_abs_qcfc=summary.median_abs_r if summary else np.nan,
            percent_qcfc_p05=summary.percent_p05 if summary else np.nan,
            distance_rho=summary.distance_rho if summary else np.nan,
        ))
    return summaries, qcfc, distance
