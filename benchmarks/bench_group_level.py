"""The shipped recipe's whole group level at 2 mm: plain permutations against the tail approximation.

Writes a group level's inputs in the participant level's layout (no participant level is run):
``--n-per-group`` subjects per group (placebo, ketamine, lamotrigine_ketamine; default 25, the
Weigner 2025 size), three sessions, the shipped recipe's three maps per session (rest
correlation z, n-back background z, n-back gPPI 2back - 0back beta) on the 2 mm brain mask of
``fcflow simulate`` (about 235k voxels), each a smooth random field (8 mm FWHM) with a subject
trait shared by its sessions; QC tables with mean FD; participants.tsv with group, age and sex.
Then it times ``fcflow BIDS OUTPUT group --recipe weigner2025_pgacc --no-reports`` (45 group
tests: 3 maps x 5 session analyses; no Julich-Brain, so no region level) through MultiProc on
this machine, per mode:

* ``tail``: the recipe with ``[inference] accel = "tail"`` and ``--n-permutations`` 500;
* ``plain``: the recipe as shipped with ``--n-permutations`` 100 (the yardstick) or any count.

Each mode runs in a fresh OUTPUT_DIR and working directory (wall time from start to exit of the
command, its own imports and map reading included). Two or more plain modes give the plain
5000-permutation row by a straight line through them (fixed + per permutation x 5000: the
permutations' cost is linear in their count); ``--full`` measures it instead (about 40 min).
The accelerated rows are compared with it (``ref / step``) and with the plain 100-permutation
yardstick (notes).

    python benchmarks/bench_group_level.py --results benchmarks/results/group_level_2mm.json
    python benchmarks/bench_group_level.py --json part.json    # the rows for run_all.py
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GROUPS = ("placebo", "ketamine", "lamotrigine_ketamine")
SESSIONS = ("baseline", "infusion", "24h")
MAPS = (("rest", "z", "correlation"), ("nback", "z", "background"), ("nback", "beta", "gppi2backMinus0back"))


def write_inputs(root: Path, n_per_group: int, seed: int = 0) -> tuple[Path, Path]:
    """``root/bids`` (participants.tsv) and ``root/first_level`` (maps, sidecars, QC tables)."""
    import nibabel as nib
    import numpy as np
    import pandas as pd
    from scipy import ndimage

    from fcflow.simulate import build_anatomy

    bids, first = root / "bids", root / "first_level"
    if (first / "done").is_file():
        return bids, first
    shutil.rmtree(root, ignore_errors=True)
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "group bench", "BIDSVersion": "1.9.0"}))
    anatomy = build_anatomy(2.0)
    mask_img = anatomy.brain_mask_img()
    mask = np.asarray(mask_img.dataobj) > 0
    rng = np.random.default_rng(seed)
    sigma = 8.0 / np.sqrt(8 * np.log(2)) / 2.0  # 8 mm FWHM, in 2 mm voxels
    # a pool of smooth fields; each map is a random mix of a few (smooth, independent enough, fast)
    pool = []
    for _ in range(48):
        field = ndimage.gaussian_filter(rng.standard_normal(mask.shape).astype(np.float32), sigma)
        pool.append(field[mask] / field[mask].std())
    pool = np.array(pool, dtype=np.float32)

    def smooth_map() -> np.ndarray:
        weights = rng.standard_normal(4).astype(np.float32)
        return (weights @ pool[rng.choice(len(pool), 4, replace=False)]) / np.float32(np.linalg.norm(weights))

    rows = []
    subject = 0
    for group in GROUPS:
        for _ in range(n_per_group):
            subject += 1
            sub = f"{subject:02d}"
            rows.append({"participant_id": f"sub-{sub}", "group": group, "age": int(rng.integers(20, 50)),
                         "sex": str(rng.choice(["F", "M"]))})
            traits = {desc: smooth_map() for _, _, desc in MAPS}
            qc = []
            for session in SESSIONS:
                func = first / f"sub-{sub}" / f"ses-{session}" / "func"
                func.mkdir(parents=True)
                for task in ("rest", "nback"):
                    qc.append({"participant_id": f"sub-{sub}", "session": session, "task": task, "run": "n/a",
                               "n_timepoints": 300, "n_kept": 290, "excluded": False, "exclusion_reason": "",
                               "mean_fd_mm": round(float(rng.uniform(0.05, 0.3)), 4), "percent_censored": 3.0})
                for task, stat, desc in MAPS:
                    values = np.zeros(mask.shape, dtype=np.float32)
                    values[mask] = 0.3 * traits[desc] + 0.3 * smooth_map()
                    name = (f"sub-{sub}_ses-{session}_task-{task}_space-MNI152NLin2009cAsym_res-2_seed-pgACC_"
                            f"stat-{stat}_desc-{desc}_statmap")
                    nib.Nifti1Image(values, mask_img.affine).to_filename(func / f"{name}.nii.gz")
                    (func / f"{name}.json").write_text("{}")
            pd.DataFrame(qc).to_csv(first / f"sub-{sub}" / f"sub-{sub}_desc-runs_qc.tsv", sep="\t", index=False)
    pd.DataFrame(rows).to_csv(bids / "participants.tsv", sep="\t", index=False)
    (first / "done").write_text("")
    return bids, first


def run_mode(root: Path, bids: Path, first: Path, mode: str, n_permutations: int, nprocs: int) -> dict:
    """Time one group level on a fresh copy of the first level (hard links: no data copied)."""
    from fcflow.resources import recipe_file

    out, work = root / f"out_{mode}_{n_permutations}", root / f"work_{mode}_{n_permutations}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(first, out, copy_function=lambda src, dst: Path(dst).hardlink_to(src))
    recipe = recipe_file("weigner2025_pgacc")
    if mode == "tail":
        text = recipe.read_text().replace("[inference]\n", '[inference]\naccel = "tail"\n', 1)
        recipe = root / "weigner2025_pgacc_tail.toml"
        recipe.write_text(text)
    command = [sys.executable, "-m", "fcflow", str(bids), str(out), "group", "--recipe", str(recipe),
               "--n-permutations", str(n_permutations), "--no-reports", "--nprocs", str(nprocs),
               "--work-dir", str(work)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**__import__("os").environ, "FCFLOW_JULICH_URL": "http://127.0.0.1:9/"})
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{mode}: fcflow failed:\n{done.stderr[-3000:]}")
    import pandas as pd

    results = pd.read_csv(out / "group" / "results.tsv", sep="\t")
    baseline = pd.read_csv(out / "group" / "baseline_results.tsv", sep="\t")
    return {"mode": mode, "n_permutations": n_permutations, "wall_s": round(wall, 1),
            "n_tests": int(len(results) + len(baseline)), "nprocs": nprocs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/fcflow_bench_group_level"))
    parser.add_argument("--n-per-group", type=int, default=25)
    parser.add_argument("--modes", nargs="+", default=["tail:500", "plain:100", "plain:300"], metavar="MODE:N")
    parser.add_argument("--full", action="store_true", help="also measure plain:5000 instead of scaling it")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--results", type=Path, default=None, help="write the measured modes (benchmarks/results)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows for run_all.py")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import Row, load_average, report_part

    modes = [(spec.partition(":")[0], int(spec.partition(":")[2])) for spec in args.modes]
    if args.full and ("plain", 5000) not in modes:
        modes.append(("plain", 5000))
    start = time.perf_counter()
    bids, first = write_inputs(args.root, args.n_per_group)
    print(f"inputs ready in {time.perf_counter() - start:.0f} s ({args.root})", flush=True)
    load_before = load_average()
    measured = []
    for mode, count in modes:
        measured.append(run_mode(args.root, bids, first, mode, count, args.nprocs))
        print(json.dumps(measured[-1]), flush=True)
    if args.results:
        args.results.write_text(json.dumps(measured, indent=2) + "\n")
    n_tests = measured[0]["n_tests"]
    group = "group level"
    reference = "plain, 5000 permutations"

    def step(mode: str, count: int) -> str:
        return reference if (mode, count) == ("plain", 5000) else f"{mode}, {count} permutations"

    rows = [Row(group, step(m["mode"], m["n_permutations"]), m["wall_s"], None, 1,
                how=f"{n_tests} tests, MultiProc {args.nprocs} procs", reference=reference)
            for m in measured]
    plain = {m["n_permutations"]: m["wall_s"] for m in measured if m["mode"] == "plain"}
    notes = []
    if 5000 not in plain and len(plain) >= 2:
        counts = sorted(plain)
        per_permutation, fixed = np.polyfit(counts, [plain[c] for c in counts], 1)
        rows.append(Row(group, reference, fixed + per_permutation * 5000, None, 0, reference=reference,
                        how=f"scaled: fixed {fixed:.0f} s + {per_permutation:.3f} s per permutation, fit through "
                            f"{', '.join(map(str, counts))}"))
    if 100 in plain:
        for m in measured:
            if m["mode"] != "plain":
                notes.append(f"{step(m['mode'], m['n_permutations'])}: {m['wall_s'] / plain[100]:.2f} x the plain "
                             "100-permutation yardstick (issue 18: within 3 x, and under 5 min)")
    report_part(rows, f"Whole group level of the shipped recipe at 2 mm ({3 * args.n_per_group} subjects x 3 "
                      f"sessions x 3 maps, {n_tests} tests, no reports)", notes, load_before, args.json)


if __name__ == "__main__":
    main()
