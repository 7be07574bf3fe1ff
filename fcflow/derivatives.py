"""BIDS-derivative names, the dataset description and provenance for fcflow's outputs.

First-level file names carry ``sub``, ``ses``, ``task``, ``run``, ``space``, ``res``, the
non-standard ``seed`` entity (declared in ``dataset_description.json``), a ``desc`` that says which
measure the map is (``correlation``, ``background``, ``gppi2back``, ``gppi2backMinus0back``) and a
``stat`` that says which statistic (``r``, ``z``, ``beta``, ``t``), e.g.::

    sub-01/ses-infusion/func/
      sub-01_ses-infusion_task-rest_space-MNI152NLin2009cAsym_res-2_seed-pgACC_desc-correlation_stat-z_statmap.nii.gz
      sub-01_ses-infusion_task-rest_space-MNI152NLin2009cAsym_res-2_seed-pgACC_mask.nii.gz
      sub-01_ses-infusion_task-rest_seed-pgACC_timeseries.tsv
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fcflow import __version__
from fcflow.io import sha256_file, write_json

#: Entities fcflow adds to BIDS, declared in the dataset description.
CUSTOM_ENTITIES = {"seed": "Seed region the map or series was computed from (see the sidecar)."}
_ORDER = ("sub", "ses", "task", "acq", "run", "space", "res", "seed", "contrast", "desc", "stat")


def bids_name(entities: Mapping[str, str | None], suffix: str, extension: str) -> str:
    """Join entities in BIDS order (unknown keys last), then the suffix and extension."""
    keys = [k for k in _ORDER if entities.get(k)] + sorted(k for k in entities if k not in _ORDER and entities[k])
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
        "CustomEntities": CUSTOM_ENTITIES,
    }
    return write_json(Path(output_dir) / "dataset_description.json", payload)


def file_record(path: Path, *, checksum: bool = True) -> dict[str, Any]:
    """Path, size and (by default) SHA-256 of an input file, for sidecars."""
    path = Path(path)
    record: dict[str, Any] = {"path": str(path.resolve()), "size": path.stat().st_size}
    if checksum:
        record["sha256"] = sha256_file(path)
    return record


def software_versions() -> dict[str, str]:
    """Versions of fcflow and the libraries whose numbers end up in the maps."""
    import nibabel
    import nilearn
    import numpy
    import scipy

    return {
        "fcflow": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "nibabel": nibabel.__version__,
        "nilearn": nilearn.__version__,
    }


def provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """What a reader needs to rebuild an output: the command line and software versions."""
    return {
        "Command": list(sys.argv if command is None else command),
        "Software": software_versions(),
    }
