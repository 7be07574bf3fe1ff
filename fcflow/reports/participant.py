"""The participant report: what each run looked like, what was done to it, and what was kept.

A run's report is made in two steps. The first level, which has the run's in-mask data in
memory anyway, calls :func:`fcflow.qc.compute_run_report_data` in its own pass (the report costs no second
read of the BOLD file) and saves the arrays; :func:`make_run_report` then makes, from those and
the run's small files only:

* the seed masks on nilearn's MNI152 template and on the run's mean BOLD;
* FD and standardised DVARS per volume with the censoring thresholds and the censored volumes;
* carpet plots of the same voxels before (detrended raw) and after the first level's cleaning
  (the operator of :func:`fcflow.denoise.build_cleaning_operator` with the run's confounds,
  censoring and filter), rows grouped by tissue class;
* the tSNR map, the seed time series, the first-level maps;
* for tasks analysed with ``correlation``: the same seed-to-voxel map without denoising (the
  non-steady-state volumes removed, then only detrending and the task's filter: no confound
  regression, no censoring), ``desc-correlationNoDenoise``, which the group report's QC-FC
  compares with the recipe's strategy.

:func:`write_participant_report` puts the figures in ``OUTPUT_DIR/sub-<label>/figures/``, the
no-denoising maps beside the participant's other maps, and renders ``OUTPUT_DIR/sub-<label>.html``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.config import DenoisingConfig, TaskConfig
from fcflow.io import atomic_path, save_img, write_json, write_text, write_tsv

__all__ = ["NO_DENOISE_DESC", "make_run_report", "write_participant_report"]

#: ``desc`` of the seed-to-voxel map computed without denoising (QC-FC reference).
NO_DENOISE_DESC = "correlationNoDenoise"

_SECTION_ORDER = ("seedTemplate", "seedBold", "motion", "carpet", "tsnr", "seedTimeseries")


def _maps_to_show(map_files: Sequence[str]) -> list[tuple[str, str, str]]:
    """(seed, desc, file) of the z maps worth a figure: correlation, background, gPPI contrasts.

    A gPPI condition map (``gppi2back``) is left out when the run also has condition contrasts.
    """
    from fcflow.bids import parse_entities

    parsed = []
    for path in map_files:
        ents = parse_entities(Path(path).name)[0]
        if ents.get("stat") == "z":
            parsed.append((ents["seed"], ents["desc"], str(path)))
    contrasts = [d for _, d, _ in parsed if d.startswith("gppi") and "Minus" in d]
    return [(s, d, f) for s, d, f in parsed
            if not (contrasts and d.startswith("gppi") and "Minus" not in d)]


def map_caption(desc: str) -> tuple[str, str]:
    """What a first-level z map shows, and the unit of its colour bar, by its ``desc``."""
    if desc == "correlation":
        return ("Fisher z of the correlation between the cleaned seed signal and each voxel (rest)", "Fisher z")
    if desc == "background":
        return ("Fisher z of the correlation between the seed and each voxel once the task condition regressors "
                "are removed (background connectivity)", "Fisher z")
    if desc.startswith("gppi"):
        condition = desc.removeprefix("gppi")
        return (f"z of the t statistic of the gPPI interaction (seed x {condition}): the change in seed "
                "coupling with each voxel between conditions", "z (gPPI interaction t)")
    return (f"{desc}, z", "z")


#: Uncorrected two-sided p at which the participant report's maps are thresholded for display.
DISPLAY_P = 0.001


def display_threshold(desc: str, dof: float | None, p: float = DISPLAY_P) -> float | None:
    """The |value| above which a first-level z map is shown: uncorrected two-sided ``p`` for the run.

    A Fisher z map with ``dof`` effective degrees of freedom has null SD 1/sqrt(dof - 3), so its
    threshold is ``norm.isf(p / 2) / sqrt(dof - 3)``; a gPPI map is already a z (of the interaction
    t), so its threshold is ``norm.isf(p / 2)``. None (show unthresholded) when the dof is unknown.
    It is a display threshold: a single run's map is not inference, and the caption says so.
    """
    from scipy import stats

    z = float(stats.norm.isf(p / 2))
    if desc.startswith("gppi"):
        return z
    if dof is None or not np.isfinite(dof) or dof <= 3:
        return None
    return z / float(np.sqrt(dof - 3))


def _task_blocks(events_file: str | None, conditions: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    if not events_file or not conditions:
        return {}
    events = pd.read_csv(events_file, sep="\t")
    return {c: [(float(o), float(d)) for o, d in events.loc[events["trial_type"] == c, ["onset", "duration"]]
                .itertuples(index=False)] for c in conditions if "trial_type" in events}


def make_run_report(
    *,
    report_data_file: str,
    mask_file: str,
    fmriprep_confounds_file: str,
    seed_files: Sequence[str],
    seed_names: Sequence[str],
    censoring_file: str,
    qc_file: str,
    map_files: Sequence[str],
    timeseries_files: Sequence[str],
    events_file: str | None,
    t_r: float,
    task: TaskConfig,
    denoising: DenoisingConfig,
    entities: Mapping[str, str | None],
    run_name: str,
    out_dir: str | Path,
) -> Path:
    """Make the figures and numbers of one run's report; write them to ``out_dir``.

    Reads only small files: the run's data enter through ``report_data_file``, which the first
    level wrote in its own pass over the run (:func:`fcflow.qc.compute_run_report_data`).

    Parameters
    ----------
    report_data_file : path
        The first level's ``report_data.npz`` (:func:`fcflow.runfiles.write_run_report_data`).
    mask_file, fmriprep_confounds_file : path
        fMRIPrep's brain mask of the run and its full confounds TSV (FD, DVARS).
    seed_files, seed_names : sequence
        The run's seed masks (``BuildSeedMasks``) and their names, recipe order.
    censoring_file : path
        The first level's censoring decision (``SelectConfounds``).
    qc_file : path
        The first level's ``run_qc.json`` (seed QC, degrees of freedom, exclusion).
    map_files, timeseries_files : sequence of path
        The first level's maps and seed time series (empty for an excluded run).
    events_file : path or None
    t_r : float
    task, denoising : TaskConfig, DenoisingConfig
        The recipe's task and ``[denoising]``.
    entities : mapping
        BIDS entities of the run's outputs (sub, ses, task, run, space, res) and ``group``.
    run_name : str
    out_dir : path
        Where the figures, the no-denoising maps and ``run_report.json`` go.

    Returns
    -------
    Path
        ``out_dir/run_report.json``: entities, numbers, exclusion, and the files made.
    """
    from fcflow.niftiio import unmask
    from fcflow.reports import figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    censoring = json.loads(Path(censoring_file).read_text())
    run_qc = json.loads(Path(qc_file).read_text())
    mask_img = nib.load(mask_file)
    brain = np.asarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0
    seed_imgs = {name: nib.load(path) for name, path in zip(seed_names, seed_files, strict=True)}
    with np.load(report_data_file, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    n_time = int(censoring["n_timepoints"])
    files: dict[str, str] = {}

    def save(key: str, figure, suffix: str = ".png") -> None:
        files[key] = str(figures.save_figure(figure, out / f"{key}{suffix}"))

    files["seedTemplate"] = str(_seed_template_figure(seed_imgs, out / "seedTemplate.png"))
    mean_img = unmask(arrays["mean"], brain, mask_img.affine)
    save("seedBold", figures.plot_seed_overlay(seed_imgs, mean_img, title="seed on the run's mean BOLD"))

    raw_confounds = pd.read_csv(fmriprep_confounds_file, sep="\t", na_values="n/a")
    kept = np.arange(n_time) if censoring["sample_mask"] is None else np.asarray(censoring["sample_mask"], int)
    censored = np.ones(n_time, dtype=bool)
    censored[kept] = False
    fd = np.array([np.nan if v is None else v for v in censoring["framewise_displacement"]], dtype=float)
    dvars = raw_confounds["std_dvars"].to_numpy(float) if "std_dvars" in raw_confounds else None
    save("motion", figures.plot_motion_trace(
        fd, fd_threshold_mm=denoising.fd_threshold_mm, censored=censored, std_dvars=dvars,
        std_dvars_threshold=denoising.std_dvars_threshold, t_r=t_r), ".svg")

    tissue = [str(t) for t in arrays["carpet_tissue"]]
    save("carpet", figures.plot_carpet(arrays["carpet_before"], arrays.get("carpet_after"), tissue, t_r=t_r))
    tsnr = arrays["tsnr"]
    save("tsnr", figures.plot_tsnr(unmask(np.nan_to_num(tsnr), brain, mask_img.affine), title="tSNR (raw data)"))

    if timeseries_files:
        signals = {}
        for path in timeseries_files:
            table = pd.read_csv(path, sep="\t")
            signals[str(table.columns[1])] = table
        save("seedTimeseries", figures.plot_seed_timeseries(
            signals, n_timepoints=n_time, t_r=t_r, blocks=_task_blocks(events_file, task.conditions),
            title="cleaned seed signal"), ".svg")

    map_figures = []
    for seed, desc, path in _maps_to_show(map_files):
        key = f"map{seed}{desc[0].upper()}{desc[1:]}"
        caption, unit = map_caption(desc)
        measure = "gppi" if desc.startswith("gppi") else desc
        threshold = display_threshold(desc, (run_qc.get("dof") or {}).get(measure))
        save(key, figures.plot_connectivity_map(nib.load(path), mean_img, title=f"seed-{seed} {desc}",
                                                colorbar_label=unit, threshold=threshold))
        map_figures.append({"key": key, "seed": seed, "desc": desc, "caption": caption, "unit": unit,
                            "threshold": threshold, "display_p": DISPLAY_P,
                            "dof": (run_qc.get("dof") or {}).get(measure)})

    no_denoise = {}
    if not run_qc.get("excluded") and not censoring["excluded"]:
        no_denoise = _write_no_denoise_maps(arrays, seed_names, brain, mask_img.affine, out)
    strategies = _write_strategy_tables(arrays, seed_names, out)

    seeds_qc = run_qc.get("seeds") or {}
    report = {
        "run_name": run_name,
        "entities": dict(entities),
        "t_r": t_r,
        "n_timepoints": censoring["n_timepoints"],
        "n_kept": censoring["n_kept"],
        "mean_fd_mm": censoring["mean_fd_mm"],
        "percent_censored": censoring["percent_censored"],
        "n_non_steady_state": censoring["n_non_steady_state"],
        "n_fd_outliers": censoring["n_fd_outliers"],
        "strategy": censoring["strategy"],
        "n_confounds": censoring["n_confounds"],
        "excluded": bool(run_qc.get("excluded") or censoring["excluded"]),
        "exclusion_reason": run_qc.get("exclusion_reason") or censoring["exclusion_reason"] or "",
        "seeds": {name: {k: seeds_qc.get(name, {}).get(k) for k in
                         ("n_voxels_seed", "n_voxels", "coverage", "min_coverage", "tsnr_median")}
                  for name in seed_names},
        "dof": run_qc.get("dof") or {},
        "dof_budget": run_qc.get("dof_budget") or {},
        "censored_by": censoring.get("censored_by") or {},
        "strategies": strategies,
        "median_tsnr_brain": float(np.nanmedian(tsnr)) if np.isfinite(tsnr).any() else None,
        "figures": files,
        "maps": map_figures,
        "no_denoise_maps": no_denoise,
        # the first level's kernel, which the no-denoising maps were smoothed with too
        "smoothing_fwhm": run_qc.get("smoothing_fwhm"),
        "carpet_rows": int(arrays["carpet_columns"].size),
        "stand_in_seeds": seed_caveats(seed_files, seed_names, "stand-in"),
        "unverified_seeds": seed_caveats(seed_files, seed_names, "unverified"),
    }
    return write_json(out / "run_report.json", report)


#: PNG bytes of the seed-on-template figure by the seeds' content: the same seeds give the same
#: figure in every run, and a MultiProc worker makes many runs' reports (0.25 s a figure, timed).
_TEMPLATE_FIGURES: dict[str, bytes] = {}


def _seed_template_figure(seed_imgs: Mapping[str, nib.spatialimages.SpatialImage], out_file: Path) -> Path:
    """The seeds on the MNI152 template (``figures.plot_seed_overlay``), drawn once per process."""
    import hashlib

    from fcflow.reports import figures

    digest = hashlib.sha256()
    for name, img in seed_imgs.items():
        digest.update(name.encode())
        digest.update(np.asarray(img.affine, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(np.asarray(img.dataobj) > 0).tobytes())
        digest.update(repr(img.shape).encode())
    key = digest.hexdigest()
    if key not in _TEMPLATE_FIGURES:
        figures.save_figure(figures.plot_seed_overlay(seed_imgs, figures.load_template(),
                                                      title="seed on the MNI152 template"), out_file)
        _TEMPLATE_FIGURES[key] = out_file.read_bytes()
        return out_file
    with atomic_path(out_file) as tmp:
        tmp.write_bytes(_TEMPLATE_FIGURES[key])
    return out_file


def _write_no_denoise_maps(arrays: Mapping[str, NDArray], seed_names: Sequence[str], brain: NDArray[np.bool_],
                           affine: NDArray[np.float64], out: Path) -> dict[str, str]:
    """Each seed's map without denoising (for QC-FC), from the report arrays, as NIfTI in ``out``."""
    from fcflow.niftiio import unmask

    written = {}
    for name in seed_names:
        if f"nodenoise_z_{name}" in arrays:
            target = out / f"seed-{name}_desc-{NO_DENOISE_DESC}_stat-z.nii.gz"
            written[name] = str(save_img(unmask(arrays[f"nodenoise_z_{name}"], brain, affine), target))
    return written


