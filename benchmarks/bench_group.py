"""Group inference on 75 change maps: fcflow's permutation engine against nilearn's.

Writes 75 synthetic change maps (float32 .nii.gz) on the 2 mm MNI152NLin2009cAsym brain mask
of ``fcflow simulate`` (97 x 115 x 97, about 235k in-mask voxels): smooth Gaussian noise
(FWHM 8 mm), 3 groups x 25, with a planted effect in group 1 (a 10 mm blob) so that the
observed map has real clusters. The test is the t contrast ``g1 - g2`` of the cell-means
design ``[g1, g2, g3]``, two-sided, cluster-forming p = 0.001, 6-connectivity, TFCE with
E = 0.5, H = 2 and 100 steps: the same model and settings on both sides.

Each measurement is a fresh process that reads the 75 files (each once for fcflow) and runs
one inference, so its wall time includes start-up, imports and reading, and its peak RSS is
its own:

* floor   - nibabel reads the 75 maps once and gathers the in-mask voxels;
* fcflow  - ``fcflow.permutation.permutation_test`` with inference max-T, cluster (mass and
            size, with max-T) or TFCE (with max-T), at 200 and 1000 permutations (and 5000
            with ``--full``; otherwise 5000 is extrapolated linearly from the 200 -> 1000
            slope, and the table says so);
* nilearn - ``nilearn.glm.second_level.non_parametric_inference`` (n_jobs=1) on the same
            files, mask, design and contrast, at two small permutation counts per inference;
            1000 and 5000 are extrapolated linearly from those two (fixed part + slope),
            because TFCE alone would take about 40 minutes per 1000 permutations.

Before timing, an equality check runs both engines on one fixed permutation set (nilearn's
own draws, replayed through ``permutations=``) on a 75-map crop of the same data and prints
the largest relative differences of t, max-T null and p, TFCE, TFCE null and p, and the
cluster mass and size nulls (tests/test_permutation.py asserts the same at test size).

    python benchmarks/bench_group.py                 # about 10 min on 2 quiet cores
    python benchmarks/bench_group.py --full          # 5000 measured, bigger nilearn runs, 3 repeats
    python benchmarks/bench_group.py --skip-nilearn  # fcflow only

Prints the table (median wall s, peak RSS MiB, ratio to the floor and nilearn / fcflow) and
the per-permutation cost of each engine, and ``--json FILE`` writes it for run_all.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import Row, load_average, median, python_child, report_part, run_child  # noqa: E402

N_PER_GROUP = 25
GROUPS = ("g1", "g2", "g3")
CLUSTER_P = 0.001
FWHM_MM = 8.0


def make_maps(data_dir: Path, seed: int = 0) -> dict[str, object]:
    """Write the mask, the 75 maps and the design; reuse them when already there."""
    import nibabel as nib
    import numpy as np
    import pandas as pd
    from scipy import ndimage

    mask_file = data_dir / "mask.nii.gz"
    design_file = data_dir / "design.tsv"
    files = [data_dir / f"sub-{i + 1:02d}_change.nii.gz" for i in range(len(GROUPS) * N_PER_GROUP)]
    if not (design_file.is_file() and all(f.is_file() for f in files)):
        from fcflow.simulate import build_anatomy

        data_dir.mkdir(parents=True, exist_ok=True)
        anatomy = build_anatomy(2.0)
        mask_img = anatomy.brain_mask_img()
        mask = np.asarray(mask_img.dataobj) > 0
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine), mask_file)
        rng = np.random.default_rng(seed)
        sigma = FWHM_MM / 2.0 / np.sqrt(8 * np.log(2))
        # a 10 mm blob in the left insula region of the grid, group 1 only
        centre = np.round(np.linalg.solve(mask_img.affine, [-38.0, 4.0, 2.0, 1.0])[:3]).astype(int)
        ii, jj, kk = np.indices(mask.shape)
        blob = ((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2) * 4.0 <= 100.0
        groups = np.repeat(GROUPS, N_PER_GROUP)
        for path, group in zip(files, groups, strict=True):
            field = ndimage.gaussian_filter(rng.standard_normal(mask.shape), sigma)
            field /= field[mask].std()
            if group == "g1":
                field[blob] += 0.9
            field[~mask] = 0
            nib.save(nib.Nifti1Image(field.astype(np.float32), mask_img.affine), path)
        design = pd.DataFrame({g: (groups == g).astype(float) for g in GROUPS})
        design.insert(0, "file", [f.name for f in files])
        design.to_csv(design_file, sep="\t", index=False)
    return {"mask": mask_file, "design": design_file, "files": files}


FLOOR = """
import sys, json, time
from pathlib import Path
import nibabel as nib, numpy as np, pandas as pd
data_dir = Path(sys.argv[1])
table = pd.read_csv(data_dir / "design.tsv", sep="\\t")
mask = np.asarray(nib.load(data_dir / "mask.nii.gz").dataobj) > 0
data = np.empty((len(table), int(mask.sum())), dtype=np.float32)
for i, name in enumerate(table["file"]):
    data[i] = np.asarray(nib.load(data_dir / name).dataobj, dtype=np.float32)[mask]
