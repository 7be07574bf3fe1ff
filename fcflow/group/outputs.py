"""Group level, outputs: statistic maps, cluster tables, region tables and ``results.tsv``.

Every file of ``OUTPUT_DIR/group/`` is written here, atomically (:mod:`fcflow.io`), under its
BIDS-derivative name (:mod:`fcflow.derivatives`) with its JSON sidecar; :func:`finish_group_level`
writes ``results.tsv`` and sets apart what an earlier, different run left
(:func:`set_apart_stale_outputs`).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.bids import parse_entities
from fcflow.clusters import label_clusters, make_cluster_table
from fcflow.config import Recipe
from fcflow.group.inference import GroupTest, InferenceResult, SessionAnalysis
from fcflow.group.inputs import MeasureMap, SessionMaps
from fcflow.io import save_img, write_json, write_tsv

LOGGER = logging.getLogger("fcflow.group")


GROUP_DIR = "group"


_LOGP_STAT = {"tfce": "logpFWE", "maxt": "logpFWE", "cluster_mass": "logpFWE", "cluster_size": "logpFWE",
              "bonferroni": "logpFWE", "fdr": "logpFDR", "cluster_extent": "logp"}


_MAX_CLUSTER_PLOTS = 20


def julich_area_lookup(atlas_dir: str | Path) -> Callable[[NDArray[np.float64]], str]:
    """``lookup(xyz_mm) -> area`` from the Julich-Brain v3.1 maximum probability maps.

    The left and right MPMs and their XML label tables are read once; a coordinate gets the
    area of the nearest MPM voxel, prefixed by its hemisphere ("left Area Id8 (Insula)"), or
    "unlabelled" outside both maps.
    """
    from fcflow.atlas.fetch import find_atlas_file
    from fcflow.atlas.release import load_atlas_release, read_label_table

    release = load_atlas_release()
    layers = []
    for hemi in ("left", "right"):
        mpm = find_atlas_file(atlas_dir, release.mpm_file(hemi))
        xml = find_atlas_file(atlas_dir, release.labels_file(hemi))
        if mpm is None or xml is None:
            from fcflow.errors import AtlasError

            raise AtlasError(f"The Julich-Brain folder {atlas_dir} lacks the {hemi} MPM or its label table.")
        img = nib.load(mpm)
        names = {value: name for name, value in read_label_table(xml).items()}
        layers.append((hemi, np.asarray(img.dataobj), np.linalg.inv(img.affine), names))

    def lookup(xyz_mm: NDArray[np.float64]) -> str:
        point = np.append(np.asarray(xyz_mm, dtype=float)[:3], 1.0)
        for hemi, labels, inverse, names in layers:
            ijk = np.rint(inverse @ point)[:3].astype(int)
            if np.all(ijk >= 0) and np.all(ijk < labels.shape):
                value = int(labels[tuple(ijk)])
                if value:
                    return f"{hemi} {names.get(value, f'label {value}')}"
        return "unlabelled"

    return lookup


def _alpha_label(alpha: float) -> str:
    return f"{alpha:g}".replace(".", "p").replace("-", "m")


def n_per_group_text(counts: Mapping[str, int]) -> str:
    return ";".join(f"{g}={n}" for g, n in counts.items())


RESULT_COLUMNS = [
    "task", "measure", "seed", "desc", "session_contrast", "group_contrast", "stat_type", "n_per_group",
    "dof", "primary_inference", "stat_map", "z_map", "logp_fwe_map", "thresholded_map", "cluster_table",
    "n_significant_clusters", "min_p", "peak_stat", "statistic", "variance_groups", "design_warnings",
    "logp_family_map", "min_p_family", "region_table", "n_significant_regions", "skip_reason",
]


@dataclass
class AnalysisOutputs:
    """What one measure x session analysis (:func:`run_session_analysis`) hands to :func:`finish_group_level`.

    ``rows`` are its ``results.tsv`` rows (the reference session's go to ``baseline_results.tsv``),
    ``files`` the SHA-256 of every file it wrote, by path relative to OUTPUT_DIR.
    """

    rows: list[dict[str, Any]]
    files: dict[str, str]


def unit_files(group_dir: Path, measure: MeasureMap, analysis: SessionAnalysis) -> dict[Path, tuple[int, int]]:
    """The files of ``group/`` one measure x session analysis writes, with their inode and mtime.

    Every one of its file names starts with its session analysis and task and names its seed,
    and all sit in its measure folder, so units running at once never list each other's files.
    """
    prefix, seed = f"ses-{analysis.label}_task-{measure.task}_", f"_seed-{measure.seed}_"
    folder = measure_dir(group_dir, measure)
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.iterdir():
        if path.name.startswith(prefix) and seed in path.name and path.is_file():
            info = path.stat()
            found[path] = (info.st_ino, info.st_mtime_ns)
    return found


def test_files(group_dir: Path, measure: MeasureMap, analysis: SessionAnalysis,
               test_name: str) -> dict[Path, tuple[int, int]]:
    """The files of one group test (:func:`unit_files` naming its ``contrast``), with inode and mtime."""
    entity = f"_contrast-{test_name}_"
    return {p: stamp for p, stamp in unit_files(group_dir, measure, analysis).items() if entity in p.name}


def finish_group_level(output_dir: str | Path, outputs: Sequence[AnalysisOutputs]) -> Path:
    """Write ``results.tsv`` and ``baseline_results.tsv`` from every unit's rows, in unit order,
    and set apart the files of ``group/`` no unit wrote (:func:`set_apart_stale_outputs`).

    Returns
    -------
    results_file : Path
        ``output_dir/group/results.tsv``.
    """
    group_dir = Path(output_dir) / GROUP_DIR
    results = pd.DataFrame([row for unit in outputs for row in unit.rows])
    for column in RESULT_COLUMNS + ["is_reference"]:
        if column not in results:
            results[column] = np.nan
    for column in ("dof", "n_significant_clusters", "n_significant_regions"):
        # counts stay integers where some tests lack them (skipped, or no region level)
        results[column] = pd.to_numeric(results[column]).astype("Int64")
    is_reference = results["is_reference"].astype(bool)
    baseline = results[is_reference][RESULT_COLUMNS]
    main = results[~is_reference][RESULT_COLUMNS]
    write_tsv(group_dir / "baseline_results.tsv", baseline)
    results_file = write_tsv(group_dir / "results.tsv", main)
    set_apart_stale_outputs(group_dir, [f for unit in outputs for f in unit.files])
    LOGGER.info("Group level done: %d rows in %s (and %d baseline-equivalence rows)", len(main), results_file,
                len(baseline))
    return results_file


#: group/ files every run writes (not per test)
_GROUP_FILES = ("results.tsv", "baseline_results.tsv", "dataset_description.json", "desc-recipe_config.json")


#: folders of group/ that hold no test outputs: set-apart files, the report's figures
_GROUP_SPECIAL_DIRS = (".fcflow-stale", "figures")


def measure_dir(group_dir: str | Path, measure: MeasureMap) -> Path:
    """``group/task-<task>/desc-<measure>/``: where the tests of one task x measure are written.

    One folder per task and measure (every seed and session analysis of it) instead of one folder
    of hundreds of files; the file names carry every entity, so the folder adds no meaning.
    """
    return Path(group_dir) / f"task-{measure.task}" / f"desc-{measure.desc}"


def group_outputs(group_dir: Path) -> list[Path]:
    """Every file of ``group/`` a group-level run writes: top level and measure folders, without
    :data:`_GROUP_SPECIAL_DIRS` and hidden files (atomic writes' temporary files)."""
    found = []
    for path in Path(group_dir).rglob("*"):
        relative = path.relative_to(group_dir).parts
        if relative[0] in _GROUP_SPECIAL_DIRS or any(part.startswith(".") for part in relative):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found)


def set_apart_stale_outputs(group_dir: str | Path, files: Sequence[str]) -> Path | None:
    """Move the files of ``group/`` that this run did not write or reuse into ``group/.fcflow-stale/<time>/``.

    A rerun with fewer contrasts, sessions or measures would otherwise leave the earlier run's
    maps and tables beside the new ones, under names a reader cannot tell apart. This run's files
    are its units' files (``files``, relative to OUTPUT_DIR: :attr:`AnalysisOutputs.files`) and
    :data:`_GROUP_FILES`; every other file of ``group/`` and its measure folders
    (:func:`group_outputs`) is moved (a rename on the same file system, atomic per file) with a
    ``manifest.json`` of what was there; measure folders left empty are removed.
    The group report's ``figures/`` are rewritten by the report itself.

    Returns
    -------
    Path or None
        The folder the stale files went to, or None when nothing was stale.
    """
    import datetime

    group_dir = Path(group_dir)
    output_dir = group_dir.parent
    keep = {group_dir / name for name in _GROUP_FILES} | {output_dir / rel for rel in files}
    stale = sorted(p for p in group_outputs(group_dir) if p not in keep)
    if not stale:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    target = group_dir / ".fcflow-stale" / stamp
    target.mkdir(parents=True)
    moved = []
    for path in stale:
        relative = path.relative_to(group_dir)
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        path.rename(target / relative)
        moved.append(str(relative))
    for folder in sorted({p.parent for p in stale}, key=lambda p: len(p.parts), reverse=True):
        # the measure folders the stale files leave empty (task-<t>/desc-<d>/, then task-<t>/)
        while folder != group_dir and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
    write_json(target / "manifest.json", {
        "Description": "Files of an earlier group-level run that the run of this time did not write or reuse "
                       "(other tests, contrasts, sessions or measures), set apart so that group/ holds one run's "
                       "outputs.",
        "MovedAtUTC": stamp, "Files": moved,
    })
    LOGGER.warning("%d file(s) of an earlier group-level run that this run did not produce were moved to %s "
                   "(listed in its manifest.json).", len(moved), target)
    return target


def write_group_description(group_dir: Path, output_dir: Path, recipe: Recipe) -> None:
    from fcflow import __version__

    write_json(group_dir / "dataset_description.json", {
        "Name": f"fcflow group level: {recipe.name}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fcflow", "Version": __version__,
                         "Description": "Group x session inference on seed-to-voxel maps"}],
        "SourceDatasets": [{"URL": "../"}],
    })
    write_json(group_dir / "desc-recipe_config.json",
               {"Recipe": recipe.to_dict(), "RecipeSHA256": recipe.fingerprint()})


