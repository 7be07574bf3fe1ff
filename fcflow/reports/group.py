"""The group report: the design, motion by group, QC-FC, every contrast's result, and the methods.

:func:`write_group_report` reads what the participant and group levels wrote in OUTPUT_DIR (the
runs' QC tables, the first-level maps and their no-denoising counterparts, ``group/results.tsv``
and the files it lists) and renders ``OUTPUT_DIR/group.html`` with figures in
``OUTPUT_DIR/group/figures/``:

1. **Design**: groups, sessions, every participant's runs (included, or excluded and why), and
   for each analysis who entered each group and who was dropped and why (from the sidecars).
2. **Motion**: mean FD and % censored volumes by group x session, with a one-way ANOVA and a
   Kruskal-Wallis test across groups per session (:mod:`fcflow.qc`).
3. **QC-FC** of every task analysed with ``correlation``, per seed and session: without denoising
   (``desc-correlationNoDenoise``, written with the participant reports) against the recipe's
   strategy (the maps the group level analysed).
4. **Results**: one entry per test of ``results.tsv`` (and of ``baseline_results.tsv``), with the
   glass brain and slices of the thresholded map, the cluster table and the group x session plot
   of each cluster, when anything survives; and the region level, a second declared family (the
   regions below alpha, or none, and a bar chart of the regions with the largest statistic).
5. A **methods** paragraph from the resolved recipe and the software (:mod:`fcflow.reports.methods`).

A simulated study (``BIDS_DIR/derivatives/ground_truth``) also gets the planted effects and the
score of each test against them (:func:`fcflow.simulate.scoring.score_group_results`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from fcflow.bids import parse_entities
from fcflow.config import Recipe
from fcflow.io import write_text

__all__ = ["collect_qcfc", "write_group_report"]

LOGGER = logging.getLogger("fcflow.report")
_FIGURES = "group/figures"


# ----------------------------------------------------------------------------------------------
# Design
# ----------------------------------------------------------------------------------------------
def _design(output_dir: Path, recipe: Recipe, qc: pd.DataFrame, participants: pd.DataFrame,
            results: pd.DataFrame) -> dict[str, Any]:
    group_of = participants[recipe.group_column].to_dict()
    subjects = sorted(set(qc["participant"]), key=lambda s: (recipe.groups.index(group_of[s])
                                                            if group_of.get(s) in recipe.groups else 99, s))
    columns = [(s, t.name) for s in recipe.sessions for t in recipe.tasks]
    matrix = []
    for subject in subjects:
        cells = []
        for session, task in columns:
            rows = qc[(qc["participant"] == subject) & (qc["session"] == session) & (qc["task"] == task)]
            if rows.empty:
                cells.append({"state": "missing", "text": "no run"})
            elif rows["excluded"].all():
                cells.append({"state": "excluded", "text": "; ".join(r for r in rows["exclusion_reason"] if r)
                              or "excluded"})
            else:
                n_bad = int(rows["excluded"].sum())
                cells.append({"state": "included", "text": f"{len(rows) - n_bad} run(s)"
                              + (f", {n_bad} excluded" if n_bad else "")})
        matrix.append({"participant": subject, "group": group_of.get(subject, ""), "cells": cells})
    analyses = []
    seen = set()
    for row in results.itertuples():
        key = (row.task, row.seed, row.desc, row.session_contrast)
        if key in seen or not row.stat_map:
            continue
        seen.add(key)
        sidecar = output_dir / str(row.stat_map).replace(".nii.gz", ".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        members = {g: [] for g in recipe.groups}
        for entry in meta.get("Subjects", []):
            members.setdefault(entry["group"], []).append(entry["participant_id"])
        analyses.append({"task": row.task, "seed": row.seed, "desc": row.desc,
                         "session_contrast": row.session_contrast, "members": members,
                         "dropped": meta.get("Dropped", []), "covariates": meta.get("Covariates", []),
                         "dof": meta.get("DegreesOfFreedom")})
    return {"subjects": matrix, "columns": [{"session": s, "task": t} for s, t in columns], "analyses": analyses,
            "n_per_group": {g: sum(1 for s in subjects if group_of.get(s) == g) for g in recipe.groups}}


# ----------------------------------------------------------------------------------------------
# Motion
# ----------------------------------------------------------------------------------------------
def _motion(output_dir: Path, recipe: Recipe, qc: pd.DataFrame, participants: pd.DataFrame) -> list[dict]:
    from fcflow.qc import compare_motion_between_groups, summarise_motion
    from fcflow.reports import figures

    out = []
    group_of = participants[recipe.group_column].to_dict()
    for task in recipe.tasks:
        runs = qc[qc["task"] == task.name]
        if runs.empty:
            continue
        per_subject = (runs.groupby(["participant", "session"], as_index=False)
                       .agg(mean_fd_mm=("mean_fd_mm", "mean"), percent_censored=("percent_censored", "mean"),
                            n_excluded=("excluded", "sum")))
        per_subject["group"] = per_subject["participant"].map(group_of)
        summary = summarise_motion(per_subject, groups=recipe.groups, sessions=recipe.sessions)
        tests = compare_motion_between_groups(per_subject, groups=recipe.groups, sessions=recipe.sessions)
        links = {}
        for value, label in (("mean_fd_mm", "mean FD (mm)"), ("percent_censored", "% volumes censored")):
            name = f"task-{task.name}_desc-{value.replace('_', '')}_motion.png"
            figures.save_figure(figures.plot_motion_by_group(
                per_subject, value=value, ylabel=label, groups=recipe.groups, sessions=recipe.sessions,
                title=f"task-{task.name}: {label} per subject (all runs, excluded ones too)"),
                output_dir / _FIGURES / name)
            links[value] = f"{_FIGURES}/{name}"
        flagged = tests[(tests["anova_p"] < 0.05) | (tests["kruskal_p"] < 0.05)]
        out.append({"task": task.name, "summary": summary.to_dict("records"), "tests": tests.to_dict("records"),
                    "figures": links, "flagged": flagged.to_dict("records")})
    return out


# ----------------------------------------------------------------------------------------------
# Degrees of freedom
# ----------------------------------------------------------------------------------------------
#: A group x session whose median dof differs from the task's median by more than this fraction
#: is flagged (a drug that makes people move also removes their degrees of freedom).
DOF_DIFFERENCE_WARNING = 0.2


def _dof(recipe: Recipe, qc: pd.DataFrame, participants: pd.DataFrame) -> list[dict]:
    """Degrees of freedom by task x measure x group x session, their budget, and what they exclude."""
    from scipy import stats

    from fcflow.denoise import order_budget, order_censoring

    group_of = participants[recipe.group_column].to_dict()
    out = []
    min_dof = recipe.denoising.min_dof
    for task in recipe.tasks:
        runs = qc[qc["task"] == task.name].copy()
        if runs.empty:
            continue
        runs["group"] = runs["participant"].map(group_of)
        runs["dof_excluded"] = runs["exclusion_reason"].str.contains("(min_dof)", regex=False)
        cost_columns = [c for c in runs.columns if c.startswith("dof_cost_")]
        censor_columns = [c for c in runs.columns if c.startswith("censored_")]
        for column in cost_columns + censor_columns:
            runs[column] = pd.to_numeric(runs[column], errors="coerce")
        budget = {"volumes": float(runs["n_timepoints"].median())}
        censored = order_censoring({c.removeprefix("censored_"): float(runs[c].median()) for c in censor_columns})
        budget.update({f"censored: {reason.replace('_', ' ')}": value for reason, value in censored.items()})
        costs = order_budget({c.removeprefix("dof_cost_"): float(runs[c].median()) for c in cost_columns})
        budget.update({f"{step} costs": value for step, value in costs.items()})
        measures = [c.removeprefix("dof_") for c in runs.columns
                    if c.startswith("dof_") and not c.startswith("dof_cost_") and c != "dof_excluded"
                    and pd.to_numeric(runs[c], errors="coerce").notna().any()]
        entry: dict[str, Any] = {"task": task.name, "min_dof": min_dof, "n_runs": len(runs),
                                 "n_excluded": int(runs["excluded"].sum()),
                                 "n_dof_excluded": int(runs["dof_excluded"].sum()), "budget": budget,
                                 "cells": [], "warnings": []}
        for measure in measures:
            values = pd.to_numeric(runs[f"dof_{measure}"], errors="coerce")
            overall = float(values.median()) if values.notna().any() else np.nan
            for session in recipe.sessions:
                samples = []
                for group in recipe.groups:
                    cell = runs[(runs["group"] == group) & (runs["session"] == session)]
                    v = pd.to_numeric(cell[f"dof_{measure}"], errors="coerce").dropna()
                    samples.append(v.to_numpy())
                    median = float(v.median()) if len(v) else np.nan
                    entry["cells"].append({
                        "measure": measure, "group": group, "session": session, "n_runs": len(cell),
                        "median_dof": median, "min_dof": float(v.min()) if len(v) else np.nan,
                        "n_below": int((v < min_dof).sum()), "n_excluded": int(cell["excluded"].sum()),
                    })
                    if np.isfinite(median) and np.isfinite(overall) and overall > 0 \
                            and abs(median - overall) > DOF_DIFFERENCE_WARNING * overall:
                        entry["warnings"].append(
                            f"task {task.name} {measure}: {group} at {session} has a median of {median:.1f} "
                            f"degrees of freedom against {overall:.1f} over the task: its maps are noisier, and "
                            "a group difference in dof can look like a group difference in connectivity.")
                usable = [v for v in samples if len(v) >= 2]
                if len(usable) >= 2 and np.unique(np.concatenate(usable)).size > 1:
                    test = stats.kruskal(*usable)
                    if test.pvalue < 0.05:
                        entry["warnings"].append(
                            f"task {task.name} {measure}, session {session}: degrees of freedom differ between "
                            f"groups (Kruskal-Wallis H = {test.statistic:.2f}, p = {test.pvalue:.3g}).")
        included = runs[~runs["excluded"]]
        lacking = [f"{g} at {s}" for g in recipe.groups for s in recipe.sessions
                   if len(included[(included["group"] == g) & (included["session"] == s)]) < 2]
        if entry["n_dof_excluded"] and lacking:
            entry["warnings"].insert(0, (
                f"task {task.name}: {entry['n_dof_excluded']} of {len(runs)} runs have fewer effective degrees of "
                f"freedom than min_dof = {min_dof:g} and are excluded; {', '.join(lacking)} keep(s) fewer than 2 "
                "runs, so the tests that need them cannot be run: the study lacks the degrees of freedom to test "
                "them. The budget below shows where they went."))
        out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# Seed coverage and tSNR across subjects
# ----------------------------------------------------------------------------------------------
def _seed_quality(output_dir: Path, recipe: Recipe, qc: pd.DataFrame, participants: pd.DataFrame) -> list[dict]:
    """Per task x seed: the seed's coverage and tSNR over runs, by group x session, and a figure.

    Reads the QC tables' ``<seed>_coverage`` (fraction of the seed's voxels inside the run's brain
    mask), ``<seed>_tsnr`` (median tSNR of the seed's voxels) and ``<seed>_n_voxels`` columns, the
    numbers each run's report shows one at a time. A run below the seed's ``min_coverage`` is
    counted; a group x session whose median tSNR is more than 20 % below the task's is flagged (a
    seed signal that is noisier in one cell weakens its maps there, which looks like an effect).
    """
    from fcflow.reports import figures

    group_of = participants[recipe.group_column].to_dict()
    out = []
    for task in recipe.tasks:
        runs = qc[qc["task"] == task.name].copy()
        if runs.empty:
            continue
        runs["group"] = runs["participant"].map(group_of)
        for seed in recipe.seeds:
            coverage, tsnr, voxels = (f"{seed.name}_{k}" for k in ("coverage", "tsnr", "n_voxels"))
            if coverage not in runs or not runs[coverage].notna().any():
                continue
            overall = float(runs[tsnr].median()) if tsnr in runs and runs[tsnr].notna().any() else np.nan
            entry: dict[str, Any] = {"task": task.name, "seed": seed.name, "min_coverage": seed.min_coverage,
                                     "n_runs": len(runs), "cells": [], "warnings": [], "figures": {}}
            for session in recipe.sessions:
                for group in recipe.groups:
                    cell = runs[(runs["group"] == group) & (runs["session"] == session)]
                    cov = cell[coverage].dropna()
                    snr = cell[tsnr].dropna() if tsnr in cell else pd.Series(dtype=float)
                    median_tsnr = float(snr.median()) if len(snr) else np.nan
                    entry["cells"].append({
                        "group": group, "session": session, "n_runs": len(cell),
                        "median_coverage": float(cov.median()) if len(cov) else np.nan,
                        "min_coverage": float(cov.min()) if len(cov) else np.nan,
                        "n_below": int((cov < seed.min_coverage).sum()),
                        "median_tsnr": median_tsnr, "min_tsnr": float(snr.min()) if len(snr) else np.nan,
                        "median_voxels": float(cell[voxels].median()) if voxels in cell and cell[voxels].notna().any()
                        else np.nan,
                    })
                    if np.isfinite(median_tsnr) and np.isfinite(overall) and median_tsnr < 0.8 * overall:
                        entry["warnings"].append(
                            f"task {task.name} seed {seed.name}: {group} at {session} has a median seed tSNR of "
                            f"{median_tsnr:.1f} against {overall:.1f} over the task: its seed signal is noisier.")
            per_subject = (runs.groupby(["participant", "session"], as_index=False)
                           .agg(**{"coverage": (coverage, "mean")},
                                **({"tsnr": (tsnr, "mean")} if tsnr in runs else {})))
            per_subject["group"] = per_subject["participant"].map(group_of)
            for value, label in (("coverage", "seed coverage (fraction)"), ("tsnr", "seed tSNR (median of voxels)")):
                if value not in per_subject or not per_subject[value].notna().any():
                    continue
                name = f"task-{task.name}_seed-{seed.name}_desc-{value}_seedqc.png"
                figures.save_figure(figures.plot_motion_by_group(
                    per_subject, value=value, ylabel=label, groups=recipe.groups, sessions=recipe.sessions,
                    title=f"task-{task.name} seed-{seed.name}: {label} per subject (all runs)"),
                    output_dir / _FIGURES / name)
                entry["figures"][value] = f"{_FIGURES}/{name}"
            out.append(entry)
    return out


# ----------------------------------------------------------------------------------------------
# Denoising strategies compared on the study's own data
# ----------------------------------------------------------------------------------------------
def _strategies(output_dir: Path, recipe: Recipe, qc: pd.DataFrame) -> list[dict]:
    """Per task x seed: QC-FC, distance dependence and dof of each candidate strategy (fcflow.strategies)."""
    from fcflow.reports import figures
    from fcflow.strategies import summarise_strategies

    sections = []
    for task in recipe.tasks:
        if "correlation" not in task.measures:
            continue
        for seed in recipe.seeds:
            files = sorted(output_dir.glob(f"sub-*/ses-*/func/sub-*_task-{task.name}_*seed-{seed.name}_"
                                           "desc-denoisingStrategies_qc.tsv"))
            tables, fds, dofs = [], [], []
            for path in files:
                meta_file = path.with_name(path.name.replace(".tsv", ".json"))
                if not meta_file.is_file():
                    continue
                meta = json.loads(meta_file.read_text())
                if meta.get("MeanFD") is None:
                    continue
                tables.append(pd.read_csv(path, sep="\t"))
                fds.append(float(meta["MeanFD"]))
                dofs.append({k: (np.nan if v is None else float(v)) for k, v in meta["DegreesOfFreedom"].items()})
            entry: dict[str, Any] = {"task": task.name, "seed": seed.name, "n_runs": len(tables), "rows": [],
                                     "note": ""}
            if len(tables) < 3:
                entry["note"] = (f"{len(tables)} run(s) with a strategy comparison (written with the participant "
                                 "reports): it needs at least 3.")
                sections.append(entry)
                continue
            masks = sorted(output_dir.glob(f"sub-*/ses-*/func/sub-*_task-{task.name}_*seed-{seed.name}_mask.nii.gz"))
            centre = np.zeros(3)
            if masks:
                img = nib.load(masks[0])
                centre = nib.affines.apply_affine(img.affine, np.argwhere(np.asarray(img.dataobj) > 0).mean(axis=0))
            summaries, qcfc, distance = summarise_strategies(tables, fds, dofs, seed_centre_mm=centre,
                                                             min_dof=recipe.denoising.min_dof)
            entry["rows"] = [dataclasses.asdict(row) | {"recipe": row.strategy == recipe.denoising.strategy}
                             for row in summaries]
            entry["n_edges"] = int(distance.size)
            name = f"task-{task.name}_seed-{seed.name}_desc-denoisingStrategies_qcfc.png"
            figures.save_figure(figures.plot_qcfc(
                {row.strategy: qcfc[row.strategy] for row in summaries}, distance,
                title=f"QC-FC by strategy, task-{task.name} seed-{seed.name} ({len(tables)} runs, "
                      f"{distance.size} probe edges)"), output_dir / _FIGURES / name)
            entry["figure"] = f"{_FIGURES}/{name}"
            sections.append(entry)
    return sections


# ----------------------------------------------------------------------------------------------
# QC-FC
# ----------------------------------------------------------------------------------------------
def _map_files(output_dir: Path, task: str, seed: str, desc: str, space: str) -> dict[tuple[str, str], list[Path]]:
    found: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(output_dir.glob(f"sub-*/ses-*/func/sub-*_task-{task}_*seed-{seed}_stat-z_desc-{desc}_"
                                       "statmap.nii.gz")):
        ents = parse_entities(path.name)[0]
        if ents.get("space") == space and ents.get("desc") == desc and ents.get("task") == task:
            found.setdefault((ents["sub"], ents.get("ses", "")), []).append(path)
    return found


def collect_qcfc(
    output_dir: str | Path, recipe: Recipe, qc: pd.DataFrame, *, task: str, seed: str, session: str | None,
) -> dict[str, Any]:
    """QC-FC of one task x seed x session without denoising and with the recipe's strategy.

    The subjects are those with an included run and both maps; a subject's map and mean FD are
    the means over its included runs of the session. ``session=None`` pools the sessions: every
    subject x session with an included run is one observation (more spread of mean FD than one
    session has, hence more power to see motion left in the data; the sessions of a subject are
    not independent, so its p values are descriptive). Edges are the brain voxels common to every
    map read, minus the seed's own voxels; distances are from the seed mask's centroid.

    Returns
    -------
    dict
        ``n_subjects``, ``n_runs`` (observations), ``subjects``, and per strategy label its
        :class:`~fcflow.qc.QCFCSummary` as a dict and its r (``r``), with ``distance_mm``
        and ``note`` (why nothing was computed).
    """
    from fcflow.qc import compute_qcfc, summarise_qcfc
    from fcflow.reports.participant import NO_DENOISE_DESC

    output_dir = Path(output_dir)
    labels = {"no denoising": NO_DENOISE_DESC, f"{recipe.denoising.strategy} (recipe)": "correlation"}
    files = {label: _map_files(output_dir, task, seed, desc, recipe.space) for label, desc in labels.items()}
    sessions = list(recipe.sessions) if session is None else [session]
    included = qc[(qc["task"] == task) & qc["session"].isin(sessions) & ~qc["excluded"]]
    fd = included.groupby(["participant", "session"])["mean_fd_mm"].mean()
    keys = sorted(k for k in fd.index if all(k in f for f in files.values()) and np.isfinite(fd[k]))
    subjects = sorted({subject for subject, _ in keys})
    out: dict[str, Any] = {"task": task, "seed": seed, "session": session or "all sessions",
                           "n_subjects": len(subjects), "n_runs": len(keys), "subjects": subjects,
                           "strategies": {}, "note": ""}
    if len(keys) < 3 or fd[keys].nunique() < 2:
        unit = "subject(s)" if session else "subject x session observation(s)"
        out["note"] = (f"{len(keys)} {unit} with an included run and both maps (no-denoising maps are "
                       "written with the participant reports): QC-FC needs at least 3 with different mean FD.")
        return out
    stacks = {}
    support = affine = shape = None
    for label, found in files.items():
        rows = []
        for key in keys:
            volumes = [np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in found[key]]
            if shape is None:
                first = nib.load(found[key][0])
                shape, affine = first.shape[:3], first.affine
                support = np.ones(shape, dtype=bool)
            mean = np.mean(volumes, axis=0)
            support &= np.isfinite(mean) & (mean != 0)
            rows.append(mean)
        stacks[label] = rows
    masks = sorted(output_dir.glob(
        f"sub-{keys[0][0]}/ses-{keys[0][1]}/func/sub-*_task-{task}_*seed-{seed}_mask.nii.gz"))
    seed_voxels = np.zeros(shape, dtype=bool)
    if masks:
        seed_voxels = np.asarray(nib.load(masks[0]).dataobj).reshape(shape) > 0
    edges = support & ~seed_voxels
    ijk = np.argwhere(edges)
    centre = np.argwhere(seed_voxels).mean(axis=0) if seed_voxels.any() else ijk.mean(axis=0)
    distance = np.linalg.norm(nib.affines.apply_affine(affine, ijk) - nib.affines.apply_affine(affine, centre),
                              axis=1)
    mean_fd = fd[keys].to_numpy(float)
    for label, rows in stacks.items():
        data = np.stack([row[edges] for row in rows])
        r, p = compute_qcfc(data, mean_fd)
        summary = summarise_qcfc(r, p, distance, n_subjects=len(keys))
        out["strategies"][label] = {**dataclasses.asdict(summary), "r": r}
    out["distance_mm"] = distance
    return out


def _qcfc_section(output_dir: Path, recipe: Recipe, qc: pd.DataFrame) -> list[dict]:
    from fcflow.reports import figures

    sections = []
    for task in recipe.tasks:
        if "correlation" not in task.measures:
            continue
        for seed in recipe.seeds:
            pooled: list[str | None] = [None] if len(recipe.sessions) > 1 else []
            for session in [*recipe.sessions, *pooled]:
                result = collect_qcfc(output_dir, recipe, qc, task=task.name, seed=seed.name, session=session)
                entry = {k: result[k] for k in ("task", "seed", "session", "n_subjects", "n_runs", "note")}
                entry["strategies"] = {label: {k: v for k, v in s.items() if k != "r"}
                                       for label, s in result["strategies"].items()}
                entry["reading"] = qcfc_reading(entry["strategies"])
                if result["strategies"]:
                    name = (f"ses-{session}_" if session else "") + f"task-{task.name}_seed-{seed.name}_qcfc.png"
                    figures.save_figure(figures.plot_qcfc(
                        {label: s["r"] for label, s in result["strategies"].items()}, result["distance_mm"],
                        title=f"QC-FC, task-{task.name} seed-{seed.name} "
                              + (f"ses-{session} ({result['n_subjects']} subjects)" if session else
                                 f"all sessions ({result['n_runs']} runs of {result['n_subjects']} subjects)")),
                        output_dir / _FIGURES / name)
                    entry["figure"] = f"{_FIGURES}/{name}"
                sections.append(entry)
    return sections


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
def _cluster_plots(output_dir: Path, table_file: str) -> list[str]:
    """The group x session PNGs of a cluster table's clusters, in cluster order."""
    table = Path(table_file)
    # ..._alpha-0p05_desc-<m>_clusters.tsv -> ..._alpha-0p05_cluster-<k>_desc-<m>_clustermeans.png
    head, _, tail = table.name.rpartition("_desc-")
    pattern = f"{head}_cluster-*_desc-{tail}".replace("_clusters.tsv", "_clustermeans.png")
    found = list((output_dir / table.parent).glob(pattern))

    def number(path: Path) -> int:
        match = re.search(r"_cluster-(\d+)_", path.name)
        return int(match.group(1)) if match else 0

    return [str(p.relative_to(output_dir)) for p in sorted(found, key=number)]


