"""nipype adapters for the first level: files in, one science call, files out.

Each interface writes into its node's working directory; :class:`WriteRunDerivatives` is the only
one that writes into the output dataset (atomically, sidecars last).
"""

from __future__ import annotations

import os

import pandas as pd
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _BuildSeedMasksInputSpec(BaseInterfaceInputSpec):
    input_stamps = traits.Str("", usedefault=True, desc=(
        "identity of the run's input files (size, mtime, ctime, inode; fcflow.io.input_stamps): any "
        "change to them, even one that restores size and mtime, reruns this node"))
    atlas_dir = traits.Either(None, Directory(exists=True), default=None, usedefault=True,
                              desc="Julich-Brain files (None when every seed is a mask file)")
    reference_file = File(exists=True, mandatory=True, desc="the run's brain mask (grid)")
    seeds = traits.List(traits.Dict(), mandatory=True,
                        desc="the recipe's seeds (fcflow.config.to_plain of each SeedConfig)")


class _BuildSeedMasksOutputSpec(TraitedSpec):
    seed_files = OutputMultiObject(File(exists=True), desc="one mask per seed, recipe order")
    sidecar_files = OutputMultiObject(File(exists=True), desc="provenance of each mask")


class BuildSeedMasks(SimpleInterface):
    """Resample each recipe seed from the atlas onto the run's grid (:func:`fcflow.atlas.build_seed`)."""

    input_spec = _BuildSeedMasksInputSpec
    output_spec = _BuildSeedMasksOutputSpec

    def _run_interface(self, runtime):
        from fcflow.atlas.seedqc import seed_from_mask_file
        from fcflow.atlas.seeds import build_seed
        from fcflow.config import SeedConfig, from_plain
        from fcflow.io import save_img, write_json

        seed_files, sidecars = [], []
        for seed in (from_plain(SeedConfig, s) for s in self.inputs.seeds):
            if seed.mask:
                img, sidecar = seed_from_mask_file(seed.mask, self.inputs.reference_file, name=seed.name)
            else:
                mask = build_seed(self.inputs.atlas_dir, seed.areas, seed.hemispheres, self.inputs.reference_file,
                                  seed.source, seed.pmap_threshold, name=seed.name)
                img, sidecar = mask.img, mask.to_sidecar()
            seed_files.append(str(save_img(img, os.path.join(runtime.cwd, f"seed-{seed.name}_mask.nii.gz"))))
            sidecars.append(str(write_json(os.path.join(runtime.cwd, f"seed-{seed.name}_mask.json"), sidecar)))
        self._results["seed_files"] = seed_files
        self._results["sidecar_files"] = sidecars
        return runtime


class _SelectConfoundsInputSpec(BaseInterfaceInputSpec):
    input_stamps = traits.Str("", usedefault=True, desc=(
        "identity of the run's input files (size, mtime, ctime, inode; fcflow.io.input_stamps): any "
        "change to them, even one that restores size and mtime, reruns this node"))
    bold_file = File(exists=True, mandatory=True)
    denoising = traits.Dict(mandatory=True, desc="the recipe's [denoising] (to_plain of DenoisingConfig)")
    run_name = traits.Str(mandatory=True)


class _SelectConfoundsOutputSpec(TraitedSpec):
    confounds_file = File(exists=True, desc="selected confounds (TSV, may have no columns)")
    censoring_file = File(exists=True, desc="kept volumes, FD, exclusion decision (JSON)")


class SelectConfounds(SimpleInterface):
    """Select confounds and censored volumes (:func:`fcflow.firstlevel.select_run_confounds`)."""

    input_spec = _SelectConfoundsInputSpec
    output_spec = _SelectConfoundsOutputSpec

    def _run_interface(self, runtime):
        from fcflow.config import DenoisingConfig, from_plain
        from fcflow.firstlevel import select_run_confounds
        from fcflow.io import write_json, write_tsv

        confounds, censoring = select_run_confounds(
            self.inputs.bold_file, from_plain(DenoisingConfig, self.inputs.denoising), run_name=self.inputs.run_name)
        table = confounds if confounds is not None else pd.DataFrame(index=range(censoring["n_timepoints"]))
        self._results["confounds_file"] = str(write_tsv(os.path.join(runtime.cwd, "confounds.tsv"), table))
        self._results["censoring_file"] = str(write_json(os.path.join(runtime.cwd, "censoring.json"), censoring))
        return runtime


class _ComputeRunMapsInputSpec(BaseInterfaceInputSpec):
    input_stamps = traits.Str("", usedefault=True, desc=(
        "identity of the run's input files (size, mtime, ctime, inode; fcflow.io.input_stamps): any "
        "change to them, even one that restores size and mtime, reruns this node"))
    bold_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    seed_files = InputMultiObject(File(exists=True), mandatory=True)
    seeds = traits.List(traits.Dict(), mandatory=True,
                        desc="the recipe's seeds (to_plain of each SeedConfig): each seed's own signal and "
                             "min_coverage")
    confounds_file = File(exists=True, mandatory=True)
    censoring_file = File(exists=True, mandatory=True)
    t_r = traits.Float(mandatory=True)
    task = traits.Dict(mandatory=True, desc="the recipe's task (to_plain of TaskConfig)")
    denoising = traits.Dict(mandatory=True, desc="the recipe's [denoising] (to_plain of DenoisingConfig)")
    events_file = traits.Either(None, File(exists=True), default=None, usedefault=True)
    run_name = traits.Str(mandatory=True)
    report_data = traits.Bool(False, usedefault=True,
                              desc="also write report_data.npz for the run's report, from the same read")


