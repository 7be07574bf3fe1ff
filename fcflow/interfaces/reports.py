"""nipype adapters of the participant report: files in, one call to :mod:`fcflow.reports`, files out."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _ComputeRunReportInputSpec(BaseInterfaceInputSpec):
    input_stamps = traits.Str("", usedefault=True, desc=(
        "identity of the run's input files (size, mtime, ctime, inode; fcflow.io.input_stamps): any "
        "change to them, even one that restores size and mtime, reruns this node"))
    report_data_file = File(exists=True, mandatory=True, desc="the first level's report_data.npz")
    mask_file = File(exists=True, mandatory=True)
    fmriprep_confounds_file = File(exists=True, mandatory=True, desc="fMRIPrep's confounds TSV (FD, DVARS)")
    seed_files = InputMultiObject(File(exists=True), mandatory=True)
    seeds = traits.List(traits.Dict(), mandatory=True,
                        desc="the recipe's seeds (fcflow.config.to_plain of each SeedConfig)")
    censoring_file = File(exists=True, mandatory=True)
    qc_file = File(exists=True, mandatory=True, desc="the first level's run_qc.json")
    map_files = InputMultiObject(File(exists=True), mandatory=False)
    timeseries_files = InputMultiObject(File(exists=True), mandatory=False)
    events_file = traits.Either(None, File(exists=True), default=None, usedefault=True)
    t_r = traits.Float(mandatory=True)
    task = traits.Dict(mandatory=True, desc="the recipe's task (to_plain of TaskConfig)")
    denoising = traits.Dict(mandatory=True, desc="the recipe's [denoising] (to_plain of DenoisingConfig)")
    entities = traits.Dict(mandatory=True, desc="BIDS entities of the run's outputs, and its group")
    run_name = traits.Str(mandatory=True)


class _ComputeRunReportOutputSpec(TraitedSpec):
    report_file = File(exists=True, desc="run_report.json: numbers and the figures made")


class ComputeRunReport(SimpleInterface):
    """Figures and QC numbers of one run (:func:`fcflow.reports.participant.make_run_report`)."""

    input_spec = _ComputeRunReportInputSpec
    output_spec = _ComputeRunReportOutputSpec

    def _run_interface(self, runtime):
        from fcflow.config import DenoisingConfig, TaskConfig, from_plain
        from fcflow.reports.participant import make_run_report

        seeds = self.inputs.seeds
        self._results["report_file"] = str(make_run_report(
            report_data_file=self.inputs.report_data_file, mask_file=self.inputs.mask_file,
            fmriprep_confounds_file=self.inputs.fmriprep_confounds_file,
            seed_files=list(self.inputs.seed_files), seed_names=[str(s["name"]) for s in seeds],
            censoring_file=self.inputs.censoring_file,
            qc_file=self.inputs.qc_file, map_files=list(self.inputs.map_files or []),
            timeseries_files=list(self.inputs.timeseries_files or []), events_file=self.inputs.events_file,
            t_r=self.inputs.t_r, task=from_plain(TaskConfig, self.inputs.task),
            denoising=from_plain(DenoisingConfig, self.inputs.denoising),
            entities=self.inputs.entities,
            run_name=self.inputs.run_name, out_dir=runtime.cwd,
        ))
        return runtime


class _WriteParticipantReportInputSpec(BaseInterfaceInputSpec):
    output_dir = Directory(mandatory=True)
    subject = traits.Str(mandatory=True)
    report_files = InputMultiObject(File(exists=True), mandatory=True)
    session_order = traits.List(traits.Str, desc="the recipe's sessions: the page lists runs in this order")


class _WriteParticipantReportOutputSpec(TraitedSpec):
    out_report = File(exists=True, desc="OUTPUT_DIR/sub-<label>.html")


class WriteParticipantReport(SimpleInterface):
    """Render ``sub-<label>.html`` (:func:`fcflow.reports.participant.write_participant_report`)."""

    input_spec = _WriteParticipantReportInputSpec
    output_spec = _WriteParticipantReportOutputSpec

    def _run_interface(self, runtime):
        from fcflow.reports.participant import write_participant_report

        self._results["out_report"] = str(write_participant_report(
            self.inputs.output_dir, self.inputs.subject, list(self.inputs.report_files),
            session_order=list(self.inputs.session_order)))
        return runtime


__all__ = ["ComputeRunReport", "WriteParticipantReport"]