print(json.dumps({"shape": data.shape}))
"""

FCFLOW = """
import sys, json, time
from pathlib import Path
start = time.perf_counter()
import nibabel as nib, numpy as np, pandas as pd
from fcflow.permutation import permutation_test
data_dir, inference, n_perm = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
table = pd.read_csv(data_dir / "design.tsv", sep="\\t")
mask = np.asarray(nib.load(data_dir / "mask.nii.gz").dataobj) > 0
data = np.empty((len(table), int(mask.sum())), dtype=np.float32)
for i, name in enumerate(table["file"]):  # each map read once
    data[i] = np.asarray(nib.load(data_dir / name).dataobj, dtype=np.float32)[mask]
read = time.perf_counter()
result = permutation_test(data, table[["g1", "g2", "g3"]], [1.0, -1.0, 0.0], n_permutations=n_perm + 1,
                          two_sided=True, random_seed=0, inference=inference, mask=mask,
                          cluster_forming_p=0.001)
done = time.perf_counter()
print(json.dumps({"imports_and_read_s": read - start, "engine_s": done - read,
                  "max_logp": {k: float(v.max()) for k, v in result.logp_fwe.items()}}))
"""

NILEARN = """
import sys, json, time, warnings
from pathlib import Path
import numpy as np, pandas as pd
from nilearn.glm.second_level import non_parametric_inference
data_dir, kind, n_perm = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
table = pd.read_csv(data_dir / "design.tsv", sep="\\t")
files = [str(data_dir / name) for name in table["file"]]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    out = non_parametric_inference(
        files, design_matrix=table[["g1", "g2", "g3"]], second_level_contrast=[1, -1, 0],
        mask=str(data_dir / "mask.nii.gz"), n_perm=n_perm, two_sided_test=True, random_state=0,
        n_jobs=1, threshold=0.001 if kind == "cluster" else None, tfce=kind == "tfce")
print(json.dumps({"ok": True}))
"""

MAKE_AND_CHECK = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import bench_group
files = bench_group.make_maps(Path(sys.argv[2]))
if sys.argv[3] == "1":
    print(json.dumps(bench_group.equality_check(files)))
"""

KINDS = {
    # name: (fcflow inferences, label)
    "maxt": (("maxt",), "max-T"),
    "cluster": (("maxt", "cluster_mass", "cluster_size"), "cluster mass+size (+max-T)"),
    "tfce": (("maxt", "tfce"), "TFCE (+max-T)"),
}


def _nilearn_shuffles(random_seed: int, n_perm: int, n_subjects: int):
    """The permutations nilearn's permuted_ols draws with n_jobs=1 (cumulative shuffles)."""
    import numpy as np
    from sklearn.utils import check_random_state

    chunk_seed = check_random_state(random_seed).randint(1, np.iinfo(np.int32).max - 1)
    rng = check_random_state(chunk_seed)
    current = np.arange(n_subjects)
    rows = []
    for _ in range(n_perm):
        current = current[rng.permutation(n_subjects)]
        rows.append(current.copy())
    return np.array(rows)