class _ComputeRunMapsOutputSpec(TraitedSpec):
    map_files = OutputMultiObject(File(exists=True), desc="maps, named seed-<s>_desc-<d>_stat-<t>")
    timeseries_files = OutputMultiObject(File(exists=True), desc="seed time series (TSV)")
    qc_file = File(exists=True, desc="seed QC, DOF, exclusion (JSON)")
    report_data_file = File(exists=True, desc="the report's arrays (only with report_data=True)")


class ComputeRunMaps(SimpleInterface):
    """Seed-to-voxel maps of one run (:func:`fcflow.firstlevel.compute_run_maps`)."""

    input_spec = _ComputeRunMapsInputSpec
    output_spec = _ComputeRunMapsOutputSpec

    def _run_interface(self, runtime):
        from fcflow.config import DenoisingConfig, SeedConfig, TaskConfig, from_plain
        from fcflow.runfiles import run_maps_from_files

        outputs = run_maps_from_files(
            bold_file=self.inputs.bold_file, mask_file=self.inputs.mask_file,
            seed_files=list(self.inputs.seed_files), seeds=[from_plain(SeedConfig, s) for s in self.inputs.seeds],
            confounds_file=self.inputs.confounds_file, censoring_file=self.inputs.censoring_file,
            t_r=self.inputs.t_r, task=from_plain(TaskConfig, self.inputs.task),
            denoising=from_plain(DenoisingConfig, self.inputs.denoising),
            events_file=self.inputs.events_file, run_name=self.inputs.run_name, out_dir=runtime.cwd,
            report_data=self.inputs.report_data,
        )
        self._results.update(outputs)
        return runtime


class _WriteRunDerivativesInputSpec(BaseInterfaceInputSpec):
    input_stamps = traits.Str("", usedefault=True, desc=(
        "identity of the run's input files (size, mtime, ctime, inode; fcflow.io.input_stamps): any "
        "change to them, even one that restores size and mtime, reruns this node"))
    output_dir = Directory(mandatory=True)
    entities = traits.Dict(mandatory=True, desc="sub, ses, task, run, space, res of the run")
    map_files = InputMultiObject(File(exists=True), mandatory=False)
    timeseries_files = InputMultiObject(File(exists=True), mandatory=False)
    seed_files = InputMultiObject(File(exists=True), mandatory=True)
    seed_sidecars = InputMultiObject(File(exists=True), mandatory=True)
    qc_file = File(exists=True, mandatory=True)
    censoring_file = File(exists=True, mandatory=True)
    provenance = traits.Dict(mandatory=True, desc="inputs, recipe, command, versions")


class _WriteRunDerivativesOutputSpec(TraitedSpec):
    out_files = OutputMultiObject(File(exists=True))
    qc_row = traits.Dict()


class WriteRunDerivatives(SimpleInterface):
    """Copy a run's results into the BIDS-derivative dataset (:func:`fcflow.derivatives.write_run_derivatives`)."""

    input_spec = _WriteRunDerivativesInputSpec
    output_spec = _WriteRunDerivativesOutputSpec

    def _run_interface(self, runtime):
        from fcflow.derivatives import write_run_derivatives

        files, qc_row = write_run_derivatives(
            self.inputs.output_dir, self.inputs.entities,
            map_files=list(self.inputs.map_files or []),
            timeseries_files=list(self.inputs.timeseries_files or []),
            seed_files=list(self.inputs.seed_files), seed_sidecars=list(self.inputs.seed_sidecars),
            qc_file=self.inputs.qc_file, censoring_file=self.inputs.censoring_file,
            provenance=self.inputs.provenance,
        )
        self._results["out_files"] = [str(f) for f in files]
        self._results["qc_row"] = qc_row
        return runtime


class _WriteParticipantQCInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    subject = traits.Str(mandatory=True)
    qc_rows = traits.List(traits.Dict(), mandatory=True)


class _WriteParticipantQCOutputSpec(TraitedSpec):
    qc_table = File(exists=True)


class WriteParticipantQC(SimpleInterface):
    """Collect the per-run QC rows of a participant into one TSV."""

    input_spec = _WriteParticipantQCInputSpec
    output_spec = _WriteParticipantQCOutputSpec

    def _run_interface(self, runtime):
        from fcflow.derivatives import write_participant_qc

        self._results["qc_table"] = str(
            write_participant_qc(self.inputs.output_dir, self.inputs.subject, self.inputs.qc_rows)
        )
        return runtime


__all__ = ["BuildSeedMasks", "SelectConfounds", "ComputeRunMaps", "WriteRunDerivatives", "WriteParticipantQC"]
