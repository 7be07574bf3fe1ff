"""BIDS-derivative names, the dataset description and provenance for fcflow's outputs.

First-level file names carry ``sub``, ``ses``, ``task``, ``run``, ``space``, ``res``, the
non-standard ``seed`` entity, a ``stat`` that says which statistic (``r``, ``z``, ``beta``, ``t``)
and, last as BIDS wants it, a ``desc`` that says which measure the map is (``correlation``,
``background``, ``gppi2back``, ``gppi2backMinus0back``), e.g.::

    sub-01/ses-infusion/func/
      sub-01_ses-infusion_task-rest_space-MNI152NLin2009cAsym_res-2_seed-pgACC_stat-z_desc-correlation_statmap.nii.gz
      sub-01_ses-infusion_task-rest_space-MNI152NLin2009cAsym_res-2_seed-pgACC_mask.nii.gz
      sub-01_ses-infusion_task-rest_seed-pgACC_timeseries.tsv

The ``statmap`` suffix, ``contrast`` and ``stat`` follow the BIDS statistical-model derivatives
proposal (BEP041, as FitLins and nilearn's ``save_glm_to_bids`` write them; XCP-D puts ``stat``
before ``desc`` too). Entities BIDS does not define (:data:`CUSTOM_ENTITIES`) are declared in the
pybids configuration shipped with fcflow (:data:`PYBIDS_CONFIG`), so that::

    from bids import BIDSLayout
    from fcflow.derivatives import PYBIDS_CONFIG
    layout = BIDSLayout(OUTPUT_DIR, validate=False, config=["bids", "derivatives", PYBIDS_CONFIG])
    layout.get(task="rest", seed="pgACC", session="infusion", desc="correlation", stat="z",
               suffix="statmap", extension=".nii.gz")

finds the rest correlation z maps of one seed and session (:func:`bids_layout` does the first
two lines).
"""

from __future__ import annotations

import json
import platform
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd

from fcflow import __version__
from fcflow.bids import parse_entities
from fcflow.errors import InputDataError
from fcflow.io import atomic_path, save_img, sha256_file, write_json, write_tsv

#: Entities fcflow's file names use that BIDS does not define (``stat`` and ``contrast`` are those of
#: the statistical-model derivatives proposal), each declared in :data:`PYBIDS_CONFIG`.
CUSTOM_ENTITIES = {
    "seed": "Seed region the map or series was computed from (see the sidecar).",
    "contrast": "Group contrast (t) or F test of the map, named as in the recipe.",
    "stat": "Statistic the map holds (r, z, beta, t, F, logpFWE, ...).",
    "inference": "Inference the p map, thresholded map or cluster table belongs to (tfce, maxt, ...).",
    "alpha": "Significance level of a thresholded map or cluster table ('0p05' is 0.05).",
    "cluster": "Cluster number in the cluster table of the same contrast.",
}
#: pybids configuration that declares :data:`CUSTOM_ENTITIES` (use with pybids' "bids" and "derivatives").
PYBIDS_CONFIG = Path(__file__).with_name("pybids_config.json")
# BIDS order; desc last, as the specification orders it; stat before it, as BEP041 and XCP-D do
_ORDER = ("sub", "ses", "task", "acq", "run", "space", "res", "seed", "contrast", "stat", "inference", "alpha",
          "cluster", "desc")


def bids_label(value: str) -> str:
    """``value`` as a BIDS label (letters and digits only): ``cluster_mass`` -> ``clusterMass``."""
    head, *rest = re.split(r"[^A-Za-z0-9]+", str(value))
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def bids_name(entities: Mapping[str, Any], suffix: str, extension: str) -> str:
    """Join entities in BIDS order (unknown keys last), then the suffix and extension.

    Raises
    ------
    ValueError
        When a label holds anything but letters and digits (BIDS labels cannot; pybids would read
        ``inference-cluster_mass`` as ``inference-cluster``): pass it through :func:`bids_label`.
    """
    keys = [k for k in _ORDER if entities.get(k)] + sorted(k for k in entities if k not in _ORDER and entities[k])
    bad = {k: entities[k] for k in keys if not re.fullmatch(r"[A-Za-z0-9]+", str(entities[k]))}
    if bad:
        raise InputDataError(f"BIDS labels hold letters and digits only; got {bad} for the {suffix} file.")
    return "_".join([f"{k}-{entities[k]}" for k in keys] + [suffix]) + extension


