"""Family-wise false-positive rate of fcflow's permutation inference, on pure noise or a null study.

Scenarios (``--scenario NAME``, repeatable, or ``all``): each repetition draws a fresh, independent
data set of pure-noise smooth Gaussian random fields in a brain-like ellipsoid mask, one per
subject, scaled by its group's standard deviation, and tests ``ketamine - placebo`` (cell-means
design, groups placebo / ketamine / lamotrigine_ketamine) with
``fcflow.permutation.permutation_test`` (voxel max-T, cluster mass, cluster size, TFCE):

==========================  ==============  ===========================  ==========================
scenario                    n per group     SD per group                 covariates
==========================  ==============  ===========================  ==========================
balanced                    6 / 6 / 6       1 / 1 / 1                    none
heteroscedastic             6 / 6 / 6       1 / 1.5 / 1                  none
heteroscedastic-unbalanced  10 / 4 / 6      1 / 2.5 / 1                  none
covariates                  6 / 6 / 6       1 / 1 / 1                    age, sex, mean_fd (higher
                                                                         in the drug groups)
==========================  ==============  ===========================  ==========================

Repeated-measures scenarios (:class:`RepeatedScenario`): three sessions per subject (baseline,
infusion, 24h), a random subject intercept shared by its sessions, session noise SDs 1 / 1.5 / 1.2
(non-sphericity), groups 8 / 6 / 7 with SDs 1 / 1.5 / 1, 15 % of subjects without one non-baseline
session, analysed as the group level does (:mod:`fcflow.repeated`: differences from baseline,
whole-subject permutations or sign flips); the ``inference`` column is ``<test>/<inference>``:

* ``repeated-measures``: a session main effect (+0.5 at infusion, +0.2 at 24h) and a group main
  effect, no interaction; tests the group x session interaction (``groupBySession``).
* ``repeated-measures-null``: no effect at all; tests the interaction and the session main effect.

Every repetition is analysed with each ``--variance-groups`` setting on the same data, so "before"
and "after" are paired: ``auto`` (the recipe default, ``variance_groups = "auto"`` with
``group_variances = "brain"``): one variance group per study group, one variance ratio per group
for the whole map, weighted least-squares t, sign flips; ``voxel`` (``group_variances = "voxel"``):
each group's variance at every voxel, Winkler's v on z, sign flips of weighted Freedman-Lane
residuals; ``none``: one common variance, t, free permutation (fcflow before issue 16). A
repetition counts as a rejection for an inference when any voxel reaches FWE p <= alpha; the
table gives the count, the rate and its exact (Clopper-Pearson) 95% CI. A valid procedure has a
rate near alpha (here 5 %).

``--accel tail`` reads every family-wise p with the tail approximation (:mod:`fcflow.tail`); the
same ``--seed`` draws the same data and permutations, so a run with and one without are paired.

Output columns: ``scenario, inference, repetitions, rejections, rate, ci_low, ci_high``, then
``variance_groups, alpha, n_permutations, n_per_group, sd_per_group, covariates, n_voxels, shape,
smoothing_sigma, cluster_forming_p, seed, residuals, accel``.

Stored results and the commands that made them: ``benchmarks/results/README.md``. Reduced run
(used by tests/test_variance_groups_fwe.py, marked slow)::

    python benchmarks/validate_fwe.py --scenario heteroscedastic-unbalanced --repetitions 200 \
        --n-permutations 100 --shape 12 14 12 --out fwe.tsv

Null-study mode (``--null-study OUTPUT_DIR``): the participant level's maps of a study simulated
with ``fcflow simulate --preset null``; each repetition draws ``--n-per-group`` subjects per group
from the study's pool and analyses the recipe's session contrast with the recipe's covariates.
Draws share subjects, so repetitions are not independent and the binomial CI is optimistic::

    fcflow simulate null_bids --preset null --n-per-group 20 --n-volumes 200 --seed 7
    fcflow null_bids null_out participant --task rest --session-label baseline infusion
    python benchmarks/validate_fwe.py --null-study null_out --bids-dir null_bids \
        --repetitions 200 --n-permutations 200 --n-per-group 8 --out fwe_null.tsv
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage, stats

from fcflow.permutation import permutation_test
from fcflow.stats import make_group_design

LEVELS = ("placebo", "ketamine", "lamotrigine_ketamine")
INFERENCE = ("maxt", "cluster_mass", "cluster_size", "tfce")


def make_brain_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """An ellipsoid filling about half of the grid, like a brain in its field of view."""
    centre = (np.array(shape) - 1) / 2
    radii = 0.45 * np.array(shape)
    grid = np.indices(shape).astype(float)
    distance = sum(((grid[axis] - centre[axis]) / radii[axis]) ** 2 for axis in range(3))
    return distance <= 1.0


def simulate_noise_maps(
    rng: np.random.Generator, n_subjects: int, mask: np.ndarray, smoothing_sigma: float
) -> np.ndarray:
    """Pure-noise smooth fields (smoothed on the whole grid, then masked), unit variance."""
    maps = np.empty((n_subjects, int(mask.sum())), dtype=np.float32)
    for subject in range(n_subjects):
        field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), smoothing_sigma)
        maps[subject] = field[mask] / field[mask].std()
    return maps


@dataclass(frozen=True)
class Scenario:
    """A null scenario: group sizes, group standard deviations and covariates."""

    name: str
    n_per_group: tuple[int, int, int]
    sd_per_group: tuple[float, float, float]
    covariates: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("balanced", (6, 6, 6), (1.0, 1.0, 1.0)),
        Scenario("heteroscedastic", (6, 6, 6), (1.0, 1.5, 1.0)),
        Scenario("heteroscedastic-unbalanced", (10, 4, 6), (1.0, 2.5, 1.0)),
        Scenario("covariates", (6, 6, 6), (1.0, 1.0, 1.0), covariates=True),
    )
}
VARIANCE_GROUPS = ("auto", "voxel", "none")


@dataclass(frozen=True)
class RepeatedScenario:
    """A repeated-measures null: no group x session interaction, every session's map per subject.

    Each subject's map at session ``k`` is ``subject_sd * S_i + session_sd[k] * group_sd * E_ik
    + session_shift[k] + group_shift``: a random intercept ``S_i`` shared by its sessions (the
    sessions of a subject are correlated), session noise whose SD differs between sessions
    (non-sphericity) and between groups (heteroscedasticity), a session main effect and a group
    main effect (both allowed under the interaction's null; the differences cancel the group's).
    A fraction of subjects lacks one non-reference session (kept with what they have).
    """

    name: str
    n_per_group: tuple[int, int, int]
    sd_per_group: tuple[float, float, float]
    session_sd: tuple[float, float, float] = (1.0, 1.5, 1.2)
    session_shift: tuple[float, float, float] = (0.0, 0.5, 0.2)
    group_shift: tuple[float, float, float] = (0.0, 0.3, -0.3)
    subject_sd: float = 1.0
    missing_fraction: float = 0.15
    tests: tuple[str, ...] = ("groupBySession",)
    covariates: bool = False


SESSIONS = ("baseline", "infusion", "24h")
REPEATED_SCENARIOS = {
    s.name: s
    for s in (
        # the interaction's null beside a session and a group main effect, unequal groups and sessions
        RepeatedScenario("repeated-measures", (8, 6, 7), (1.0, 1.5, 1.0)),
        # no effect at all: the interaction and the session main effect are both null
        RepeatedScenario("repeated-measures-null", (8, 6, 7), (1.0, 1.5, 1.0), session_shift=(0.0, 0.0, 0.0),
                         tests=("groupBySession", "session")),
    )
}


def simulate_covariates(rng: np.random.Generator, groups: np.ndarray) -> pd.DataFrame:
    """age, sex and a mean_fd that is higher in the drug groups (as measured at infusion)."""
    shift = np.where(groups == LEVELS[0], 0.0, 0.08)
    return pd.DataFrame({
        "age": rng.uniform(20, 50, groups.size),
        "sex": rng.choice(["F", "M"], groups.size),
        "mean_fd": 0.15 + shift + rng.gamma(2.0, 0.04, groups.size),
    })


def run_scenario(
    scenario: Scenario | str,
    *,
    repetitions: int,
    n_permutations: int = 250,
    variance_groups: tuple[str, ...] = ("auto",),
    shape: tuple[int, int, int] = (20, 24, 20),
    seed: int = 0,
    alpha: float = 0.05,
    smoothing_sigma: float = 1.5,
    cluster_forming_p: float = 0.001,
    n_jobs: int | None = 1,
    verbose: bool = False,
    checkpoint: Callable[[pd.DataFrame], None] | None = None,
    checkpoint_every: int = 50,
    residuals: str = "auto",
    accel: str = "none",
) -> pd.DataFrame:
    """Count family-wise false positives per inference over independent pure-noise data sets.

    ``accel="tail"`` reads the family-wise p with the tail approximation (:mod:`fcflow.tail`); the
    same ``seed`` gives the same data and permutations, so runs with and without it are paired.

    ``checkpoint``, if given, receives the table of the repetitions done so far every
    ``checkpoint_every`` repetitions (a long run killed early keeps what it measured).

    Returns
    -------
    table : DataFrame
        One row per variance-group setting x inference (columns in the module docstring).
    """
    if isinstance(scenario, str):
        if scenario not in SCENARIOS:
            raise ValueError(f"'scenario' must be one of {sorted(SCENARIOS)}. Got {scenario!r}.")
        scenario = SCENARIOS[scenario]
    unknown = [v for v in variance_groups if v not in VARIANCE_GROUPS]
    if unknown or not variance_groups:
        raise ValueError(f"'variance_groups' must be a non-empty subset of {VARIANCE_GROUPS}. Got {variance_groups!r}.")
    mask = make_brain_mask(shape)
    groups = np.repeat(LEVELS, scenario.n_per_group)
    sd = np.repeat(scenario.sd_per_group, scenario.n_per_group).astype(np.float32)
    children = np.random.SeedSequence(seed).spawn(repetitions)
    hits = {(setting, name): 0 for setting in variance_groups for name in INFERENCE}
    settings = {"alpha": alpha, "n_permutations": n_permutations, "mask": mask, "shape": shape,
                "smoothing_sigma": smoothing_sigma, "cluster_forming_p": cluster_forming_p, "seed": seed,
                "residuals": residuals, "accel": accel}
    started = time.perf_counter()
    for repetition, child in enumerate(children):
        rng = np.random.default_rng(child)
        data = simulate_noise_maps(rng, groups.size, mask, smoothing_sigma) * sd[:, None]
        covariates = simulate_covariates(rng, groups) if scenario.covariates else None
        design = make_group_design(groups, LEVELS, covariates)
        permutation_seed = int(rng.integers(2**32))
        for setting in variance_groups:
            result = permutation_test(
                data, design, "ketamine - placebo", n_permutations=n_permutations,
                random_seed=permutation_seed, inference=INFERENCE, mask=mask,
                cluster_forming_p=cluster_forming_p, n_jobs=n_jobs,
                variance_groups=None if setting == "none" else groups,
                variance_estimate="voxel" if setting == "voxel" else "brain", residuals=residuals, accel=accel,
            )  # fmt: skip
            for name in INFERENCE:
                hits[(setting, name)] += _rejects(result.logp_fwe[name], alpha)
        _after_repetition(scenario, hits, repetition, repetitions, started, verbose=verbose, checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, settings=settings)
    return _scenario_table(scenario, hits, repetitions, **settings)


def simulate_repeated_study(
    rng: np.random.Generator, scenario: RepeatedScenario, mask: np.ndarray, smoothing_sigma: float,
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, str]]:
    """Maps (sessions, subjects, voxels), presence (sessions, subjects), labels, group of each label."""
    groups = np.repeat(LEVELS, scenario.n_per_group)
    n = groups.size
    group_sd = np.repeat(scenario.sd_per_group, scenario.n_per_group).astype(np.float32)
    group_shift = np.repeat(scenario.group_shift, scenario.n_per_group).astype(np.float32)
    subject = simulate_noise_maps(rng, n, mask, smoothing_sigma) * np.float32(scenario.subject_sd)
    data = np.empty((len(SESSIONS), n, int(mask.sum())), dtype=np.float32)
    for k in range(len(SESSIONS)):
        noise = simulate_noise_maps(rng, n, mask, smoothing_sigma)
        data[k] = (subject + noise * (np.float32(scenario.session_sd[k]) * group_sd[:, None])
                   + np.float32(scenario.session_shift[k]) + group_shift[:, None])
    present = np.ones((len(SESSIONS), n), dtype=bool)
    lacking = rng.random(n) < scenario.missing_fraction
    present[rng.integers(1, len(SESSIONS), size=n)[lacking], np.flatnonzero(lacking)] = False
    labels = [f"{i:02d}" for i in range(n)]
    return data, present, labels, dict(zip(labels, groups))


def run_repeated_scenario(
    scenario: RepeatedScenario | str,
    *,
    repetitions: int,
    n_permutations: int = 250,
    variance_groups: tuple[str, ...] = ("auto",),
    shape: tuple[int, int, int] = (20, 24, 20),
    seed: int = 0,
    alpha: float = 0.05,
    smoothing_sigma: float = 1.5,
    cluster_forming_p: float = 0.001,
    verbose: bool = False,
    checkpoint: Callable[[pd.DataFrame], None] | None = None,
    checkpoint_every: int = 50,
) -> pd.DataFrame:
    """FWE of the group level's repeated-measures tests (:mod:`fcflow.repeated`) on independent nulls.

    Each repetition is analysed as the group level does: within-subject differences from the
    baseline, the group x difference cell-means design, whole-subject permutations (or sign
    flips), :func:`fcflow.group.inference.run_inference` with the recipe's variance-group setting.
    The ``inference`` column is ``<test>/<inference>``.
    """
    from fcflow.group.inference import GroupTest, run_inference
    from fcflow.repeated import (
        build_repeated_measures,
        permutation_scheme,
        repeated_measures_contrasts,
        repeated_measures_design,
        whole_block_permutations,
    )

    if isinstance(scenario, str):
        scenario = REPEATED_SCENARIOS[scenario]
    mask = make_brain_mask(shape)
    children = np.random.SeedSequence(seed).spawn(repetitions)
    hits = {(setting, f"{test}/{name}"): 0 for setting in variance_groups for test in scenario.tests
            for name in INFERENCE}
    settings = {"alpha": alpha, "n_permutations": n_permutations, "mask": mask, "shape": shape,
                "smoothing_sigma": smoothing_sigma, "cluster_forming_p": cluster_forming_p, "seed": seed,
                "residuals": "auto"}
    started = time.perf_counter()
    for repetition, child in enumerate(children):
        rng = np.random.default_rng(child)
        data, present, labels, group_of = simulate_repeated_study(rng, scenario, mask, smoothing_sigma)
        measures = build_repeated_measures(data, present, labels, SESSIONS, SESSIONS[0], group_of)
        design = repeated_measures_design(measures, LEVELS, SESSIONS, SESSIONS[0])
        contrasts = repeated_measures_contrasts(LEVELS, SESSIONS, SESSIONS[0], design.columns)
        permutation_seed = int(rng.integers(2**32))
        for setting in variance_groups:
            for test in scenario.tests:
                scheme = permutation_scheme(test, setting != "none")
                rows = whole_block_permutations(measures.row_subject, measures.row_session, n_permutations,
                                                scheme=scheme, patterns=measures.patterns(),
                                                random_seed=permutation_seed)
                result = run_inference(
                    measures.data, design, GroupTest(test, test, "F", contrasts[test]), mask, methods=INFERENCE,
                    n_permutations=n_permutations, two_sided=False, random_seed=permutation_seed,
                    cluster_forming_p=cluster_forming_p,
                    variance_groups=None if setting == "none" else measures.row_group,
                    group_variances="voxel" if setting == "voxel" else "brain", permutations=rows, scheme=scheme,
                )  # fmt: skip
                for name in INFERENCE:
                    hits[(setting, f"{test}/{name}")] += _rejects(result.logp[name], alpha)
        _after_repetition(scenario, hits, repetition, repetitions, started, verbose=verbose, checkpoint=checkpoint,
                          checkpoint_every=checkpoint_every, settings=settings)
    return _scenario_table(scenario, hits, repetitions, **settings)


def _after_repetition(
    scenario: Scenario | RepeatedScenario, hits: dict, repetition: int, repetitions: int, started: float, *,
    verbose: bool, checkpoint: Callable[[pd.DataFrame], None] | None, checkpoint_every: int, settings: dict,
) -> None:
    """Progress line and, every ``checkpoint_every`` repetitions, the table so far."""
    if verbose:
        elapsed = time.perf_counter() - started
        print(f"{scenario.name} {repetition + 1}/{repetitions} ({elapsed:.0f} s): "
              + ", ".join(f"{s}/{n}={v}" for (s, n), v in hits.items()), file=sys.stderr, flush=True)
    if checkpoint is not None and (repetition + 1) % checkpoint_every == 0 and repetition + 1 < repetitions:
        checkpoint(_scenario_table(scenario, hits, repetition + 1, **settings))


def _scenario_table(
    scenario: Scenario | RepeatedScenario, hits: dict, repetitions: int, *, alpha: float, n_permutations: int,
    mask: np.ndarray,
    shape: tuple[int, int, int], smoothing_sigma: float, cluster_forming_p: float, seed: int, residuals: str,
    accel: str = "none",
) -> pd.DataFrame:
    """One row per variance-group setting x inference: counts, rate, exact 95% CI, settings."""
    rows = []
    for (setting, name), count in hits.items():
        ci = stats.binomtest(count, repetitions, alpha).proportion_ci(confidence_level=0.95, method="exact")
        rows.append({
            "scenario": scenario.name, "inference": name, "repetitions": repetitions, "rejections": count,
            "rate": count / repetitions, "ci_low": ci.low, "ci_high": ci.high, "variance_groups": setting,
            "alpha": alpha, "n_permutations": n_permutations,
            "n_per_group": "/".join(map(str, scenario.n_per_group)),
            "sd_per_group": "/".join(f"{v:g}" for v in scenario.sd_per_group),
            "covariates": "age,sex,mean_fd" if scenario.covariates else "",
            "sessions": ("/".join(SESSIONS) + f" (session SD {'/'.join(f'{v:g}' for v in scenario.session_sd)}, "
                         f"{scenario.missing_fraction:.0%} of subjects lack one)")
                        if isinstance(scenario, RepeatedScenario) else "",
            "n_voxels": int(mask.sum()), "shape": "x".join(map(str, shape)),
            "smoothing_sigma": smoothing_sigma, "cluster_forming_p": cluster_forming_p, "seed": seed,
            "residuals": residuals, "accel": accel,
        })  # fmt: skip
    return pd.DataFrame(rows)


def _rejects(logp_fwe: np.ndarray, alpha: float) -> bool:
    """Any voxel at FWE p <= alpha, from a -log10 p map."""
    # p = k / n_permutations; the tolerance only absorbs the float round trip
    return bool(10.0 ** -logp_fwe.max() <= alpha * (1 + 1e-9))


def _count(hits: dict[str, int], result, alpha: float) -> None:
    """Add one to ``hits[name]`` for each inference with any voxel at FWE p <= alpha."""
    for name in hits:
        hits[name] += _rejects(result.logp_fwe[name], alpha)


def _progress(repetition: int, n_repetitions: int, started: float, hits: dict[str, int]) -> None:
    elapsed = time.perf_counter() - started
    print(
        f"repetition {repetition + 1}/{n_repetitions} ({elapsed:.0f} s): "
        + ", ".join(f"{k}={v}" for k, v in hits.items()),
        file=sys.stderr,
        flush=True,
    )


def _summary(hits: dict[str, int], n_repetitions: int, alpha: float, settings: dict) -> pd.DataFrame:
    """One row per inference: counts, rate and its exact binomial 95% CI, then ``settings``."""
    rows = []
    for name, count in hits.items():
        ci = stats.binomtest(count, n_repetitions, alpha).proportion_ci(confidence_level=0.95, method="exact")
        rows.append({"inference": name, "n_repetitions": n_repetitions, "n_false_positive": count,
                     "rate": count / n_repetitions, "ci_low": ci.low, "ci_high": ci.high, "alpha": alpha,
                     **settings})
    return pd.DataFrame(rows)


def run_null_study_validation(
    output_dir: Path,
    bids_dir: Path,
    *,
    recipe: str = "weigner2025_pgacc",
    task: str = "rest",
    session_contrast: str = "infusion - baseline",
    group_contrast: str = "ketamine - placebo",
    n_repetitions: int,
    n_permutations: int,
    n_per_group: int,
    seed: int,
    alpha: float = 0.05,
    verbose: bool = False,
) -> pd.DataFrame:
    """Count family-wise false positives over subsamples of a null study's participant level.

    The maps, change maps, covariates (the recipe's, demeaned) and design are built with the
    group level's own functions (:mod:`fcflow.group`); only the subject draw is added.
    """
    from fcflow.bids import read_participants
    from fcflow.config import load_recipe
    from fcflow.group.inference import build_covariates, compute_change_maps, contrast_mean_fd, session_analyses
    from fcflow.group.inputs import collect_first_level, load_session_maps, select_measure_maps

    resolved = load_recipe(recipe)
    measure = next(m for m in select_measure_maps(resolved) if m.task == task)
    analysis = next(a for a in session_analyses(resolved) if a.expression == session_contrast)
    participants = read_participants(Path(bids_dir), resolved.group_column, resolved.groups)
    runs = collect_first_level(output_dir, measure, space=resolved.space)
    maps = load_session_maps(output_dir, runs, resolved.sessions)
    data, subjects, dropped = compute_change_maps(maps, dict(analysis.weights))
    if dropped:
        print(f"dropped (incomplete): {dropped}", file=sys.stderr)
    groups = participants.loc[subjects, resolved.group_column].to_numpy()
    mean_fd = contrast_mean_fd(maps, analysis.weights, subjects)
    pool = {g: np.flatnonzero(groups == g) for g in resolved.groups}
    short = {g: len(i) for g, i in pool.items() if len(i) < n_per_group}
    if short:
        raise ValueError(f"--n-per-group {n_per_group} exceeds the pool of the null study: {short}")
    children = np.random.SeedSequence(seed).spawn(n_repetitions)
    hits = {name: 0 for name in INFERENCE}
    started = time.perf_counter()
    for repetition, child in enumerate(children):
        rng = np.random.default_rng(child)
        pick = np.sort(np.concatenate([rng.choice(pool[g], n_per_group, replace=False) for g in resolved.groups]))
        chosen = [subjects[i] for i in pick]
        covariates = build_covariates(participants, chosen, resolved.inference.covariates, mean_fd)
        design = make_group_design(list(groups[pick]), resolved.groups, covariates)
        result = permutation_test(
            data[pick], design, group_contrast, n_permutations=n_permutations, random_seed=rng,
            inference=INFERENCE, mask=maps.mask, two_sided=resolved.inference.two_sided,
            cluster_forming_p=resolved.inference.cluster_forming_p,
        )
        _count(hits, result, alpha)
        if verbose:
            _progress(repetition, n_repetitions, started, hits)
    return _summary(hits, n_repetitions, alpha, {
        "source": f"null study {output_dir.name}: task-{task} {measure.desc}, {session_contrast}, "
                  f"{group_contrast}, covariates {list(resolved.inference.covariates)}",
        "n_permutations": n_permutations, "n_per_group": n_per_group,
        "pool_per_group": ";".join(f"{g}={len(i)}" for g, i in pool.items()),
        "n_voxels": int(maps.mask.sum()), "cluster_forming_p": resolved.inference.cluster_forming_p,
        "seed": seed,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", action="append", default=None,
                        choices=[*SCENARIOS, *REPEATED_SCENARIOS, "all"], help="repeatable; default all")
    parser.add_argument("--repetitions", "--n-repetitions", type=int, default=500, dest="repetitions")
    parser.add_argument("--n-permutations", type=int, default=250)
    parser.add_argument("--variance-groups", nargs="+", default=["auto"], choices=VARIANCE_GROUPS,
                        help="settings to analyse every repetition with (default: auto, the recipe default)")
    parser.add_argument("--n-per-group", type=int, default=8, help="null-study mode only")
    parser.add_argument("--shape", type=int, nargs=3, default=(20, 24, 20), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--smoothing-sigma", type=float, default=1.5, help="voxels")
    parser.add_argument("--cluster-forming-p", type=float, default=0.001)
    parser.add_argument("--n-jobs", type=int, default=1, help="threads for the cluster and TFCE statistics")
    parser.add_argument("--residuals", default="auto", choices=("auto", "freedman_lane", "weighted_freedman_lane",
                                                                "ter_braak"),
                        help="permutation_test's residuals (comparisons of the 'voxel' statistic)")
    parser.add_argument("--accel", default="none", choices=("none", "tail"),
                        help="family-wise p: empirical, or with the tail approximation (fcflow.tail)")
    parser.add_argument("--out", type=Path, default=None, help="TSV file (default: stdout)")
    parser.add_argument("--null-study", type=Path, default=None, metavar="OUTPUT_DIR",
                        help="participant-level outputs of a `fcflow simulate --preset null` study "
                             "(instead of pure noise)")
    parser.add_argument("--bids-dir", type=Path, default=None, help="that study's BIDS root (participants.tsv)")
    parser.add_argument("--recipe", default="weigner2025_pgacc", help="recipe of the null study's analysis")
    parser.add_argument("--task", default="rest")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.null_study is not None:
        if args.bids_dir is None:
            parser.error("--null-study needs --bids-dir")
        table = run_null_study_validation(
            args.null_study, args.bids_dir, recipe=args.recipe, task=args.task,
            n_repetitions=args.repetitions, n_permutations=args.n_permutations,
            n_per_group=args.n_per_group, seed=args.seed, alpha=args.alpha, verbose=True,
        )
    else:
        names = args.scenario or ["all"]
        names = [*SCENARIOS, *REPEATED_SCENARIOS] if "all" in names else list(dict.fromkeys(names))
        done: list[pd.DataFrame] = []

        def checkpoint(partial: pd.DataFrame) -> None:
            if args.out is not None:
                snapshot = pd.concat([*done, partial], ignore_index=True)
                snapshot["wall_s"] = round(time.perf_counter() - started, 1)
                snapshot.to_csv(args.out, sep="\t", index=False)

        for name in names:
            if name in REPEATED_SCENARIOS:
                done.append(run_repeated_scenario(
                    name, repetitions=args.repetitions, n_permutations=args.n_permutations,
                    variance_groups=tuple(args.variance_groups), shape=tuple(args.shape), seed=args.seed,
                    alpha=args.alpha, smoothing_sigma=args.smoothing_sigma,
                    cluster_forming_p=args.cluster_forming_p, verbose=True, checkpoint=checkpoint,
                ))  # fmt: skip
                checkpoint(done[-1].iloc[:0])
                continue
            done.append(run_scenario(
                name, repetitions=args.repetitions, n_permutations=args.n_permutations,
                variance_groups=tuple(args.variance_groups), shape=tuple(args.shape), seed=args.seed,
                alpha=args.alpha, smoothing_sigma=args.smoothing_sigma,
                cluster_forming_p=args.cluster_forming_p, n_jobs=args.n_jobs, verbose=True,
                checkpoint=checkpoint, residuals=args.residuals, accel=args.accel,
            ))  # fmt: skip
            checkpoint(done[-1].iloc[:0])  # every scenario finished so far
        table = pd.concat(done, ignore_index=True)
    table["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out is None:
        table.to_csv(sys.stdout, sep="\t", index=False)
    else:
        table.to_csv(args.out, sep="\t", index=False)
        print(table.to_string(index=False), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
