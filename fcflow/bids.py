"""Find the runs of a study in a raw BIDS tree and its fMRIPrep derivatives.

fcflow needs, per run: the preprocessed BOLD in the recipe's space, its brain mask, the confounds
TSV (+ JSON), the repetition time, the task events (for tasks with conditions), and the
participant's group from ``participants.tsv``. :func:`collect_runs` gathers them and checks that
they agree; anything missing or mismatched is an :class:`~fcflow.errors.InputDataError` that names
the file and the fix.

Why not pybids: on a 75-subject tree with fMRIPrep derivatives (450 runs, about 3,600 files),
``bids.BIDSLayout(root, derivatives=True, validate=False)`` took 9.1 s to index (it builds an SQL
database and parses every sidecar), while :func:`collect_runs`, which lists only the file names
fcflow uses and reads the sidecars of the selected runs, took 0.9 s including its imports
(``benchmarks/bench_bids_index.py``, 2 cores, 2026-11-22). The file-name grammar used here is
the BIDS one: ``key-value`` entities joined by underscores, then a suffix and an extension.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from fcflow.errors import InputDataError

LOGGER = logging.getLogger("fcflow.bids")

_ENTITY = re.compile(r"([a-zA-Z]+)-([a-zA-Z0-9]+)")
_TR_TOLERANCE_S = 1e-3
_LABEL = re.compile(r"[A-Za-z0-9]+")
# Direction cosines of an axis-aligned grid are 0 or +-1; float32 headers round them.
_OBLIQUE_TOLERANCE = 1e-4
_REREAD = "Re-run fMRIPrep for this run or copy the file again"


def parse_entities(name: str) -> tuple[dict[str, str], str, str]:
    """Split a BIDS file name into ``(entities, suffix, extension)``; the one parser of fcflow's names.

    A name whose last part is an entity has no suffix (""), as the nipype nodes' own files
    (``seed-pgACC_stat-z_desc-correlation.nii.gz``).

    >>> parse_entities("sub-01_ses-24h_task-rest_desc-preproc_bold.nii.gz")
    ({'sub': '01', 'ses': '24h', 'task': 'rest', 'desc': 'preproc'}, 'bold', '.nii.gz')
    >>> parse_entities("seed-pgACC_desc-correlation_stat-z.nii.gz")
    ({'seed': 'pgACC', 'desc': 'correlation', 'stat': 'z'}, '', '.nii.gz')
    """
    stem, dot, ext = Path(name).name.partition(".")
    parts = stem.split("_")
    suffix = "" if _ENTITY.fullmatch(parts[-1]) else parts.pop()
    entities: dict[str, str] = {}
    for part in parts:
        match = _ENTITY.fullmatch(part)
        if match:
            entities[match.group(1)] = match.group(2)
    return entities, suffix, dot + ext


@dataclass(frozen=True)
class RunInputs:
    """Everything fcflow reads for one BOLD run."""

    subject: str
    session: str | None
    task: str
    run: str | None
    group: str
    bold_file: Path
    mask_file: Path
    confounds_file: Path
    confounds_json: Path | None
    t_r: float
    events_file: Path | None
    entities: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        """``sub-01_ses-infusion_task-rest`` (with ``_run-N`` when present)."""
        keys = {"sub": self.subject, "ses": self.session, "task": self.task, "run": self.run}
        return "_".join(f"{k}-{v}" for k, v in keys.items() if v is not None)


@dataclass(frozen=True)
class StudyInputs:
    """The runs selected for analysis and the participants table they come from."""

    runs: tuple[RunInputs, ...]
    participants: pd.DataFrame
    warnings: tuple[str, ...] = ()


def read_participants_table(path: str | Path, columns: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.Series]:
    """Read a BIDS ``participants.tsv``: the table (text) and its participant labels without ``sub-``.

    The one reader of the file (the group design, the SLURM array's participant list): it checks
    that ``participant_id`` and ``columns`` exist and that every label is letters and digits, once.

    Raises
    ------
    InputDataError
        A column is missing or a label is not ``sub-<letters and digits>``, naming the file.
    """
    path = Path(path)
    table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
    for column in ("participant_id", *columns):
        if column not in table.columns:
            hint = (f" (the recipe's [groups] column is '{column}')" if column != "participant_id"
                    else " (BIDS participants.tsv)")
            raise InputDataError(f"{path} must have a '{column}' column{hint}. Got columns {list(table.columns)}.")
    labels = table["participant_id"].str.removeprefix("sub-")
    bad = [text for text, label in zip(table["participant_id"], labels) if not _LABEL.fullmatch(str(label))]
    if bad:
        raise InputDataError(
            f"{path}: 'participant_id' must be sub-<label> with letters and digits only (BIDS), because fcflow "
            f"builds folder names from it. Got {bad[:5]}. Fix the table."
        )
    return table, labels


def read_participants(bids_dir: Path, group_column: str, groups: Sequence[str]) -> pd.DataFrame:
    """Read ``participants.tsv`` and check its group column.

    Returns
    -------
    DataFrame
        Indexed by the participant label without ``sub-``.
    """
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        raise InputDataError(
            f"{path} is missing: fcflow reads each participant's group from its "
            f"'{group_column}' column. Add the file (BIDS: participant_id and {group_column})."
        )
    table, labels = read_participants_table(path, [group_column])
    bad = [text for text, label in zip(table["participant_id"], labels) if not _LABEL.fullmatch(str(label))]
    if bad:
        raise InputDataError(
            f"{path}: 'participant_id' must be sub-<label> with letters and digits only (BIDS), because fcflow "
            f"builds folder names from it. Got {bad[:5]}. Fix the table."
        )
    duplicated = sorted(set(labels[labels.duplicated()]))
    if duplicated:
        raise InputDataError(f"{path} lists participants more than once: {duplicated}.")
    unknown = sorted(set(table[group_column].dropna()) - set(groups))
    if unknown:
        rows = table.loc[table[group_column].isin(unknown), "participant_id"].tolist()
        raise InputDataError(
            f"{path}: '{group_column}' must be one of the recipe's groups {list(groups)}. "
            f"Got {unknown} (participants {rows[:5]}). Fix the table or the recipe's [groups] levels."
        )
    table.index = pd.Index(labels, name="participant")
    return table


def _sidecar_chain(bids_dir: Path, bold_entities: dict[str, str]) -> list[Path]:
    """Raw-side JSON sidecars that apply to a run, most general first (BIDS inheritance)."""
    sub, ses, task = bold_entities["sub"], bold_entities.get("ses"), bold_entities["task"]
    chain = [bids_dir / f"task-{task}_bold.json"]
    sub_dir = bids_dir / f"sub-{sub}"
    chain.append(sub_dir / f"sub-{sub}_task-{task}_bold.json")
    prefix = f"sub-{sub}" + (f"_ses-{ses}" if ses else "")
    func = sub_dir / (f"ses-{ses}" if ses else "") / "func"
    chain.append(func / f"{prefix}_task-{task}_bold.json")
    if "run" in bold_entities:
        chain.append(func / f"{prefix}_task-{task}_run-{bold_entities['run']}_bold.json")
    return chain


def _read_repetition_time(bids_dir: Path, deriv_bold: Path, entities: dict[str, str]) -> tuple[float, Path]:
    candidates = _sidecar_chain(bids_dir, entities) + [
        deriv_bold.with_name(deriv_bold.name.replace(".nii.gz", ".json").replace(".nii", ".json"))
    ]
    found: tuple[float, Path] | None = None
    for path in candidates:
        if path.is_file():
            try:
                meta = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise InputDataError(f"{path} is not valid JSON ({exc}).") from None
            if "RepetitionTime" in meta:
                found = (float(meta["RepetitionTime"]), path)
    if found is None:
        raise InputDataError(
            f"No RepetitionTime for {deriv_bold.name}: looked in {[str(p) for p in candidates]}. "
            "Add it to the run's BOLD sidecar (seconds)."
        )
    return found


def _load_header(path: Path, what: str) -> nib.spatialimages.SpatialImage:
    """nibabel's lazy image of ``path``; an empty or non-NIfTI file is an InputDataError."""
    if path.stat().st_size == 0:
        raise InputDataError(f"{path}: expected {what}. Got an empty file (0 bytes). {_REREAD}.")
    try:
        return nib.load(path)
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise InputDataError(
            f"{path}: expected {what}. Got a file nibabel cannot read as NIfTI ({type(exc).__name__}: {exc}). "
            f"{_REREAD}."
        ) from None


def _check_complete(path: Path, img: nib.spatialimages.SpatialImage) -> None:
    """Refuse a BOLD file shorter than its header says (a copy or a write cut short).

    For ``.nii.gz`` the gzip trailer holds the uncompressed size (modulo 2**32): when it matches
    the header there is nothing more to read. Otherwise (a truncated file, whose last bytes are
    not a trailer, or a valid multi-member gzip) the file is decompressed once to find out.
    """
    header = img.header
    # nibabel zeroes vox_offset in a loaded header; the array proxy keeps the file's.
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    expected = offset + int(np.prod(img.shape)) * header.get_data_dtype().itemsize
    if not path.name.endswith(".gz"):
        size = path.stat().st_size
        if size < expected:
            raise InputDataError(
                f"{path}: expected {expected} bytes (header and {img.shape} voxels). Got {size} bytes: the "
                f"file is truncated. {_REREAD}."
            )
        return
    with open(path, "rb") as handle:
        handle.seek(-4, 2)
        trailer = int.from_bytes(handle.read(4), "little")
    if trailer == expected % 2**32:
        return
    from isal import igzip

    total = 0
    try:
        with igzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError) as exc:
        raise InputDataError(
            f"{path}: expected a complete gzip stream of {expected} bytes (header and {img.shape} voxels). "
            f"Got a file that ends early or is corrupt ({type(exc).__name__}: {exc}). {_REREAD}."
        ) from None
    if total < expected:
        raise InputDataError(
            f"{path}: expected {expected} bytes once decompressed (header and {img.shape} voxels). Got "
            f"{total}: the file is truncated. {_REREAD}."
        )


