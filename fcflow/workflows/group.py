r"""Group level as a nipype workflow: one job per group test.

:func:`fcflow.group.run.plan_group_level` checks the inputs and lists the units of work in the
fcflow process; :func:`init_group_wf` turns the plan into, per task x measure x seed::

    maps_<measure> (LoadGroupMaps) --> test_<analysis>_<measure>_contrast-<c> (RunGroupTest), one per test
                                   \-> family_<analysis>_<measure> (RunFamilyCorrection), after its tests
    every test and family --> merge --> results (FinishGroupLevel: results.tsv)

so ``fcflow BIDS_DIR OUTPUT_DIR group --plugin MultiProc|SLURM|SLURMGraph`` spreads the
permutation tests, the costly part of a study, over processes or cluster jobs: the shipped
recipe makes 45 test jobs (3 measures x 5 session analyses: 4 tests for each session contrast
and for the baseline, 2 repeated-measures F tests, 1 group main effect), 3 map readers and 12
family-wise corrections. The maps of a measure are read once for all its tests; each test
prepares its analysis (subjects, design, variance groups) itself, which is cheap and
deterministic, and keeps its permutation result for the correction over its analysis' tests
(``inference.family_wise``), the one step that needs them together.

Resume is nipype's cache only: a node reruns when its inputs change (the maps' and QC tables'
identity, :func:`fcflow.io.input_stamps`; the recipe; participants.tsv) or did not finish. The one
thing nipype cannot see is an output of a finished test changed or removed in OUTPUT_DIR
afterwards: :func:`invalidate_changed_units` drops those nodes from the cache before the run.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
from nipype.interfaces.utility import Merge
from nipype.pipeline import engine as pe

from fcflow.config import PERMUTATION_INFERENCES, to_plain
from fcflow.derivatives import analysis_command
from fcflow.group.inference import SessionAnalysis
from fcflow.group.inputs import MeasureMap
from fcflow.group.run import GroupPlan, analysis_test_names, corrects_over_tests, test_key, unit_name, usable_runs
from fcflow.interfaces.group import FinishGroupLevel, LoadGroupMaps, RunFamilyCorrection, RunGroupTest
from fcflow.io import input_stamps

LOGGER = logging.getLogger("fcflow.group")
WORKFLOW_NAME = "fcflow_group_wf"
_BASE_GB = 0.5


def _node_name(prefix: str, text: str) -> str:
    """A nipype node name (letters, digits, underscores) from entity text."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_')}"


def maps_node_name(measure: MeasureMap) -> str:
    return _node_name("maps", f"task-{measure.task}_seed-{measure.seed}_desc-{measure.desc}")


def test_node_name(measure: MeasureMap, analysis: SessionAnalysis, test: str) -> str:
    return _node_name("test", test_key(measure, analysis, test))


def _n_voxels(output_dir: Path, files: Sequence[str]) -> int:
    """Voxels of the maps' grid (an upper bound of the analysis mask), from the first map's header."""
    shape = nib.load(output_dir / files[0]).shape[:3]
    return int(shape[0] * shape[1] * shape[2])


def estimate_unit_mem_gb(plan: GroupPlan, measure: MeasureMap, n_voxels: int) -> float:
    """Memory (GB) of one session analysis: the maps, its design's copies of them and its permutations.

    The maps (float32, sessions x subjects x voxels), three float64 copies of one analysis' rows
    (data, residuals, statistic work) and :func:`fcflow.permutation.permutation_memory_bytes` for
    its tests; a generous bound, for MultiProc's budget and SLURM's ``--mem``.
    """
    from fcflow.permutation import permutation_memory_bytes

    runs = plan.runs[measure]
    n_subjects = int(runs["participant"].nunique())
    n_sessions = len(plan.recipe.sessions)
    n_rows = n_subjects * max(1, n_sessions - 1)
    inference = plan.recipe.inference
    methods = [m for m in inference.methods if m in PERMUTATION_INFERENCES]
    n_tests = max(len(plan.recipe.group_contrasts) + len(plan.recipe.f_tests), 2)
    maps = 4 * n_sessions * n_subjects * n_voxels
    work = 3 * 8 * n_rows * n_voxels
    permutations = permutation_memory_bytes(inference.n_permutations if methods else 0, n_rows, len(methods),
                                            n_tests)
    return round(_BASE_GB + (maps + work + permutations) / 1e9, 2)