def _write_strategy_tables(arrays: Mapping[str, NDArray], seed_names: Sequence[str], out: Path) -> dict[str, Any]:
    """The run's share of the strategy comparison: dof and errors per strategy, one z table per seed."""
    if "strategy_names" not in arrays:
        return {}
    names = [str(n) for n in arrays["strategy_names"]]
    points = arrays["strategy_points_mm"]
    strategies: dict[str, Any] = {
        "dof": {n: (None if not np.isfinite(d) else float(d)) for n, d in zip(names, arrays["strategy_dof"],
                                                                               strict=True)},
        "errors": {n: str(e) for n, e in zip(names, arrays["strategy_errors"], strict=True) if str(e)},
        "tables": {},
    }
    for name in seed_names:
        if f"strategy_z_{name}" not in arrays:
            continue
        table = pd.DataFrame(points, columns=["x", "y", "z"])
        for index, strategy in enumerate(names):
            table[strategy] = arrays[f"strategy_z_{name}"][index]
        strategies["tables"][name] = str(write_tsv(out / f"seed-{name}_desc-denoisingStrategies_qc.tsv", table))
    return strategies


def seed_caveats(seed_files: Sequence[str], seed_names: Sequence[str], kind: str) -> dict[str, str]:
    """Seeds whose provenance sidecar (beside the mask) carries a caveat of ``kind``, with its text.

    ``kind`` is ``"stand-in"`` (a declared stand-in mask, e.g. the simulator's pgACC sphere) or
    ``"unverified"`` (atlas files not verified against the release); :func:`fcflow.atlas.seed_caveat`
    reads the sidecar the first level writes beside each seed mask.
    """
    from fcflow.atlas.fetch import seed_caveat

    out = {}
    for name, path in zip(seed_names, seed_files, strict=True):
        sidecar = Path(str(path).removesuffix(".gz").removesuffix(".nii") + ".json")
        if sidecar.is_file():
            caveat = seed_caveat(json.loads(sidecar.read_text()))
            if caveat is not None and caveat[0] == kind:
                out[name] = caveat[1]
    return out