def _check_axis_aligned(path: Path, affine: np.ndarray, space: str) -> None:
    """Refuse an oblique grid: a template-space run is resampled to an axis-aligned grid."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(np.abs(directions), np.round(np.abs(directions)), atol=_OBLIQUE_TOLERANCE):
        raise InputDataError(
            f"{path}: expected an axis-aligned grid, as fMRIPrep writes in {space} (flipped axes are fine). "
            f"Got an oblique affine {np.round(affine, 3).tolist()}: this file is not on the template's grid. "
            "Check its space- entity, or resample it to the template with fMRIPrep's --output-spaces."
        )


def _count_rows(path: Path) -> int:
    """Data rows of a TSV (non-empty lines after the header)."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return max(sum(1 for line in handle if line.strip()) - 1, 0)


def _check_headers(run_name: str, bold_file: Path, mask_file: Path, t_r: float, t_r_file: Path,
                   space: str = "the template space") -> int:
    """Check a run's BOLD and mask headers (readable, 4D, one grid, complete, TR); return its volumes."""
    bold = _load_header(bold_file, "fMRIPrep's preprocessed 4D BOLD series")
    mask = _load_header(mask_file, "fMRIPrep's 3D brain mask of the run")
    if len(bold.shape) != 4:
        raise InputDataError(f"{bold_file} must be a 4D BOLD series. Got shape {bold.shape}.")
    if bold.shape[3] < 2:
        # checked before the confounds' row count, which would otherwise take the blame
        raise InputDataError(
            f"{bold_file}: expected a BOLD time series. Got {bold.shape[3]} volume: the file is not a complete "
            f"fMRIPrep output. {_REREAD}."
        )
    if bold.shape[:3] != mask.shape[:3] or not np.allclose(bold.affine, mask.affine, atol=1e-3):
        raise InputDataError(
            f"{run_name}: the brain mask {mask_file.name} is on another grid than the BOLD run "
            f"(mask shape {mask.shape[:3]}, BOLD shape {bold.shape[:3]}; affines "
            f"{'equal' if np.allclose(bold.affine, mask.affine, atol=1e-3) else 'differ'}). "
            "Use the mask fMRIPrep wrote for this run and space."
        )
    _check_axis_aligned(bold_file, bold.affine, space)
    _check_complete(bold_file, bold)
    zooms = bold.header.get_zooms()
    units = bold.header.get_xyzt_units()[1] if hasattr(bold.header, "get_xyzt_units") else "sec"
    header_tr = float(zooms[3]) * {"msec": 1e-3, "usec": 1e-6}.get(units, 1.0)
    if header_tr > 0 and abs(header_tr - t_r) > _TR_TOLERANCE_S:
        raise InputDataError(
            f"{run_name}: RepetitionTime {t_r} s in {t_r_file} disagrees with the NIfTI header of "
            f"{bold_file.name} ({header_tr} s). Fix whichever is wrong before analysing."
        )
    return int(bold.shape[3])