def _volume(values: NDArray, mask: NDArray[np.bool_], affine: NDArray[np.float64]) -> nib.Nifti1Image:
    volume = np.zeros(mask.shape, dtype=np.float32)
    volume[mask] = values
    img = nib.Nifti1Image(volume, affine)
    img.header.set_xyzt_units("mm")
    return img


def write_test_outputs(
    group_dir: Path, output_dir: Path, recipe: Recipe, measure: MeasureMap, analysis: SessionAnalysis,
    test: GroupTest, result: InferenceResult, maps: SessionMaps, subjects: list[str], group_of: pd.Series,
    design: pd.DataFrame, dropped: Mapping[str, str], counts: Mapping[str, int],
    lookup: Callable | None, provenance: Mapping[str, Any], recipe_sha: str, n_perm: int, *,
    diagnostics: Any = None, variance_note: str = "",
) -> dict[str, Any]:
    inference = recipe.inference
    space_res = res_label(maps, output_dir)
    ents = {"ses": analysis.label, "task": measure.task, "space": recipe.space, "res": space_res,
            "seed": measure.seed, "contrast": test.name, "desc": measure.desc}
    from fcflow.derivatives import bids_label, bids_name

    def path(suffix: str, ext: str, **extra: str) -> Path:
        return measure_dir(group_dir, measure) / bids_name({**ents, **extra}, suffix, ext)

    def rel(p: Path) -> str:
        return str(p.relative_to(output_dir))

    two_sided = inference.two_sided and test.kind == "t"
    columns = list(design.columns)
    meta = {
        "Task": measure.task, "Measure": measure.measure, "Seed": measure.seed,
        "FirstLevelMaps": {"desc": measure.desc, "stat": measure.stat,
                           "Note": "Fisher z for correlation/background; gPPI beta of the condition contrast."},
        "SessionContrast": {"expression": analysis.expression, "weights": dict(analysis.weights),
                            "baseline_equivalence": analysis.is_reference, "kind": analysis.kind,
                            "model": _ANALYSIS_MODEL.get(analysis.kind)},
        "GroupTest": {"name": test.name, "expression": test.expression, "type": test.kind,
                      "weights": {"columns": columns, "matrix": test.matrix.tolist()}},
        "DesignMatrix": {"columns": columns, "participant_id": list(design.index),
                         "rows": np.round(design.to_numpy(dtype=float), 12).tolist()},
        "Covariates": list(inference.covariates),
        "Subjects": [{"participant_id": f"sub-{s}", "group": str(g)} for s, g in zip(subjects, group_of)],
        "NPerGroup": dict(counts),
        "Dropped": [{"participant_id": f"sub-{s}", "reason": r} for s, r in dropped.items()],
        "DegreesOfFreedom": result.dof,
        "StatisticComputed": {"name": result.statistic, "description": _STATISTIC_DESCRIPTION[result.statistic],
                              "VarianceGroups": result.settings.get("variance_groups", []),
                              "VarianceGroupsSetting": inference.variance_groups,
                              "Note": variance_note or None,
                              "WelchDegreesOfFreedom": result.settings.get("welch_dof"),
                              "GroupVariances": inference.group_variances,
                              "GroupWeights": result.settings.get("group_weights")},
        "DesignDiagnostics": diagnostics.to_dict() if diagnostics is not None else None,
        "AnalysisMaskVoxels": int(maps.mask.sum()),
        "Inference": {"methods": list(inference.methods), "primary": inference.primary, "alpha": inference.alpha,
                      "n_permutations": n_perm, "random_seed": inference.random_seed,
                      "cluster_forming_p": inference.cluster_forming_p, "two_sided": two_sided,
                      "min_cluster_voxels": inference.min_cluster_voxels, **result.settings},
        "RecipeSHA256": recipe_sha,
        **provenance,
    }
    out: dict[str, Any] = {
        "dof": result.dof, "statistic": result.statistic,
        "variance_groups": "auto" if len(result.settings.get("variance_groups", [])) > 1 else "none",
        "design_warnings": " | ".join(diagnostics.warnings) if diagnostics is not None else "",
    }
    stat_file = path("statmap", ".nii.gz", stat=test.kind)
    save_img(_volume(result.stat, maps.mask, maps.affine), stat_file)
    sources = sorted(f for s in subjects for ses in maps.sessions
                     if dict(analysis.weights).get(ses, 0) != 0 for f in maps.files.get((s, ses), []))
    write_json(stat_file.with_name(stat_file.name.replace(".nii.gz", ".json")),
               {**meta, "Statistic": result.statistic, "Sources": sources})
    z_file = path("statmap", ".nii.gz", stat="z")
    save_img(_volume(result.z, maps.mask, maps.affine), z_file)
    write_json(z_file.with_name(z_file.name.replace(".nii.gz", ".json")),
               {**meta, "Statistic": "z", "Description": _z_description(result)})
    logp_files = {}
    for method, values in result.logp.items():
        f = path("statmap", ".nii.gz", stat=_LOGP_STAT[method], inference=bids_label(method))
        save_img(_volume(values, maps.mask, maps.affine), f)
        write_json(f.with_name(f.name.replace(".nii.gz", ".json")),
                   {**meta, "Statistic": _LOGP_STAT[method], "InferenceMethod": method,
                    "Description": (_LOGP_DESCRIPTION[method] if not (method == "fdr" and
                                    result.settings.get("fdr_p") == "permutation")
                                    else "-log10 Benjamini-Hochberg q of the voxel-wise permutation p "
                                         "(over the analysis mask).")})
        logp_files[method] = f
    out.update(stat_map=rel(stat_file), z_map=rel(z_file))
    primary = inference.primary
    if primary not in result.logp:
        return out
    out["logp_fwe_map"] = rel(logp_files[primary])
    significant = result.logp[primary] > -math.log10(inference.alpha)
    thresholded = np.where(significant, result.stat, 0.0)
    alpha = _alpha_label(inference.alpha)
    thr_file = path("statmap", ".nii.gz", stat=test.kind, inference=bids_label(primary), alpha=alpha)
    save_img(_volume(thresholded, maps.mask, maps.affine), thr_file)
    write_json(thr_file.with_name(thr_file.name.replace(".nii.gz", ".json")),
               {**meta, "Statistic": test.kind, "InferenceMethod": primary,
                "Description": f"{test.kind} where the {primary} p < {inference.alpha}; 0 elsewhere."})
    out["thresholded_map"] = rel(thr_file)
    volume = np.zeros(maps.mask.shape)
    volume[maps.mask] = thresholded
    logp_volume = np.zeros(maps.mask.shape)
    logp_volume[maps.mask] = result.logp[primary]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = make_cluster_table((volume, maps.affine), 0.0, logp_fwe=logp_volume, two_sided=two_sided,
                                   min_size_voxels=inference.min_cluster_voxels, atlas_lookup=lookup)
    table_file = path("clusters", ".tsv", inference=bids_label(primary), alpha=alpha)
    write_tsv(table_file, table.round(6))
    write_json(table_file.with_name(table_file.name.replace(".tsv", ".json")), {
        **meta, "InferenceMethod": primary,
        "Description": f"Clusters (6-connectivity) of the voxels significant by {primary} at p < {inference.alpha}; "
                       "p_fwe is the smallest corrected p in the cluster; peak_x/y/z and com_x/y/z in mm (MNI).",
        "AtlasLookup": "Julich-Brain v3.1 MPM" if lookup is not None else None,
    })
    out.update(cluster_table=rel(table_file), n_significant_clusters=int(len(table)))
    # -log10 round trip: 0.219 would print as 0.21900000000000003
    out["min_p"] = float(f"{10.0 ** -np.max(result.logp[primary]):.10g}") if result.logp[primary].size else np.nan
    out["peak_stat"] = float(result.stat[np.argmax(np.abs(result.stat))]) if result.stat.size else np.nan
    if len(table):
        _write_cluster_values(path, table, volume, two_sided, maps, subjects, group_of, meta, measure, test,
                              primary, alpha)
    return out


