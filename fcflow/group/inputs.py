"""Group level, inputs: which first-level maps enter, read once per task x measure x seed.

:func:`collect_first_level` finds a measure's maps and the runs' QC rows in OUTPUT_DIR;
:func:`load_session_maps` reads them into one (sessions, subjects, voxels) array over the analysis
mask; :func:`check_map_provenance` refuses maps made with different analysis settings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.bids import parse_entities
from fcflow.config import Recipe
from fcflow.errors import InputDataError

LOGGER = logging.getLogger("fcflow.group")


_MAP_RE = re.compile(r"^sub-(?P<sub>[A-Za-z0-9]+)_(?P<rest>.+)_statmap\.nii\.gz$")


@dataclass(frozen=True)
class MeasureMap:
    """The first-level map of one task x measure x seed that the group level analyses.

    ``desc`` and ``stat`` are the entities of the first-level file name.
    """

    task: str
    measure: str
    seed: str
    desc: str
    stat: str

    @property
    def label(self) -> str:
        return f"task-{self.task} seed-{self.seed} desc-{self.desc} (stat-{self.stat})"


def select_measure_maps(recipe: Recipe) -> list[MeasureMap]:
    """The maps the group level analyses, in recipe order.

    Correlation (rest) and background (task) enter as Fisher z (``stat-z``); gPPI as the
    ``beta`` of each condition contrast of the task (``desc-gppi<contrast name>``), or of each
    condition when the task declares no condition contrast.
    """
    out = []
    for task in recipe.tasks:
        for measure in task.measures:
            for seed in recipe.seeds:
                if measure == "gppi":
                    labels = [c.name for c in task.condition_contrasts] or list(task.conditions)
                    out += [MeasureMap(task.name, measure, seed.name, f"gppi{lab}", "beta") for lab in labels]
                else:
                    out.append(MeasureMap(task.name, measure, seed.name, measure, "z"))
    return out


def read_run_qc(output_dir: str | Path) -> pd.DataFrame:
    """The participant level's QC rows the group level needs (:func:`fcflow.derivatives.read_runs_qc`).

    Returns
    -------
    DataFrame
        Columns ``participant`` (label without ``sub-``), ``session``, ``task``, ``run`` (str,
        "" when absent), ``excluded`` (bool), ``exclusion_reason``, ``mean_fd_mm``.
    """
    from fcflow.derivatives import read_runs_qc

    columns = ["participant", "session", "task", "run", "excluded", "exclusion_reason", "mean_fd_mm"]
    return read_runs_qc(output_dir)[columns]


def collect_first_level(output_dir: str | Path, measure: MeasureMap, *, space: str) -> pd.DataFrame:
    """The runs of one task x measure x seed: their map (if any), exclusion and mean FD.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    measure : MeasureMap
    space : str
        Template space of the maps (``space-`` entity), e.g. ``MNI152NLin2009cAsym``.

    Returns
    -------
    runs : DataFrame
        One row per run of the task listed in the QC tables or found as a map, sorted by
        participant, session and run, with columns participant, session, run, file (relative to
        ``output_dir``, "" without a map), excluded, exclusion_reason, mean_fd_mm.
    """
    output_dir = Path(output_dir)
    found = []
    pattern = (f"sub-*/ses-*/func/sub-*_task-{measure.task}_*seed-{measure.seed}_stat-{measure.stat}_"
               f"desc-{measure.desc}_statmap.nii.gz")
    for path in sorted(output_dir.glob(pattern)):
        match = _MAP_RE.match(path.name)
        if match is None:
            continue
        ents = parse_entities(path.name)[0]
        if ents.get("space") != space or ents.get("task") != measure.task or ents.get("desc") != measure.desc:
            continue
        found.append({"participant": ents["sub"], "session": ents.get("ses", ""), "run": ents.get("run", ""),
                      "file": str(path.relative_to(output_dir))})
    maps = pd.DataFrame(found, columns=["participant", "session", "run", "file"])
    qc = read_run_qc(output_dir)
    qc = qc[qc["task"] == measure.task].drop(columns="task")
    runs = qc.merge(maps, on=["participant", "session", "run"], how="outer")
    runs["file"] = runs["file"].fillna("")
    runs["excluded"] = runs["excluded"].fillna(False).astype(bool)
    runs["exclusion_reason"] = runs["exclusion_reason"].fillna("")
    no_qc = runs["mean_fd_mm"].isna() & (runs["file"] != "")
    if no_qc.any():
        LOGGER.warning("%d map(s) of %s have no row in a participant QC table (e.g. %s): their mean FD "
                       "is unknown.", int(no_qc.sum()), measure.label, runs.loc[no_qc, "file"].iloc[0])
    lost = ~runs["excluded"] & (runs["file"] == "")
    if lost.any():
        first = runs[lost].iloc[0]
        LOGGER.warning("%d run(s) of %s are included in the QC tables but have no map (e.g. sub-%s "
                       "ses-%s): rerun the participant level for them.", int(lost.sum()), measure.label,
                       first["participant"], first["session"])
    return runs.sort_values(["participant", "session", "run"]).reset_index(drop=True)[
        ["participant", "session", "run", "file", "excluded", "exclusion_reason", "mean_fd_mm"]]


@dataclass
class SessionMaps:
    """Every subject's map at every session of one task x measure x seed, on the analysis mask.

    Attributes
    ----------
    subjects : list of str
        Participant labels (without ``sub-``), sorted.
    sessions : tuple of str
    data : ndarray of shape (n_sessions, n_subjects, n_voxels), float32
        0 where ``present`` is False.
    present : ndarray of shape (n_sessions, n_subjects), bool
        The subject has at least one usable run in the session.
    mean_fd_mm : ndarray of shape (n_sessions, n_subjects)
        Mean of the runs' QC mean FD (NaN where absent or unknown).
    n_runs : ndarray of shape (n_sessions, n_subjects), int
    missing_reason : dict of (subject, session) to str
        Why a session is absent (no run, excluded run and its reason).
    files : dict of (subject, session) to list of str
        Maps read (relative to OUTPUT_DIR).
    mask : ndarray of bool, 3D
    affine : ndarray of shape (4, 4)
    """

    subjects: list[str]
    sessions: tuple[str, ...]
    data: NDArray[np.float32]
    present: NDArray[np.bool_]
    mean_fd_mm: NDArray[np.float64]
    n_runs: NDArray[np.int64]
    missing_reason: dict[tuple[str, str], str]
    files: dict[tuple[str, str], list[str]]
    mask: NDArray[np.bool_]
    affine: NDArray[np.float64]


def load_session_maps(output_dir: str | Path, runs: pd.DataFrame, sessions: Sequence[str]) -> SessionMaps:
    """Read every usable run's map once into (n_sessions, n_subjects, n_voxels) float32.

    Storage is limited to the voxels where the first map read is non-zero (its brain mask);
    the analysis mask, the voxels non-zero and finite in every map read, is a subset of it.

    Raises
    ------
    InputDataError
        No usable map, or maps on different grids (the file is named).
    """
    output_dir = Path(output_dir)
    sessions = tuple(sessions)
    runs = runs[runs["session"].isin(sessions)]
    usable = runs[~runs["excluded"] & (runs["file"] != "")]
    if usable.empty:
        raise InputDataError(
            f"No usable first-level map in {output_dir}: run the participant level first "
            f"({len(runs)} runs listed, {int(runs['excluded'].sum())} excluded)."
        )
    subjects = sorted(usable["participant"].unique())
    index = {s: i for i, s in enumerate(subjects)}
    n_ses, n_sub = len(sessions), len(subjects)
    present = np.zeros((n_ses, n_sub), dtype=bool)
    mean_fd = np.full((n_ses, n_sub), np.nan)
    n_runs = np.zeros((n_ses, n_sub), dtype=np.int64)
    files: dict[tuple[str, str], list[str]] = {}
    missing: dict[tuple[str, str], str] = {}
    shape = affine = candidate = support = data = None
    for subject in subjects:
        for s, session in enumerate(sessions):
            rows = runs[(runs["participant"] == subject) & (runs["session"] == session)]
            good = rows[~rows["excluded"] & (rows["file"] != "")]
            if good.empty:
                if rows.empty:
                    missing[(subject, session)] = "no run"
                else:
                    reasons = "; ".join(r or "excluded" for r in rows["exclusion_reason"])
                    missing[(subject, session)] = f"run excluded ({reasons})"
                continue
            total = None
            for rel in good["file"]:
                img = nib.load(output_dir / rel)
                if shape is None:
                    shape, affine = img.shape[:3], img.affine
                elif img.shape[:3] != shape or not np.allclose(img.affine, affine, atol=1e-3):
                    raise InputDataError(
                        f"The first-level map {rel} is on grid {img.shape[:3]} but earlier maps are on "
                        f"{shape}: all maps of a group analysis must share one grid (same space and "
                        f"res). Remove or recompute the odd one."
                    )
                values = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
                if candidate is None:
                    candidate = (values != 0) & np.isfinite(values)
                    support = np.ones(int(candidate.sum()), dtype=bool)
                    data = np.zeros((n_ses, n_sub, support.size), dtype=np.float32)
                vector = values[candidate]
                support &= (vector != 0) & np.isfinite(vector)
                total = vector if total is None else total + vector
            data[s, index[subject]] = np.nan_to_num(total / len(good))
            present[s, index[subject]] = True
            n_runs[s, index[subject]] = len(good)
            mean_fd[s, index[subject]] = float(good["mean_fd_mm"].mean())
            files[(subject, session)] = list(good["file"])
    mask = np.zeros(shape, dtype=bool)
    mask[candidate] = support
    data = np.ascontiguousarray(data[:, :, support])
    return SessionMaps(subjects=subjects, sessions=sessions, data=data, present=present, mean_fd_mm=mean_fd,
                       n_runs=n_runs, missing_reason=missing, files=files, mask=mask,
                       affine=np.asarray(affine, dtype=float))


#: Denoising settings that only feed quality control, not the maps
_QC_ONLY_DENOISING = ("compare_strategies",)


def analysis_settings(sidecar: Mapping[str, Any], task: str, seed: str) -> dict[str, Any] | None:
    """What made a first-level map, from its sidecar: the settings two maps of one analysis must share.

    The recipe's space, ``[denoising]`` (censoring, strategy, band filter, dof and exclusion limits,
    smoothing; not the QC-only strategy comparison), the task's band and conditions, the seed's
    definition, and fcflow's major.minor version. None when the sidecar records no recipe (maps
    written by other tools or by hand), which cannot be checked.
    """
    recipe = sidecar.get("Recipe") or {}
    if not recipe:
        return None
    task_entry = next((t for t in recipe.get("tasks", []) if t.get("name") == task), None)
    seed_entry = next((s for s in recipe.get("seeds", []) if s.get("name") == seed), None)
    denoising = {k: v for k, v in (recipe.get("denoising") or {}).items() if k not in _QC_ONLY_DENOISING}
    version = str((sidecar.get("Software") or {}).get("fcflow", ""))
    return {"space": recipe.get("space"), "denoising": denoising,
            "task": {k: v for k, v in (task_entry or {}).items() if k != "measures"},
            "seed": seed_entry, "smoothing_fwhm": sidecar.get("SmoothingFWHM"),
            "fcflow": ".".join(version.split(".")[:2])}


def _setting_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += _setting_differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key} {x!r} vs {y!r}")
    return out


def check_map_provenance(
    output_dir: str | Path, files: Sequence[str], *, task: str, seed: str, recipe: Recipe | None = None,
) -> None:
    """Refuse first-level maps of one analysis that were made with different settings.

    Reads every map's JSON sidecar (:func:`analysis_settings`). A study whose subjects were
    rerun with another strategy, band or seed would otherwise mix them in one test, and a
    subject's change map would subtract maps made two ways. Maps whose sidecar records no recipe
    are not compared. When the group level's ``recipe`` differs from the maps', a warning names
    the difference (the maps are what was computed; the recipe's text would describe another
    analysis).

    Raises
    ------
    InputDataError
        Two maps differ; the message names both files and every differing setting.
    """
    import json

    output_dir = Path(output_dir)
    reference: tuple[str, dict[str, Any]] | None = None
    for rel in files:
        sidecar = output_dir / str(rel).replace(".nii.gz", ".json")
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        settings = analysis_settings(meta, task, seed) if isinstance(meta, dict) else None
        if settings is None:
            continue
        if reference is None:
            reference = (str(rel), settings)
        elif settings != reference[1]:
            differences = _setting_differences(reference[1], settings)
            raise InputDataError(
                f"{rel} and {reference[0]} were made with different analysis settings ("
                f"{'; '.join(differences[:6])}{'; ...' if len(differences) > 6 else ''}): one group analysis must not "
                "mix them. Rerun the participant level for the odd subjects with the study's recipe (a fresh "
                "--work-dir after changing the recipe or fcflow)."
            )
    if reference is not None and recipe is not None:
        current = analysis_settings({"Recipe": recipe.to_dict(), "Software": {"fcflow": reference[1]["fcflow"]},
                                     "SmoothingFWHM": reference[1]["smoothing_fwhm"]}, task, seed)
        current = json.loads(json.dumps(current, default=list))
        differences = _setting_differences(reference[1], current)
        if differences:
            LOGGER.warning("task-%s seed-%s: the first-level maps were made with settings the group level's recipe "
                           "does not have (%s); the group report and methods describe the recipe, the maps what was "
                           "computed.", task, seed, "; ".join(differences[:6]))
