"""Accuracy and cost of the tail approximation (``accel = "tail"``) on real-size maps.

The data are ``bench_group.py``'s: 75 synthetic change maps on the 2 mm brain mask of
``fcflow simulate`` (about 235k voxels, smooth noise of 8 mm FWHM, 3 groups x 25, a 10 mm blob of
+0.9 SD in group 1), tested with ``g1 - g2`` (two-sided, cluster-forming p = 0.001, TFCE
E = 0.5, H = 2). For max-T, cluster mass and TFCE:

* **reference**: 10,000 plain permutations (random seed 0), fcflow's empirical family-wise p;
* **accelerated**: ``--repeats`` runs of ``--n-permutations`` (500) permutations with
  ``accel="tail"``, each with its own random seed, and the empirical p of the same runs (what
  500 plain permutations give).

For every voxel whose reference p lies in [0.001, 0.2] (for cluster mass: every cluster, one
value per cluster), grouped in bins of the reference p, the table gives the median over voxels
and repeats of p_accelerated / p_reference, its 5th and 95th percentiles over the repeats'
voxel medians, the same for the plain 500 permutations, and the reference's own Monte-Carlo
relative error (1.96 sqrt((1 - p) / (p n)) at the bin's centre). The accelerated p is within
Monte-Carlo error when its ratio's spread stays inside the reference's error band widened by
the 500-permutation draws' own spread. Wall times of the reference and of one accelerated run
are printed.

    python benchmarks/validate_tail.py --out benchmarks/results/tail_accuracy.tsv   # ~10 min, 2 cores

Stored results and the command: ``benchmarks/results/README.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
BINS = [(0.001, 0.005), (0.005, 0.02), (0.02, 0.05), (0.05, 0.2)]
INFERENCES = ("maxt", "cluster_mass", "tfce")


def load(data_dir: Path) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    import nibabel as nib

    sys.path.insert(0, str(HERE))
    import bench_group

    files = bench_group.make_maps(data_dir)
    table = pd.read_csv(files["design"], sep="\t")
    mask = np.asarray(nib.load(files["mask"]).dataobj) > 0
    data = np.empty((len(table), int(mask.sum())), dtype=np.float32)
    for i, name in enumerate(table["file"]):
        data[i] = np.asarray(nib.load(data_dir / name).dataobj, dtype=np.float32)[mask]
    return data, table[["g1", "g2", "g3"]], mask


def observed_values(result, name: str) -> np.ndarray:
    """The map each inference's family-wise p is read at (as fcflow.permutation does)."""
    if name == "maxt":
        values = result.z if result.zstat else result.stat
        return np.abs(values) if result.two_sided else values
    if name == "tfce":
        return np.abs(result.tfce)
    return result.cluster_mass


def empirical_p(values: np.ndarray, null: np.ndarray, zero_is_null: bool) -> np.ndarray:
    """The empirical family-wise p (no tie tolerance: the values here are continuous)."""
    ordered = np.sort(null)
    p = (ordered.size - np.searchsorted(ordered, values, side="left")) / ordered.size
    p = np.clip(p, 1.0 / ordered.size, 1.0)
    return np.where(values > 0, p, 1.0) if zero_is_null else p


def units(name: str, values: np.ndarray, reference_p: np.ndarray) -> np.ndarray:
    """Indices of the voxels compared: every voxel, or one voxel per cluster for cluster mass."""
    keep = (reference_p >= BINS[0][0]) & (reference_p < BINS[-1][1])
    if name != "cluster_mass":
        return np.flatnonzero(keep)
    _, first = np.unique(values[keep], return_index=True)
    return np.flatnonzero(keep)[first]


def main() -> None:
    from fcflow.permutation import permutation_test

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/fcflow_bench_group"))
    parser.add_argument("--reference-permutations", type=int, default=10_000)
    parser.add_argument("--n-permutations", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    data, design, mask = load(args.data_dir)
    common = dict(two_sided=True, inference=INFERENCES, mask=mask, cluster_forming_p=0.001)
    start = time.perf_counter()
    reference = permutation_test(data, design, [1.0, -1.0, 0.0], n_permutations=args.reference_permutations,
                                 random_seed=0, **common)
    reference_s = time.perf_counter() - start
    print(f"reference: {args.reference_permutations} permutations in {reference_s:.0f} s", flush=True)
    ref_p = {name: 10.0 ** -reference.logp_fwe[name] for name in INFERENCES}
    ratios = {name: {"tail": [], "plain": []} for name in INFERENCES}
    run_s = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        result = permutation_test(data, design, [1.0, -1.0, 0.0], n_permutations=args.n_permutations,
                                  random_seed=1000 + repeat, accel="tail", **common)
        run_s.append(time.perf_counter() - start)
        for name in INFERENCES:
            values = observed_values(result, name)
            tail_p = 10.0 ** -result.logp_fwe[name]
            plain_p = empirical_p(values, result.null_max[name], zero_is_null=name != "maxt")
            picked = units(name, observed_values(reference, name), ref_p[name])
            ratios[name]["tail"].append((ref_p[name][picked], tail_p[picked] / ref_p[name][picked]))
            ratios[name]["plain"].append((ref_p[name][picked], plain_p[picked] / ref_p[name][picked]))
        print(f"repeat {repeat + 1}: {args.n_permutations} permutations + tail in {run_s[-1]:.0f} s; fits "
              f"{ {k: (v and round(v['quantile'], 2)) for k, v in result.settings['tail_fits'].items()} }",
              flush=True)
    rows = []
    for name in INFERENCES:
        for low, high in BINS:
            row = {"inference": name, "reference_p_from": low, "reference_p_to": high}
            for kind in ("tail", "plain"):
                per_repeat = []
                pooled = []
                for p, ratio in ratios[name][kind]:
                    inside = (p >= low) & (p < high)
                    if inside.any():
                        per_repeat.append(float(np.median(ratio[inside])))
                        pooled.append(ratio[inside])
                row["n_units"] = int(sum(len(x) for x in pooled) / max(len(pooled), 1))
                if pooled:
                    row[f"{kind}_ratio_median"] = round(float(np.median(np.concatenate(pooled))), 3)
                    row[f"{kind}_ratio_p05"] = round(float(np.percentile(per_repeat, 5)), 3)
                    row[f"{kind}_ratio_p95"] = round(float(np.percentile(per_repeat, 95)), 3)
            centre = np.sqrt(low * high)
            row["reference_mc_relative_error"] = round(
                float(1.96 * np.sqrt((1 - centre) / (centre * args.reference_permutations))), 3)
            rows.append(row)
    table = pd.DataFrame(rows)
    table["reference_permutations"] = args.reference_permutations
    table["accelerated_permutations"] = args.n_permutations
    table["repeats"] = args.repeats
    table["reference_s"] = round(reference_s, 1)
    table["accelerated_s_median"] = round(float(np.median(run_s)), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, sep="\t", index=False, na_rep="n/a")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.drop(columns=["reference_permutations", "accelerated_permutations", "repeats"]))


if __name__ == "__main__":
    main()