def _results(output_dir: Path, recipe: Recipe, results: pd.DataFrame, *, baseline: bool) -> list[dict]:
    from fcflow.reports import figures

    entries = []
    template = figures.load_template()
    for index, row in enumerate(results.itertuples()):
        anchor = (f"{'baseline' if baseline else 'result'}-{index}-"
                  + re.sub(r"[^A-Za-z0-9]+", "-", f"{row.task}-{row.desc}-{row.session_contrast}-{row.group_contrast}"))
        entry = {"anchor": anchor, "task": row.task, "measure": row.measure, "seed": row.seed, "desc": row.desc,
                 "session_contrast": row.session_contrast, "group_contrast": row.group_contrast,
                 "stat_type": row.stat_type, "n_per_group": row.n_per_group, "dof": row.dof,
                 "primary_inference": row.primary_inference, "min_p": row.min_p, "peak_stat": row.peak_stat,
                 "statistic": getattr(row, "statistic", "") or row.stat_type,
                 "min_p_family": getattr(row, "min_p_family", None),
                 "design_warnings": [w for w in str(getattr(row, "design_warnings", "") or "").split(" | ") if w],
                 "n_clusters": None if pd.isna(row.n_significant_clusters) else int(row.n_significant_clusters),
                 "skipped": not row.stat_map, "skip_reason": str(getattr(row, "skip_reason", "") or ""),
                 "stat_map": row.stat_map,
                 "figures": {}, "clusters": [], "cluster_plots": []}
        if entry["n_clusters"] and row.thresholded_map and row.cluster_table:
            table = pd.read_csv(output_dir / row.cluster_table, sep="\t", keep_default_na=False)
            entry["clusters"] = table.to_dict("records")
            entry["cluster_columns"] = list(table.columns)
            img = nib.load(output_dir / row.thresholded_map)
            stem = Path(row.thresholded_map).name.removesuffix(".nii.gz")
            title = f"{row.desc}, {row.session_contrast}: {row.group_contrast}"
            glass = f"{_FIGURES}/{stem}_glassbrain.png"
            figures.save_figure(figures.plot_glass_brain_map(img, title=title), output_dir / glass)
            peak = table.iloc[0]
            slices = f"{_FIGURES}/{stem}_slices.png"
            figures.save_figure(figures.plot_stat_slices(
                img, template, cut_coords=(float(peak["peak_x"]), float(peak["peak_y"]), float(peak["peak_z"])),
                title=f"cluster 1 peak ({peak['peak_x']:g}, {peak['peak_y']:g}, {peak['peak_z']:g}) mm"),
                output_dir / slices)
            entry["figures"] = {"glass": glass, "slices": slices}
            entry["cluster_plots"] = _cluster_plots(output_dir, row.cluster_table)
            entry["thresholded_map"] = row.thresholded_map
            entry["cluster_table"] = row.cluster_table
        entry["regions"] = _regions_entry(output_dir, recipe, row, entry["anchor"]) if getattr(
            row, "region_table", "") else None
        entries.append(entry)
    return entries


