"""Participant level: every run of every selected participant into seed-to-voxel maps.

Per run (:func:`init_run_wf`)::

    inputnode -> seed_masks (BuildSeedMasks) ---------------------------\\
             \\-> confounds (SelectConfounds) -> run_maps (ComputeRunMaps) -> derivatives
                                                 ^ seed_masks                 (WriteRunDerivatives)
                                                                              -> outputnode

Per participant (:func:`init_participant_wf`) the runs' QC rows are joined into one TSV, and
(unless ``reports=False``) each run's figures (``report``, :class:`ComputeRunReport`, after
``run_maps``) into ``OUTPUT_DIR/sub-<label>.html`` (:class:`WriteParticipantReport`).
Settings reach the nodes as plain values (nipype hashes them), so a rerun with the same
``--work-dir`` recomputes only what changed or did not finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.utility import IdentityInterface, Merge
from nipype.pipeline import engine as pe

from fcflow.bids import RunInputs
from fcflow.config import Recipe, to_plain
from fcflow.interfaces.firstlevel import (
    BuildSeedMasks,
    ComputeRunMaps,
    SelectConfounds,
    WriteParticipantQC,
    WriteRunDerivatives,
)
from fcflow.interfaces.reports import ComputeRunReport, WriteParticipantReport
from fcflow.io import input_stamps

# Measured on the lean path: the masked float32 run plus one cleaned copy for task measures,
# and float64 operators; see benchmarks/ (performance issue).
_BYTES_PER_SAMPLE = 4 * 2.5
_BASE_GB = 0.4


def estimate_run_mem_gb(bold_file: Path, mask_file: Path) -> float:
    """Memory (GB) a run's ComputeRunMaps node needs: about 2.5 copies of its masked data."""
    n_volumes = nib.load(bold_file).shape[3]
    mask = nib.load(mask_file)
    n_voxels = int(np.count_nonzero(np.asarray(mask.dataobj)))
    return round(_BASE_GB + n_volumes * n_voxels * _BYTES_PER_SAMPLE / 1e9, 2)


def run_entities(run: RunInputs) -> dict[str, str | None]:
    """BIDS entities of a run's outputs (``res`` and ``space`` kept from the input file)."""
    ents = run.entities
    return {"sub": run.subject, "ses": run.session, "task": run.task, "acq": ents.get("acq"),
            "run": run.run, "space": ents.get("space"), "res": ents.get("res")}


def init_run_wf(
    *,
    run: RunInputs,
    recipe: Recipe,
    atlas_dir: Path | None,
    output_dir: Path,
    command: Sequence[str],
    name: str,
    reports: bool = True,
) -> pe.Workflow:
    """Build the workflow of one run.

    Parameters
    ----------
    run : RunInputs
        The run's files, TR and group (:func:`fcflow.bids.collect_runs`).
    recipe : Recipe
    atlas_dir : Path or None
        Julich-Brain files (:func:`fcflow.atlas.resolve_atlas_dir`); None when every seed of the
        recipe is a mask file.
    output_dir : Path
        The derivatives dataset.
    command : sequence of str
        The command line, recorded in the sidecars.
    name : str
    reports : bool, default=True
        Also make the run's report figures (:func:`fcflow.reports.participant.make_run_report`).

    Inputs
    ------
    bold_file, mask_file, events_file, t_r

    Outputs
    -------
    qc_row : dict
        The run's row of the participant's QC table.
    report_file : str
        The run's ``run_report.json`` (only with ``reports=True``).
    """
    task = recipe.task(run.task)
    seeds = [to_plain(seed) for seed in recipe.seeds]
    denoising = to_plain(recipe.denoising)
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(IdentityInterface(fields=["bold_file", "mask_file", "events_file", "t_r"]),
                        name="inputnode")
    inputnode.inputs.bold_file = str(run.bold_file)
    inputnode.inputs.mask_file = str(run.mask_file)
    inputnode.inputs.events_file = str(run.events_file) if run.events_file else None
    inputnode.inputs.t_r = run.t_r
    outputnode = pe.Node(IdentityInterface(fields=["qc_row", "report_file"]), name="outputnode")

    # reuse is decided by the inputs' identity, ctime included, not by size and mtime alone
    # (issue 17: a confounds value changed with size and mtime kept reused the stale maps)
    stamps = input_stamps([run.bold_file, run.mask_file, run.confounds_file, run.confounds_json, run.events_file,
                           *(seed.mask for seed in recipe.seeds if seed.mask)])
    seed_masks = pe.Node(BuildSeedMasks(atlas_dir=str(atlas_dir) if atlas_dir else None, seeds=seeds,
                                        input_stamps=stamps), name="seed_masks", mem_gb=0.3)
    confounds = pe.Node(SelectConfounds(denoising=denoising, run_name=run.name, input_stamps=stamps),
                        name="confounds", mem_gb=0.2)
    run_maps = pe.Node(
        ComputeRunMaps(seeds=seeds, task=to_plain(task), denoising=denoising, run_name=run.name,
                       report_data=reports, input_stamps=stamps),
        name="run_maps", mem_gb=estimate_run_mem_gb(run.bold_file, run.mask_file),
    )
    provenance = {
        "inputs": {"bold": str(run.bold_file), "mask": str(run.mask_file), "confounds": str(run.confounds_file),
                   "confounds_json": str(run.confounds_json) if run.confounds_json else None,
                   "events": str(run.events_file) if run.events_file else None},
        "t_r": run.t_r,
        "denoising": denoising,
        "recipe": to_plain(recipe.to_dict()),
        "recipe_sha256": recipe.fingerprint(),
        "command": list(command),
    }
    derivatives = pe.Node(
        WriteRunDerivatives(output_dir=str(output_dir), entities=run_entities(run), provenance=provenance,
                            input_stamps=stamps),
        name="derivatives", mem_gb=0.3,
    )
    workflow.connect([
        (inputnode, seed_masks, [("mask_file", "reference_file")]),
        (inputnode, confounds, [("bold_file", "bold_file")]),
        (inputnode, run_maps, [("bold_file", "bold_file"), ("mask_file", "mask_file"),
                               ("events_file", "events_file"), ("t_r", "t_r")]),
        (seed_masks, run_maps, [("seed_files", "seed_files")]),
        (confounds, run_maps, [("confounds_file", "confounds_file"), ("censoring_file", "censoring_file")]),
        (seed_masks, derivatives, [("seed_files", "seed_files"), ("sidecar_files", "seed_sidecars")]),
        (confounds, derivatives, [("censoring_file", "censoring_file")]),
        (run_maps, derivatives, [("map_files", "map_files"), ("timeseries_files", "timeseries_files"),
                                 ("qc_file", "qc_file")]),
        (derivatives, outputnode, [("qc_row", "qc_row")]),
    ])
    if reports:
        # Figures only: the run's data reach it as run_maps' report_data.npz (one read per run);
        # matplotlib, nilearn's 1 mm template and a few maps: the small nodes' 0.3 GB.
        report = pe.Node(
            ComputeRunReport(fmriprep_confounds_file=str(run.confounds_file), seeds=seeds, task=to_plain(task),
                             denoising=denoising, entities={**run_entities(run), "group": run.group},
                             run_name=run.name, input_stamps=stamps),
            name="report", mem_gb=0.3,
        )
        workflow.connect([
            (inputnode, report, [("mask_file", "mask_file"), ("events_file", "events_file"), ("t_r", "t_r")]),
            (seed_masks, report, [("seed_files", "seed_files")]),
            (confounds, report, [("censoring_file", "censoring_file")]),
            (run_maps, report, [("map_files", "map_files"), ("timeseries_files", "timeseries_files"),
                                ("qc_file", "qc_file"), ("report_data_file", "report_data_file")]),
            (report, outputnode, [("report_file", "report_file")]),
        ])
    return workflow