def collect_runs(
    bids_dir: Path,
    derivatives_dir: Path,
    *,
    space: str,
    group_column: str,
    groups: Sequence[str],
    sessions: Sequence[str],
    tasks_with_events: Iterable[str],
    tasks: Sequence[str],
    participant_labels: Sequence[str] | None = None,
    session_labels: Sequence[str] | None = None,
    task_labels: Sequence[str] | None = None,
    check_headers: bool = True,
) -> StudyInputs:
    """Collect the runs to analyse, with every input checked.

    Parameters
    ----------
    bids_dir : Path
        Raw BIDS dataset (``participants.tsv``, sidecars, events).
    derivatives_dir : Path
        fMRIPrep derivatives.
    space : str
        Output space the recipe analyses (``space-`` entity), e.g. ``MNI152NLin2009cAsym``.
    group_column, groups : str, sequence of str
        The ``participants.tsv`` column and the recipe's group levels.
    sessions : sequence of str
        The recipe's sessions; runs of other sessions are ignored (with a warning).
    tasks_with_events : iterable of str
        Tasks whose measures need an events file.
    tasks : sequence of str
        The recipe's tasks.
    participant_labels, session_labels, task_labels : sequence of str, optional
        BIDS-App filters (labels without ``sub-``/``ses-``/``task-``).
    check_headers : bool, default=True
        Read the NIfTI headers to compare grids and repetition times.

    Returns
    -------
    StudyInputs
    """
    # Absolute paths: nipype runs each node in its own working folder.
    bids_dir, derivatives_dir = Path(bids_dir).resolve(), Path(derivatives_dir).resolve()
    if not derivatives_dir.is_dir():
        raise InputDataError(
            f"fMRIPrep derivatives folder {derivatives_dir} does not exist: pass --derivatives "
            "with the folder fMRIPrep wrote (it holds sub-*/[ses-*/]func/*_desc-preproc_bold.nii.gz)."
        )
    participants = read_participants(bids_dir, group_column, groups)
    wanted_tasks, wanted_sessions = _wanted_levels(tasks, sessions, task_labels, session_labels)
    warnings: list[str] = []
    found = _find_bold_runs(derivatives_dir, space=space, sessions=sessions, wanted_tasks=wanted_tasks,
                            wanted_sessions=wanted_sessions, participant_labels=participant_labels,
                            warnings=warnings)
    _check_masks_have_bold(derivatives_dir, space=space, wanted_tasks=wanted_tasks,
                           wanted_sessions=wanted_sessions, participant_labels=participant_labels)
    needs_events = set(tasks_with_events)
    runs = [
        _run_inputs(bold, key, bids_dir=bids_dir, participants=participants, group_column=group_column,
                    space=space, needs_events=key[2] in needs_events, check_headers=check_headers)
        for key, bold in sorted(found.items(), key=lambda kv: tuple(str(k) for k in kv[0]))
    ]
    analysed = {r.subject for r in runs}
    without_data = sorted(set(participants.index) - analysed)
    if without_data and not participant_labels:
        warnings.append(
            f"{len(without_data)} participant(s) in participants.tsv have no runs to analyse: "
            f"{['sub-' + s for s in without_data[:10]]}."
        )
    for text in warnings:
        LOGGER.warning(text)
    return StudyInputs(tuple(runs), participants, tuple(warnings))