def _regions_entry(output_dir: Path, recipe: Recipe, row: Any, anchor: str) -> dict[str, Any]:
    """A test's region table: the regions below alpha by the family's correction, and the bar chart."""
    from fcflow.regions import significant_regions
    from fcflow.reports import figures

    table = pd.read_csv(output_dir / row.region_table, sep="\t", keep_default_na=False, na_values=["n/a"])
    table["hemisphere"] = table["hemisphere"].fillna("")
    correction = recipe.regions.correction
    survivors = significant_regions(table, recipe.inference.alpha, correction)
    value = "effect" if row.stat_type == "t" else "stat"
    xlabel = ("contrast estimate (mean map value)" if value == "effect" else "F") + \
        f"; filled, *: {'p FWE' if correction == 'fwe' else 'q FDR'} < {recipe.inference.alpha}"
    figure = f"{_FIGURES}/{Path(row.region_table).name.removesuffix('.tsv')}_bars.png"
    figures.save_figure(figures.plot_region_effects(
        table, value=value, significant=table.index.isin(survivors.index), xlabel=xlabel,
        title=f"{row.desc}, {row.session_contrast}: {row.group_contrast} ({len(table)} regions)"),
        output_dir / figure)
    return {"table": row.region_table, "n_regions": len(table), "correction": correction, "figure": figure,
            "columns": list(table.columns), "significant": survivors.to_dict("records")}


