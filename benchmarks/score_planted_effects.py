"""Score a group analysis of a simulated study against its planted truth.

Reads ``OUTPUT_DIR/group/results.tsv`` and ``BIDS_DIR/derivatives/ground_truth/`` and prints,
per test, the regions it should find, those it found, significant voxels further than
``--max-distance-mm`` from them and a verdict (hit, miss, false positive, clean); see
:func:`fcflow.simulate.scoring.score_group_results`. The summary line states the issue's
acceptance: ``ketamine - placebo`` (``infusion - baseline``) finds the left insula at rest and
the dmPFC in the n-back gPPI, and ``lamotrigine_ketamine - placebo`` finds nothing::

    fcflow simulate bids --preset weigner2025 --n-per-group 15 --n-volumes 200 --seed 1
    fcflow bids out participant
    fcflow bids out group --n-permutations 1000
    python benchmarks/score_planted_effects.py out bids --out scores.tsv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from fcflow.simulate.scoring import score_group_results

ACCEPTANCE = [
    ("rest", "correlation", "ketamine - placebo", "hit"),
    ("nback", "gppi", "ketamine - placebo", "hit"),
    ("rest", "correlation", "lamotrigine_ketamine - placebo", "clean"),
    ("nback", "gppi", "lamotrigine_ketamine - placebo", "clean"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="the analysis OUTPUT_DIR (with group/results.tsv)")
    parser.add_argument("bids_dir", type=Path, help="the simulated BIDS_DIR (derivatives/ground_truth)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--max-distance-mm", type=float, default=6.0)
    parser.add_argument("--session-contrast", default="infusion - baseline")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as TSV")
    args = parser.parse_args(argv)
    scores = score_group_results(args.output_dir, args.bids_dir / "derivatives" / "ground_truth",
                                 alpha=args.alpha, max_distance_mm=args.max_distance_mm)
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(scores.to_string(index=False))
    if args.out is not None:
        scores.to_csv(args.out, sep="\t", index=False)
    ok = True
    for task, measure, contrast, wanted in ACCEPTANCE:
        row = scores[(scores["task"] == task) & (scores["measure"] == measure)
                     & (scores["group_contrast"] == contrast)
                     & (scores["session_contrast"] == args.session_contrast)]
        verdict = row["verdict"].iloc[0] if len(row) else "absent"
        ok &= verdict == wanted
        print(f"{task} {measure} {contrast} ({args.session_contrast}): {verdict} (wanted {wanted})")
    far = int(scores["n_voxels_far"].fillna(0).sum())
    print(f"acceptance {'MET' if ok else 'NOT MET'}; significant voxels > {args.max_distance_mm:g} mm from an "
          f"expected region, over all {len(scores)} tests: {far}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
