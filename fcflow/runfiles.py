"""A run's node files: read its prepared inputs, call the first-level science, write its results.

The file side of the first level, apart from its science (:mod:`fcflow.firstlevel`, which
computes on arrays): :func:`run_maps_from_files` is what the participant workflow's ``run_maps``
node (:class:`fcflow.interfaces.firstlevel.ComputeRunMaps`) calls, and what tests call without
nipype. Everything is written into the node's own folder, atomically; the derivatives are
written later by :func:`fcflow.derivatives.write_run_derivatives`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from fcflow.config import DenoisingConfig, SeedConfig, TaskConfig
from fcflow.firstlevel import compute_run_maps
from fcflow.io import atomic_path, save_img, write_json, write_tsv
from fcflow.niftiio import read_masked_bold


def run_maps_from_files(
    *,
    bold_file: str,
    mask_file: str,
    seed_files: Sequence[str],
    seeds: Sequence[SeedConfig],
    confounds_file: str,
    censoring_file: str,
    t_r: float,
    task: TaskConfig,
    denoising: DenoisingConfig,
    events_file: str | None,
    run_name: str,
    out_dir: str,
    report_data: bool = False,
) -> dict[str, object]:
    """Read a run's prepared inputs, call :func:`compute_run_maps`, write its results to ``out_dir``.

    Each seed is extracted and checked with its own recipe settings (``signal``, ``min_coverage``).

    Returns the paths nipype passes on: ``map_files`` (``seed-<s>_desc-<d>_stat-<t>.nii.gz``),
    ``timeseries_files`` (``seed-<s>_timeseries.tsv``) and ``qc_file`` (``run_qc.json``). With
    ``report_data=True`` also ``report_data_file`` (``report_data.npz``,
    :func:`fcflow.qc.compute_run_report_data`), computed from the same read of
    the run, for every run (an excluded one too: its report shows why).
    """
    from fcflow.niftiio import unmask

    censoring = json.loads(Path(censoring_file).read_text())
    confounds = pd.read_csv(confounds_file, sep="\t")
    confounds = None if confounds.shape[1] == 0 else confounds
    sample_mask = None if censoring["sample_mask"] is None else np.asarray(censoring["sample_mask"], dtype=np.int64)
    out = Path(out_dir)
    # The job that computed the run (None outside SLURM): the node's record, not an output.
    qc: dict[str, object] = {"run_name": run_name, "censoring": censoring,
                             "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
    map_files: list[str] = []
    timeseries_files: list[str] = []
    seed_imgs = {seed.name: nib.load(path) for seed, path in zip(seeds, seed_files, strict=True)}
    signals = {seed.name: seed.signal for seed in seeds}
    mask_img = nib.load(mask_file)
    masked = read_masked_bold(bold_file, mask_img) if report_data else None
    outputs: dict[str, object] = {}

    def add_report_data(excluded: bool) -> None:
        from fcflow.qc import compute_run_report_data

        assert masked is not None
        arrays = compute_run_report_data(
            masked[0], masked[1].mean, mask_img, seed_imgs, bold_file=bold_file, confounds=confounds,
            censoring={**censoring, "excluded": excluded}, t_r=t_r, task=task, denoising=denoising,
            signal=signals, run_name=run_name,
        )
        outputs["report_data_file"] = str(write_run_report_data(out / "report_data.npz", arrays))

    if censoring["excluded"]:
        qc.update(excluded=True, exclusion_reason=censoring["exclusion_reason"], seeds={}, dof={})
        if report_data:
            add_report_data(True)
        return {"map_files": map_files, "timeseries_files": timeseries_files,
                "qc_file": str(write_json(out / "run_qc.json", qc)), **outputs}
    events = pd.read_csv(events_file, sep="\t") if events_file else None
    result = compute_run_maps(
        bold_file, mask_file, seed_imgs, t_r=t_r, task=task, denoising=denoising, confounds=confounds,
        sample_mask=sample_mask, seeds=seeds, events=events, events_file=str(events_file or ""), run_name=run_name,
        masked=masked,
    )
    brain = np.asarray(mask_img.dataobj).reshape(mask_img.shape[:3]) > 0
    for spec, values in result.maps.items():
        img = unmask(values.astype(np.float32), brain, mask_img.affine)
        map_files.append(str(save_img(img, out / f"seed-{spec.seed}_desc-{spec.desc}_stat-{spec.stat}.nii.gz")))
    for name, signal in result.seed_signals.items():
        table = pd.DataFrame({"volume": result.kept_volumes[: len(signal)], name: signal})
        timeseries_files.append(str(write_tsv(out / f"seed-{name}_timeseries.tsv", table)))
    qc.update(
        excluded=result.excluded, exclusion_reason=result.exclusion_reason,
        seeds={name: q.to_dict() for name, q in result.seed_qc.items()}, dof=result.dof,
        dof_budget=result.dof_budget, smoothing_fwhm=result.smoothing_fwhm,
    )
    if report_data:
        add_report_data(result.excluded)
    return {"map_files": map_files, "timeseries_files": timeseries_files,
            "qc_file": str(write_json(out / "run_qc.json", qc)), **outputs}


def write_run_report_data(path: str | Path, arrays: Mapping[str, NDArray]) -> Path:
    """Save :func:`fcflow.qc.compute_run_report_data`'s arrays as one ``.npz`` (atomically)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return path
