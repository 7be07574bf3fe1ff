"""Family-wise false-positive rate of fcflow's permutation inference on pure noise.

Simulates change maps with no group effect (smooth Gaussian random fields in a brain-like
ellipsoid mask) for 3 groups, tests ``ketamine - placebo`` in the cell-means design with
``fcflow.permutation.permutation_test`` (voxel max-T, cluster mass, cluster size, TFCE), and
counts the repetitions in which any voxel reaches FWE p <= alpha. A valid procedure has a
rate <= alpha; the table gives the count, the rate and its exact (Clopper-Pearson) 95% CI.

Reduced run (about a minute, used by tests/test_permutation.py, marked slow)::

    python benchmarks/validate_fwe.py --n-repetitions 30 --n-permutations 100 --shape 12 14 12

Full run for the closing note (>= 200 repetitions)::

    python benchmarks/validate_fwe.py --n-repetitions 200 --n-permutations 200 --out fwe.tsv
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
        for name in INFERENCE:
            min_p = 10.0 ** -result.logp_fwe[name].max()
            # p = k / n_permutations; the tolerance only absorbs the float round trip
            hits[name] += bool(min_p <= alpha * (1 + 1e-9))
        if verbose:
            elapsed = time.perf_counter() - started
            print(
                f"repetition {repetition + 1}/{n_repetitions} ({elapsed:.0f} s): "
                + ", ".join(f"{k}={v}" for k, v in hits.items()),
                file=sys.stderr,
                flush=True,
            )
    rows = []
    for name in INFERENCE:
        test = stats.binomtest(hits[name], n_repetitions, alpha)
        ci = test.proportion_ci(confidence_level=0.95, method="exact")
        rows.append(
            {
                "inference": name,
                "n_repetitions": n_repetitions,
                "n_false_positive": hits[name],
                "rate": hits[name] / n_repetitions,
                "ci_low": ci.low,
                "ci_high": ci.high,
                "alpha": alpha,
                "n_permutations": n_permutations,
                "n_per_group": n_per_group,
                "shape": "x".join(map(str, shape)),
                "n_voxels": int(mask.sum()),
                "smoothing_sigma": smoothing_sigma,
                "cluster_forming_p": cluster_forming_p,
                "seed": seed,
            }
        )
    return pd.DataFrame(rows)


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
    args = parser.parse_args(argv)
    started = time.perf_counter()
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
