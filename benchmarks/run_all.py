"""Run every benchmark and print the one table: step, median, peak RSS, ratio to floor / to reference.

    python benchmarks/run_all.py              # the defaults of each script (about an hour on 2 cores)
    python benchmarks/run_all.py --full       # full sizes (hours: nilearn's recipe and TFCE)
    python benchmarks/run_all.py --only group # one or more of: firstlevel group grouplevel study

Rows issue 18 asks for: ``grouplevel`` (the shipped recipe's whole group level at 2 mm, 75
subjects: plain 5000 permutations, scaled from 100 and 300 or measured with ``--full``, against
the tail approximation), ``study`` (the reports' cost per run against the maps') and
``firstlevel`` (the n-back first level against the read of its run).

Each script also runs alone and prints its own part (see benchmarks/README.md). The machine is
small and shared: the ratios between rows measured in the same script are the figures to
compare, and the load average is printed with each part.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import format_table, read_json  # noqa: E402

SCRIPTS = {
    "group": "bench_group.py",
    "firstlevel": "bench_firstlevel.py",
    "study": "bench_study.py",
    "grouplevel": "bench_group_level.py",
}
# the study's rows include the reports' cost per run (with and without reports)
EXTRA_ARGS = {"study": ["--report-cost"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="pass --full to the scripts that have it")
    parser.add_argument("--only", nargs="+", choices=sorted(SCRIPTS), default=list(SCRIPTS))
    args = parser.parse_args()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            out = Path(tmp) / f"{name}.json"
            argv = [sys.executable, str(HERE / SCRIPTS[name]), "--json", str(out), *EXTRA_ARGS.get(name, [])]
            if args.full and name != "study":
                argv.append("--full")
            print(f"== {SCRIPTS[name]}", flush=True)
            status = subprocess.run(argv).returncode
            if status or not out.is_file():
                notes.append(f"[{name}] {SCRIPTS[name]} failed (exit status {status}): see its output above")
                continue
            part, meta = read_json(out)
            rows += part
            notes += [f"[{name}] {n}" for n in meta.get("notes", [])]
            notes.append(f"[{name}] load average before/after: {meta['load_before']} / {meta['load_after']}")
    print()
    print(format_table(rows, "fcflow benchmarks (x floor: wall / the floor row's wall; ref / step: the reference "
                             "row's wall / this row's wall)"))
    for note in notes:
        print("  " + note)


if __name__ == "__main__":
    main()
