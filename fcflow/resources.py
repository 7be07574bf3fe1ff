"""Locate the data folders that ship with fcflow (``atlases/``, ``workflows/``, ``sample_data/``).

In a source checkout (and an editable install) they are the top-level folders of the repository;
in a wheel they are carried inside the package as ``fcflow/_data/<name>`` (see ``pyproject.toml``).
"""

from __future__ import annotations

from pathlib import Path

from fcflow.errors import InputDataError

_PACKAGE_DIR = Path(__file__).resolve().parent
_NAMES = ("atlases", "workflows", "sample_data")


def data_dir(name: str) -> Path:
    """Return the folder ``name`` (one of ``atlases``, ``workflows``, ``sample_data``).

    Raises
    ------
    ValueError
        If ``name`` is not one of the shipped folders.
    FileNotFoundError
        If the folder is in neither place (a broken installation).
    """
    if name not in _NAMES:
        raise InputDataError(f"'name' must be one of {_NAMES}. Got {name!r}.")
    for candidate in (_PACKAGE_DIR / "_data" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"fcflow's '{name}' folder is missing from {_PACKAGE_DIR / '_data'} and "
        f"{_PACKAGE_DIR.parent}: reinstall fcflow."
    )


def recipe_file(name: str) -> Path:
    """Return the path of a shipped study recipe, by file name or stem (``weigner2025_pgacc``)."""
    folder = data_dir("workflows")
    path = folder / (name if name.endswith(".toml") else f"{name}.toml")
    if not path.is_file():
        shipped = sorted(p.stem for p in folder.glob("*.toml"))
        raise FileNotFoundError(f"No shipped recipe {name!r}; fcflow ships {shipped}.")
    return path