def equality_check(files: dict[str, object], n_perm: int = 50) -> dict[str, float]:
    """Both engines on one fixed permutation set, on a crop of the maps: largest rel. diffs."""
    import warnings

    import nibabel as nib
    import numpy as np
    import pandas as pd
    from nilearn.maskers import NiftiMasker
    from nilearn.mass_univariate import permuted_ols

    from fcflow.permutation import permutation_test

    table = pd.read_csv(files["design"], sep="\t")
    mask_img = nib.load(files["mask"])
    mask = np.asarray(mask_img.dataobj) > 0
    # a box of its own grid, so that nilearn labels a small volume per permutation, not the
    # whole 97 x 115 x 97 grid
    box = (slice(20, 50), slice(50, 80), slice(30, 60))
    crop = mask[box]
    affine = mask_img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ [b.start for b in box]
    data = np.stack([np.asarray(nib.load(f).dataobj, dtype=np.float64)[box][crop] for f in files["files"]])
    design = table[["g1", "g2", "g3"]]
    tested = (design["g1"] - design["g2"]).to_numpy()[:, None]
    confounds = np.column_stack([design["g1"] + design["g2"], design["g3"]])
    masker = NiftiMasker(nib.Nifti1Image(crop.astype(np.uint8), affine, dtype=np.uint8)).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = permuted_ols(tested, data, confounding_vars=confounds, model_intercept=False, n_perm=n_perm,
                           two_sided_test=True, random_state=3, n_jobs=1, masker=masker, tfce=True,
                           threshold=CLUSTER_P, verbose=0)
    shuffles = _nilearn_shuffles(3, n_perm, data.shape[0])
    got = permutation_test(data, design, [1.0, -1.0, 0.0], permutations=shuffles, mask=crop,
                           inference=("maxt", "cluster_mass", "cluster_size", "tfce"),
                           cluster_forming_p=CLUSTER_P, precision="float64")

    def rel(a, b):
        a, b = np.ravel(a), np.ravel(b)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))

    return {
        "n_voxels": int(crop.sum()),
        "n_permutations": n_perm,
        "t": rel(got.stat, ref["t"][0]),
        "max-T null": rel(got.null_max["maxt"][1:], ref["h0_max_t"][0]),
        "max-T -log10 p": rel(got.logp_fwe["maxt"], ref["logp_max_t"][0]),
        "TFCE": rel(got.tfce, ref["tfce"][0]),
        "TFCE null": rel(got.null_max["tfce"][1:], ref["h0_max_tfce"][0]),
        "TFCE -log10 p": rel(got.logp_fwe["tfce"], ref["logp_max_tfce"][0]),
        "cluster mass null": rel(got.null_max["cluster_mass"][1:], ref["h0_max_mass"][0]),
        "cluster size null": rel(got.null_max["cluster_size"][1:], ref["h0_max_size"][0]),
        "cluster mass": rel(got.cluster_mass, ref["mass"][0]),
    }