def init_participant_wf(
    *,
    subject: str,
    runs: Sequence[RunInputs],
    recipe: Recipe,
    atlas_dir: Path | None,
    output_dir: Path,
    command: Sequence[str],
    name: str | None = None,
    reports: bool = True,
) -> pe.Workflow:
    """Build the workflow of one participant: one :func:`init_run_wf` per run, the QC table, the report.

    Outputs
    -------
    qc_table : str
        ``sub-<label>/sub-<label>_desc-runs_qc.tsv``.
    report : str
        ``sub-<label>.html`` (only with ``reports=True``).
    """
    workflow = pe.Workflow(name=name or f"sub_{subject}_wf")
    merge = pe.Node(Merge(len(runs)), name="merge_qc")
    qc_table = pe.Node(WriteParticipantQC(output_dir=str(output_dir), subject=subject), name="qc_table")
    outputnode = pe.Node(IdentityInterface(fields=["qc_table", "report"]), name="outputnode")
    if reports:
        merge_reports = pe.Node(Merge(len(runs)), name="merge_reports")
        report = pe.Node(WriteParticipantReport(output_dir=str(output_dir), subject=subject,
                                                session_order=list(recipe.sessions)), name="report")
        workflow.connect([(merge_reports, report, [("out", "report_files")]),
                          (report, outputnode, [("out_report", "report")])])
    for index, run in enumerate(runs, start=1):
        run_wf = init_run_wf(run=run, recipe=recipe, atlas_dir=atlas_dir, output_dir=output_dir,
                             command=command, name=run.name.replace("-", "_") + "_wf", reports=reports)
        workflow.connect(run_wf, "outputnode.qc_row", merge, f"in{index}")
        if reports:
            workflow.connect(run_wf, "outputnode.report_file", merge_reports, f"in{index}")
    workflow.connect([(merge, qc_table, [("out", "qc_rows")]), (qc_table, outputnode, [("qc_table", "qc_table")])])
    return workflow


def init_fcflow_participant_wf(
    *,
    runs: Sequence[RunInputs],
    recipe: Recipe,
    atlas_dir: Path | None,
    output_dir: Path,
    work_dir: Path,
    command: Sequence[str],
    reports: bool = True,
) -> pe.Workflow:
    """Build the participant level for every selected participant (one sub-workflow each).

    With ``reports=True`` (the default) each participant also gets ``OUTPUT_DIR/sub-<label>.html``.
    """
    workflow = pe.Workflow(name="fcflow_participant_wf", base_dir=str(work_dir))
    by_subject: dict[str, list[RunInputs]] = {}
    for run in runs:
        by_subject.setdefault(run.subject, []).append(run)
    for subject, subject_runs in sorted(by_subject.items()):
        workflow.add_nodes([init_participant_wf(subject=subject, runs=subject_runs, recipe=recipe,
                                                atlas_dir=atlas_dir, output_dir=output_dir, command=command,
                                                reports=reports)])
    return workflow