def write_region_outputs(
    group_dir: Path, output_dir: Path, recipe: Recipe, measure: MeasureMap, analysis: SessionAnalysis,
    test: GroupTest, atlas: Any, maps: SessionMaps, data: NDArray[np.float32], subjects: list[str],
    group_of: pd.Series, design: pd.DataFrame, variance_labels: Sequence[str] | None, n_perm: int,
    recipe_sha: str, provenance: Mapping[str, Any], permutations: NDArray | None = None, scheme: str = "auto",
) -> dict[str, Any]:
    """One test's region table (``..._regions.tsv`` and its sidecar) and its ``results.tsv`` values."""
    from fcflow.derivatives import bids_name
    from fcflow.regions import compute_region_values, run_region_inference, significant_regions

    inference, settings = recipe.inference, recipe.regions
    values, regions = compute_region_values(data, maps.mask, atlas, min_voxels=settings.min_voxels)
    if regions.empty:
        LOGGER.warning("%s ses %s: %s: region level skipped: no region of %s has %d voxels (min_voxels) in the "
                       "analysis mask of %d voxels.", measure.label, analysis.expression, test.expression,
                       atlas.source, settings.min_voxels, int(maps.mask.sum()))
        return {}
    table = run_region_inference(
        values, regions, design, test, n_permutations=n_perm, two_sided=inference.two_sided,
        random_seed=inference.random_seed, variance_groups=variance_labels, group_variances=inference.group_variances,
        permutations=permutations, scheme=scheme,
    )  # fmt: skip
    ents = {"ses": analysis.label, "task": measure.task, "space": recipe.space, "res": res_label(maps, output_dir),
            "seed": measure.seed, "contrast": test.name, "desc": measure.desc}
    table_file = measure_dir(group_dir, measure) / bids_name(ents, "regions", ".tsv")
    # p to 6 significant digits, not decimals: a region's p of 1e-9 must not print as 0
    p_columns = ["p_uncorrected", "p_fwe", "q_fdr"]
    write_tsv(table_file, table.round({"effect": 8, "stat": 8}).assign(
        **{c: [float(f"{p:.6g}") for p in table[c]] for c in p_columns}))
    two_sided = inference.two_sided and test.kind == "t"
    declared = ("" if "*" in settings.areas else
                f" (the regions matching {', '.join(map(repr, settings.areas))} with at least "
                f"{settings.min_voxels} voxels in the analysis mask)")
    write_json(table_file.with_name(table_file.name.replace(".tsv", ".json")), {
        "Task": measure.task, "Measure": measure.measure, "Seed": measure.seed,
        "FirstLevelMaps": {"desc": measure.desc, "stat": measure.stat},
        "SessionContrast": {"expression": analysis.expression, "weights": dict(analysis.weights)},
        "GroupTest": {"name": test.name, "expression": test.expression, "type": test.kind},
        "Subjects": [{"participant_id": f"sub-{s}", "group": str(g)} for s, g in zip(subjects, group_of)],
        "Regions": {"source": atlas.source, "areas": list(settings.areas),
                    "declared_regions": atlas.regions["region"].astype(str).tolist(),
                    "min_voxels": settings.min_voxels, "n_regions": len(regions), "correction": settings.correction},
        "Family": (f"The {len(regions)} regions of this test are their own family, declared beside the voxel-wise "
                   f"one{declared}: p_fwe is corrected over these regions only, not over voxels, other tests or "
                   "the voxel-wise family. Report both families; do not pick the better of the two."),
        "Description": (
            f"Per region: the mean of each subject's first-level {measure.desc} ({measure.stat}) map over the "
            "region's voxels in the analysis mask (a mean of voxel-wise values, not the connectivity of the "
            "region's mean time series), tested with the voxel level's design and statistic. effect: the OLS "
            "contrast estimate (n/a for F); stat: the statistic; p_uncorrected: its parametric p"
            f"{' (two-sided)' if two_sided else ''}; p_fwe: max-statistic permutation p over the regions "
            f"({n_perm} permutations, random seed {inference.random_seed}); q_fdr: Benjamini-Hochberg q of "
            "p_uncorrected over the regions."),
        "RecipeSHA256": recipe_sha,
        **provenance,
    })  # fmt: skip
    n_significant = len(significant_regions(table, inference.alpha, settings.correction))
    return {"region_table": str(table_file.relative_to(output_dir)), "n_significant_regions": n_significant}


