"""Denoising strategies on one simulated study: dof, exclusions, QC-FC, and the planted effects.

For each strategy, the shipped recipe with only ``[denoising] strategy`` changed runs both levels
(``fcflow BIDS OUT participant`` then ``group``) as a user would; the planted effects are scored
(:func:`fcflow.simulate.scoring.score_group_results`). QC-FC and its distance dependence come from
the strategy comparison that the participant reports write for every candidate
(:mod:`fcflow.strategies`), read from the first strategy's output. One TSV row per strategy x task::

    fcflow simulate bids --from-definition sample_data/sample_study.toml --julich-dir DIR
    python benchmarks/compare_strategies.py bids work --julich-dir DIR \\
        --strategies 24P+aCompCor 6P+aCompCor 24P --out benchmarks/results/strategies_sample_study.tsv
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fcflow.config import load_recipe
from fcflow.reports.group import read_qc_tables
from fcflow.resources import recipe_file
from fcflow.simulate.scoring import score_group_results

ACCEPTANCE = [
    ("rest", "correlation", "ketamine - placebo", "rest ketamine"),
    ("nback", "gppi", "ketamine - placebo", "gPPI ketamine"),
    ("rest", "correlation", "lamotrigine_ketamine - placebo", "rest lamotrigine"),
    ("nback", "gppi", "lamotrigine_ketamine - placebo", "gPPI lamotrigine"),
]


def _run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _strategy_table(output_dir: Path, recipe, qc: pd.DataFrame) -> pd.DataFrame:
    """QC-FC of every candidate from the strategy TSVs of one output (fcflow.strategies)."""
    from fcflow.reports.group import _strategies

    rows = []
    for section in _strategies(output_dir, recipe, qc):
        for row in section["rows"]:
            rows.append({"task": section["task"], **row})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bids_dir", type=Path, help="a study written by fcflow simulate")
    parser.add_argument("work_dir", type=Path, help="one OUTPUT_DIR per strategy goes here")
    parser.add_argument("--strategies", nargs="+", default=["24P+aCompCor", "6P+aCompCor", "24P"])
    parser.add_argument("--recipe", default="weigner2025_pgacc")
    parser.add_argument("--n-permutations", type=int, default=500)
    parser.add_argument("--julich-dir", type=Path, default=None)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="TSV to write")
    args = parser.parse_args(argv)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    source = Path(args.recipe) if Path(args.recipe).is_file() else recipe_file(args.recipe)
    text = source.read_text()
    fcflow = str(Path(sys.executable).with_name("fcflow"))
    extra = ["--julich-dir", str(args.julich_dir)] if args.julich_dir else []
    rows = []
    candidates = None
    for index, strategy in enumerate(args.strategies):
        label = re.sub(r"[^A-Za-z0-9]+", "", strategy)
        recipe_path = args.work_dir / f"recipe_{label}.toml"
        recipe_path.write_text(re.sub(r'(?m)^strategy = "[^"]*"', f'strategy = "{strategy}"', text))
        recipe = load_recipe(recipe_path)
        out = args.work_dir / f"out_{label}"
        reports = [] if index == 0 else ["--no-reports"]  # the first one writes the strategy table
        seconds = _run([fcflow, str(args.bids_dir), str(out), "participant", "--recipe", str(recipe_path),
                        "--nprocs", str(args.nprocs), "--work-dir", str(args.work_dir / f"work_{label}"),
                        *reports, *extra], args.work_dir / f"participant_{label}.log")
        seconds += _run([fcflow, str(args.bids_dir), str(out), "group", "--recipe", str(recipe_path),
                         "--n-permutations", str(args.n_permutations), *reports, *extra],
                        args.work_dir / f"group_{label}.log")
        qc = read_qc_tables(out)
        if index == 0:
            candidates = _strategy_table(out, recipe, qc)
        scores = score_group_results(out, args.bids_dir / "derivatives" / "ground_truth")
        wanted = scores[scores["session_contrast"] == "infusion - baseline"]
        for task in recipe.tasks:
            runs = qc[qc["task"] == task.name]
            row = {"strategy": strategy, "task": task.name, "runs": len(runs),
                   "percent_excluded": 100.0 * runs["excluded"].mean(),
                   "percent_excluded_min_dof": 100.0 * runs["exclusion_reason"].str.contains("(min_dof)",
                                                                                             regex=False).mean(),
                   "seconds_both_levels": round(seconds, 1)}
            for measure in task.measures:
                values = pd.to_numeric(runs.get(f"dof_{measure}"), errors="coerce")
                row[f"median_dof_{measure}"] = float(values.median()) if values is not None else np.nan
            if candidates is not None and not candidates.empty:
                match = candidates[(candidates["task"] == task.name) & (candidates["strategy"] == strategy)]
                for column in ("median_abs_qcfc", "percent_qcfc_p05", "distance_rho"):
                    row[column] = float(match[column].iloc[0]) if len(match) else np.nan
            for t, measure, contrast, name in ACCEPTANCE:
                if t != task.name:
                    continue
                hit = wanted[(wanted["task"] == t) & (wanted["measure"] == measure)
                             & (wanted["group_contrast"] == contrast)]
                row[name] = hit["verdict"].iloc[0] if len(hit) else "not tested"
            rows.append(row)
        print(json.dumps(rows[-len(recipe.tasks):], default=str), flush=True)
    table = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, sep="\t", index=False, float_format="%.4g")
    if candidates is not None:
        candidates.to_csv(args.out.with_name(args.out.stem + "_qcfc.tsv"), sep="\t", index=False,
                          float_format="%.4g")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