def run_dir(output_dir: Path, subject: str, session: str | None) -> Path:
    """``OUTPUT_DIR/sub-<label>[/ses-<label>]/func``."""
    path = Path(output_dir) / f"sub-{subject}"
    return (path / f"ses-{session}" if session else path) / "func"


def write_dataset_description(
    output_dir: Path, source_datasets: Sequence[Path], name: str = "fcflow seed-to-voxel connectivity"
) -> Path:
    """Write ``dataset_description.json`` for fcflow's derivatives (stable content, atomic)."""
    payload = {
        "Name": name,
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "fcflow",
            "Version": __version__,
            "Description": "Seed-to-voxel functional connectivity and group x session inference",
        }],
        "SourceDatasets": [{"URL": Path(p).resolve().as_uri()} for p in source_datasets],
    }
    return write_json(Path(output_dir) / "dataset_description.json", payload)


def bids_layout(output_dir: str | Path) -> Any:
    """A pybids ``BIDSLayout`` of fcflow's outputs that can be queried by every fcflow entity.

    Parameters
    ----------
    output_dir : path
        fcflow's OUTPUT_DIR (first level in ``sub-*/``, group level in ``group/``).

    Returns
    -------
    bids.BIDSLayout
        Indexed with pybids' ``bids`` and ``derivatives`` configurations and :data:`PYBIDS_CONFIG`.
    """
    try:
        from bids import BIDSLayout
    except ImportError as exc:  # pybids is optional: fcflow itself never needs it
        raise ImportError("fcflow.derivatives.bids_layout needs pybids: pip install 'pybids>=0.21,<0.23'.") from exc

    return BIDSLayout(Path(output_dir), validate=False, config=["bids", "derivatives", str(PYBIDS_CONFIG)])


def file_record(path: Path, *, checksum: bool = True) -> dict[str, Any]:
    """Path, size and (by default) SHA-256 of an input file, for sidecars."""
    path = Path(path)
    record: dict[str, Any] = {"path": str(path.resolve()), "size": path.stat().st_size}
    if checksum:
        record["sha256"] = sha256_file(path)
    return record


def software_versions() -> dict[str, str]:
    """Versions of fcflow and the software whose numbers end up in the maps, by their usual names.

    The one source of the ``Software`` record of every sidecar and of the versions the reports and
    the methods paragraph name.
    """
    from importlib.metadata import PackageNotFoundError, version

    import nibabel
    import nilearn
    import numpy
    import scipy

    try:
        # from the installed metadata: importing nipype would pull the wiring layer into the
        # science layer (tests/test_layers.py)
        nipype_version = version("nipype")
    except PackageNotFoundError:
        nipype_version = "not installed"
    return {"fcflow": __version__, "Python": platform.python_version(), "nilearn": nilearn.__version__,
            "nibabel": nibabel.__version__, "nipype": nipype_version, "NumPy": numpy.__version__,
            "SciPy": scipy.__version__}


#: Options that decide only how fcflow runs, never what it computes (the reliability tests check
#: that outputs are byte-identical across them), with whether each takes a value.
EXECUTION_OPTIONS = {"--plugin": True, "--nprocs": True, "--mem-gb": True, "--sbatch-args": True,
                     "--plugin-args": True, "--work-dir": True, "--debug": False, "--quiet": False, "-q": False}