def write_family_outputs(
    group_dir: Path, output_dir: Path, recipe: Recipe, measure: MeasureMap, analysis: SessionAnalysis,
    tests: Sequence[GroupTest], results: Sequence[InferenceResult], maps: SessionMaps, where: str,
) -> dict[str, dict[str, Any]]:
    """-log10 p corrected over voxels and over every group test of one map and session analysis.

    Writes ``stat-logpFamilyFWE_inference-<m>`` maps beside each test's own ``stat-logpFWE`` maps
    and returns, per test name, the primary inference's family-wise map and smallest p
    (``logp_family_map``, ``min_p_family`` in ``results.tsv``). Tests whose permutations differ
    (e.g. a one-group mean, sign-flipped, beside permuted group differences) cannot share one
    null: a warning, and no family-wise maps.
    """
    from fcflow.derivatives import bids_label, bids_name
    from fcflow.permutation import combine_family_wise

    try:
        family = combine_family_wise([r.permutation for r in results])
    except ValueError as exc:
        LOGGER.warning("%s: no family-wise correction over %d tests: %s", where, len(tests), exc)
        return {}
    inference = recipe.inference
    ents = {"ses": analysis.label, "task": measure.task, "space": recipe.space, "res": res_label(maps, output_dir),
            "seed": measure.seed, "desc": measure.desc}
    names = [t.name for t in tests]
    out: dict[str, dict[str, Any]] = {}
    for test, logps in zip(tests, family):
        entry: dict[str, Any] = {}
        for method, values in logps.items():
            f = measure_dir(group_dir, measure) / bids_name(
                {**ents, "contrast": test.name, "stat": "logpFamilyFWE", "inference": bids_label(method)},
                "statmap", ".nii.gz")
            save_img(_volume(values, maps.mask, maps.affine), f)
            write_json(f.with_name(f.name.replace(".nii.gz", ".json")), {
                "Task": measure.task, "Measure": measure.measure, "Seed": measure.seed,
                "SessionContrast": analysis.expression, "GroupTest": test.name, "InferenceMethod": method,
                "Family": names, "Statistic": "logpFamilyFWE",
                "Description": f"-log10 p of {method}, family-wise corrected over the voxels and over the {len(names)} "
                               f"group tests {names} of this map and session contrast: every permutation's largest "
                               "statistic over all of them (same permutations, all on z; Winkler et al. 2016, "
                               "PALM -corrcon).",
            })  # fmt: skip
            if method == inference.primary:
                entry["logp_family_map"] = str(f.relative_to(output_dir))
                entry["min_p_family"] = float(f"{10.0 ** -np.max(values):.10g}") if values.size else np.nan
        out[test.name] = entry
    return out


