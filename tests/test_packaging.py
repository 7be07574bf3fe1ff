"""The wheel carries what the program reads at run time from atlases/, workflows/ and sample_data/;
the licence, citation and changelog files agree with the package's metadata."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from fcflow import __version__

ROOT = Path(__file__).resolve().parents[1]
# The DOI pattern of the CFF 1.2.0 schema (definitions.doi).
_CFF_DOI = re.compile(r"^10\.\d{4,9}(\.\d+)?/[A-Za-z0-9:/_;\-\.\(\)\[\]\\]+$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


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
    # hatchling puts LICEN[CS]E* into the dist-info by default (no license-files needed).
    dist_info = [n for n in names if ".dist-info/" in n]
    assert [n for n in dist_info if re.fullmatch(r"fcflow-[^/]+\.dist-info/(licenses/)?LICENSE", n)], dist_info
    # The report templates are package data: jinja2's PackageLoader reads them from the installed package.
    templates = [p for p in (ROOT / "fcflow" / "reports" / "templates").glob("*.j2")]
    assert len(templates) >= 3
    for path in templates:
        assert f"fcflow/reports/templates/{path.name}" in names
    # the pybids configuration that declares fcflow's entities (fcflow.derivatives.PYBIDS_CONFIG)
    assert "fcflow/pybids_config.json" in names
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


def test_license_file_is_the_license_pyproject_declares():
    assert _pyproject()["project"]["license"] == "BSD-3-Clause"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License\n")
    assert "Copyright (c) 2025-2026, the fcflow developers" in text
    assert "3. Neither the name of the copyright holder nor the names of its" in text


def test_citation_cff_is_valid_and_agrees_with_the_package():
    yaml = pytest.importorskip("yaml")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    # The required keys of CFF 1.2.0 and their types.
    for key, kind in (("cff-version", str), ("message", str), ("title", str), ("authors", list)):
        assert isinstance(cff.get(key), kind), f"CITATION.cff: {key!r} must be a {kind.__name__}"
    assert cff["cff-version"] == "1.2.0"
    assert cff["type"] == "software"
    assert cff["title"] == "fcflow"
    assert cff["version"] == __version__, "bump CITATION.cff's version with fcflow/__init__.py's"
    assert cff["license"] == _pyproject()["project"]["license"]
    assert cff["authors"] == [{"name": "the fcflow developers"}]
    assert isinstance(cff["abstract"], str) and cff["abstract"].strip()
    assert cff["keywords"] and all(isinstance(k, str) and k for k in cff["keywords"])
    assert "repository-code" not in cff or cff["repository-code"].startswith("https://")
    references = cff["references"]
    assert [r["doi"] for r in references] == ["10.1177/02698811251346705", "10.1126/science.abb4588"]
    for reference in references:
        assert isinstance(reference["title"], str) and isinstance(reference["type"], str)
        assert reference["authors"] and all(
            isinstance(a.get("family-names") or a.get("name"), str) for a in reference["authors"])
        assert _CFF_DOI.match(reference["doi"]), reference["doi"]
        assert isinstance(reference["year"], int)


def test_changelog_names_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in text
    assert __version__ in text, "CHANGELOG.md must name the version fcflow/__init__.py declares"
