"""Indexing a 75-subject study: pybids' BIDSLayout vs fcflow.bids.collect_runs.

Writes a BIDS tree of the Weigner 2025 size (75 subjects x 3 sessions x 2 tasks, fMRIPrep
derivatives with BOLD, mask, confounds TSV + JSON and sidecars; image files are empty because
only indexing is timed) and times each indexer in a fresh process, several times.

    python benchmarks/bench_bids_index.py [--repeats 3] [--n-subjects 75]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SESSIONS = ("baseline", "infusion", "24h")
TASKS = ("rest", "nback")
GROUPS = ("placebo", "ketamine", "lamotrigine_ketamine")


def write_tree(root: Path, n_subjects: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "bench", "BIDSVersion": "1.9.0"}))
    rows = ["participant_id\tgroup"]
    deriv = root / "derivatives" / "fmriprep"
    deriv.mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(
        json.dumps({"Name": "fMRIPrep", "BIDSVersion": "1.9.0", "DatasetType": "derivative"})
    )
    for i in range(1, n_subjects + 1):
        sub = f"{i:02d}"
        rows.append(f"sub-{sub}\t{GROUPS[i % 3]}")
        for ses in SESSIONS:
            raw = root / f"sub-{sub}" / f"ses-{ses}" / "func"
            der = deriv / f"sub-{sub}" / f"ses-{ses}" / "func"
            raw.mkdir(parents=True)
            der.mkdir(parents=True)
            for task in TASKS:
                base = f"sub-{sub}_ses-{ses}_task-{task}"
                (raw / f"{base}_bold.json").write_text(json.dumps({"RepetitionTime": 2.0, "TaskName": task}))
                (raw / f"{base}_bold.nii.gz").touch()
                if task == "nback":
                    (raw / f"{base}_events.tsv").write_text("onset\tduration\ttrial_type\n0\t30\t0back\n")
                space = f"{base}_space-MNI152NLin2009cAsym_res-2"
                for name in (f"{space}_desc-preproc_bold.nii.gz", f"{space}_desc-brain_mask.nii.gz"):
                    (der / name).touch()
                (der / f"{space}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
                (der / f"{base}_desc-confounds_timeseries.tsv").write_text("trans_x\n0\n")
                (der / f"{base}_desc-confounds_timeseries.json").write_text("{}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")


PYBIDS = """
import sys, time
t = time.perf_counter()
from bids import BIDSLayout
layout = BIDSLayout(sys.argv[1], derivatives=True, validate=False)
bolds = layout.get(scope="derivatives", suffix="bold", desc="preproc", space="MNI152NLin2009cAsym",
                   extension=".nii.gz")
assert len(bolds) == int(sys.argv[2]), len(bolds)
print(time.perf_counter() - t)
"""

FCFLOW = """
import sys, time
from pathlib import Path
t = time.perf_counter()
from fcflow.bids import collect_runs
study = collect_runs(Path(sys.argv[1]), Path(sys.argv[1]) / "derivatives" / "fmriprep",
                     space="MNI152NLin2009cAsym", group_column="group",
                     groups=["placebo", "ketamine", "lamotrigine_ketamine"],
                     sessions=["baseline", "infusion", "24h"], tasks_with_events=["nback"],
                     tasks=["rest", "nback"], check_headers=False)
assert len(study.runs) == int(sys.argv[2]), len(study.runs)
print(time.perf_counter() - t)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-subjects", type=int, default=75)
    args = parser.parse_args()
    n_runs = args.n_subjects * len(SESSIONS) * len(TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "bids"
        write_tree(root, args.n_subjects)
        print(f"{args.n_subjects} subjects, {n_runs} runs; seconds (imports included), median of {args.repeats}")
        for name, code in (("pybids BIDSLayout", PYBIDS), ("fcflow collect_runs", FCFLOW)):
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = subprocess.run([sys.executable, "-c", code, str(root), str(n_runs)],
                                     capture_output=True, text=True, check=True)
                times.append((float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start))
            inner = statistics.median(t[0] for t in times)
            outer = statistics.median(t[1] for t in times)
            print(f"  {name:<22} index {inner:6.2f} s   whole process {outer:6.2f} s")


if __name__ == "__main__":
    main()