_ANALYSIS_MODEL = {
    "repeated": "Repeated measures (fcflow.repeated): one row per subject and non-reference session, the "
                "subject's map minus its reference-session map; cell means of group x session; subjects with a "
                "missing non-reference session kept with the differences they have. Subjects are exchangeability "
                "blocks: whole subjects are sign-flipped (with variance groups, and for the session main effect) "
                "or permuted between groups among subjects with the same sessions (Winkler et al. 2015, "
                "NeuroImage 123:253). No sphericity is assumed.",
    "mean": "Each subject's mean map over all sessions (subjects with every session), one row per subject: "
            "the group main effect of the repeated-measures design.",
}


_STATISTIC_DESCRIPTION = {
    "t": "t of the OLS fit, one residual variance for all subjects.",
    "F": "F of the OLS fit, one residual variance for all subjects.",
    "wls-t": "t of the weighted least-squares fit with one variance ratio per variance group for the whole map "
             "(the median over voxels of each group's share of the residual sum of squares); subjects sign-flipped.",
    "wls-F": "F of the weighted least-squares fit with one variance ratio per variance group for the whole map "
             "(the median over voxels of each group's share of the residual sum of squares); subjects sign-flipped.",
    "v": "Welch-type v (Winkler et al. 2014, NeuroImage 92:381): OLS contrast over its standard error with one "
         "residual variance per variance group; approximate dof per voxel by Welch-Satterthwaite.",
    "G": "Winkler's G (Winkler et al. 2014, NeuroImage 92:381), the F generalised to one residual variance per "
         "variance group (Welch's ANOVA for a one-way design); approximate dof per voxel by Winkler's formula.",
}