def _extrapolate(points: dict[int, float], target: int) -> tuple[float, float, float]:
    """Linear fit through the two smallest counts: (prediction, fixed s, s per permutation)."""
    (n_a, t_a), (n_b, t_b) = sorted(points.items())[:2]
    slope = (t_b - t_a) / (n_b - n_a)
    fixed = t_a - slope * n_a
    return fixed + slope * target, fixed, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="measure fcflow at 5000 too, nilearn at larger counts, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (fcflow) and 1 (nilearn)")
    parser.add_argument("--skip-nilearn", action="store_true")
    parser.add_argument("--skip-check", action="store_true", help="skip the equality check")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "fcflow_bench_group")
    parser.add_argument("--json", type=Path, default=None, help="write the rows for run_all.py")
    args = parser.parse_args()
    # data and the equality check in child processes: a child forked from a parent that holds
    # nilearn and the maps would start its peak RSS at the parent's
    run_child(python_child(MAKE_AND_CHECK, HERE, args.data_dir, "0"))
    load_before = load_average()

    if not args.skip_check:
        check = json.loads(run_child(python_child(MAKE_AND_CHECK, HERE, args.data_dir, "1"))[2].splitlines()[-1])
        print(f"Equality on one fixed set of {check.pop('n_permutations')} nilearn permutations, "
              f"{check.pop('n_voxels')} voxels x 75 maps, float64 (largest relative difference):", flush=True)
        print("  " + ", ".join(f"{k} {v:.1e}" for k, v in check.items()), flush=True)

    fcflow_counts = (200, 1000, 5000) if args.full else (200, 1000)
    # the two counts are far apart so that the slope stands out of the ~1 s noise of the
    # ~20 s fixed part (nilearn: ~30 ms per max-T permutation, ~2 s per TFCE permutation)
    nilearn_counts = ({"maxt": (20, 1000), "cluster": (20, 1000), "tfce": (5, 30)} if args.full
                      else {"maxt": (10, 300), "cluster": (10, 300), "tfce": (2, 12)})
    fc_repeats = args.repeats or 3
    nl_repeats = args.repeats or (3 if args.full else 1)
    data_dir = str(args.data_dir)

    # (name, argv) in the order of one round; rounds alternate the steps
    plan = [("floor", python_child(FLOOR, data_dir))]
    for kind, (inference, _) in KINDS.items():
        for n in fcflow_counts:
            plan.append((f"fcflow {kind} {n}", python_child(FCFLOW, data_dir, ",".join(inference), n)))
    nilearn_plan = []
    if not args.skip_nilearn:
        for kind in KINDS:
            for n in nilearn_counts[kind]:
                nilearn_plan.append((f"nilearn {kind} {n}", python_child(NILEARN, data_dir, kind, n)))
    samples: dict[str, list[tuple[float, float]]] = {}
    details: dict[str, list[dict]] = {}
    for repeat in range(max(fc_repeats, nl_repeats)):
        steps = (plan if repeat < fc_repeats else []) + (nilearn_plan if repeat < nl_repeats else [])
        for name, argv in steps:
            wall, peak, out = run_child(argv)
            samples.setdefault(name, []).append((wall, peak))
            details.setdefault(name, []).append(json.loads(out.strip().splitlines()[-1]))
            print(f"  repeat {repeat + 1}: {name}: {wall:.2f} s, {peak:.0f} MiB (load {load_average()})",
                  file=sys.stderr, flush=True)

    def wall(name):
        return median([w for w, _ in samples[name]])

    def peak(name):
        return max(p for _, p in samples[name])

    rows = [Row("group", "floor: nibabel reads the 75 maps once", wall("floor"), peak("floor"),
                len(samples["floor"]), floor="floor: nibabel reads the 75 maps once")]
    notes = []
    for kind, (_, label) in KINDS.items():
        points = {n: wall(f"fcflow {kind} {n}") for n in fcflow_counts}
        engine = {n: median([d["engine_s"] for d in details[f"fcflow {kind} {n}"]]) for n in fcflow_counts}
        _, fixed, slope = _extrapolate(points, 1000)
        per_perm = f"fcflow {label}: {1000 * slope:.1f} ms/permutation (200 -> 1000)"
        if 5000 in points:
            per_perm += f", {1000 * (points[5000] - points[1000]) / 4000:.1f} ms (1000 -> 5000)"
        notes.append(per_perm + f"; fixed part {fixed:.1f} s; engine alone at 1000: {engine[1000]:.1f} s")
        targets = (1000, 5000)
        nl_rows = {}
        if not args.skip_nilearn:
            nl_points = {n: wall(f"nilearn {kind} {n}") for n in nilearn_counts[kind]}
            _, nl_fixed, nl_slope = _extrapolate(nl_points, 1000)
            notes.append(f"nilearn {label}: {1000 * nl_slope:.0f} ms/permutation, fixed part {nl_fixed:.1f} s "
                         f"(from {' and '.join(map(str, nl_points))} permutations)")
            for n, w in nl_points.items():
                name = f"nilearn {label}, {n} perm"
                rows.append(Row("group", name, w, peak(f"nilearn {kind} {n}"), len(samples[f"nilearn {kind} {n}"]),
                                floor=rows[0].step))
            for n in targets:
                name = f"nilearn {label}, {n} perm"
                nl_rows[n] = name
                how = f"extrapolated from {' and '.join(map(str, nl_points))} perm"
                rows.append(Row("group", name, _extrapolate(nl_points, n)[0], None, 0, how=how, floor=rows[0].step))
        for n in targets:
            name = f"fcflow {label}, {n} perm"
            if n in points:
                rows.append(Row("group", name, points[n], peak(f"fcflow {kind} {n}"),
                                len(samples[f"fcflow {kind} {n}"]), floor=rows[0].step, reference=nl_rows.get(n)))
            else:
                rows.append(Row("group", name, _extrapolate(points, n)[0], peak(f"fcflow {kind} 1000"), 0,
                                how="extrapolated from 200 and 1000 perm (peak: 1000)", floor=rows[0].step,
                                reference=nl_rows.get(n)))
    n_vox = json.loads(run_child(python_child(FLOOR, data_dir))[2])["shape"][1]
    report_part(rows, f"Group inference: 75 maps x {n_vox} voxels, t contrast g1 - g2 of 3 x 25, two-sided; "
                      f"medians (fcflow {fc_repeats} repeats"
                      + ("" if args.skip_nilearn else f", nilearn {nl_repeats}") + ")",
                notes, load_before, args.json, fcflow_repeats=fc_repeats, nilearn_repeats=nl_repeats)


if __name__ == "__main__":
    main()
