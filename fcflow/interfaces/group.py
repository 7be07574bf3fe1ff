"""nipype adapters for the group level: one science call each (:mod:`fcflow.group`).

:class:`LoadGroupMaps` reads one task x measure x seed's first-level maps into its node's
working directory; :class:`RunGroupTest` runs one group test of one session analysis on them
and writes its files into OUTPUT_DIR (atomically); :class:`RunFamilyCorrection` corrects an
analysis' tests over each other; :class:`FinishGroupLevel` writes ``results.tsv`` from every
test and sets apart what none wrote. Every setting arrives as plain
data (the typed recipe through :func:`fcflow.config.to_plain`), so nipype's hash of a node's
inputs decides whether it reruns.
"""

from __future__ import annotations

import os

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    SimpleInterface,
    TraitedSpec,
    traits,
)


def write_pickle(value, path: str) -> str:
    """Write ``value`` to ``path`` (a node's working directory) as a pickle; return its SHA-256."""
    import pickle

    from fcflow.io import sha256_file, write_bytes

    write_bytes(path, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    return sha256_file(path)


def read_pickle(path: str):
    """Read what :func:`write_pickle` wrote (a node's own output, written by this fcflow)."""
    import pickle

    with open(path, "rb") as handle:
        return pickle.load(handle)


class _LoadGroupMapsInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="the participant level's OUTPUT_DIR")
    runs = traits.List(traits.Dict(), mandatory=True,
                       desc="the measure's runs, fcflow.group.inputs.collect_first_level as records")
    sessions = traits.List(traits.Str(), mandatory=True, desc="the recipe's sessions, in order")
    input_stamps = traits.Str(mandatory=True, desc=(
        "identity of every map read and every QC table (fcflow.io.input_stamps): any change reruns this node "
        "and the tests after it"))


class _LoadGroupMapsOutputSpec(TraitedSpec):
    maps_file = traits.Str(desc="fcflow.group.inputs.SessionMaps, pickled in this node's folder")
    maps_sha256 = traits.Str(desc="its SHA-256: the tests rerun only when the maps' values change")


class LoadGroupMaps(SimpleInterface):
    """Read every usable map of one task x measure x seed once (:func:`fcflow.group.inputs.load_session_maps`)."""

    input_spec = _LoadGroupMapsInputSpec
    output_spec = _LoadGroupMapsOutputSpec

    def _run_interface(self, runtime):
        import pandas as pd

        from fcflow.group.inputs import load_session_maps

        maps = load_session_maps(self.inputs.output_dir, pd.DataFrame(self.inputs.runs), self.inputs.sessions)
        path = os.path.join(runtime.cwd, "session_maps.pkl")
        self._results["maps_sha256"] = write_pickle(maps, path)
        self._results["maps_file"] = path
        return runtime


class _GroupAnalysisInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="the participant level's OUTPUT_DIR; files go to its group/")
    bids_dir = traits.Str(mandatory=True, desc="raw BIDS dataset (participants.tsv)")
    recipe = traits.Dict(mandatory=True, desc="the effective recipe (fcflow.config.to_plain of a Recipe)")
    measure = traits.Dict(mandatory=True, desc="fcflow.group.inputs.MeasureMap fields")
    analysis = traits.Str(mandatory=True, desc="label of one of fcflow.group.inference.session_analyses(recipe)")
    maps_file = traits.Str(mandatory=True, desc="LoadGroupMaps' pickled SessionMaps")
    maps_sha256 = traits.Str(mandatory=True, desc="its SHA-256 (what the hash of this node depends on)")
    input_stamps = traits.Str(mandatory=True, desc=(
        "identity of participants.tsv and of the region atlas (fcflow.io.input_stamps)"))


def _setup(inputs):
    """The recipe, the analysis' setup (fcflow.group.run.prepare_session_analysis) and the maps."""
    from pathlib import Path

    from fcflow.bids import read_participants
    from fcflow.config import Recipe, from_plain
    from fcflow.group.inference import session_analyses
    from fcflow.group.inputs import MeasureMap
    from fcflow.group.run import prepare_session_analysis

    recipe = from_plain(Recipe, inputs.recipe)
    (analysis,) = [a for a in session_analyses(recipe) if a.label == inputs.analysis]
    maps = read_pickle(inputs.maps_file)
    participants = read_participants(Path(inputs.bids_dir), recipe.group_column, recipe.groups)
    return recipe, prepare_session_analysis(recipe, MeasureMap(**inputs.measure), analysis, maps, participants), maps