def analysis_command(command: Sequence[str]) -> list[str]:
    """``command`` without :data:`EXECUTION_OPTIONS` (and their values), as sidecars record it.

    The same analysis run with another ``--nprocs``, plugin or working directory then writes
    the same bytes, and the recorded command still rebuilds every output. argparse's
    abbreviations (``--npro 2``) and ``--opt=value`` forms are recognised.
    """
    kept: list[str] = []
    words = list(command)
    i = 0
    while i < len(words):
        word = words[i]
        flag, has_equals, _ = word.partition("=")
        matches = [name for name in EXECUTION_OPTIONS
                   if name == flag or (flag.startswith("--") and len(flag) > 2 and name.startswith(flag))]
        if not matches:
            kept.append(word)
            i += 1
            continue
        takes_value = EXECUTION_OPTIONS[flag if flag in EXECUTION_OPTIONS else matches[0]]
        i += 2 if takes_value and not has_equals else 1
    return kept


def software_provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """What a reader needs to rebuild an output: the analysis command (:func:`analysis_command`) and
    the software versions."""
    return {
        "Command": analysis_command(sys.argv if command is None else command),
        "Software": software_versions(),
    }


def write_run_derivatives(
    output_dir: str | Path,
    entities: Mapping[str, str | None],
    *,
    map_files: Sequence[str],
    timeseries_files: Sequence[str],
    seed_files: Sequence[str],
    seed_sidecars: Sequence[str],
    qc_file: str,
    censoring_file: str,
    provenance: Mapping[str, Any],
) -> tuple[list[Path], dict[str, Any]]:
    """Write one run's maps, seed masks and seed time series under their BIDS-derivative names.

    Images and tables are written first, then every JSON sidecar, each atomically, so a sidecar
    exists only beside a complete file. Sidecars hold the inputs with their SHA-256, the seed's
    provenance, the denoising settings in force, the volumes kept, mean FD, the degrees of
    freedom, the resolved recipe and the software versions; a map's sidecar also holds
    ``SmoothingFWHM``, the FWHM in mm of the Gaussian kernel it was smoothed with (null: not
    smoothed).

    Returns
    -------
    files : list of Path
        Every file written.
    qc_row : dict
        The run's row of the participant's QC table.
    """
    import shutil

    out = run_dir(Path(output_dir), str(entities["sub"]), entities.get("ses"))
    base = {k: entities.get(k) for k in ("sub", "ses", "task", "acq", "run")}
    grid = {**base, "space": entities.get("space"), "res": entities.get("res")}
    qc = json.loads(Path(qc_file).read_text())
    censoring = json.loads(Path(censoring_file).read_text())
    inputs = {key: file_record(Path(path)) for key, path in provenance.get("inputs", {}).items() if path}
    common = {
        "Sources": inputs,
        "RepetitionTime": provenance.get("t_r"),
        "TaskName": entities.get("task"),
        "Denoising": provenance.get("denoising", {}),
        "Censoring": {k: censoring[k] for k in ("n_timepoints", "n_kept", "mean_fd_mm", "percent_censored",
                                                "n_non_steady_state", "n_fd_outliers", "strategy",
                                                "n_confounds", "confound_names") if k in censoring},
        "CensoredBy": censoring.get("censored_by"),
        "DegreesOfFreedomBudget": qc.get("dof_budget"),
        "Recipe": provenance.get("recipe", {}),
        "RecipeSHA256": provenance.get("recipe_sha256"),
        **software_provenance(provenance.get("command")),
    }
    seed_meta = {}
    for path in seed_sidecars:
        meta = json.loads(Path(path).read_text())
        seed_meta[parse_entities(Path(path).name)[0]["seed"]] = meta

    written: list[Path] = []
    sidecars: list[tuple[Path, dict[str, Any]]] = []
    for path in seed_files:
        seed = parse_entities(Path(path).name)[0]["seed"]
        target = out / bids_name({**grid, "seed": seed}, "mask", ".nii.gz")
        written.append(save_img(nib.load(path), target))
        sidecars.append((target, {**seed_meta.get(seed, {}), "Sources": inputs,
                                  "SeedQC": qc.get("seeds", {}).get(seed)}))
    for path in map_files:
        ents = parse_entities(Path(path).name)[0]
        target = out / bids_name({**grid, "seed": ents["seed"], "desc": ents["desc"], "stat": ents["stat"]},
                                 "statmap", ".nii.gz")
        written.append(save_img(nib.load(path), target))
        measure = "gppi" if ents["desc"].startswith("gppi") else ents["desc"]
        sidecars.append((target, {
            **common, "Measure": measure, "Statistic": ents["stat"], "Seed": seed_meta.get(ents["seed"], {}),
            "SeedQC": qc.get("seeds", {}).get(ents["seed"]),
            "DegreesOfFreedom": qc.get("dof", {}).get(measure),
            # what the map was computed with (run_qc.json), not what the recipe asks for now
            "SmoothingFWHM": qc.get("smoothing_fwhm"),
        }))
    for path in timeseries_files:
        seed = parse_entities(Path(path).name)[0]["seed"]
        target = out / bids_name({**base, "seed": seed}, "timeseries", ".tsv")
        with atomic_path(target) as tmp:
            shutil.copyfile(path, tmp)
        written.append(target)
        sidecars.append((target, {**common, "Seed": seed_meta.get(seed, {}),
                                  "Description": "Cleaned seed signal at the kept volumes ('volume' is the "
                                                 "0-based index in the BOLD run)."}))
    for target, meta in sidecars:
        stem = target.name.split(".")[0]
        written.append(write_json(target.with_name(stem + ".json"), meta))

    row: dict[str, Any] = {
        "participant_id": f"sub-{entities['sub']}", "session": entities.get("ses"), "task": entities.get("task"),
        "run": entities.get("run"), "n_timepoints": censoring["n_timepoints"], "n_kept": censoring["n_kept"],
        "mean_fd_mm": censoring["mean_fd_mm"], "percent_censored": censoring["percent_censored"],
        "excluded": bool(qc.get("excluded")), "exclusion_reason": qc.get("exclusion_reason") or "",
    }
    for seed, seed_qc in (qc.get("seeds") or {}).items():
        row[f"{seed}_n_voxels"] = seed_qc.get("n_voxels")
        row[f"{seed}_coverage"] = seed_qc.get("coverage")
        row[f"{seed}_tsnr"] = seed_qc.get("tsnr_median")
    for measure, dof in (qc.get("dof") or {}).items():
        row[f"dof_{measure}"] = dof
    # Why volumes were removed, and where the degrees of freedom went (fcflow.denoise.dof_budget).
    for reason, count in (censoring.get("censored_by") or {}).items():
        row[f"censored_{reason}"] = count
    for step, cost in (qc.get("dof_budget") or {}).items():
        if step not in ("n_kept", "dof"):
            row[f"dof_cost_{step}"] = cost
    return written, row


