"""Power of the three families on simulated studies, and the region family's FWE under the null.

Issue 21, part 3. Each repetition is a fresh study of ``fcflow simulate`` (3 groups of
``--n-per-group``, 4 mm, rest runs of ``--n-volumes-rest`` volumes at TR ``--t-r``; only the
rest runs of the baseline and infusion sessions are simulated, see below) analysed by fcflow:

1. the participant level CLI with the shipped recipe (``workflows/weigner2025_pgacc.toml``,
   24P+aCompCor, censoring, min_dof) but ``smoothing_fwhm = 0``, ``--task rest
   --session-label baseline infusion --no-reports``: unsmoothed Fisher z maps;
2. a smoothed copy of every first-level map, made with the pipeline's own function
   (:func:`fcflow.niftiio.smooth_map` on the run's brain mask at the recipe's 6 mm, what the
   participant level does with ``smoothing_fwhm = 6``; the first study of each run of the script
   runs the participant level at 6 mm for sub-01 and checks the copy against it byte for byte);
3. per copy, the group level's science functions (:func:`fcflow.group.inputs.collect_first_level`,
   ``load_session_maps``, ``compute_change_maps``, ``contrast_mean_fd``, ``build_covariates``,
   :func:`fcflow.stats.make_group_design`, ``build_tests``) on ``infusion - baseline``, with the
   recipe's inference settings (covariates age, sex, mean_fd; variance groups per study group,
   brain-wide weights; two-sided; TFCE, max-T, cluster mass):

   * ``voxel-unsmoothed`` and ``voxel-6mm``: :func:`fcflow.group.inference.run_inference` of
     ``ketamine - placebo``; detected = a voxel at FWE p < alpha inside the planted left-insula
     sphere (``derivatives/ground_truth/..._desc-leftInsula_mask``), per inference method;
   * ``region-unsmoothed`` and ``region-6mm``: :func:`fcflow.regions.run_region_inference` over
     the recipe's declared Julich-Brain areas (``[regions] areas``, min_voxels); detected = a
     ``left ... (Insula)`` area at p_fwe < alpha;
   * in every arm ``lamotrigine_ketamine - placebo`` (nothing planted in either group) is a null
     test: any voxel or region at FWE p < alpha is a false positive.

Scenarios: ``planted-<change>`` (``--insula-rest-change``, the rise of the latent pgACC-insula
coupling in the ketamine group at infusion, with ``--effect-subject-sd``; by default 0.25 in 20
studies, region-level d about 1, the issue's realistic drug effect; 0.7 in 6, d about 2.5-3, the
size tests/test_power_study.py uses; 0.15 in 7, d about 0.6) and ``null`` (``--null-studies``:
both 0, no group differs in connectivity). Every simulated study keeps the drug groups' extra
motion at infusion (1.2 times). Scenarios share their seeds 1..N: a seed is the same subjects and
noise in every scenario, only the ketamine group's insula differs, so the scenarios compare
effect sizes on common noise and the null test of a seed is counted once in the pooled ``all``
rows. Each study records its measured region-level effect: Cohen's d (pooled SD, no covariates)
of ketamine vs placebo in the infusion - baseline change of the mean unsmoothed z over the left
insular Julich area that holds most of the planted sphere (left Area Id6 at 4 mm), and over all
left insular areas as one region. It also records what the recipe's covariates and variance
groups cost the region test (``region-unsmoothed-<variant>`` rows: with or without the
covariates, WLS or OLS).

Only rest, baseline and infusion are simulated (about a third of ``fcflow simulate``'s runs):
the script runs :func:`fcflow.simulate.simulate_study` with the module's task and session lists
narrowed for the call. Every run is seeded by (seed, subject, session, task), so those runs are
byte for byte the runs of the full simulation (checked once: a rest BOLD file, a confounds
file and participants.tsv of ``fcflow simulate --from-definition`` with the same seed had the same
SHA-256). ``simulate_study`` has no option for this; see benchmarks/results/README.md.

Output: ``--out`` (one row per scenario x arm x method x measure: ``scenario, arm, method,
measure, repetitions, count, rate, ci_low, ci_high``, exact Clopper-Pearson 95 %, then the
settings) and ``--out-studies`` (one row per study: seed, measured d, and per arm the statistic
and p of the planted and the null test). Studies are cached under ``--work-dir`` (default
``$TMPDIR/fcflow_power``; the BOLD files are deleted once the participant level is done), so a
rerun resumes. The stored results and the command that made them: ``benchmarks/results/README.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
SESSION_WEIGHTS = (("baseline", -1.0), ("infusion", 1.0))
PLANTED_TEST, NULL_TEST = "ketamine - placebo", "lamotrigine_ketamine - placebo"
ARMS = ("voxel-unsmoothed", "voxel-6mm", "region-unsmoothed", "region-6mm")
VOXEL_METHODS = ("tfce", "maxt", "cluster_mass")


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    low = stats.beta.ppf(0.025, k, n - k + 1) if k else 0.0
    high = stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# Study definition, simulation, participant level
# ----------------------------------------------------------------------------------------------
def write_definition(path: Path, *, n_per_group: int, n_volumes_rest: int, t_r: float, insula_rest_change: float,
                     effect_subject_sd: float) -> Path:
    """A study definition like ``sample_data/sample_study.toml``, with the preset's realistic defaults."""
    path.write_text(
        "[study]\n"
        'name = "fcflow power study"\n'
        'preset = "weigner2025"\n'
        f"n_per_group = {n_per_group}\n"
        "resolution_mm = 4\n"
        f"n_volumes = {n_volumes_rest}\n"
        f"t_r = {t_r!r}\n"
        "seed = 0\n\n"
        "[effects]\n"
        f"insula_rest_change = {insula_rest_change!r}\n"
        f"effect_subject_sd = {effect_subject_sd!r}\n",
        encoding="utf-8",
    )
    return path


