"""Figures of the reports: plain functions that return matplotlib figures, and one writer.

Every function builds its own :class:`matplotlib.figure.Figure` on the Agg canvas and hands it to
nilearn's plotting through ``figure=``, so nothing touches pyplot's global state and no display is
needed. :func:`save_figure` writes PNG or SVG (by suffix) atomically, without the date and
software stamps, so the same data give the same bytes.

Figures show only the data they are given: the callers pass the run's own images, traces and
maps, never a stand-in.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import NDArray

from fcflow.errors import InputDataError
from fcflow.io import atomic_path

__all__ = [
    "load_template",
    "new_figure",
    "save_figure",
    "plot_seed_overlay",
    "plot_motion_trace",
    "plot_carpet",
    "plot_tsnr",
    "plot_seed_timeseries",
    "plot_connectivity_map",
    "plot_glass_brain_map",
    "plot_stat_slices",
    "plot_motion_by_group",
    "plot_qcfc",
    "plot_region_effects",
]

_DPI = 80
_SEED_COLOURS = ("#ffb000", "#00c0ff", "#ff4080", "#60ff60", "#c080ff")
#: Font sizes (points) of the reports' figures: legends and tick-level text, axis labels, titles. The
#: figures are drawn at 6.5-8 inches and shown at about that width, so 9 pt reads like the page's text.
LEGEND_SIZE, LABEL_SIZE, TITLE_SIZE = 9, 9, 10
_TISSUE_COLOURS = {"GM": "#d95f02", "WM": "#7570b3", "CSF/other": "#1b9e77"}


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure on the Agg canvas (no pyplot, no display)."""
    figure = Figure(figsize=(width_in, height_in), dpi=_DPI)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, out_file: str | Path) -> Path:
    """Write ``figure`` as PNG or SVG (chosen by the suffix of ``out_file``), atomically.

    Raises
    ------
    ValueError
        If the suffix is neither ``.png`` nor ``.svg``.
    """
    import matplotlib

    out_file = Path(out_file)
    kind = out_file.suffix.lower().lstrip(".")
    if kind not in ("png", "svg"):
        raise InputDataError(f"'out_file' must end in .png or .svg. Got {str(out_file)!r}.")
    metadata = {"Software": None} if kind == "png" else {"Date": None, "Creator": None}
    with atomic_path(out_file) as tmp, matplotlib.rc_context({"svg.hashsalt": "fcflow", "svg.fonttype": "none"}):
        figure.savefig(tmp, format=kind, metadata=metadata, facecolor=figure.get_facecolor())
    return out_file