def init_group_wf(
    plan: GroupPlan,
    *,
    output_dir: Path,
    bids_dir: Path,
    atlas_dir: Path | None,
    command: Sequence[str],
) -> pe.Workflow:
    """Build the group level of ``plan`` (:func:`fcflow.group.run.plan_group_level`).

    Parameters
    ----------
    plan : GroupPlan
    output_dir : Path
        The participant level's OUTPUT_DIR; the units write into its ``group/``.
    bids_dir : Path
        Raw BIDS dataset (participants.tsv).
    atlas_dir : Path or None
        Julich-Brain v3.1 folder, or None.
    command : sequence of str
        The command line, recorded in the sidecars without its execution options.

    Returns
    -------
    Workflow
        ``fcflow_group_wf``; its ``results`` node writes ``group/results.tsv``.
    """
    recipe = plan.recipe
    workflow = pe.Workflow(name=WORKFLOW_NAME)
    finish = pe.Node(FinishGroupLevel(output_dir=str(output_dir)), name="results", mem_gb=0.3)
    tests = [(measure, analysis, name) for measure, analysis in plan.units
             for name in analysis_test_names(recipe, analysis)]
    if not tests:
        finish.inputs.test_files = []
        workflow.add_nodes([finish])
        return workflow
    families = [(m, a) for m, a in plan.units if corrects_over_tests(recipe, len(analysis_test_names(recipe, a)))]
    merge_tests = pe.Node(Merge(len(tests)), name="merge_tests")
    workflow.connect(merge_tests, "out", finish, "test_files")
    if families:
        merge_families = pe.Node(Merge(len(families)), name="merge_families")
        workflow.connect(merge_families, "out", finish, "family_files")
    participants = [bids_dir / "participants.tsv", bids_dir / "participants.json"]
    label_image = [Path(recipe.regions.atlas)] if recipe.regions.atlas != "julich-brain-3.1" else []
    shared = {"output_dir": str(output_dir), "bids_dir": str(bids_dir), "recipe": to_plain(recipe),
              "input_stamps": input_stamps([p for p in [*participants, *label_image] if p.exists()])}
    qc_tables = sorted(output_dir.glob("sub-*/sub-*_desc-runs_qc.tsv"))
    # without its execution options: rerunning with another plugin or --nprocs reuses every test
    analysis_only = analysis_command(command)
    n_test = n_family = 0
    for measure in plan.measures:
        runs = plan.runs[measure]
        files = list(usable_runs(runs, recipe.sessions)["file"])
        n_voxels = _n_voxels(output_dir, files)
        mem_gb = estimate_unit_mem_gb(plan, measure, n_voxels)
        load = pe.Node(
            LoadGroupMaps(output_dir=str(output_dir), runs=runs.to_dict("records"), sessions=list(recipe.sessions),
                          input_stamps=input_stamps([*(output_dir / f for f in files), *qc_tables])),
            # the float32 maps of every session and subject, and the pickle written from them
            name=maps_node_name(measure),
            mem_gb=round(_BASE_GB + 2 * 4 * len(recipe.sessions) * runs["participant"].nunique() * n_voxels / 1e9, 2),
        )
        maps_in = [("maps_file", "maps_file"), ("maps_sha256", "maps_sha256")]
        for analysis in plan.analyses:
            names = analysis_test_names(recipe, analysis)
            family = None
            if (measure, analysis) in families:
                n_family += 1
                family = pe.Node(RunFamilyCorrection(measure=to_plain(measure), analysis=analysis.label, **shared),
                                 name=_node_name("family", unit_name(measure, analysis)), mem_gb=mem_gb)
                unit = unit_name(measure, analysis)
                files_in = pe.Node(Merge(len(names)), name=_node_name("merge_family_files", unit))
                sha_in = pe.Node(Merge(len(names)), name=_node_name("merge_family_sha", unit))
                workflow.connect([(load, family, maps_in), (files_in, family, [("out", "test_files")]),
                                  (sha_in, family, [("out", "test_sha256")]),
                                  (family, merge_families, [("outputs_file", f"in{n_family}")])])
            for index, name in enumerate(names, start=1):
                n_test += 1
                node = pe.Node(
                    RunGroupTest(measure=to_plain(measure), analysis=analysis.label, test=name,
                                 atlas_dir=str(atlas_dir) if atlas_dir else None, command=analysis_only, **shared),
                    name=test_node_name(measure, analysis, name), mem_gb=mem_gb,
                )
                workflow.connect([(load, node, maps_in), (node, merge_tests, [("outputs_file", f"in{n_test}")])])
                if family is not None:
                    workflow.connect([(node, files_in, [("outputs_file", f"in{index}")]),
                                      (node, sha_in, [("outputs_sha256", f"in{index}")])])
    return workflow


def invalidate_changed_units(workflow: pe.Workflow, work_dir: Path, output_dir: Path) -> list[str]:
    """Drop from nipype's cache every finished unit whose files in OUTPUT_DIR changed or went missing.

    nipype decides reuse from a node's inputs; a unit's outputs live in OUTPUT_DIR, outside its
    working directory, where a user (or a disk fault) may change them after the unit finished.
    Each finished unit's ``analysis_outputs.pkl`` lists the SHA-256 of the files it wrote; a unit
    whose files no longer match loses its working directory, so the run recomputes it.

    Returns
    -------
    list of str
        The units dropped.
    """
    from fcflow.interfaces.group import read_pickle
    from fcflow.io import sha256_file

    dropped = []
    for node in workflow._graph.nodes():
        record_name = {RunGroupTest: "test_outputs.pkl", RunFamilyCorrection: "family_outputs.pkl"}.get(
            type(node.interface))
        if record_name is None:
            continue
        folder = Path(work_dir) / WORKFLOW_NAME / node.name
        record = folder / record_name
        if not (folder / f"result_{node.name}.pklz").is_file() or not record.is_file():
            continue
        try:
            files = read_pickle(str(record)).files
        except Exception:  # an unreadable record: recompute rather than trust it
            files = None
        if files is not None and all((output_dir / rel).is_file() and sha256_file(output_dir / rel) == sha
                                     for rel, sha in files.items()):
            continue
        shutil.rmtree(folder)
        dropped.append(node.name)
    if dropped:
        LOGGER.warning("%d finished group-level unit(s) had outputs changed or removed since they were written; "
                       "they are computed again: %s", len(dropped), ", ".join(dropped))
    return dropped
