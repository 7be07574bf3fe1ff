"""Family-wise false-positive rate of fcflow's permutation inference, on pure noise or a null study.

Two sources of change maps with no group effect:

* **pure noise** (default): smooth Gaussian random fields in a brain-like ellipsoid mask;
* **a null study** (``--null-study OUTPUT_DIR``): the participant level's maps of a study
  simulated with ``fcflow simulate --preset null``. Each repetition draws ``--n-per-group``
  subjects per group from the study's pool (their true groups kept, so the drug groups' larger
  motion at infusion is kept too) and analyses the recipe's session contrast with the recipe's
  covariates, exactly as ``fcflow ... group`` does. Draws share subjects, so repetitions are
  not independent: the binomial CI is then optimistic; a pool several times ``--n-per-group``
  keeps the overlap small.

Each repetition tests ``ketamine - placebo`` (cell-means design) with
``fcflow.permutation.permutation_test`` (voxel max-T, cluster mass, cluster size, TFCE), and
counts the repetitions in which any voxel reaches FWE p <= alpha. A valid procedure has a
rate <= alpha; the table gives the count, the rate and its exact (Clopper-Pearson) 95% CI.

Reduced run (about a minute, used by tests/test_permutation.py, marked slow)::

    python benchmarks/validate_fwe.py --n-repetitions 30 --n-permutations 100 --shape 12 14 12

Full runs for the closing note (>= 200 repetitions)::

    python benchmarks/validate_fwe.py --n-repetitions 200 --n-permutations 200 --out fwe.tsv
    fcflow simulate null_bids --preset null --n-per-group 20 --n-volumes 200 --seed 7
    fcflow null_bids null_out participant --task rest --session-label baseline infusion
    python benchmarks/validate_fwe.py --null-study null_out --bids-dir null_bids \\
        --n-repetitions 200 --n-permutations 200 --n-per-group 8 --out fwe_null.tsv
"""

from __future__ import annotations

import argparse
import sys
import time
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


def run_validation(
    *,
    n_repetitions: int,
    n_permutations: int,
    n_per_group: int,
    shape: tuple[int, int, int],
    seed: int,
    alpha: float = 0.05,
    smoothing_sigma: float = 1.5,
    cluster_forming_p: float = 0.001,
    verbose: bool = False,
) -> pd.DataFrame:
    """Count family-wise false positives per inference over pure-noise repetitions.

    Returns
    -------
    table : DataFrame
        One row per inference: inference, n_repetitions, n_false_positive, rate, ci_low,
        ci_high (exact binomial 95% CI), alpha, plus the run's settings.
    """
    mask = make_brain_mask(shape)
    groups = np.repeat(LEVELS, n_per_group)
    design = make_group_design(groups, LEVELS)
    children = np.random.SeedSequence(seed).spawn(n_repetitions)
    hits = {name: 0 for name in INFERENCE}
    started = time.perf_counter()
    for repetition, child in enumerate(children):
        rng = np.random.default_rng(child)
        data = simulate_noise_maps(rng, groups.size, mask, smoothing_sigma)
        result = permutation_test(
            data,
            design,
            "ketamine - placebo",
            n_permutations=n_permutations,
            random_state=rng,
            inference=INFERENCE,
            mask=mask,
            cluster_forming_p=cluster_forming_p,
        )
        _count(hits, result, alpha)
        if verbose:
            _progress(repetition, n_repetitions, started, hits)
    return _summary(hits, n_repetitions, alpha, {
        "source": "pure noise", "n_permutations": n_permutations, "n_per_group": n_per_group,
        "shape": "x".join(map(str, shape)), "n_voxels": int(mask.sum()),
        "smoothing_sigma": smoothing_sigma, "cluster_forming_p": cluster_forming_p, "seed": seed,
    })


def _count(hits: dict[str, int], result, alpha: float) -> None:
    """Add one to ``hits[name]`` for each inference with any voxel at FWE p <= alpha."""
    for name in hits:
        min_p = 10.0 ** -result.logp_fwe[name].max()
        # p = k / n_permutations; the tolerance only absorbs the float round trip
        hits[name] += bool(min_p <= alpha * (1 + 1e-9))


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
    group level's own functions (:mod:`fcflow.grouplevel`); only the subject draw is added.
    """
    from fcflow.bids import read_participants
    from fcflow.config import load_recipe
    from fcflow.grouplevel import (
        build_covariates,
        collect_first_level,
        compute_change_maps,
        contrast_mean_fd,
        load_session_maps,
        select_measure_maps,
        session_analyses,
    )

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
            data[pick], design, group_contrast, n_permutations=n_permutations, random_state=rng,
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
    parser.add_argument("--n-repetitions", type=int, default=200)
    parser.add_argument("--n-permutations", type=int, default=200)
    parser.add_argument("--n-per-group", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=(20, 24, 20), metavar=("X", "Y", "Z"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--smoothing-sigma", type=float, default=1.5, help="voxels")
    parser.add_argument("--cluster-forming-p", type=float, default=0.001)
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
            n_repetitions=args.n_repetitions, n_permutations=args.n_permutations,
            n_per_group=args.n_per_group, seed=args.seed, alpha=args.alpha, verbose=True,
        )
    else:
        table = run_validation(
            n_repetitions=args.n_repetitions,
            n_permutations=args.n_permutations,
            n_per_group=args.n_per_group,
            shape=tuple(args.shape),
            seed=args.seed,
            alpha=args.alpha,
            smoothing_sigma=args.smoothing_sigma,
            cluster_forming_p=args.cluster_forming_p,
            verbose=True,
        )
    table["wall_s"] = round(time.perf_counter() - started, 1)
    if args.out is None:
        table.to_csv(sys.stdout, sep="\t", index=False)
    else:
        table.to_csv(args.out, sep="\t", index=False)
        print(table.to_string(index=False), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