def _z_description(result: InferenceResult) -> str:
    if result.dof_map is None:
        return f"z with the same tail probability as {result.statistic} ({result.dof} dof)."
    low, median, high = (result.settings["welch_dof"][k] for k in ("min", "median", "max"))
    return (f"z with the same tail probability as {result.statistic} under its approximate dof at each voxel "
            f"(min {low:.1f}, median {median:.1f}, max {high:.1f}).")


_LOGP_DESCRIPTION = {
    "tfce": "-log10 family-wise corrected p of TFCE (permutation; max-TFCE null).",
    "maxt": "-log10 family-wise corrected p of the voxel statistic (permutation; max-statistic null).",
    "cluster_mass": "-log10 family-wise corrected p of the cluster mass of the voxel's cluster (permutation); "
                    "0 outside clusters.",
    "cluster_size": "-log10 family-wise corrected p of the cluster size of the voxel's cluster (permutation); "
                    "0 outside clusters.",
    "bonferroni": "-log10 Bonferroni-corrected parametric p (over the analysis mask).",
    "fdr": "-log10 Benjamini-Hochberg q of the parametric p (over the analysis mask).",
    "cluster_extent": "-log10 uncorrected parametric p inside clusters of p < cluster_forming_p with at least "
                      "min_cluster_voxels voxels; 0 elsewhere. Not a family-wise error control.",
}


