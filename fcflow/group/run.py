"""Group level, run: the plan of a group-level run and its units of work.

:func:`plan_group_level` checks the inputs (without reading a map) and lists the session
analyses; :func:`prepare_session_analysis` builds one analysis' subjects, design and tests;
:func:`run_group_test` runs one group test (the unit of work: inference, maps, tables, regions)
and :func:`run_family_correction` corrects an analysis' tests over each other;
:func:`fcflow.group.outputs.finish_group_level` writes ``results.tsv``. The nipype workflow
(:mod:`fcflow.workflows.group`) runs one node per test; :func:`run_group_level` runs them one
after the other in this process. See :mod:`fcflow.group` for what is computed and written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from numpy.typing import NDArray

from fcflow.config import PERMUTATION_INFERENCES, Recipe
from fcflow.errors import InputDataError
from fcflow.group.inference import (
    AnalysisSubjects,
    GroupTest,
    InferenceResult,
    SessionAnalysis,
    analysis_design,
    analysis_subjects,
    analysis_tests,
    check_permutation_memory,
    run_inference,
    session_analyses,
    variance_group_labels,
)
from fcflow.group.inputs import (
    MeasureMap,
    SessionMaps,
    check_map_provenance,
    collect_first_level,
    load_session_maps,
    select_measure_maps,
)
from fcflow.group.outputs import (
    GROUP_DIR,
    AnalysisOutputs,
    finish_group_level,
    julich_area_lookup,
    n_per_group_text,
    test_files,
    unit_files,
    write_family_outputs,
    write_group_description,
    write_region_outputs,
    write_test_outputs,
)

LOGGER = logging.getLogger("fcflow.group")


@dataclass
class GroupPlan:
    """What one group-level run does, decided before any map is read (:func:`plan_group_level`).

    Attributes
    ----------
    recipe : Recipe
        The effective recipe (``--n-permutations`` applied): what runs and what is recorded.
    measures : list of MeasureMap
        The task x measure x seed maps that have at least one first-level map, recipe order.
    runs : dict of MeasureMap to DataFrame
        Each measure's runs (:func:`collect_first_level`).
    analyses : list of SessionAnalysis
        The session analyses every measure gets (:func:`session_analyses`).
    use_regions : bool
        The region level runs (enabled in the recipe and its atlas available).
    """

    recipe: Recipe
    measures: list[MeasureMap]
    runs: dict[MeasureMap, pd.DataFrame]
    analyses: list[SessionAnalysis]
    use_regions: bool

    @property
    def n_tests(self) -> int:
        """The group tests of the run: every measure x session analysis x contrast or F test."""
        return sum(len(analysis_test_names(self.recipe, a)) for _, a in self.units)

    @property
    def units(self) -> list[tuple[MeasureMap, SessionAnalysis]]:
        """The units of work, one per measure x session analysis, in ``results.tsv`` order."""
        return [(m, a) for m in self.measures for a in self.analyses]


def unit_name(measure: MeasureMap, analysis: SessionAnalysis) -> str:
    """A name for one measure x session analysis, made of its entities (node names, logs)."""
    return f"ses-{analysis.label}_task-{measure.task}_seed-{measure.seed}_desc-{measure.desc}"


def regions_available(recipe: Recipe, atlas_dir: str | Path | None) -> bool:
    """Whether the region level can run: enabled, and its atlas (Julich-Brain or the recipe's labels) at hand."""
    return recipe.regions.enabled and not (recipe.regions.atlas == "julich-brain-3.1" and atlas_dir is None)


def plan_group_level(
    output_dir: str | Path,
    recipe: Recipe,
    *,
    bids_dir: str | Path,
    atlas_dir: str | Path | None = None,
    n_permutations: int | None = None,
) -> GroupPlan:
    """Check the group level's inputs and decide its units of work; writes only ``group``'s description.

    Every check that reads no map runs here, before any inference, so a bad input stops the run
    at once with one message: the participant level's outputs exist, ``participants.tsv`` has a
    group for every subject with maps, the permutations fit in memory, and every map of a
    task x measure x seed was made with the same analysis settings (:func:`check_map_provenance`).

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    recipe : Recipe
    bids_dir : path
        Raw BIDS dataset (its ``participants.tsv``).
    atlas_dir : path or None, default=None
        Julich-Brain v3.1 folder; None skips the Julich-Brain region level with a warning.
    n_permutations : int or None, default=None
        Overrides the recipe's ``inference.n_permutations``.

    Returns
    -------
    GroupPlan
    """
    from fcflow.bids import read_participants

    output_dir = Path(output_dir)
    # the effective recipe: what runs is what desc-recipe_config.json, the sidecars and the
    # methods text record (issue 17: --n-permutations was applied but the recipe's value recorded)
    recipe = recipe.with_overrides(n_permutations=None if n_permutations is None else int(n_permutations))
    inference = recipe.inference
    if not any(output_dir.glob("sub-*/sub-*_desc-runs_qc.tsv")):
        raise InputDataError(
            f"{output_dir}: expected the participant level's outputs (sub-<label>/sub-<label>_desc-runs_qc.tsv "
            "and the maps). Got none: run 'fcflow BIDS_DIR OUTPUT_DIR participant' first, with this OUTPUT_DIR."
        )
    participants = read_participants(Path(bids_dir), recipe.group_column, recipe.groups)
    check_permutation_memory(recipe, n_rows=len(participants) * max(1, len(recipe.sessions) - 1))
    use_regions = regions_available(recipe, atlas_dir)
    if recipe.regions.enabled and not use_regions:
        LOGGER.warning("Region level skipped: its atlas, Julich-Brain v3.1, is not available (no --julich-dir). "
                       "Give --julich-dir, or a label image as [regions] 'atlas' in the recipe, or set [regions] "
                       "enabled = false.")
    analyses = session_analyses(recipe)
    per_measure = sum(len(analysis_test_names(recipe, a)) for a in analyses)
    measures: list[MeasureMap] = []
    runs_of: dict[MeasureMap, pd.DataFrame] = {}
    for measure in select_measure_maps(recipe):
        runs = collect_first_level(output_dir, measure, space=recipe.space)
        usable = usable_runs(runs, recipe.sessions)
        if usable.empty:
            LOGGER.warning("No first-level map for %s: skipped (%d tests).", measure.label, per_measure)
            continue
        check_map_provenance(output_dir, list(usable["file"]), task=measure.task, seed=measure.seed, recipe=recipe)
        unknown = sorted(set(usable["participant"]) - set(participants.index))
        if unknown:
            raise InputDataError(
                f"sub-{unknown[0]} has first-level maps but no row in {Path(bids_dir) / 'participants.tsv'}: "
                "add it with its group."
            )
        measures.append(measure)
        runs_of[measure] = runs
    write_group_description(output_dir / GROUP_DIR, output_dir, recipe)
    LOGGER.info("Group level: %d map types x %d session analyses (%d tests each) = %d tests; %s; primary %s",
                len(measures), len(analyses), per_measure, len(measures) * per_measure,
                f"{inference.n_permutations} permutations" if set(inference.methods) & set(PERMUTATION_INFERENCES)
                else "parametric only", inference.primary)
    return GroupPlan(recipe=recipe, measures=measures, runs=runs_of, analyses=analyses, use_regions=use_regions)


def run_group_level(
    output_dir: str | Path,
    recipe: Recipe,
    *,
    bids_dir: str | Path,
    atlas_dir: str | Path | None = None,
    n_permutations: int | None = None,
    command: Sequence[str] | None = None,
) -> Path:
    """Group-level inference for every task x measure x seed x session contrast of the recipe, in this process.

    The science in one call, one unit after the other and without a cache:
    :func:`plan_group_level`, then for every measure :func:`load_session_maps` and for each of
    its session analyses :func:`run_session_analysis`, then :func:`finish_group_level`.
    ``fcflow BIDS_DIR OUTPUT_DIR group`` runs the same steps as a nipype workflow
    (:func:`fcflow.workflows.group.init_group_wf`), which spreads the units over processes or
    SLURM jobs and resumes from its cache; both write the same bytes.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR; results go to ``output_dir/group``.
    recipe : Recipe
    bids_dir : path
        Raw BIDS dataset (its ``participants.tsv`` gives groups and covariates).
    atlas_dir : path or None, default=None
        Julich-Brain v3.1 folder for area names in the cluster tables; None gives coordinates
        only.
    n_permutations : int or None, default=None
        Overrides the recipe's ``inference.n_permutations`` (demos, tests).
    command : sequence of str or None, default=None
        Command line for the provenance (default ``sys.argv``).

    Returns
    -------
    results_file : Path
        ``output_dir/group/results.tsv``.
    """
    plan = plan_group_level(output_dir, recipe, bids_dir=bids_dir, atlas_dir=atlas_dir,
                            n_permutations=n_permutations)
    outputs = []
    for measure in plan.measures:
        maps = load_session_maps(output_dir, plan.runs[measure], plan.recipe.sessions)
        for analysis in plan.analyses:
            outputs.append(run_session_analysis(output_dir, plan.recipe, measure, analysis, maps, bids_dir=bids_dir,
                                                atlas_dir=atlas_dir, command=command))
    return finish_group_level(output_dir, outputs)


@dataclass
class AnalysisSetup:
    """One measure x session analysis made ready for its tests (:func:`prepare_session_analysis`).

    ``subjects`` are its rows, ``design`` its model (None when it cannot be built), ``tests`` its
    group contrasts and F tests, ``skip_reason`` why none of them can run ("" when they can),
    ``variance_labels`` each row's variance group (None: one common variance), ``family`` whether
    its permutation p maps are also corrected over its tests (:func:`run_family_correction`).
    """

    measure: MeasureMap
    analysis: SessionAnalysis
    subjects: AnalysisSubjects
    design: pd.DataFrame | None
    tests: list[GroupTest]
    skip_reason: str
    variance_labels: list[str] | None
    variance_note: str
    group_cells: list[str]
    family: bool
    counts: dict[str, int]

    @property
    def where(self) -> str:
        """The analysis in log messages: measure and session analysis."""
        return f"{self.measure.label} ses {self.analysis.expression}"

    def test(self, name: str) -> GroupTest:
        """The group test called ``name``."""
        for test in self.tests:
            if test.name == name:
                return test
        raise KeyError(f"{self.where} has no group test {name!r}; it has {[t.name for t in self.tests]}")


@dataclass
class TestOutputs:
    """What one group test (:func:`run_group_test`) hands on: its ``results.tsv`` row, the SHA-256
    of the files it wrote, and its inference when the family-wise correction needs it."""

    key: str
    row: dict[str, Any]
    files: dict[str, str]
    result: InferenceResult | None = None


@dataclass
class FamilyOutputs:
    """The family-wise correction of one session analysis (:func:`run_family_correction`): the
    values it adds to each test's row (by :func:`test_key`) and the files it wrote."""

    updates: dict[str, dict[str, Any]]
    files: dict[str, str]


def test_key(measure: MeasureMap, analysis: SessionAnalysis, test_name: str) -> str:
    """A name for one group test of one measure x session analysis (rows, nodes, logs)."""
    return f"{unit_name(measure, analysis)}_contrast-{test_name}"


def usable_runs(runs: pd.DataFrame, sessions: Sequence[str]) -> pd.DataFrame:
    """The runs of :func:`collect_first_level` that enter: in the recipe's sessions, not excluded, with a map."""
    return runs[runs["session"].isin(sessions) & ~runs["excluded"] & (runs["file"] != "")]


def corrects_over_tests(recipe: Recipe, n_tests: int) -> bool:
    """Whether a session analysis of ``n_tests`` tests gets the correction over its tests
    (``family_wise = "contrasts"``, two or more tests, a permutation method)."""
    inference = recipe.inference
    return inference.family_wise == "contrasts" and n_tests > 1 and bool(
        set(inference.methods) & set(PERMUTATION_INFERENCES))


def analysis_test_names(recipe: Recipe, analysis: SessionAnalysis) -> list[str]:
    """The names of the group tests of ``analysis``, known from the recipe before any map is read."""
    from fcflow.repeated import repeated_cells

    columns = (repeated_cells(recipe.groups, recipe.sessions, recipe.reference_session)
               if analysis.kind == "repeated" else list(recipe.groups))
    return [test.name for test in analysis_tests(recipe, analysis, columns)]


def prepare_session_analysis(recipe: Recipe, measure: MeasureMap, analysis: SessionAnalysis, maps: SessionMaps,
                             participants: pd.DataFrame) -> AnalysisSetup:
    """The rows, design, tests and variance groups of one measure x session analysis (no file written).

    Deterministic: every group test of the analysis, run in its own process, prepares the same
    setup from the same maps.
    """
    inference = recipe.inference
    rows_of = analysis_subjects(recipe, analysis, maps, participants)
    group_of, repeated = rows_of.group_of, rows_of.repeated
    counts = {g: int((group_of == g).sum()) for g in recipe.groups}
    where = f"{measure.label} ses {analysis.expression}"
    design, skip_reason = analysis_design(recipe, analysis, maps, participants, rows_of)
    all_columns = list(recipe.groups)
    if repeated is not None:
        from fcflow.repeated import repeated_cells

        all_columns = repeated_cells(recipe.groups, maps.sessions, recipe.reference_session)
    try:
        tests = analysis_tests(recipe, analysis, design.columns if design is not None else all_columns)
    except ValueError as exc:
        # a repeated-measures cell without any subject: its contrasts are not estimable
        skip_reason = skip_reason or f"no difference in a group x session cell ({exc})"
        tests = analysis_tests(recipe, analysis, all_columns)
    row_groups = (pd.Series(repeated.row_group) if repeated is not None else group_of)
    variance_labels, variance_note = variance_group_labels(inference.variance_groups, row_groups, where, design)
    group_cells = (list(recipe.groups) if repeated is None else
                   [c for c in (design.columns if design is not None else []) if ":" in c])
    family = not skip_reason and corrects_over_tests(recipe, len(tests))
    return AnalysisSetup(measure=measure, analysis=analysis, subjects=rows_of, design=design, tests=list(tests),
                         skip_reason=skip_reason, variance_labels=variance_labels, variance_note=variance_note,
                         group_cells=group_cells, family=family, counts=counts)


def _exchange(recipe: Recipe, setup: AnalysisSetup, test: GroupTest) -> tuple[NDArray | None, str]:
    """Whole-subject shuffles of a repeated-measures test (the same for its voxel and region
    tests: drawn from the recipe's random seed); the permutation engine's own otherwise."""
    repeated = setup.subjects.repeated
    if repeated is None:
        return None, "auto"
    from fcflow.repeated import permutation_scheme, whole_block_permutations

    scheme = permutation_scheme(test.name, setup.variance_labels is not None)
    return whole_block_permutations(
        repeated.row_subject, repeated.row_session, int(recipe.inference.n_permutations), scheme=scheme,
        patterns=repeated.patterns(), random_seed=recipe.inference.random_seed), scheme


def _infer(recipe: Recipe, setup: AnalysisSetup, test: GroupTest, maps: SessionMaps,
           shuffles: tuple[NDArray | None, str]) -> InferenceResult:
    inference = recipe.inference
    permutations, scheme = shuffles
    return run_inference(
        setup.subjects.data, setup.design, test, maps.mask, methods=inference.methods,
        n_permutations=int(inference.n_permutations), two_sided=inference.two_sided,
        random_seed=inference.random_seed, cluster_forming_p=inference.cluster_forming_p,
        min_cluster_voxels=inference.min_cluster_voxels, variance_groups=setup.variance_labels,
        fdr_p=inference.fdr_p, zstat=setup.family, group_variances=inference.group_variances,
        permutations=permutations, scheme=scheme, accel=inference.accel,
    )


def _sha256_of_written(output_dir: Path, before: dict[Path, tuple[int, int]],
                       after: dict[Path, tuple[int, int]]) -> dict[str, str]:
    from fcflow.io import sha256_file

    return {str(p.relative_to(output_dir)): sha256_file(p) for p in sorted(after) if before.get(p) != after[p]}


def run_group_test(
    output_dir: str | Path,
    recipe: Recipe,
    setup: AnalysisSetup,
    test_name: str,
    maps: SessionMaps,
    *,
    lookup: Callable | None = None,
    region_atlas: Any = None,
    command: Sequence[str] | None = None,
) -> TestOutputs:
    """One group test of one measure x session analysis: inference, its maps and tables, its regions.

    The unit of work of the group level: tests share nothing but their inputs, so they may run
    at once in several processes or SLURM jobs and write the same bytes.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    recipe : Recipe
        The effective recipe (:attr:`GroupPlan.recipe`).
    setup : AnalysisSetup
        :func:`prepare_session_analysis` of the test's analysis.
    test_name : str
        One of ``setup.tests``.
    maps : SessionMaps
        The measure's maps (:func:`load_session_maps`).
    lookup : callable or None, default=None
        Area names for the cluster tables (:func:`julich_area_lookup`).
    region_atlas : RegionAtlas or None, default=None
        The declared regions on the maps' grid; None skips the region level.
    command : sequence of str or None, default=None
        Command line for the provenance (default ``sys.argv``).

    Returns
    -------
    TestOutputs
    """
    from fcflow.derivatives import software_provenance

    output_dir = Path(output_dir)
    group_dir = output_dir / GROUP_DIR
    measure, analysis, inference = setup.measure, setup.analysis, recipe.inference
    test = setup.test(test_name)
    index = setup.tests.index(test) + 1
    n_perm = int(inference.n_permutations)
    key = test_key(measure, analysis, test.name)
    row = {"task": measure.task, "measure": measure.measure, "seed": measure.seed, "desc": measure.desc,
           "session_contrast": analysis.expression, "n_per_group": n_per_group_text(setup.counts),
           "primary_inference": inference.primary, "is_reference": analysis.is_reference,
           "group_contrast": test.expression if test.kind == "t" else test.name, "stat_type": test.kind}
    if setup.skip_reason:
        LOGGER.warning("[%d/%d] %s: %s skipped: %s.", index, len(setup.tests), setup.where, test.expression,
                       setup.skip_reason.rstrip("."))
        return TestOutputs(key=key, row={**row, "skip_reason": setup.skip_reason}, files={})
    LOGGER.info("[%d/%d] %s: %s (%s)", index, len(setup.tests), setup.where, test.expression,
                f"{n_perm} permutations" if set(inference.methods) & set(PERMUTATION_INFERENCES) else "parametric")
    design, rows_of = setup.design, setup.subjects
    diagnostics = None
    if len(design.columns) > len(setup.group_cells):
        from fcflow.stats import compute_design_diagnostics

        diagnostics = compute_design_diagnostics(design, setup.group_cells, test.matrix, max_vif=inference.max_vif)
        for message in diagnostics.warnings:
            LOGGER.warning("%s: %s: %s.", setup.where, test.expression, message)
    before = test_files(group_dir, measure, analysis, test.name)
    provenance, recipe_sha = software_provenance(command), recipe.fingerprint()
    shuffles = _exchange(recipe, setup, test)
    result = _infer(recipe, setup, test, maps, shuffles)
    row.update(write_test_outputs(
        group_dir, output_dir, recipe, measure, analysis, test, result, maps, rows_of.subjects, rows_of.group_of,
        design, rows_of.dropped, setup.counts, lookup, provenance, recipe_sha, n_perm,
        diagnostics=diagnostics, variance_note=setup.variance_note,
    ))
    if region_atlas is not None:
        permutations, scheme = shuffles
        row.update(write_region_outputs(
            group_dir, output_dir, recipe, measure, analysis, test, region_atlas, maps, rows_of.data,
            rows_of.subjects, rows_of.group_of, design, setup.variance_labels, n_perm, recipe_sha, provenance,
            permutations=permutations, scheme=scheme,
        ))
    files = _sha256_of_written(output_dir, before, test_files(group_dir, measure, analysis, test.name))
    return TestOutputs(key=key, row=row, files=files, result=result if setup.family else None)


def run_family_correction(output_dir: str | Path, recipe: Recipe, setup: AnalysisSetup,
                          tests: Sequence[TestOutputs], maps: SessionMaps) -> FamilyOutputs:
    """The permutation p maps of an analysis' tests corrected over its tests too (``family_wise``).

    ``tests`` are the analysis' :func:`run_group_test` outputs, in ``setup.tests`` order. Nothing
    is written when the analysis has no family (one test, skipped, or no permutation method).
    """
    if not setup.family:
        return FamilyOutputs(updates={}, files={})
    output_dir = Path(output_dir)
    group_dir = output_dir / GROUP_DIR
    measure, analysis = setup.measure, setup.analysis
    before = unit_files(group_dir, measure, analysis)
    update = write_family_outputs(group_dir, output_dir, recipe, measure, analysis, setup.tests,
                                  [t.result for t in tests], maps, setup.where)
    files = _sha256_of_written(output_dir, before, unit_files(group_dir, measure, analysis))
    return FamilyOutputs(updates={test_key(measure, analysis, name): values for name, values in update.items()},
                         files=files)


def combine_outputs(tests: Sequence[TestOutputs], families: Sequence[FamilyOutputs]) -> AnalysisOutputs:
    """The rows (in ``tests`` order, with their family-wise values) and files of tests and families."""
    updates = {key: values for family in families for key, values in family.updates.items()}
    rows = [{**t.row, **updates.get(t.key, {})} for t in tests]
    files = {rel: sha for part in [*tests, *families] for rel, sha in part.files.items()}
    return AnalysisOutputs(rows=rows, files=files)


def run_session_analysis(
    output_dir: str | Path,
    recipe: Recipe,
    measure: MeasureMap,
    analysis: SessionAnalysis,
    maps: SessionMaps,
    *,
    bids_dir: str | Path,
    atlas_dir: str | Path | None = None,
    command: Sequence[str] | None = None,
) -> AnalysisOutputs:
    """Every group test of one task x measure x seed on one session analysis, in this process.

    :func:`prepare_session_analysis`, :func:`run_group_test` for each of its tests, then
    :func:`run_family_correction`; the nipype workflow runs the same steps as separate nodes.

    Parameters
    ----------
    output_dir : path
        The participant level's OUTPUT_DIR.
    recipe : Recipe
        The effective recipe (:attr:`GroupPlan.recipe`).
    measure : MeasureMap
    analysis : SessionAnalysis
    maps : SessionMaps
        The measure's maps (:func:`load_session_maps`).
    bids_dir : path
        Raw BIDS dataset (its ``participants.tsv``).
    atlas_dir : path or None, default=None
        Julich-Brain v3.1 folder (area names, the region level).
    command : sequence of str or None, default=None
        Command line for the provenance (default ``sys.argv``).

    Returns
    -------
    AnalysisOutputs
    """
    from fcflow.bids import read_participants

    participants = read_participants(Path(bids_dir), recipe.group_column, recipe.groups)
    setup = prepare_session_analysis(recipe, measure, analysis, maps, participants)
    log_analysis(setup)
    lookup = julich_area_lookup(atlas_dir) if atlas_dir is not None else None
    region_atlas = load_region_atlas(recipe, atlas_dir, maps) if regions_available(recipe, atlas_dir) else None
    tests = [run_group_test(output_dir, recipe, setup, test.name, maps, lookup=lookup, region_atlas=region_atlas,
                            command=command) for test in setup.tests]
    family = run_family_correction(output_dir, recipe, setup, tests, maps)
    return combine_outputs(tests, [family])


def log_analysis(setup: AnalysisSetup) -> None:
    """Log who a session analysis tests and who dropped out of it, and why."""
    dropped = setup.subjects.dropped
    LOGGER.info("%s: n = %s%s", setup.where, n_per_group_text(setup.counts),
                f"; dropped {', '.join(f'sub-{s} ({r})' for s, r in dropped.items())}" if dropped else "")


def load_region_atlas(recipe: Recipe, atlas_dir: str | Path | None, maps: SessionMaps) -> Any:
    """The recipe's declared regions (``areas``) on the maps' grid (:mod:`fcflow.regions`)."""
    from fcflow.regions import load_julich_regions, load_label_regions, select_regions

    if recipe.regions.labels is None:
        atlas = load_julich_regions(atlas_dir, maps.mask.shape, maps.affine)
    else:
        atlas = load_label_regions(recipe.regions.atlas, recipe.regions.labels, maps.mask.shape, maps.affine)
    return select_regions(atlas, recipe.regions.areas)
