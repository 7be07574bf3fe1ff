"""Where a participant level spent its time: nipype's own record of every node, by node type.

nipype stores each finished node's runtime (start, end, duration) in ``result_<node>.pklz`` in
its working directory. This script reads them from a ``--work-dir`` (e.g. after ``fcflow demo``
or ``benchmarks/bench_study.py --keep``) and prints, per node name (``run_maps``, ``report``,
``seed_masks``, ...), the count, median and total duration and the share of the total::

    python benchmarks/node_times.py OUTPUT_DIR_work

The sum of durations is CPU-side work of the nodes; with MultiProc on 2 processes the wall time
is about half of it plus the scheduler's gaps (compare with the command's wall time).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def collect(work_dir: Path) -> dict[str, list[float]]:
    """Node name -> durations in seconds of every finished node below ``work_dir``."""
    from nipype.utils.filemanip import loadpkl

    times: dict[str, list[float]] = defaultdict(list)
    for path in sorted(work_dir.rglob("result_*.pklz")):
        result = loadpkl(path)
        runtime = getattr(result, "runtime", None)
        duration = getattr(runtime, "duration", None) if runtime is not None else None
        if duration is None:
            continue
        times[path.parent.name].append(float(duration))
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work_dir", type=Path)
    args = parser.parse_args(argv)
    times = collect(args.work_dir)
    if not times:
        print(f"{args.work_dir}: no result_*.pklz with a runtime below it", file=sys.stderr)
        return 1
    total = sum(sum(v) for v in times.values())
    print(f"{'node':<22} {'n':>5} {'median s':>9} {'total s':>9} {'share':>6}")
    for name, values in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:<22} {len(values):>5} {np.median(values):>9.2f} {sum(values):>9.1f} {sum(values) / total:>6.1%}")
    print(f"{'all nodes':<22} {sum(len(v) for v in times.values()):>5} {'':>9} {total:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