@cache
def load_template() -> nib.Nifti1Image:
    """nilearn's MNI152 (ICBM 2009) T1 template, block-averaged from 1 mm to 2 mm.

    A background for seed and map figures: read from nilearn's own files (no download), averaged
    over 2 x 2 x 2 blocks (a few milliseconds, where ``load_mni152_template(resolution=2)``
    resamples for 2 s), and drawn ten times faster than the 1 mm image. Cached per process.
    """
    from nilearn.datasets import load_mni152_template

    img = load_mni152_template(resolution=None)
    data = np.asarray(img.dataobj, dtype=np.float32)
    shape = tuple(n // 2 for n in data.shape[:3])
    blocks = data[: 2 * shape[0], : 2 * shape[1], : 2 * shape[2]].reshape(shape[0], 2, shape[1], 2, shape[2], 2)
    affine = img.affine.copy()
    affine[:3, :3] *= 2.0
    # the centre of a 2 x 2 x 2 block sits half a 1 mm voxel from its first voxel
    affine[:3, 3] = nib.affines.apply_affine(img.affine, (0.5, 0.5, 0.5))
    return nib.Nifti1Image(blocks.mean(axis=(1, 3, 5)), affine)


def _centre_mm(img: nib.spatialimages.SpatialImage) -> tuple[float, float, float]:
    ijk = np.argwhere(np.asarray(img.dataobj) > 0)
    if ijk.size == 0:
        return (0.0, 0.0, 0.0)
    xyz = nib.affines.apply_affine(img.affine, ijk.mean(axis=0))
    return tuple(float(v) for v in xyz)


def plot_seed_overlay(
    seed_imgs: Mapping[str, nib.spatialimages.SpatialImage],
    bg_img: nib.spatialimages.SpatialImage,
    *,
    title: str,
) -> Figure:
    """Seed masks (one colour each) on a background image, ortho view through the first seed.

    Parameters
    ----------
    seed_imgs : mapping of str to nibabel image
        Seed masks on the run's grid (non-zero inside).
    bg_img : nibabel image
        The MNI template or the run's mean BOLD.
    title : str
    """
    from matplotlib.colors import ListedColormap
    from nilearn import plotting

    names = list(seed_imgs)
    first = seed_imgs[names[0]]
    labels = np.zeros(first.shape[:3], dtype=np.int16)
    for k, name in enumerate(names, start=1):
        labels[np.asarray(seed_imgs[name].dataobj).reshape(labels.shape) > 0] = k
    label_img = nib.Nifti1Image(labels, first.affine)
    figure = new_figure(8.0, 2.8)
    colours = [_SEED_COLOURS[k % len(_SEED_COLOURS)] for k in range(len(names))]
    display = plotting.plot_roi(
        label_img, bg_img=bg_img, cut_coords=_centre_mm(first), display_mode="ortho", figure=figure,
        title=title, draw_cross=False, black_bg=True, alpha=0.55, cmap=ListedColormap(colours),
        vmin=0.5, vmax=len(names) + 0.5, colorbar=False, resampling_interpolation="nearest",
    )
    for k, name in enumerate(names, start=1):
        display.add_contours(nib.Nifti1Image((labels == k).astype(np.int8), first.affine), levels=[0.5],
                             colors=[colours[k - 1]], linewidths=1.0)
    figure.legend(handles=_patches(names, colours), loc="lower right", fontsize=LABEL_SIZE, frameon=False,
                  labelcolor="white")
    return figure


def _patches(names: Sequence[str], colours: Sequence[str]):
    from matplotlib.patches import Patch

    return [Patch(color=c, label=n) for n, c in zip(names, colours)]


def _censored_spans(censored: NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Contiguous runs of censored volumes as (first, last + 1)."""
    edges = np.diff(np.concatenate([[0], censored.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def plot_motion_trace(
    framewise_displacement: NDArray[np.float64],
    *,
    fd_threshold_mm: float | None,
    censored: NDArray[np.bool_],
    std_dvars: NDArray[np.float64] | None = None,
    std_dvars_threshold: float | None = None,
    t_r: float,
    title: str = "",
) -> Figure:
    """FD (and standardised DVARS) per volume with the censoring thresholds and censored volumes.

    Parameters
    ----------
    framewise_displacement : ndarray of shape (n_timepoints,)
        fMRIPrep's FD in mm (nan at the first volume).
    fd_threshold_mm : float or None
        Censoring threshold drawn as a dashed line (None: no FD censoring).
    censored : ndarray of bool, shape (n_timepoints,)
        Volumes left out of the analysis (censoring, non-steady-state), shaded.
    std_dvars, std_dvars_threshold : optional
        fMRIPrep's standardised DVARS and its threshold: a second panel.
    t_r : float
        Repetition time in seconds (for the time axis).
    """
    panels = [("FD (mm)", framewise_displacement, fd_threshold_mm)]
    if std_dvars is not None:
        panels.append(("std DVARS", std_dvars, std_dvars_threshold))
    figure = new_figure(8.0, 1.5 + 1.2 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    time_s = np.arange(len(framewise_displacement)) * t_r
    spans = _censored_spans(np.asarray(censored, dtype=bool))
    for ax, (label, values, threshold) in zip(axes, panels):
        for start, stop in spans:
            ax.axvspan((start - 0.5) * t_r, (stop - 0.5) * t_r, color="#e41a1c", alpha=0.25, linewidth=0)
        ax.plot(time_s, values, color="black", linewidth=0.8)
        if threshold is not None:
            ax.axhline(threshold, color="#e41a1c", linestyle="--", linewidth=0.8,
                       label=f"threshold {threshold:g}")
            ax.legend(loc="upper right", fontsize=LEGEND_SIZE, frameon=False)
        ax.set_ylabel(label, fontsize=LABEL_SIZE)
        ax.tick_params(labelsize=7)
        ax.set_xlim(-0.5 * t_r, (len(values) - 0.5) * t_r)
    n_censored = int(np.count_nonzero(censored))
    axes[0].set_title(f"{title}{' - ' if title else ''}{n_censored} of {len(censored)} volumes censored "
                      "(shaded)", fontsize=TITLE_SIZE)
    axes[-1].set_xlabel("time (s)", fontsize=LABEL_SIZE)
    figure.subplots_adjust(left=0.08, right=0.98, top=1 - 0.4 / figure.get_figheight(),
                           bottom=0.45 / figure.get_figheight(), hspace=0.15)
    return figure


def plot_carpet(
    before: NDArray[np.floating],
    after: NDArray[np.floating] | None,
    tissue: Sequence[str],
    *,
    t_r: float,
    title: str = "",
) -> Figure:
    """Carpet plots of the same voxels before and after denoising, rows grouped by tissue.

    Parameters
    ----------
    before : ndarray of shape (n_rows, n_timepoints)
        Detrended raw signals, z-scored per row; nan where a volume is left out (drawn blank).
    after : ndarray of shape (n_rows, n_timepoints) or None
        Cleaned signals, z-scored per row; nan at censored volumes (drawn blank). None when the
        run could not be cleaned (too few volumes left): only "before" is drawn.
    tissue : sequence of str, length n_rows
        Tissue class of each row (rows already sorted by it).
    t_r : float
    """
    from matplotlib.colors import ListedColormap

    panels = [(before, "before: detrended raw")]
    if after is not None:
        panels.append((after, "after: the first level's cleaning"))
    figure = new_figure(8.0, 0.6 + 2.3 * len(panels))
    grid = figure.add_gridspec(len(panels), 2, width_ratios=[0.025, 1], wspace=0.02, hspace=0.3)
    classes = list(dict.fromkeys(tissue))
    codes = np.array([classes.index(t) for t in tissue])[:, None]
    cmap = ListedColormap([_TISSUE_COLOURS.get(c, "#999999") for c in classes])
    extent = (-0.5 * t_r, (before.shape[1] - 0.5) * t_r, before.shape[0], 0)
    image_cmap = ListedColormap(np.linspace(0, 1, 256)[:, None].repeat(3, axis=1)).with_extremes(bad="#fff0f0")
    for row, (values, label) in enumerate(panels):
        strip = figure.add_subplot(grid[row, 0])
        strip.imshow(codes, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(classes) - 0.5,
                     interpolation="nearest")
        strip.set_xticks([])
        strip.set_yticks([])
        ax = figure.add_subplot(grid[row, 1])
        ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=image_cmap, vmin=-2, vmax=2,
                  interpolation="nearest", extent=extent)
        ax.set_yticks([])
        ax.set_title(f"{title}{' - ' if title else ''}{label} ({values.shape[0]} voxels, z-scored)",
                     fontsize=TITLE_SIZE)
        ax.tick_params(labelsize=7)
        if row == len(panels) - 1:
            ax.set_xlabel("time (s); censored volumes blank", fontsize=LABEL_SIZE)
    figure.legend(handles=_patches(classes, [_TISSUE_COLOURS.get(c, "#999999") for c in classes]),
                  loc="lower left", ncol=len(classes), fontsize=LEGEND_SIZE, frameon=False)
    return figure


def plot_tsnr(tsnr_img: nib.spatialimages.SpatialImage, *, title: str = "") -> Figure:
    """tSNR (mean over standard deviation in time) as an axial mosaic."""
    from nilearn import plotting

    values = np.asarray(tsnr_img.dataobj)
    finite = values[np.isfinite(values) & (values > 0)]
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    figure = new_figure(8.0, 1.9)
    plotting.plot_img(tsnr_img, display_mode="z", cut_coords=7, figure=figure, title=title, cmap="inferno",
                      colorbar=True, vmin=0.0, vmax=vmax, black_bg=True, annotate=True)
    return figure


def plot_seed_timeseries(
    signals: Mapping[str, pd.DataFrame],
    *,
    n_timepoints: int,
    t_r: float,
    blocks: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    title: str = "",
) -> Figure:
    """Each seed's cleaned time series at the volumes kept, gaps where volumes were censored.

    Parameters
    ----------
    signals : mapping of seed name to DataFrame
        Columns ``volume`` (0-based index in the run) and the seed's values, as fcflow writes
        ``*_timeseries.tsv``.
    n_timepoints : int
        Volumes in the run (the time axis).
    blocks : mapping of condition to list of (onset_s, duration_s), optional
        Task blocks, shaded.
    """
    figure = new_figure(8.0, 2.2)
    ax = figure.add_subplot(1, 1, 1)
    for k, (condition, spans) in enumerate((blocks or {}).items()):
        colour = ("#fdd49e", "#c6dbef", "#c7e9c0", "#dadaeb")[k % 4]
        for n, (onset, duration) in enumerate(spans):
            ax.axvspan(onset, onset + duration, color=colour, linewidth=0, label=condition if n == 0 else None)
    for name, table in signals.items():
        full = np.full(n_timepoints, np.nan)
        volumes = table["volume"].to_numpy(dtype=int)
        full[volumes] = table[name].to_numpy(dtype=float)
        ax.plot(np.arange(n_timepoints) * t_r, full, linewidth=0.9, label=name)
    ax.set_xlim(-0.5 * t_r, (n_timepoints - 0.5) * t_r)
    ax.set_xlabel("time (s); gaps are censored volumes", fontsize=LABEL_SIZE)
    ax.set_ylabel("cleaned signal", fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.legend(loc="upper right", fontsize=LEGEND_SIZE, frameon=False, ncol=4)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.2)
    return figure


def plot_connectivity_map(
    stat_img: nib.spatialimages.SpatialImage,
    bg_img: nib.spatialimages.SpatialImage,
    *,
    title: str,
    n_cuts: int = 7,
    colorbar_label: str = "",
    threshold: float | None = None,
) -> Figure:
    """A first-level map as an axial mosaic on a background, shown where ``|value| > threshold``.

    The colour scale is symmetric and saturates at the 99th percentile of the absolute values, so that the
    seed's own voxels (r near 1) do not wash out the rest of the brain. ``threshold`` None shows every
    non-zero voxel.
    """
    from nilearn import plotting

    values = np.asarray(stat_img.dataobj)
    finite = np.abs(values[np.isfinite(values) & (values != 0)])
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    if threshold is not None and threshold >= vmax:
        vmax = 1.5 * threshold  # nothing above the threshold: keep a scale that shows it
    figure = new_figure(8.0, 1.9)
    with warnings.catch_warnings():
        # a run's map with nothing above the display threshold is drawn as its background, and
        # nilearn says "empty mask" for it once per figure (the caption gives the threshold)
        warnings.filterwarnings("ignore", message="empty mask", category=UserWarning)
        plotting.plot_stat_map(stat_img, bg_img=bg_img, display_mode="z", cut_coords=n_cuts, figure=figure,
                               title=title, colorbar=True, vmax=vmax, symmetric_cbar=True, black_bg=True,
                               cmap="RdBu_r", threshold=1e-6 if threshold is None else threshold)
    if colorbar_label:
        # nilearn draws the colour bar last, on an axes of its own
        figure.axes[-1].set_ylabel(colorbar_label, color="white", fontsize=LEGEND_SIZE)
    return figure


def plot_glass_brain_map(stat_img: nib.spatialimages.SpatialImage, *, title: str) -> Figure:
    """Glass brain of a (thresholded) group map; zeros are transparent."""
    from nilearn import plotting

    values = np.asarray(stat_img.dataobj)
    finite = np.abs(values[np.isfinite(values) & (values != 0)])
    vmax = float(finite.max()) if finite.size else 1.0
    figure = new_figure(8.0, 2.4)
    plotting.plot_glass_brain(stat_img, display_mode="lzry", figure=figure, title=title, colorbar=True,
                              plot_abs=False, symmetric_cbar=True, vmax=vmax, threshold=1e-6, cmap="RdBu_r")
    return figure


def plot_stat_slices(
    stat_img: nib.spatialimages.SpatialImage,
    bg_img: nib.spatialimages.SpatialImage,
    *,
    cut_coords: Sequence[float],
    title: str,
) -> Figure:
    """Orthogonal slices of a (thresholded) group map through ``cut_coords`` (mm)."""
    from nilearn import plotting

    values = np.asarray(stat_img.dataobj)
    finite = np.abs(values[np.isfinite(values) & (values != 0)])
    vmax = float(finite.max()) if finite.size else 1.0
    figure = new_figure(8.0, 2.8)
    plotting.plot_stat_map(stat_img, bg_img=bg_img, cut_coords=tuple(cut_coords), display_mode="ortho",
                           figure=figure, title=title, colorbar=True, vmax=vmax, symmetric_cbar=True,
                           threshold=1e-6, black_bg=True, cmap="RdBu_r", draw_cross=True)
    return figure


def plot_motion_by_group(
    motion: pd.DataFrame,
    *,
    value: str,
    ylabel: str,
    groups: Sequence[str],
    sessions: Sequence[str],
    title: str = "",
) -> Figure:
    """One dot per subject, group means as bars, per session (x) and group (colour).

    Parameters
    ----------
    motion : DataFrame
        Columns ``group``, ``session`` and ``value`` (one row per subject x session).
    """
    figure = new_figure(6.5, 3.0)
    ax = figure.add_subplot(1, 1, 1)
    width = 0.8 / max(len(groups), 1)
    colours = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e")
    rng = np.random.default_rng(0)  # jitter only: the same figure on every run
    for g, group in enumerate(groups):
        for s, session in enumerate(sessions):
            x = motion.loc[(motion["group"] == group) & (motion["session"] == session), value].to_numpy(float)
            x = x[np.isfinite(x)]
            centre = s - 0.4 + width * (g + 0.5)
            if x.size:
                ax.bar(centre, x.mean(), width=width * 0.9, color=colours[g % len(colours)], alpha=0.35,
                       label=group if s == 0 else None)
                ax.scatter(centre + rng.uniform(-width / 4, width / 4, x.size), x, s=9,
                           color=colours[g % len(colours)], zorder=3)
    ax.set_xticks(np.arange(len(sessions)), list(sessions))
    ax.set_ylabel(ylabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.legend(fontsize=LEGEND_SIZE, frameon=False)
    figure.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.1)
    return figure


def plot_qcfc(
    qcfc_r: Mapping[str, NDArray[np.float64]],
    distance_mm: NDArray[np.float64],
    *,
    title: str = "",
    max_points: int = 4000,
) -> Figure:
    """QC-FC distributions per denoising strategy (left) and their dependence on distance (right).

    Parameters
    ----------
    qcfc_r : mapping of strategy label to ndarray of shape (n_edges,)
        Correlation across subjects of each edge's connectivity with mean FD.
    distance_mm : ndarray of shape (n_edges,)
        Distance of each edge's voxel from the seed centroid.
    max_points : int, default=4000
        Edges drawn in the scatter (an even subsample; the histogram uses all).
    """
    figure = new_figure(8.0, 3.0)
    hist, scatter = figure.subplots(1, 2)
    colours = ("#999999", "#d95f02", "#1b9e77", "#7570b3", "#e7298a", "#66a61e", "#e6ab02")
    bins = np.linspace(-1, 1, 81)
    step = max(1, distance_mm.size // max_points)
    for k, (label, r) in enumerate(qcfc_r.items()):
        colour = colours[k % len(colours)]
        finite = r[np.isfinite(r)]
        hist.hist(finite, bins=bins, histtype="step", color=colour, linewidth=1.2,
                  label=f"{label} (median |r| {np.median(np.abs(finite)):.2f})" if finite.size else label)
        scatter.scatter(distance_mm[::step], r[::step], s=2, alpha=0.35, color=colour, label=label,
                        rasterized=True)
    hist.axvline(0.0, color="black", linewidth=0.6)
    hist.set_xlabel("QC-FC r (connectivity vs mean FD across subjects)", fontsize=LABEL_SIZE)
    hist.set_ylabel("edges (voxels)", fontsize=LABEL_SIZE)
    hist.legend(fontsize=LEGEND_SIZE, frameon=False)
    scatter.axhline(0.0, color="black", linewidth=0.6)
    scatter.set_xlabel("distance from the seed centroid (mm)", fontsize=LABEL_SIZE)
    scatter.set_ylabel("QC-FC r", fontsize=LABEL_SIZE)
    for ax in (hist, scatter):
        ax.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=TITLE_SIZE)
    figure.subplots_adjust(left=0.08, right=0.98, top=0.88, bottom=0.15, wspace=0.25)
    return figure


def plot_region_effects(
    table: pd.DataFrame, *, value: str, significant: Sequence[bool], xlabel: str, title: str = "",
    n_top: int = 15,
) -> Figure:
    """Horizontal bars of the ``n_top`` regions with the largest ``|stat|``; significant ones filled.

    Parameters
    ----------
    table : DataFrame
        A region table (:data:`fcflow.regions.REGION_COLUMNS`).
    value : str
        Column the bars show (``effect`` for t tests, ``stat`` for F).
    significant : sequence of bool
        One per row of ``table``: below alpha by the region family's correction.
    """
    order = np.argsort(-np.abs(table["stat"].to_numpy(dtype=float)), kind="stable")[:n_top][::-1]
    values = table[value].to_numpy(dtype=float)[order]
    marked = np.asarray(significant, dtype=bool)[order]
    names = [str(n) for n in table["region"].to_numpy()[order]]
    figure = new_figure(6.5, 0.8 + 0.22 * len(order))
    ax = figure.add_subplot(1, 1, 1)
    colours = np.where(marked, "#d95f02", "#bbbbbb")
    ax.barh(np.arange(len(order)), values, color=colours, edgecolor="#555555", linewidth=0.5)
    ax.set_yticks(np.arange(len(order)), [f"{n} *" if m else n for n, m in zip(names, marked)])
    ax.axvline(0.0, color="#555555", linewidth=0.6)
    ax.set_xlabel(xlabel, fontsize=LABEL_SIZE)
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=TITLE_SIZE)
    figure.subplots_adjust(left=0.42, right=0.97, top=1 - 0.35 / figure.get_figheight(),
                           bottom=0.45 / figure.get_figheight())
    return figure
