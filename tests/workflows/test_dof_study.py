"""A study whose runs are too short for the shipped recipe: nothing below min_dof reaches the group.

A 100-volume run at TR 2 s (`fcflow simulate`'s default until it moved to 300) holds 28 cosines of the 0.01-0.08 Hz rest
band; 24P+aCompCor spends 29 of them. As a new user would run it: both levels from the command
line with the shipped recipe. Every rest run must be excluded with its budget in the reason, no
included run may have fewer dof than min_dof, and the group report must say that the study lacks
the degrees of freedom, with the numbers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fcflow.config import load_recipe

pytestmark = pytest.mark.slow

RECIPE = load_recipe("weigner2025_pgacc")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> dict[str, Path]:
    from fcflow.cli.demo import _stand_in_recipe
    from fcflow.simulate import simulate_study

    root = tmp_path_factory.mktemp("dof_study")
    bids = root / "bids"
    simulate_study(bids, n_per_group=1, resolution_mm=6, n_volumes=100, seed=21)
    recipe = _stand_in_recipe(root, bids)  # the shipped recipe with the simulated seed (no atlas here)
    text = recipe.read_text().replace('covariates = ["age", "sex", "mean_fd"]', "covariates = []")
    recipe.write_text(text)
    out = root / "out"
    fcflow = [sys.executable, "-m", "fcflow"]
    for level, extra in (("participant", ["--nprocs", "2"]), ("group", ["--n-permutations", "100"])):
        done = subprocess.run([*fcflow, str(bids), str(out), level, "--recipe", str(recipe), *extra],
                              capture_output=True, text=True, timeout=900,
                              env={"FCFLOW_JULICH_URL": "http://127.0.0.1:9/", "PATH": "/usr/bin:/bin",
                                   "MPLBACKEND": "Agg", "HOME": str(root)})
        assert done.returncode == 0, done.stderr[-3000:]
        if level == "participant":
            log = done.stderr + done.stdout
    return {"out": out, "log": log, "recipe": recipe}


def test_no_run_below_min_dof_is_used(analysed):
    qc = pd.concat([pd.read_csv(p, sep="\t") for p in analysed["out"].glob("sub-*/sub-*_desc-runs_qc.tsv")])
    rest = qc[qc["task"] == "rest"]
    assert len(rest) == 9 and rest["excluded"].all()
    for reason in rest["exclusion_reason"]:
        assert "below the minimum of 10 (min_dof)" in reason
        assert "filter -" in reason and "motion -" in reason and "compcor -" in reason
    assert "(min_dof)" in analysed["log"]  # and the log said so
    # and the last line of the participant level counts what was kept and why the rest was not
    n_excluded = int(qc["excluded"].sum())
    by_dof = int(qc["exclusion_reason"].fillna("").str.contains("(min_dof)", regex=False).sum())
    assert (f"Participant level done: {len(qc) - n_excluded} of {len(qc)} runs kept; {n_excluded} excluded ("
            in analysed["log"]) and f"min_dof {by_dof}" in analysed["log"] and by_dof >= 9
    for measure in ("gppi", "background"):
        included = qc[(qc["task"] == "nback") & ~qc["excluded"]]
        assert (included[f"dof_{measure}"] >= 20).all()
    # The budget adds up in every row: kept volumes minus every cost is the dof left.
    costs = [c for c in rest.columns if c.startswith("dof_cost_")]
    assert {"dof_cost_filter", "dof_cost_motion", "dof_cost_compcor"} <= set(costs)
    censored = [c for c in qc.columns if c.startswith("censored_")]
    assert (qc[censored].sum(axis=1) == qc["n_timepoints"] - qc["n_kept"]).all()
    # Nothing of rest reached the group level.
    results = pd.read_csv(analysed["out"] / "group" / "results.tsv", sep="\t")
    assert not (results["task"] == "rest").any()


def test_group_report_says_the_study_lacks_the_dof(analysed):
    html = (analysed["out"] / "group.html").read_text()
    assert "lacks the degrees of freedom" in html
    assert "9 of 9 runs have fewer effective degrees of freedom than min_dof = 10" in html
    assert 'id="strategies"' in html and "6P+aCompCor" in html
