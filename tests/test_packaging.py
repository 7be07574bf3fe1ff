"""The wheel carries what the program reads at run time from atlases/, workflows/ and sample_data/."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_carries_the_data_folders(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("fcflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("atlases", "workflows", "sample_data"):
        shipped = [p for p in (ROOT / folder).rglob("*") if p.is_file()]
        assert shipped, f"{folder}/ is empty"
        for path in shipped:
            assert f"fcflow/_data/{path.relative_to(ROOT).as_posix()}" in names
    assert "fcflow/cli/__init__.py" in names
    # The report templates are package data: jinja2's PackageLoader reads them from the installed package.
    templates = [p for p in (ROOT / "fcflow" / "reports" / "templates").glob("*.j2")]
    assert len(templates) >= 3
    for path in templates:
        assert f"fcflow/reports/templates/{path.name}" in names
    # No atlas voxels: the Julich-Brain files are CC BY-NC-SA and are fetched, never shipped.
    assert not [n for n in names if n.endswith((".nii", ".nii.gz"))]


def test_data_dir_finds_the_checkout_folders():
    from fcflow.resources import data_dir, recipe_file

    assert recipe_file("weigner2025_pgacc").is_file()
    assert (data_dir("sample_data")).is_dir()
    with pytest.raises(FileNotFoundError, match="fcflow ships"):
        recipe_file("no_such_recipe")
    with pytest.raises(ValueError, match="'name' must be one of"):
        data_dir("secrets")
