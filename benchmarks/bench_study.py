"""The participant level of a whole study on 2 cores, measured on fractions and scaled to 450 runs.

The Weigner 2025 design has 75 subjects x 3 sessions x 2 tasks = 450 runs. This script
simulates a 3-subject fraction of it with ``fcflow simulate`` (1 subject per group, 2 mm,
300 volumes, TR 2 s: 18 runs, about 6 GB; shared with bench_firstlevel.py) and runs the
participant level through the real CLI (``fcflow BIDS OUT participant --plugin MultiProc
--nprocs 2``, the recipe's censoring, reports included unless ``--no-reports``) on two
fraction sizes: 6 runs (one subject) and 18 runs (three subjects), each in a fresh output and
work folder. It reports wall time, peak RSS (the largest process of the tree) and time per
run, fits ``wall = fixed + per_run * n_runs`` through the two sizes and extrapolates to 450
runs. Equal time per run at both sizes is the evidence that the scaling is linear.

    python benchmarks/bench_study.py                    # 6 and 18 runs, about 10 min on 2 cores
    python benchmarks/bench_study.py --sizes 6 12 18    # more points
    python benchmarks/bench_study.py --no-reports       # the maps only
    python benchmarks/bench_study.py --report-cost      # with and without reports, in alternation
    python benchmarks/bench_study.py --keep             # keep the work folders for node_times.py

``--report-cost`` runs every size with and without reports (alternating, with first) and adds
the row issue 18 asks for: the reports' cost per run, the difference of the two marginal times
per run, as a share of the maps' own marginal time per run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import Row, ensure_study, load_average, python_child, report_part, run_child  # noqa: E402

N_STUDY_RUNS = 450
RUNS_PER_SUBJECT = 6

PARTICIPANT = """
import sys
from fcflow.cli import main
bids, out, recipe, work, nprocs, reports, *labels = sys.argv[1:]
argv = [bids, out, "participant", "--recipe", recipe, "--work-dir", work, "--plugin", "MultiProc",
        "--nprocs", nprocs, "--participant-label", *labels]
sys.exit(main(argv + ([] if reports == "1" else ["--no-reports"])))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[6, 18],
                        help="fractions in runs, multiples of 6 up to 18 (default: 6 18)")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--no-reports", action="store_true")
    parser.add_argument("--report-cost", action="store_true",
                        help="run every size with and without reports and report the reports' cost per run")
    parser.add_argument("--keep", action="store_true",
                        help="keep each size's output and work folder (benchmarks/node_times.py reads the latter)")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "fcflow_bench_study")
    parser.add_argument("--json", type=Path, default=None, help="write the rows for run_all.py")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    if any(n % RUNS_PER_SUBJECT or not 0 < n <= 18 for n in sizes) or len(sizes) < 2:
        parser.error(f"'--sizes' must be two or more multiples of 6 up to 18. Got {args.sizes!r}.")
    if args.report_cost and args.no_reports:
        parser.error("'--report-cost' runs with and without reports: leave out '--no-reports'.")
    study = ensure_study(args.data_dir)
    load_before = load_average()
    modes = [True, False] if args.report_cost else [not args.no_reports]
    rows, results = [], {}
    for n_runs in sizes:
        labels = [f"{i:02d}" for i in range(1, n_runs // RUNS_PER_SUBJECT + 1)]
        for reports in modes:
            kind = "with" if reports else "without"
            out = Path(tempfile.mkdtemp(prefix=f"fcflow_bench_study_{n_runs}_{kind}_"))
            try:
                argv = python_child(PARTICIPANT, study["bids"], out / "out", study["recipe"], out / "work",
                                    args.nprocs, "1" if reports else "0", *labels)
                wall, peak, _ = run_child(argv)
                n_maps = len(list((out / "out").rglob("*_statmap.nii.gz")))
            finally:
                if args.keep:
                    print(f"  kept {out} (python benchmarks/node_times.py {out / 'work'})", file=sys.stderr)
                else:
                    shutil.rmtree(out, ignore_errors=True)
            results[n_runs, reports] = wall
            print(f"  {n_runs} runs {kind} reports: {wall:.1f} s, {wall / n_runs:.2f} s per run, peak {peak:.0f} "
                  f"MiB, {n_maps} maps (load {load_average()})", file=sys.stderr, flush=True)
            rows.append(Row("study", f"participant level, {n_runs} runs, {kind} reports", wall, peak, 1,
                            how=f"{wall / n_runs:.2f} s/run"))
    notes, marginal = [], {}
    (n_a, n_b) = sizes[0], sizes[-1]
    for reports in modes:
        kind = "with" if reports else "without"
        t_a, t_b = results[n_a, reports], results[n_b, reports]
        per_run = (t_b - t_a) / (n_b - n_a)
        fixed = t_a - per_run * n_a
        predicted = fixed + per_run * N_STUDY_RUNS
        marginal[reports] = per_run
        rows.append(Row("study", f"participant level, {N_STUDY_RUNS} runs (75 subjects), {kind} reports, scaled",
                        predicted, None, 0,
                        how=f"fixed {fixed:.0f} s + {per_run:.2f} s/run, fit through {n_a} and {n_b} runs"))
        each = ", ".join(f"{n}: {results[n, reports] / n:.2f} s" for n in sizes)
        notes.append(f"{kind} reports: time per run {each}; marginal {per_run:.2f} s/run; "
                     f"{N_STUDY_RUNS} runs: {predicted / 60:.1f} min on {args.nprocs} processes")
    if args.report_cost:
        cost = marginal[True] - marginal[False]
        share = cost / marginal[False]
        rows.append(Row("study", "reports' cost per run (marginal with - without)", cost, None, 0,
                        how=f"{100 * share:.0f} % of the maps' {marginal[False]:.2f} s/run (issue 18: <= 25 %)"))
        notes.append(f"reports cost {cost:.2f} s per run, {100 * share:.0f} % of the maps' marginal time per run")
    title = "with and without reports" if args.report_cost else f"{'with' if modes[0] else 'without'} reports"
    report_part(rows, f"Participant level (2 mm, 300 volumes per run, {title}; MultiProc {args.nprocs} procs)",
                notes, load_before, args.json)


if __name__ == "__main__":
    main()
