"""Region family: family-wise error on null studies and detection of a planted region effect.

Each repetition draws a fresh, independent study of region values (each subject's mean map value
over each region, :func:`fcflow.regions.compute_region_values`): 3 groups (placebo, ketamine,
lamotrigine_ketamine) of ``--n-per-group`` subjects, ``--n-regions`` regions, N(0, 1) values
independent across subjects and regions, and tests it as the group level does
(:func:`fcflow.regions.run_region_inference`: cell-means design, the recipe's default statistic,
weighted least-squares t with one variance ratio per group and sign flips, max-T FWE over the
regions, Benjamini-Hochberg q):

* ``null``: no effect anywhere; the test ``ketamine - placebo``. A rejection is any region at
  p_fwe < alpha (FWE) or q_fdr < alpha (FDR; under the complete null FDR = FWE).
* ``planted-d<d>``: region 0 raised by ``d`` (population Cohen's d) in the ketamine group.
  Detection: region 0 at p_fwe < alpha (``ketamine - placebo``); false positive: any region at
  p_fwe < alpha in ``lamotrigine_ketamine - placebo`` (null by construction).

Regions independent of each other is the hardest case for max-T (real areas are correlated,
which makes the maximum less extreme and the correction less strict). 8 regions is a small user
atlas; 250 is fewer than the Julich-Brain v3.1 family (207 areas per hemisphere, those with at least
min_voxels voxels in the group mask), so its power is an upper bound for that atlas.

Output columns: ``scenario, n_regions, n_per_group, d, measure, repetitions, count, rate, ci_low,
ci_high`` (exact Clopper-Pearson 95 %), then ``alpha, n_permutations, seed``.

Stored results and the command that made them: ``benchmarks/results/README.md``::

    python benchmarks/validate_regions.py --repetitions 1000 --power-repetitions 200 \
        --out benchmarks/results/regions_fwe.tsv
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

GROUPS = ("placebo", "ketamine", "lamotrigine_ketamine")


def _clopper_pearson(k: int, n: int) -> tuple[float, float]:
    low = stats.beta.ppf(0.025, k, n - k + 1) if k else 0.0
    high = stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    return float(low), float(high)


def run(n_regions: int, n_per_group: int, d: float, repetitions: int, n_permutations: int, alpha: float,
        seed: int) -> list[dict]:
    from fcflow.group.inference import GroupTest
    from fcflow.regions import run_region_inference
    from fcflow.stats import make_group_design

    labels = [g for g in GROUPS for _ in range(n_per_group)]
    design = make_group_design(labels, list(GROUPS))

    def test(a: str, b: str) -> GroupTest:
        weights = {a: 1.0, b: -1.0}
        return GroupTest(f"{a}-{b}", f"{a} - {b}", "t", np.array([[weights.get(c, 0.0) for c in design.columns]]))

    planted, null = test("ketamine", "placebo"), test("lamotrigine_ketamine", "placebo")
    regions = pd.DataFrame({"region": [f"r{i}" for i in range(n_regions)], "hemisphere": "", "n_voxels": 10})
    rng = np.random.default_rng(seed)
    counts = {"fwe_any": 0, "fdr_any": 0, "detected_fwe": 0, "detected_fdr": 0, "null_contrast_fwe_any": 0}
    for repetition in range(repetitions):
        values = rng.normal(size=(len(labels), n_regions))
        values[n_per_group:2 * n_per_group, 0] += d
        kwargs = {"n_permutations": n_permutations, "two_sided": True, "random_seed": seed + repetition,
                  "variance_groups": labels}
        table = run_region_inference(values, regions, design, planted, **kwargs)
        counts["fwe_any"] += bool((table["p_fwe"] < alpha).any())
        counts["fdr_any"] += bool((table["q_fdr"] < alpha).any())
        counts["detected_fwe"] += bool(table["p_fwe"][0] < alpha)
        counts["detected_fdr"] += bool(table["q_fdr"][0] < alpha)
        if d:
            other = run_region_inference(values, regions, design, null, **kwargs)
            counts["null_contrast_fwe_any"] += bool((other["p_fwe"] < alpha).any())
    measures = (["fwe_any", "fdr_any"] if d == 0 else ["detected_fwe", "detected_fdr", "null_contrast_fwe_any"])
    rows = []
    for measure in measures:
        low, high = _clopper_pearson(counts[measure], repetitions)
        rows.append({"scenario": "null" if d == 0 else f"planted-d{d:g}", "n_regions": n_regions,
                     "n_per_group": n_per_group, "d": d, "measure": measure, "repetitions": repetitions,
                     "count": counts[measure], "rate": round(counts[measure] / repetitions, 4),
                     "ci_low": round(low, 4), "ci_high": round(high, 4), "alpha": alpha,
                     "n_permutations": n_permutations, "seed": seed})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=1000, help="null studies per region count")
    parser.add_argument("--power-repetitions", type=int, default=200, help="planted studies per d and region count")
    parser.add_argument("--n-regions", type=int, nargs="+", default=[8, 250])
    parser.add_argument("--d", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    parser.add_argument("--n-per-group", type=int, default=10)
    parser.add_argument("--n-permutations", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fcflow.io import write_tsv

    rows = []
    for n_regions in args.n_regions:
        for d, repetitions in [(0.0, args.repetitions)] + [(d, args.power_repetitions) for d in args.d]:
            start = time.perf_counter()
            rows += run(n_regions, args.n_per_group, d, repetitions, args.n_permutations, args.alpha, args.seed)
            print(f"{n_regions} regions, d = {d:g}: {repetitions} studies in {time.perf_counter() - start:.0f} s",
                  file=sys.stderr)
            write_tsv(args.out, pd.DataFrame(rows))
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