def _wanted_levels(
    tasks: Sequence[str], sessions: Sequence[str], task_labels: Sequence[str] | None,
    session_labels: Sequence[str] | None,
) -> tuple[set[str], set[str]]:
    """The tasks and sessions the BIDS-App filters select, each checked against the recipe's."""
    wanted_tasks = set(task_labels or tasks)
    unknown_tasks = wanted_tasks - set(tasks)
    if unknown_tasks:
        raise InputDataError(f"--task must name tasks of the recipe {list(tasks)}. Got {sorted(unknown_tasks)}.")
    wanted_sessions = set(session_labels or sessions)
    unknown_sessions = wanted_sessions - set(sessions)
    if unknown_sessions:
        raise InputDataError(
            f"--session-label must name sessions of the recipe's [sessions] levels {list(sessions)}. "
            f"Got {sorted(unknown_sessions)}."
        )
    return wanted_tasks, wanted_sessions


def _find_bold_runs(
    derivatives_dir: Path, *, space: str, sessions: Sequence[str], wanted_tasks: set[str],
    wanted_sessions: set[str], participant_labels: Sequence[str] | None, warnings: list[str],
) -> dict[tuple, Path]:
    """fMRIPrep's preprocessed BOLD of the selected runs in ``space``, one per run.

    Keyed by (subject, session, task, run, echo). Runs of sessions the recipe does not know add a
    line to ``warnings``. Raises when a run has two BOLD files in the space, when a requested
    participant has none, or when nothing is found (naming the spaces that are there).
    """
    found: dict[tuple, Path] = {}
    other_spaces: set[str] = set()
    subjects_seen: set[str] = set()
    for bold in sorted(derivatives_dir.glob("sub-*/**/func/*_desc-preproc_bold.nii*")):
        entities, suffix, ext = parse_entities(bold.name)
        if ext not in (".nii", ".nii.gz") or "task" not in entities:
            continue
        if entities.get("space") != space:
            other_spaces.add(entities.get("space", "<none: native>"))
            continue
        subjects_seen.add(entities["sub"])
        if participant_labels and entities["sub"] not in participant_labels:
            continue
        if entities["task"] not in wanted_tasks:
            continue
        session = entities.get("ses")
        if session is not None and session not in wanted_sessions:
            if session not in sessions:
                warnings.append(f"{bold.name}: session '{session}' is not in the recipe {list(sessions)}; ignored.")
            continue
        key = (entities["sub"], session, entities["task"], entities.get("run"), entities.get("echo"))
        if key in found:
            raise InputDataError(
                f"Two BOLD files for one run in {space}: {found[key].name} and {bold.name}. "
                "Keep one resolution (res-) or description per run in the derivatives folder."
            )
        found[key] = bold
    if participant_labels:
        missing = sorted(set(participant_labels) - {key[0] for key in found})
        if missing:
            seen = sorted(subjects_seen)
            listed = ", ".join(seen[:20]) + (f" and {len(seen) - 20} more" if len(seen) > 20 else "")
            raise InputDataError(
                f"--participant-label {missing}: no preprocessed BOLD in space {space} under "
                f"{derivatives_dir} for these participants. Participants with BOLD in {space}: "
                f"{listed or 'none'}."
            )
    if not found:
        hint = f" Found other spaces: {sorted(other_spaces)}." if other_spaces else ""
        raise InputDataError(
            f"No *_space-{space}_*desc-preproc_bold.nii.gz for the selected runs under {derivatives_dir}."
            f"{hint} Run fMRIPrep with --output-spaces {space}, or check the filters."
        )
    return found