def simulate_rest_study(bids_dir: Path, definition_file: Path, seed: int, julich_dir: Path) -> None:
    """``fcflow simulate --from-definition`` restricted to the rest runs at baseline and infusion."""
    import fcflow.simulate.study as study
    from fcflow.simulate import load_simulation_definition, simulate_study

    definition = dataclasses.replace(load_simulation_definition(definition_file), seed=seed, julich_dir=julich_dir)
    saved = study.TASKS, study.SESSIONS
    # simulate_study has no task or session option (see the README): narrow the module's lists
    study.TASKS, study.SESSIONS = ("rest",), ("baseline", "infusion")
    try:
        simulate_study(bids_dir, **definition.as_kwargs())
    finally:
        study.TASKS, study.SESSIONS = saved


def run_participant_level(bids_dir: Path, output_dir: Path, recipe_file: Path, julich_dir: Path, work_dir: Path,
                          participant_label: list[str] | None = None) -> None:
    command = [str(Path(sys.executable).with_name("fcflow")), str(bids_dir), str(output_dir), "participant",
               "--recipe", str(recipe_file), "--julich-dir", str(julich_dir), "--task", "rest",
               "--session-label", "baseline", "infusion", "--no-reports", "--plugin", "Linear",
               "--work-dir", str(work_dir), "-q"]
    if participant_label:
        command += ["--participant-label", *participant_label]
    subprocess.run(command, check=True)