def res_label(maps: SessionMaps, output_dir: Path) -> str | None:
    """The ``res`` entity of the maps (from the first map's name), carried into the group's names."""
    first = next(iter(maps.files.values()))[0]
    return parse_entities(Path(first).name)[0].get("res")


def _write_cluster_values(
    path: Callable[..., Path], table: pd.DataFrame, volume: NDArray[np.float64], two_sided: bool,
    maps: SessionMaps, subjects: list[str], group_of: pd.Series, meta: Mapping[str, Any],
    measure: MeasureMap, test: GroupTest, primary: str, alpha: str,
) -> None:
    """Per significant cluster: each subject's mean map value at every session, TSV and plot."""
    from fcflow.derivatives import bids_label
    from fcflow.plotting import plot_group_session_means

    labels, _ = label_clusters(volume, 0.0, two_sided=two_sided)
    in_mask_labels = labels[maps.mask]
    inverse = np.linalg.inv(maps.affine)
    columns = [maps.subjects.index(s) for s in subjects]
    for _, cluster in table.head(_MAX_CLUSTER_PLOTS).iterrows():
        ijk = np.rint(inverse @ np.array([cluster["peak_x"], cluster["peak_y"], cluster["peak_z"], 1.0]))[:3]
        label = labels[tuple(ijk.astype(int))]
        voxels = in_mask_labels == label
        records = []
        for s, session in enumerate(maps.sessions):
            means = maps.data[s][np.ix_(columns, np.flatnonzero(voxels))].mean(axis=1, dtype=np.float64)
            for k, subject in enumerate(subjects):
                if maps.present[s, columns[k]]:
                    records.append({"participant_id": f"sub-{subject}", "group": str(group_of.iloc[k]),
                                    "session": session, "value": round(float(means[k]), 8)})
        values = pd.DataFrame(records, columns=["participant_id", "group", "session", "value"])
        number = str(int(cluster["cluster_id"]))
        tsv = path("clustermeans", ".tsv", inference=bids_label(primary), alpha=alpha, cluster=number)
        write_tsv(tsv, values)
        where = f"peak ({cluster['peak_x']:.0f}, {cluster['peak_y']:.0f}, {cluster['peak_z']:.0f}) mm"
        if "peak_area" in cluster:
            where += f", {cluster['peak_area']}"
        write_json(tsv.with_name(tsv.name.replace(".tsv", ".json")), {
            **{k: meta[k] for k in ("Task", "Measure", "Seed", "FirstLevelMaps", "SessionContrast", "GroupTest",
                                    "RecipeSHA256")},
            "Cluster": {k: (v.item() if hasattr(v, "item") else v) for k, v in cluster.items()},
            "Description": f"Mean first-level {measure.desc} ({measure.stat}) over the {int(cluster['size_voxels'])} "
                           f"voxels of cluster {number} ({where}) per subject and session.",
        })
        png = tsv.with_name(tsv.name.replace(".tsv", ".png"))
        ylabel = {"z": "Fisher z", "beta": "gPPI beta"}.get(measure.stat, measure.stat)
        plot_group_session_means(
            values, png, sessions=maps.sessions, groups=list(dict.fromkeys(meta["NPerGroup"])),
            title=f"task-{measure.task} {measure.desc}, {test.expression}\ncluster {number}: {where}",
            ylabel=f"mean {ylabel} in cluster",
        )