def _read_results(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return pd.DataFrame()
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a"])
    numeric = ("min_p", "min_p_family", "peak_stat", "dof", "n_significant_clusters", "n_significant_regions")
    for column in table.columns:
        if column in numeric:
            table[column] = pd.to_numeric(table[column], errors="coerce")
        else:
            table[column] = table[column].fillna("")
    return table


def _ground_truth(output_dir: Path, bids_dir: Path) -> dict[str, Any] | None:
    truth = bids_dir / "derivatives" / "ground_truth"
    if not (truth / "effects.tsv").is_file():
        return None
    effects = pd.read_csv(truth / "effects.tsv", sep="\t", keep_default_na=False)
    out: dict[str, Any] = {"effects": effects.to_dict("records"), "effect_columns": list(effects.columns),
                           "scores": [], "note": ""}
    try:
        from fcflow.simulate.scoring import score_group_results

        scores = score_group_results(output_dir, truth)
        out["scores"] = scores.fillna("").to_dict("records")
        out["score_columns"] = list(scores.columns)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        out["note"] = f"The results could not be scored against the planted truth: {exc}"
    return out


def qcfc_reading(strategies: dict[str, dict[str, Any]], chance_percent: float = 5.0) -> str:
    """One sentence that reads a QC-FC table against chance (5 % of edges at p < 0.05 under no motion effect).

    ``strategies`` maps a label to its summary (``percent_p05``); the recipe's entry is the one
    labelled ``(recipe)``, the no-denoising one ``no denoising``. Edges are correlated, so the
    share is compared with chance descriptively, not tested.
    """
    recipe = next((v for k, v in strategies.items() if k.endswith("(recipe)")), None)
    raw = next((v for k, v in strategies.items() if k.startswith("no denoising")), None)
    if recipe is None or recipe.get("percent_p05") is None:
        return ""
    share = float(recipe["percent_p05"])
    text = f"Chance is {chance_percent:g} % of edges at p < 0.05; the recipe's strategy leaves {share:.1f} %"
    if raw is not None and raw.get("percent_p05") is not None:
        before = float(raw["percent_p05"])
        text += f" ({before:.1f} % without denoising)"
        if share > before:
            text += ": denoising raised the share of motion-related edges, which deserves a look at this session"
        elif share <= 1.5 * chance_percent:
            text += ": motion left in the maps is near chance"
        else:
            text += ": lower than without denoising, but still above chance"
    elif share <= 1.5 * chance_percent:
        text += ": near chance"
    return text + "."


def seed_caveats_of_study(output_dir: str | Path, kind: str) -> dict[str, str]:
    """Seeds that any run used with a caveat of ``kind`` (``"stand-in"`` or ``"unverified"``).

    Read from the seed masks' sidecars the participant level writes
    (``sub-*/[ses-*/]func/*_seed-<name>_mask.json``) by :func:`fcflow.atlas.seed_caveat`, the same
    reading as the participant report's.
    """
    from fcflow.atlas.fetch import seed_caveat

    out: dict[str, str] = {}
    for path in sorted(Path(output_dir).glob("sub-*/**/func/*_mask.json")):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        caveat = seed_caveat(meta) if isinstance(meta, dict) else None
        if caveat is not None and caveat[0] == kind:
            out.setdefault(str(meta.get("Seed") or path.name), caveat[1])
    return out


def write_group_report(
    output_dir: str | Path,
    recipe: Recipe,
    *,
    bids_dir: str | Path,
    command: Sequence[str] | None = None,
) -> Path:
    """Render ``OUTPUT_DIR/group.html`` from the participant and group levels' outputs.

    Parameters
    ----------
    output_dir : path
        The analysis OUTPUT_DIR (participant maps, QC tables, ``group/``).
    recipe : Recipe
        The recipe the group level ran with (:meth:`fcflow.config.Recipe.with_overrides`).
    bids_dir : path
        The raw BIDS dataset (``participants.tsv``; a simulated study's ground truth).
    command : sequence of str, optional
        The command line, shown in the report without its execution options
        (:func:`fcflow.derivatives.analysis_command`).

    Returns
    -------
    Path
        ``OUTPUT_DIR/group.html``.
    """
    import sys

    from fcflow.bids import read_participants
    from fcflow.derivatives import analysis_command, read_runs_qc
    from fcflow.reports.methods import describe_methods, software_versions, write_bibtex
    from fcflow.reports.render import render

    output_dir, bids_dir = Path(output_dir), Path(bids_dir)
    participants = read_participants(bids_dir, recipe.group_column, recipe.groups)
    qc = read_runs_qc(output_dir)
    results = _read_results(output_dir / "group" / "results.tsv")
    baseline = _read_results(output_dir / "group" / "baseline_results.tsv")
    both = pd.concat([results, baseline], ignore_index=True) if not baseline.empty else results
    LOGGER.info("Group report: design, motion, QC-FC, %d results", len(both))
    context = {
        "recipe": recipe,
        "recipe_sha": recipe.fingerprint(),
        # without execution options (plugin, processes, work dir), as the sidecars record it: the
        # report's bytes do not depend on how the work ran (logs/ records that)
        "command": " ".join(analysis_command(command if command is not None else ["fcflow", *sys.argv[1:]])),
        "design": _design(output_dir, recipe, qc, participants, both),
        "motion": _motion(output_dir, recipe, qc, participants),
        "qcfc": _qcfc_section(output_dir, recipe, qc),
        "dof": _dof(recipe, qc, participants),
        "seed_quality": _seed_quality(output_dir, recipe, qc, participants),
        "strategies": _strategies(output_dir, recipe, qc),
        "results": _results(output_dir, recipe, results, baseline=False),
        "baseline": _results(output_dir, recipe, baseline, baseline=True),
        "truth": _ground_truth(output_dir, bids_dir),
        "stand_in_seeds": seed_caveats_of_study(output_dir, "stand-in"),
        "unverified_seeds": seed_caveats_of_study(output_dir, "unverified"),
        "methods": describe_methods(recipe),
        "software": software_versions(),
    }
    # the references of the methods paragraph as BibTeX, beside the report
    bibtex = write_bibtex(output_dir / "group_references.bib", context["methods"]["cited"],
                          context["methods"]["notes"])
    context["methods"]["bibtex"] = bibtex.name
    return write_text(output_dir / "group.html", render("group.html.j2", **context))
