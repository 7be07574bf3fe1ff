"""Shared fixtures.

The real Julich-Brain v3.1 files are never part of the repository (CC BY-NC-SA). Tests that need
them read the folder named by FCFLOW_TEST_JULICH_DIR and are skipped when it is unset; CI sets it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def julich_dir() -> Path:
    """The folder with the real Julich-Brain v3.1 MPM files, or skip."""
    value = os.environ.get("FCFLOW_TEST_JULICH_DIR")
    if not value:
        pytest.skip("FCFLOW_TEST_JULICH_DIR is not set (the real Julich-Brain files are not committed)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"FCFLOW_TEST_JULICH_DIR={value!r} is not a directory")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never let a test read or write the user's cache or pick up the user's atlas copy."""
    monkeypatch.setenv("FCFLOW_CACHE_DIR", str(tmp_path_factory.mktemp("fcflow-cache")))
    monkeypatch.delenv("FCFLOW_JULICH_DIR", raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def one_subject_infusion(tmp_path_factory) -> dict:
    """Subject 01's infusion rest and n-back runs of a small simulated study (read only).

    240 volumes at TR 2 s, 4 mm, seed 5: the rest run keeps more than the shipped recipe's
    min_dof (80 volumes would not). ``bids``, ``runs`` (fcflow.bids runs) and ``seed_file``
    (the simulator's pgACC mask); shared by the report and smoothing tests, simulated once.
    """
    from fcflow.bids import collect_runs
    from fcflow.config import load_recipe
    from fcflow.simulate import simulate_study

    recipe = load_recipe("weigner2025_pgacc")
    bids = tmp_path_factory.mktemp("one_subject") / "bids"
    simulate_study(bids, n_per_group=1, resolution_mm=4, n_volumes=240, seed=5)
    runs = collect_runs(bids, bids / "derivatives" / "fmriprep", space=recipe.space, group_column="group",
                        groups=recipe.groups, sessions=recipe.sessions, tasks_with_events=["nback"],
                        tasks=["rest", "nback"], participant_labels=["01"], session_labels=["infusion"]).runs
    (seed_file,) = (bids / "derivatives" / "ground_truth").glob("*_desc-pgACC_mask.nii.gz")
    return {"bids": bids, "runs": runs, "seed_file": seed_file}