def write_participant_qc(output_dir: str | Path, subject: str, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``sub-<label>/sub-<label>_desc-runs_qc.tsv``: one row per run (motion, seed, exclusion).

    Rows of runs already in the table and not in ``rows`` are kept: a rerun of some of the
    subject's runs (``--session-label``, ``--task``) updates their rows and never drops the others
    (issue 17: rerunning one of six runs left a table of one, and the group level then lacked
    the others' mean FD).
    """
    import pandas as pd

    table = pd.DataFrame(list(rows))
    path = Path(output_dir) / f"sub-{subject}" / f"sub-{subject}_desc-runs_qc.tsv"
    key = [c for c in ("session", "task", "acq", "run", "echo") if c in table]
    if path.is_file() and key:
        earlier = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        if set(key) <= set(earlier.columns):
            def keys(frame: pd.DataFrame) -> list[tuple[str, ...]]:
                text = frame[key].astype(object).where(frame[key].notna(), "n/a").astype(str)
                return [tuple(r) for r in text.replace({"": "n/a", "None": "n/a", "nan": "n/a"}).to_numpy()]

            new_keys = set(keys(table))
            kept = earlier[[k not in new_keys for k in keys(earlier)]]
            if len(kept):
                # the earlier rows as they were written (text), the new rows as computed
                table = pd.concat([table.astype(object), kept], ignore_index=True)
    order = ["session", "task", "run"]
    table = table.sort_values([c for c in order if c in table], key=lambda s: s.astype(str)).reset_index(drop=True)
    return write_tsv(path, table)


#: Columns every run's row of the QC table must have for the group level and its report.
QC_REQUIRED_COLUMNS = ("participant_id", "session", "task", "excluded", "mean_fd_mm")


def read_runs_qc(output_dir: str | Path) -> pd.DataFrame:
    """Every participant's ``sub-<label>/sub-<label>_desc-runs_qc.tsv`` (:func:`write_participant_qc`), as one table.

    The one reader of the QC tables (the group level and the group report). All columns are
    kept; ``participant`` (label without ``sub-``) is added, ``session``, ``run`` and
    ``exclusion_reason`` are strings ("" when absent), ``excluded`` is boolean, and the numeric
    columns (mean FD, % censored, volumes, ``dof_*``, ``<seed>_coverage``, ``_tsnr``,
    ``_n_voxels``) are numbers.

    Raises
    ------
    InputDataError
        A table lacks a column of :data:`QC_REQUIRED_COLUMNS` (written by an older fcflow).
    """

    frames = []
    for path in sorted(Path(output_dir).glob("sub-*/sub-*_desc-runs_qc.tsv")):
        table = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a"], keep_default_na=False)
        missing = [c for c in QC_REQUIRED_COLUMNS if c not in table]
        if missing:
            raise InputDataError(
                f"The QC table {path} must have the columns {missing}: rerun the participant level "
                "with this version of fcflow."
            )
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["participant", "session", "task", "run", "mean_fd_mm", "percent_censored",
                                     "excluded", "exclusion_reason"])
    table = pd.concat(frames, ignore_index=True)
    table["participant"] = table["participant_id"].str.removeprefix("sub-")
    for column in ("session", "run", "exclusion_reason"):
        table[column] = table[column].fillna("") if column in table else ""
    table["excluded"] = table["excluded"].str.lower().isin(["true", "1"])
    for column in table.columns:
        if column in ("mean_fd_mm", "percent_censored", "n_timepoints", "n_kept") or column.startswith("dof_") \
                or column.endswith(("_coverage", "_tsnr", "_n_voxels")):
            table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


def write_execution_record(
    output_dir: str | Path, level: str, *, command: Sequence[str], settings: Mapping[str, Any],
    started: str,
) -> Path:
    """Record once how an invocation ran: ``OUTPUT_DIR/logs/<level>-<UTC start>_execution.json``.

    The derivatives are byte-identical whatever the plugin, process count or working folder
    (their sidecars record the analysis command without those options: :func:`analysis_command`),
    so the options that decided how the work ran are kept here instead, one file per invocation:
    the full command, the effective settings (plugin and its arguments; the permutations that ran),
    the host, the start and end time and the software.
    """
    import datetime
    import socket

    payload = {
        "Level": level,
        "Command": list(command),
        "Effective": dict(settings),
        "Host": socket.gethostname(),
        "StartedUTC": started,
        "FinishedUTC": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "Software": software_versions(),
    }
    stamp = started.replace(":", "").replace("-", "").replace("+0000", "Z").replace("+00:00", "Z")
    return write_json(Path(output_dir) / "logs" / f"{level}-{stamp}_execution.json", payload)


def utc_now() -> str:
    """The current UTC time, to the second, ISO 8601 (for :func:`write_execution_record`)."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