def write_smoothed_copy(output_dir: Path, fmriprep_dir: Path, smoothed_dir: Path, smoothing_fwhm: float) -> None:
    """Every first-level map of ``output_dir`` smoothed as the participant level would, into ``smoothed_dir``.

    The participant level smooths each map over its run's brain mask (the fMRIPrep
    ``desc-brain_mask``) with :func:`fcflow.niftiio.smooth_map` and writes it as float32; the QC
    tables are copied as they are.
    """
    import nibabel as nib

    from fcflow.io import save_img
    from fcflow.niftiio import smooth_map, unmask

    for qc in output_dir.glob("sub-*/sub-*_desc-runs_qc.tsv"):
        (smoothed_dir / qc.relative_to(output_dir)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(qc, smoothed_dir / qc.relative_to(output_dir))
    for map_file in sorted(output_dir.glob("sub-*/ses-*/func/*_statmap.nii.gz")):
        stem = map_file.name.split("_space-")[0]  # sub-XX_ses-YY_task-ZZ
        masks = sorted(fmriprep_dir.glob(f"{map_file.parent.relative_to(output_dir)}/{stem}_*desc-brain_mask.nii.gz"))
        mask_img = nib.load(masks[0])
        brain = np.asarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0
        img = nib.load(map_file)
        values = np.asarray(img.dataobj, dtype=np.float32)[brain]
        smoothed = smooth_map(values, brain, mask_img.affine, smoothing_fwhm)
        target = smoothed_dir / map_file.relative_to(output_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        save_img(unmask(smoothed.astype(np.float32), brain, mask_img.affine), target)


def check_smoothed_copy(study_dir: Path, julich_dir: Path, recipe_file: Path, smoothing_fwhm: float) -> int:
    """Run the participant level with ``smoothing_fwhm`` for sub-01 and compare its maps with the copy's bytes."""
    bids, check_dir = study_dir / "bids", study_dir / "check_smoothed"
    text = recipe_file.read_text(encoding="utf-8").replace("smoothing_fwhm = 0", f"smoothing_fwhm = {smoothing_fwhm!r}")
    smoothed_recipe = study_dir / "recipe_smoothed.toml"
    smoothed_recipe.write_text(text, encoding="utf-8")
    run_participant_level(bids, check_dir / "out", smoothed_recipe, julich_dir, check_dir / "work", ["01"])
    maps = sorted((check_dir / "out").glob("sub-*/ses-*/func/*_statmap.nii.gz"))
    differ = [m.name for m in maps
              if m.read_bytes() != (study_dir / "out_6mm" / m.relative_to(check_dir / "out")).read_bytes()]
    if not maps or differ:
        raise RuntimeError(f"The smoothed copy differs from the participant level's smoothed maps: {differ or 'none'}")
    shutil.rmtree(check_dir)
    return len(maps)


def prepare_study(study_dir: Path, definition_file: Path, seed: int, julich_dir: Path, recipe_file: Path,
                  smoothing_fwhm: float, check: bool = False) -> None:
    """Simulate, run the participant level and smooth, unless an earlier run of the script did."""
    done = study_dir / "prepared.json"
    if done.is_file() and json.loads(done.read_text())["definition"] == definition_file.read_text():
        return
    if study_dir.exists():
        shutil.rmtree(study_dir)
    study_dir.mkdir(parents=True)
    bids = study_dir / "bids"
    simulate_rest_study(bids, definition_file, seed, julich_dir)
    run_participant_level(bids, study_dir / "out", recipe_file, julich_dir, study_dir / "work")
    write_smoothed_copy(study_dir / "out", bids / "derivatives" / "fmriprep", study_dir / "out_6mm", smoothing_fwhm)
    checked = check_smoothed_copy(study_dir, julich_dir, recipe_file, smoothing_fwhm) if check else 0
    if check:
        print(f"{study_dir.name}: the {checked} maps of sub-01 smoothed by the participant level "
              f"(smoothing_fwhm = {smoothing_fwhm:g}) equal the copy byte for byte", file=sys.stderr, flush=True)
    # keep what the group level reads (maps, QC tables, participants.tsv, ground truth): ~40 MB, not ~2 GB
    shutil.rmtree(study_dir / "work")
    for bold in (bids / "derivatives" / "fmriprep").glob("sub-*/ses-*/func/*_desc-preproc_bold.nii.gz"):
        bold.unlink()
    done.write_text(json.dumps({"definition": definition_file.read_text(), "seed": seed,
                                "smoothing_checked_maps": checked}))


# ----------------------------------------------------------------------------------------------
# Group level of one study
# ----------------------------------------------------------------------------------------------
class GroupInputs:
    """One study's change maps, design and tests, built by the group level's own functions."""

    def __init__(self, output_dir: Path, bids_dir: Path, recipe) -> None:
        from fcflow.bids import read_participants
        from fcflow.group.inference import build_covariates, build_tests, compute_change_maps, contrast_mean_fd
        from fcflow.group.inputs import collect_first_level, load_session_maps, select_measure_maps
        from fcflow.stats import make_group_design

        measure = next(m for m in select_measure_maps(recipe) if m.task == "rest")
        runs = collect_first_level(output_dir, measure, space=recipe.space)
        sessions = tuple(s for s, _ in SESSION_WEIGHTS)
        self.maps = load_session_maps(output_dir, runs, sessions)
        self.data, self.subjects, self.dropped = compute_change_maps(self.maps, dict(SESSION_WEIGHTS))
        participants = read_participants(bids_dir, recipe.group_column, recipe.groups)
        self.group_of = [str(g) for g in participants.loc[self.subjects, recipe.group_column]]
        fd = contrast_mean_fd(self.maps, SESSION_WEIGHTS, self.subjects)
        covariates = build_covariates(participants, self.subjects, recipe.inference.covariates, fd)
        self.design = make_group_design(self.group_of, recipe.groups, covariates)
        self.tests = {t.expression: t for t in build_tests(recipe, self.design.columns)}
        self.n_excluded_runs = int(runs["excluded"].sum())
        # the recipe's variance_groups = "auto": one variance group per study group (every group here has
        # 10 subjects and 3 covariates, far above the group level's fallback threshold)
        self.variance_groups = self.group_of if recipe.inference.variance_groups == "auto" else None


def cohens_d(values, group_of, a: str = "ketamine", b: str = "placebo") -> float:
    group_of = np.asarray(group_of)
    x, y = values[group_of == a], values[group_of == b]
    pooled = np.sqrt(((len(x) - 1) * x.var(ddof=1) + (len(y) - 1) * y.var(ddof=1)) / (len(x) + len(y) - 2))
    return float((x.mean() - y.mean()) / pooled)


def analyse_study(study_dir: Path, recipe, atlas_cache: dict, *, julich_dir: Path, n_permutations: int,
                  n_region_permutations: int, alpha: float) -> dict:
    import nibabel as nib

    from fcflow.group.inference import run_inference
    from fcflow.regions import (
        RegionAtlas,
        compute_region_values,
        load_julich_regions,
        run_region_inference,
        select_regions,
    )

    inference = recipe.inference
    bids = study_dir / "bids"
    truth_file = next((bids / "derivatives" / "ground_truth").glob("*desc-leftInsula_mask.nii.gz"))
    row: dict = {}
    for smoothing, output_dir in (("unsmoothed", study_dir / "out"), ("6mm", study_dir / "out_6mm")):
        group = GroupInputs(output_dir, bids, recipe)
        maps = group.maps
        grid = (maps.mask.shape, maps.affine.round(6).tobytes())
        if grid not in atlas_cache:
            atlas_cache[grid] = select_regions(load_julich_regions(julich_dir, maps.mask.shape, maps.affine),
                                               recipe.regions.areas)
        atlas = atlas_cache[grid]
        truth_img = nib.load(truth_file)
        planted = (np.asarray(truth_img.dataobj) > 0)[maps.mask]
        row["n_subjects"], row["n_excluded_runs"] = len(group.subjects), group.n_excluded_runs
        row["n_planted_voxels"] = int(planted.sum())
        if smoothing == "unsmoothed":
            # measured effect: the left insula as one region (all its Julich areas), and the area holding most
            # of the planted sphere
            left_insula = atlas.regions[(atlas.regions["hemisphere"] == "left")
                                        & atlas.regions["region"].str.endswith("(Insula)")]
            union = RegionAtlas(np.where(np.isin(atlas.labels, left_insula["index"]), 1, 0).astype(np.int32),
                                pd.DataFrame({"index": [1], "region": ["left insula"], "hemisphere": ["left"]}),
                                atlas.source)
            union_values, _ = compute_region_values(group.data, maps.mask, union, min_voxels=1)
            row["d_left_insula"] = cohens_d(union_values[:, 0], group.group_of)
            in_mask = atlas.labels[maps.mask]
            overlap = {r: int(np.count_nonzero(planted & (in_mask == i)))
                       for r, i in zip(left_insula["region"], left_insula["index"])}
            row["planted_area"] = max(overlap, key=overlap.get)
        values, regions = compute_region_values(group.data, maps.mask, atlas, min_voxels=recipe.regions.min_voxels)
        if smoothing == "unsmoothed":
            column = regions["region"].tolist().index(row["planted_area"])
            row["d_planted_area"] = cohens_d(values[:, column], group.group_of)
        row["n_regions"] = len(regions)
        for label, expression in (("planted", PLANTED_TEST), ("null", NULL_TEST)):
            test = group.tests[expression]
            result = run_inference(
                group.data, group.design, test, maps.mask, methods=inference.methods, n_permutations=n_permutations,
                two_sided=inference.two_sided, random_seed=inference.random_seed,
                cluster_forming_p=inference.cluster_forming_p, min_cluster_voxels=inference.min_cluster_voxels,
                variance_groups=group.variance_groups, fdr_p=inference.fdr_p, zstat=True,
                group_variances=inference.group_variances,
            )  # fmt: skip
            arm = f"voxel-{smoothing}"
            for method in VOXEL_METHODS:
                p = 10.0 ** -result.logp[method]
                if label == "planted":
                    row[f"{arm}_{method}_min_p_in_planted"] = float(p[planted].min())
                    row[f"{arm}_{method}_min_p_outside"] = float(p[~planted].min())
                    row[f"{arm}_{method}_n_in_planted"] = int(np.count_nonzero(p[planted] < alpha))
                else:
                    row[f"{arm}_{method}_null_min_p"] = float(p.min())
            if label == "planted":
                row[f"{arm}_max_stat_in_planted"] = float(result.stat[planted].max())
            table = run_region_inference(
                values, regions, group.design, test, n_permutations=n_region_permutations,
                two_sided=inference.two_sided, random_seed=inference.random_seed,
                variance_groups=group.variance_groups, group_variances=inference.group_variances,
            )  # fmt: skip
            arm = f"region-{smoothing}"
            if label == "planted":
                insula = table[(table["hemisphere"] == "left") & table["region"].str.endswith("(Insula)")]
                best = insula.loc[insula["p_fwe"].idxmin()]
                row[f"{arm}_best_left_insula_area"] = best["region"]
                row[f"{arm}_best_stat"] = float(best["stat"])
                row[f"{arm}_min_p_fwe_left_insula"] = float(best["p_fwe"])
                row[f"{arm}_n_left_insula_significant"] = int((insula["p_fwe"] < alpha).sum())
                planted_area = table[table["region"] == row["planted_area"]].iloc[0]
                row[f"{arm}_planted_area_stat"] = float(planted_area["stat"])
                row[f"{arm}_planted_area_p_fwe"] = float(planted_area["p_fwe"])
                other = table.drop(index=insula.index)
                row[f"{arm}_min_p_fwe_other_regions"] = float(other["p_fwe"].min())
            else:
                row[f"{arm}_null_min_p_fwe"] = float(table["p_fwe"].min())
                row[f"{arm}_null_region"] = table.loc[table["p_fwe"].idxmin(), "region"]
    return row


def analyse_region_variants(study_dir: Path, recipe, atlas_cache: dict, *, julich_dir: Path,
                            n_region_permutations: int) -> dict:
    """What the recipe's covariates and variance groups cost: the region test of ``ketamine - placebo``
    (unsmoothed maps) with and without the covariates, with (WLS) and without (OLS) variance groups."""
    from fcflow.group.inference import GroupTest
    from fcflow.regions import compute_region_values, load_julich_regions, run_region_inference, select_regions
    from fcflow.stats import make_group_design

    group = GroupInputs(study_dir / "out", study_dir / "bids", recipe)
    maps = group.maps
    grid = (maps.mask.shape, maps.affine.round(6).tobytes())
    if grid not in atlas_cache:
        atlas_cache[grid] = select_regions(load_julich_regions(julich_dir, maps.mask.shape, maps.affine),
                                           recipe.regions.areas)
    values, regions = compute_region_values(group.data, maps.mask, atlas_cache[grid],
                                            min_voxels=recipe.regions.min_voxels)
    no_covariates = make_group_design(group.group_of, recipe.groups)
    fd = group.design["mean_fd"].to_numpy() if "mean_fd" in group.design else np.zeros(len(group.group_of))
    labels = np.asarray(group.group_of)
    fd_difference = fd[labels == "ketamine"].mean() - fd[labels == "placebo"].mean()
    row = {"mean_fd_change_ketamine_minus_placebo": float(fd_difference)}
    for name, design, variance_groups in (("covariates_wls", group.design, group.variance_groups),
                                          ("covariates_ols", group.design, None),
                                          ("nocovariates_wls", no_covariates, group.variance_groups),
                                          ("nocovariates_ols", no_covariates, None)):
        weights = {"ketamine": 1.0, "placebo": -1.0}
        test = GroupTest(PLANTED_TEST, PLANTED_TEST, "t", np.array([[weights.get(c, 0.0) for c in design.columns]]))
        table = run_region_inference(
            values, regions, design, test, n_permutations=n_region_permutations,
            two_sided=recipe.inference.two_sided, random_seed=recipe.inference.random_seed,
            variance_groups=variance_groups, group_variances=recipe.inference.group_variances,
        )  # fmt: skip
        insula = table[(table["hemisphere"] == "left") & table["region"].str.endswith("(Insula)")]
        row[f"variant-{name}_min_p_fwe_left_insula"] = float(insula["p_fwe"].min())
        row[f"variant-{name}_max_stat_left_insula"] = float(insula["stat"].max())
    return row


# ----------------------------------------------------------------------------------------------
# Rates
# ----------------------------------------------------------------------------------------------
def summarise(studies: pd.DataFrame, alpha: float, settings: dict) -> pd.DataFrame:
    """Rates with exact 95 % CIs per scenario x arm x method x measure.

    ``all`` pools the null test (``lamotrigine_ketamine - placebo``) over the studies, once per seed:
    scenarios share their seeds (the same subjects and noise, only the ketamine group's insula
    differs), so the placebo and lamotrigine_ketamine data of a seed are the same in every scenario.
    """
    rows = []

    def add(scenario: str, block: pd.DataFrame, arm: str, method: str, measure: str, hits: pd.Series) -> None:
        n, k = len(hits), int(hits.sum())
        low, high = _clopper_pearson(k, n)
        # the pooled null rows mix scenarios: no single planted effect or d
        pooled = scenario == "all"
        d_area, d_insula = ((block["d_planted_area"], block["d_left_insula"]) if not pooled
                            else (pd.Series([np.nan]),) * 2)
        rows.append({"scenario": scenario, "arm": arm, "method": method, "measure": measure, "repetitions": n,
                     "count": k, "rate": round(k / n, 4), "ci_low": round(low, 4), "ci_high": round(high, 4),
                     "insula_rest_change": np.nan if pooled else block["insula_rest_change"].iloc[0],
                     "effect_subject_sd": np.nan if pooled else block["effect_subject_sd"].iloc[0],
                     "median_d_planted_area": round(float(d_area.median()), 3),
                     "min_d_planted_area": round(float(d_area.min()), 3),
                     "max_d_planted_area": round(float(d_area.max()), 3),
                     "median_d_left_insula": round(float(d_insula.median()), 3), **settings})

    blocks = list(studies.groupby("scenario", sort=False)) + [("all", studies.drop_duplicates("seed"))]
    for scenario, block in blocks:
        planted = not scenario.startswith("null")
        for smoothing in ("unsmoothed", "6mm"):
            arm = f"voxel-{smoothing}"
            for method in VOXEL_METHODS:
                if scenario != "all":
                    if planted:
                        add(scenario, block, arm, method, "detected_in_planted",
                            block[f"{arm}_{method}_min_p_in_planted"] < alpha)
                    add(scenario, block, arm, method, "planted_test_any_outside_planted",
                        block[f"{arm}_{method}_min_p_outside"] < alpha)
                add(scenario, block, arm, method, "null_test_any", block[f"{arm}_{method}_null_min_p"] < alpha)
            arm = f"region-{smoothing}"
            if scenario != "all":
                if planted:
                    add(scenario, block, arm, "maxt", "detected_left_insula",
                        block[f"{arm}_min_p_fwe_left_insula"] < alpha)
                    add(scenario, block, arm, "maxt", "detected_planted_area",
                        block[f"{arm}_planted_area_p_fwe"] < alpha)
                else:
                    add(scenario, block, arm, "maxt", "planted_test_any",
                        np.minimum(block[f"{arm}_min_p_fwe_left_insula"],
                                   block[f"{arm}_min_p_fwe_other_regions"]) < alpha)
                add(scenario, block, arm, "maxt", "planted_test_any_other_region",
                    block[f"{arm}_min_p_fwe_other_regions"] < alpha)
            add(scenario, block, arm, "maxt", "null_test_any", block[f"{arm}_null_min_p_fwe"] < alpha)
        if scenario != "all" and planted:
            for name in ("covariates_wls", "covariates_ols", "nocovariates_wls", "nocovariates_ols"):
                add(scenario, block, f"region-unsmoothed-{name}", "maxt", "detected_left_insula",
                    block[f"variant-{name}_min_p_fwe_left_insula"] < alpha)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--insula-rest-change", type=float, nargs="+", default=[0.25, 0.7, 0.15],
                        help="planted scenarios: the ketamine group's rise in pgACC-insula coupling at infusion")
    parser.add_argument("--studies", type=int, nargs="+", default=[20, 6, 7],
                        help="studies per planted scenario (seeds 1..N)")
    parser.add_argument("--effect-subject-sd", type=float, default=0.1)
    parser.add_argument("--null-studies", type=int, default=0,
                        help="null studies, insula_rest_change = effect_subject_sd = 0 (seeds 1001..1000+N)")
    parser.add_argument("--n-per-group", type=int, default=10)
    parser.add_argument("--n-volumes-rest", type=int, default=180)
    parser.add_argument("--t-r", type=float, default=2.0)
    parser.add_argument("--smoothing-fwhm", type=float, default=None,
                        help="mm of the smoothed arm (default: the shipped recipe's smoothing_fwhm)")
    parser.add_argument("--n-permutations", type=int, default=500, help="voxel level")
    parser.add_argument("--n-region-permutations", type=int, default=None,
                        help="region level (default: the recipe's n_permutations)")
    parser.add_argument("--alpha", type=float, default=None, help="default: the recipe's alpha")
    parser.add_argument("--julich-dir", type=Path, default=os.environ.get("FCFLOW_JULICH_DIR"))
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "fcflow_power")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--out-studies", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.julich_dir is None:
        parser.error("'--julich-dir' must be the Julich-Brain v3.1 folder (or set FCFLOW_JULICH_DIR). Got none.")
    sys.path.insert(0, str(ROOT))
    from fcflow.config import load_recipe
    from fcflow.io import write_tsv

    shipped = ROOT / "workflows" / "weigner2025_pgacc.toml"
    base = load_recipe(shipped)
    smoothing = args.smoothing_fwhm if args.smoothing_fwhm is not None else base.denoising.smoothing_fwhm
    alpha = args.alpha if args.alpha is not None else base.inference.alpha
    n_region_perm = args.n_region_permutations or base.inference.n_permutations
    args.work_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = args.work_dir / "recipe_unsmoothed.toml"
    text = shipped.read_text(encoding="utf-8")
    line = next(ln for ln in text.splitlines() if ln.startswith("smoothing_fwhm"))
    recipe_file.write_text(text.replace(line, "smoothing_fwhm = 0"), encoding="utf-8")
    recipe = load_recipe(recipe_file)
    assert recipe.denoising.smoothing_fwhm in (None, 0)

    if len(args.studies) != len(args.insula_rest_change):
        parser.error(f"'--studies' must give one count per '--insula-rest-change'. Got {args.studies} for "
                     f"{args.insula_rest_change}.")
    scenarios = [(f"planted-{change:g}", change, args.effect_subject_sd, range(1, n + 1))
                 for change, n in zip(args.insula_rest_change, args.studies)]
    scenarios.append(("null", 0.0, 0.0, range(1001, 1001 + args.null_studies)))
    queues = []
    for name, change, sd, seeds in scenarios:
        label = f"change{change:g}_sd{sd:g}_n{args.n_per_group}_vol{args.n_volumes_rest}_tr{args.t_r:g}"
        definition = write_definition(args.work_dir / f"{label}.toml", n_per_group=args.n_per_group,
                                      n_volumes_rest=args.n_volumes_rest, t_r=args.t_r, insula_rest_change=change,
                                      effect_subject_sd=sd)
        queues.append([(name, change, sd, definition, args.work_dir / label / f"seed-{seed}", seed) for seed in seeds])
    # the scenarios take turns, so a run stopped early has some of each
    order = [queue[i] for i in range(max(map(len, queues))) for queue in queues if i < len(queue)]

    settings = {"n_per_group": args.n_per_group, "resolution_mm": 4, "n_volumes_rest": args.n_volumes_rest,
                "t_r": args.t_r, "smoothing_fwhm": smoothing, "n_permutations": args.n_permutations,
                "n_region_permutations": n_region_perm, "alpha": alpha}
    rows, atlas_cache, started = [], {}, time.perf_counter()
    for k, (name, change, sd, definition, study_dir, seed) in enumerate(order, start=1):
        t0 = time.perf_counter()
        prepare_study(study_dir, definition, seed, args.julich_dir, recipe_file, smoothing, check=k == 1)
        t1 = time.perf_counter()
        cache = study_dir / "analysis.json"
        key = {**settings, "scenario": name}
        stored = json.loads(cache.read_text()) if cache.is_file() else {}
        if stored.get("settings") == key:
            row, times = stored["row"], stored.get("times", {})
        else:
            row = analyse_study(study_dir, recipe, atlas_cache, julich_dir=args.julich_dir,
                                n_permutations=args.n_permutations, n_region_permutations=n_region_perm, alpha=alpha)
            times = {"prepare_s": round(t1 - t0, 1), "analysis_s": round(time.perf_counter() - t1, 1)}
        if "variant-covariates_wls_min_p_fwe_left_insula" not in row:
            row.update(analyse_region_variants(study_dir, recipe, atlas_cache, julich_dir=args.julich_dir,
                                               n_region_permutations=n_region_perm))
        cache.write_text(json.dumps({"settings": key, "row": row, "times": times}))
        t2 = time.perf_counter()
        # times of the run that computed the study (n/a for a study cached by an earlier version of this script)
        rows.append({"scenario": name, "seed": seed, "insula_rest_change": change, "effect_subject_sd": sd, **row,
                     "prepare_s": times.get("prepare_s", np.nan), "analysis_s": times.get("analysis_s", np.nan)})
        print(f"[{k}/{len(order)}] {name} seed {seed}: d = {row['d_left_insula']:.2f} (left insula), "
              f"{row['d_planted_area']:.2f} ({row['planted_area']}); region p_fwe "
              f"{row['region-unsmoothed_min_p_fwe_left_insula']:.4f} / 6 mm "
              f"{row['region-6mm_min_p_fwe_left_insula']:.4f}; TFCE in planted "
              f"{row['voxel-unsmoothed_tfce_min_p_in_planted']:.4f} / 6 mm "
              f"{row['voxel-6mm_tfce_min_p_in_planted']:.4f}; "
              f"null test region {row['region-unsmoothed_null_min_p_fwe']:.3f}; "
              f"study {t1 - t0:.0f} s, analysis {t2 - t1:.0f} s, total {(time.perf_counter() - started) / 60:.1f} min",
              file=sys.stderr, flush=True)
        studies = pd.DataFrame(rows)
        write_tsv(args.out_studies, studies)
        write_tsv(args.out, summarise(studies, alpha, settings))
    summary = summarise(pd.DataFrame(rows), alpha, {})
    print(summary[["scenario", "arm", "method", "measure", "repetitions", "count", "rate", "ci_low", "ci_high"]]
          .to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