# ----------------------------------------------------------------------------------------------
# The participant's page
# ----------------------------------------------------------------------------------------------
def _figure_name(entities: Mapping[str, Any], key: str, suffix: str) -> str:
    from fcflow.derivatives import bids_name

    base = {k: entities.get(k) for k in ("sub", "ses", "task", "acq", "run")}
    return bids_name({**base, "desc": key}, "bold", suffix)


def write_participant_report(
    output_dir: str | Path, subject: str, run_report_files: Sequence[str | Path], *,
    session_order: Sequence[str] = (),
) -> Path:
    """Copy each run's figures into ``sub-<label>/figures``, write its no-denoising maps, render the page.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    subject : str
        Participant label without ``sub-``.
    run_report_files : sequence of path
        The ``run_report.json`` of each run (:func:`make_run_report`). Each run's page data is
        kept as ``sub-<label>/figures/<run>_report.json``; runs reported earlier and not given
        here stay on the page (reruns update a run, never drop the others).
    session_order : sequence of str, default=()
        The design's sessions (the recipe's order, e.g. baseline, infusion, 24h): runs are listed
        by session in this order, then by task, acquisition and run; sessions not in it come last,
        alphabetically.

    Returns
    -------
    Path
        ``OUTPUT_DIR/sub-<label>.html``.
    """
    from fcflow.denoise import order_budget, order_censoring
    from fcflow.derivatives import bids_name, run_dir
    from fcflow.reports.methods import software_versions
    from fcflow.reports.render import render

    output_dir = Path(output_dir)
    figures_dir = output_dir / f"sub-{subject}" / "figures"
    runs = []
    for path in run_report_files:
        report = json.loads(Path(path).read_text())
        ents = report["entities"]
        links = {}
        for key, source in report["figures"].items():
            name = _figure_name(ents, key, Path(source).suffix)
            with atomic_path(figures_dir / name) as tmp:
                shutil.copyfile(source, tmp)
            links[key] = f"sub-{subject}/figures/{name}"
        grid = {k: ents.get(k) for k in ("sub", "ses", "task", "acq", "run", "space", "res")}
        for seed, source in report["no_denoise_maps"].items():
            target = run_dir(output_dir, subject, ents.get("ses")) / bids_name(
                {**grid, "seed": seed, "desc": NO_DENOISE_DESC, "stat": "z"}, "statmap", ".nii.gz")
            save_img(nib.load(source), target)
            write_json(target.with_name(target.name.replace(".nii.gz", ".json")), {
                "Measure": "correlation", "Statistic": "z", "Seed": seed,
                "Description": ("Quality control only, not analysed: the seed-to-voxel Fisher z of the run "
                                "without denoising (non-steady-state volumes removed, then detrending and the "
                                "task's filter; no confound regression, no censoring; smoothed as the "
                                "first level's maps). The group report's "
                                "QC-FC compares it with the recipe's strategy."),
                "SmoothingFWHM": report.get("smoothing_fwhm"),
                "Software": software_versions(),
            })
        for seed, source in (report.get("strategies") or {}).get("tables", {}).items():
            target = run_dir(output_dir, subject, ents.get("ses")) / bids_name(
                {**{k: grid[k] for k in ("sub", "ses", "task", "acq", "run")}, "seed": seed,
                 "desc": "denoisingStrategies"}, "qc", ".tsv")
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
            write_json(target.with_name(target.name.replace(".tsv", ".json")), {
                "Description": ("Quality control only, not analysed: the seed's Fisher z with each probe point "
                                "of an 8 mm MNI grid (x, y, z in mm) under each candidate denoising strategy "
                                "(same censoring, band and filter as the recipe). The group report's strategy "
                                "comparison reads it (fcflow.strategies)."),
                "DegreesOfFreedom": report["strategies"]["dof"],
                "Errors": report["strategies"].get("errors", {}),
                "Recipe strategy": report["strategy"],
                "MeanFD": report["mean_fd_mm"],
                "Software": software_versions(),
            })
        # JSON sorted the keys: back to the order the budget charges them
        report["dof_budget"] = order_budget(report.get("dof_budget") or {})
        report["censored_by"] = order_censoring(report.get("censored_by") or {})
        report["links"] = links
        report["maps"] = [{**m, "link": links[m["key"]]} for m in report["maps"]]
        # kept beside the figures, so that a later run of some of the subject's runs adds to
        # the page instead of replacing it (issue 17: rerunning one of six runs left one)
        # without the work directory's paths (figures, no-denoising maps, strategy tables): the
        # page needs only the links, and the file must not depend on where the work ran
        kept = {k: v for k, v in report.items() if k not in ("figures", "no_denoise_maps")}
        if isinstance(kept.get("strategies"), dict):
            kept["strategies"] = {k: v for k, v in kept["strategies"].items() if k != "tables"}
        write_json(figures_dir / f"{report['run_name']}_report.json", kept)
        runs.append(report)
    done = {r["run_name"] for r in runs}
    for kept in sorted(figures_dir.glob("*_report.json")):
        earlier = json.loads(kept.read_text())
        if earlier.get("run_name") not in done and all(
                (output_dir / link).is_file() for link in earlier.get("links", {}).values()):
            runs.append(earlier)
    order = {session: i for i, session in enumerate(session_order)}
    runs.sort(key=lambda r: (order.get(str(r["entities"].get("ses") or ""), len(order)),
                             *(str(r["entities"].get(k) or "") for k in ("ses", "task", "acq", "run"))))
    group = next((r["entities"].get("group") for r in runs if r["entities"].get("group")), "")
    html = render("participant.html.j2", subject=subject, group=group, runs=runs,
                  sections=_SECTION_ORDER, software=software_versions())
    return write_text(output_dir / f"sub-{subject}.html", html)