def _check_masks_have_bold(
    derivatives_dir: Path, *, space: str, wanted_tasks: set[str], wanted_sessions: set[str],
    participant_labels: Sequence[str] | None,
) -> None:
    """Refuse a selected run whose brain mask is there but whose preprocessed BOLD is not."""
    for mask in sorted(derivatives_dir.glob("sub-*/**/func/*_desc-brain_mask.nii.gz")):
        entities, _, _ = parse_entities(mask.name)
        if (entities.get("space") != space or entities.get("task") not in wanted_tasks
                or (participant_labels and entities["sub"] not in participant_labels)
                or entities.get("ses", "") not in wanted_sessions | {""}):
            continue
        bold_name = mask.name.split("_desc-brain_mask")[0] + "_desc-preproc_bold.nii.gz"
        if not (mask.with_name(bold_name).exists() or mask.with_name(bold_name.removesuffix(".gz")).exists()):
            raise InputDataError(
                f"{mask.with_name(bold_name)}: expected fMRIPrep's preprocessed BOLD beside its brain mask "
                f"{mask.name}. Got no such file (.nii.gz or .nii): fMRIPrep did not finish this run, or the "
                f"file was lost. {_REREAD}, or remove the run's other files to leave it out."
            )


def _run_inputs(
    bold: Path, key: tuple, *, bids_dir: Path, participants: pd.DataFrame, group_column: str, space: str,
    needs_events: bool, check_headers: bool,
) -> RunInputs:
    """One run's inputs: its group, brain mask, confounds (and JSON), TR and events, each checked."""
    sub, ses, task, run, _echo = key
    entities, _, _ = parse_entities(bold.name)
    name = bold.name.split("_space-")[0]
    if sub not in participants.index:
        raise InputDataError(
            f"sub-{sub} has data ({bold.name}) but no row in {bids_dir / 'participants.tsv'}: add it "
            f"with its '{group_column}', or leave it out with --participant-label."
        )
    group = participants.loc[sub, group_column]
    if not isinstance(group, str):
        raise InputDataError(
            f"sub-{sub} has no '{group_column}' in {bids_dir / 'participants.tsv'} (n/a): every "
            "analysed participant needs a group."
        )
    prefix = bold.name.split("_desc-preproc_bold")[0]
    mask = bold.with_name(f"{prefix}_desc-brain_mask.nii.gz")
    if not mask.is_file():
        raise InputDataError(f"{name}: the brain mask {mask} is missing (fMRIPrep writes it beside the BOLD).")
    base = "_".join(f"{k}-{entities[k]}" for k in ("sub", "ses", "task", "acq", "run") if k in entities)
    confounds = bold.with_name(f"{base}_desc-confounds_timeseries.tsv")
    if not confounds.is_file():
        legacy = bold.with_name(f"{base}_desc-confounds_regressors.tsv")
        if not legacy.is_file():
            raise InputDataError(
                f"{name}: the confounds file {confounds} is missing. fcflow needs fMRIPrep's "
                "confounds TSV (and its JSON) for denoising."
            )
        confounds = legacy
    confounds_json = confounds.with_suffix(".json")
    t_r, t_r_file = _read_repetition_time(bids_dir, bold, entities)
    events = None
    if needs_events:
        func = bids_dir / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "func"
        events = func / f"{base}_events.tsv"
        if not events.is_file():
            raise InputDataError(
                f"{name}: the events file {events} is missing; the recipe's task '{task}' models "
                "conditions and needs it (onset, duration, trial_type)."
            )
    if check_headers:
        n_volumes = _check_headers(name, bold, mask, t_r, t_r_file, space)
        n_rows = _count_rows(confounds)
        if n_rows != n_volumes:
            raise InputDataError(
                f"{confounds}: expected one row per volume of {bold.name} ({n_volumes} volumes). Got "
                f"{n_rows} rows. Use the confounds file fMRIPrep wrote for this run (re-run fMRIPrep for it "
                "if the file was cut short)."
            )
    return RunInputs(sub, ses, task, run, group, bold, mask, confounds,
                     confounds_json if confounds_json.is_file() else None, t_r, events, entities)