class _RunGroupTestInputSpec(_GroupAnalysisInputSpec):
    test = traits.Str(mandatory=True, desc="the group test's name (contrast entity), one of the analysis' tests")
    atlas_dir = traits.Either(None, traits.Str(), default=None, usedefault=True,
                              desc="Julich-Brain v3.1 folder (area names, region level); None: without")
    command = traits.List(traits.Str(), mandatory=True, desc="the command line, for the sidecars")


class _OutputsFileSpec(TraitedSpec):
    outputs_file = traits.Str(desc="what the node hands on, pickled in its folder")
    outputs_sha256 = traits.Str(desc="its SHA-256 (the nodes after it rerun when it changes)")


class RunGroupTest(SimpleInterface):
    """One group test of one measure x session analysis (:func:`fcflow.group.run.run_group_test`)."""

    input_spec = _RunGroupTestInputSpec
    output_spec = _OutputsFileSpec

    def _run_interface(self, runtime):
        from fcflow.group.outputs import julich_area_lookup
        from fcflow.group.run import load_region_atlas, log_analysis, regions_available, run_group_test

        recipe, setup, maps = _setup(self.inputs)
        if setup.tests[0].name == self.inputs.test:
            log_analysis(setup)  # once per analysis
        atlas_dir = self.inputs.atlas_dir
        outputs = run_group_test(
            self.inputs.output_dir, recipe, setup, self.inputs.test, maps,
            lookup=julich_area_lookup(atlas_dir) if atlas_dir is not None else None,
            region_atlas=load_region_atlas(recipe, atlas_dir, maps) if regions_available(recipe, atlas_dir) else None,
            command=list(self.inputs.command),
        )
        path = os.path.join(runtime.cwd, "test_outputs.pkl")
        self._results["outputs_sha256"] = write_pickle(outputs, path)
        self._results["outputs_file"] = path
        return runtime


class _RunFamilyCorrectionInputSpec(_GroupAnalysisInputSpec):
    test_files = traits.List(traits.Str(), mandatory=True,
                             desc="the analysis' RunGroupTest outputs_file, in the order of its tests")
    test_sha256 = traits.List(traits.Str(), mandatory=True, desc="their SHA-256 (what this node's hash follows)")


class RunFamilyCorrection(SimpleInterface):
    """Correction over the tests of one analysis (:func:`fcflow.group.run.run_family_correction`)."""

    input_spec = _RunFamilyCorrectionInputSpec
    output_spec = _OutputsFileSpec

    def _run_interface(self, runtime):
        from fcflow.group.run import run_family_correction

        recipe, setup, maps = _setup(self.inputs)
        tests = [read_pickle(path) for path in self.inputs.test_files]
        outputs = run_family_correction(self.inputs.output_dir, recipe, setup, tests, maps)
        path = os.path.join(runtime.cwd, "family_outputs.pkl")
        self._results["outputs_sha256"] = write_pickle(outputs, path)
        self._results["outputs_file"] = path
        return runtime


class _FinishGroupLevelInputSpec(BaseInterfaceInputSpec):
    output_dir = traits.Str(mandatory=True, desc="the participant level's OUTPUT_DIR")
    test_files = traits.List(traits.Str(), mandatory=True,
                             desc="every RunGroupTest's outputs_file, in results.tsv order")
    family_files = traits.List(traits.Str(), value=[], usedefault=True,
                               desc="every RunFamilyCorrection's outputs_file")


class _FinishGroupLevelOutputSpec(TraitedSpec):
    results_file = traits.Str(desc="OUTPUT_DIR/group/results.tsv")


class FinishGroupLevel(SimpleInterface):
    """``results.tsv`` from every unit, stale files set apart (:func:`fcflow.group.outputs.finish_group_level`).

    Always runs (it is cheap): it decides what ``group/`` holds after this invocation.
    """

    input_spec = _FinishGroupLevelInputSpec
    output_spec = _FinishGroupLevelOutputSpec
    _always_run = True

    def _run_interface(self, runtime):
        from fcflow.group.outputs import finish_group_level
        from fcflow.group.run import combine_outputs

        outputs = combine_outputs([read_pickle(path) for path in self.inputs.test_files],
                                  [read_pickle(path) for path in self.inputs.family_files])
        self._results["results_file"] = str(finish_group_level(self.inputs.output_dir, [outputs]))
        return runtime


__all__ = ["LoadGroupMaps", "RunGroupTest", "RunFamilyCorrection", "FinishGroupLevel", "read_pickle",
           "write_pickle"]
