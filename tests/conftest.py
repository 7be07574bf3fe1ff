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
