"""Shared helpers of the benchmark scripts: timed child processes, medians, the one table.

Every figure comes from a fresh child process (start-up, imports and file reading included),
so that its peak RSS is its own (``os.wait4``'s ``ru_maxrss``). The machine these run on is
small and shared: each script runs its steps in alternation (A B C A B C ...) and reports
medians, and the ratios between steps measured in the same run are the figures to compare.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One line of the table.

    ``wall_s`` is the median over repeats (or an extrapolation, then ``how`` says from what);
    ``peak_mib`` the largest peak RSS over repeats; ``floor`` and ``reference`` name the rows
    that the ratios are taken to.
    """

    group: str
    step: str
    wall_s: float
    peak_mib: float | None
    n: int
    how: str = "measured"
    floor: str | None = None
    reference: str | None = None
    samples: list[float] = field(default_factory=list)


def load_average() -> str:
    """``uptime``'s three load averages and the number of cores, e.g. ``3.1 2.8 2.0 on 2 cores``."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def run_child(argv: list[str], *, env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``argv``; return wall seconds, peak RSS in MiB and its stdout. Raises on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})
    # communicate() reaps the child, so wait4 would never see its rusage: read the pipes
    # on threads and reap the child here with wait4.
    import threading

    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()))
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for reader in readers:
        reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    for reader in readers:
        reader.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step failed ({' '.join(argv[:3])} ...):\n{out['stderr'][-3000:]}")
    return wall, usage.ru_maxrss / 1024, out["stdout"]


def python_child(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def median(values: list[float]) -> float:
    return statistics.median(values)


def format_table(rows: list[Row], title: str = "") -> str:
    """The table: step, median, peak RSS, ratio to the floor and to the reference."""
    by_key = {(r.group, r.step): r for r in rows}
    lines = []
    if title:
        lines.append(title)
    header = (f"{'group':<12} {'step':<52} {'median s':>9} {'peak MiB':>9} {'x floor':>8} {'ref / step':>10} "
              f"{'n':>3}  how")
    lines.append(header)
    lines.append("-" * len(header))
    for r in rows:
        floor = by_key.get((r.group, r.floor)) if r.floor else None
        ref = by_key.get((r.group, r.reference)) if r.reference else None
        x_floor = f"{r.wall_s / floor.wall_s:8.2f}" if floor else f"{'-':>8}"
        speedup = f"{ref.wall_s / r.wall_s:9.1f}x" if ref else f"{'-':>10}"
        peak = f"{r.peak_mib:9.0f}" if r.peak_mib is not None else f"{'-':>9}"
        lines.append(f"{r.group:<12} {r.step:<52} {r.wall_s:9.2f} {peak} {x_floor} {speedup} {r.n:>3}  {r.how}")
    return "\n".join(lines)


def write_json(path: str | Path | None, rows: list[Row], meta: dict) -> None:
    if path is None:
        return
    Path(path).write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))


def report_part(rows: list[Row], title: str, notes: list[str], load_before: str, json_path: str | Path | None,
                **meta) -> None:
    """Print one script's table, its notes and the load average, and save them for run_all.py."""
    meta = {"load_before": load_before, "load_after": load_average(), "notes": notes, **meta}
    print()
    print(format_table(rows, title))
    for note in notes:
        print("  " + note)
    print(f"  load average before/after: {meta['load_before']} / {meta['load_after']}")
    write_json(json_path, rows, meta)


def read_json(path: str | Path) -> tuple[list[Row], dict]:
    payload = json.loads(Path(path).read_text())
    return [Row(**r) for r in payload["rows"]], payload["meta"]


# --------------------------------------------------------------------------------------------
# The simulated study shared by bench_firstlevel.py and bench_study.py
# --------------------------------------------------------------------------------------------
STUDY_ARGS = ("--resolution", "2", "--n-volumes", "300", "--seed", "1")


def ensure_study(root: Path, n_per_group: int = 1) -> dict[str, Path]:
    """Simulate a study with ``fcflow simulate`` (2 mm, 300 volumes) unless it is there.

    ``n_per_group=1`` gives 3 subjects x 3 sessions x 2 tasks = 18 runs (about 6 GB). Returns
    the BIDS folder and a recipe whose seed is the simulator's stand-in pgACC mask (so that no
    atlas is needed; the seed does not change any cost).
    """
    root = Path(root)
    bids = root / f"bids_n{n_per_group}"
    if not (bids / "participants.tsv").is_file() or not (bids / ".complete").is_file():
        fcflow = str(Path(sys.executable).with_name("fcflow"))
        run_child([fcflow, "simulate", str(bids), "--n-per-group", str(n_per_group), *STUDY_ARGS])
        (bids / ".complete").write_text("")
    from fcflow.cli.demo import _stand_in_recipe

    recipe = _stand_in_recipe(root, bids)
    return {"bids": bids, "recipe": recipe, "fmriprep": bids / "derivatives" / "fmriprep"}
