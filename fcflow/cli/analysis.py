"""Seed-to-voxel connectivity of a BIDS study (BIDS-App form).

  fcflow BIDS_DIR OUTPUT_DIR participant --derivatives FMRIPREP_DIR --recipe RECIPE
  fcflow BIDS_DIR OUTPUT_DIR group --recipe RECIPE

The participant level turns every run of the selected participants into seed-to-voxel maps;
the group level turns those maps into group x session contrasts, cluster tables and figures.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
from pathlib import Path

from fcflow.config import load_recipe
from fcflow.errors import InputDataError, OutputError
from fcflow.lock import lock_output_dir
from fcflow.workflows.options import add_execution_arguments, plugin_settings, positive_type

_LABEL = re.compile(r"^[A-Za-z0-9]+$")
LOGGER = logging.getLogger("fcflow.participant")


def _label(kind: str, prefix: str):
    def parse(text: str) -> str:
        label = text[len(prefix):] if text.startswith(prefix) else text
        if not _LABEL.match(label):
            raise argparse.ArgumentTypeError(
                f"{kind} labels must be letters and digits (BIDS), with or without '{prefix}'. Got {text!r}."
            )
        return label

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bids_dir", type=Path, help="the raw BIDS dataset (participants.tsv, sidecars, events)")
    parser.add_argument("output_dir", type=Path, help="where fcflow writes its derivatives")
    parser.add_argument("analysis_level", choices=("participant", "group"), help="which level to run")
    parser.add_argument("--recipe", default="weigner2025_pgacc",
                        help="study recipe: a TOML file or the name of a shipped one (default: %(default)s)")
    parser.add_argument("--derivatives", type=Path, default=None, metavar="FMRIPREP_DIR",
                        help="fMRIPrep derivatives (default: BIDS_DIR/derivatives/fmriprep)")
    parser.add_argument("--participant-label", "--participant_label", nargs="+", default=None,
                        type=_label("participant", "sub-"), metavar="LABEL",
                        help="participant level: analyse only these participants, BIDS labels of letters and "
                             "digits with or without 'sub-', e.g. --participant-label 01 sub-02; each must "
                             "have preprocessed BOLD in the recipe's space (default: every participant "
                             "found in the fMRIPrep derivatives). The group level ignores it")
    parser.add_argument("--session-label", nargs="+", default=None, type=_label("session", "ses-"), metavar="LABEL",
                        help="participant level: analyse only the runs of these sessions, BIDS labels with or "
                             "without 'ses-', e.g. --session-label baseline infusion (default: the "
                             "recipe's [sessions] levels). The group level ignores it")
    parser.add_argument("--task", nargs="+", default=None, type=_label("task", "task-"), metavar="LABEL",
                        help="participant level: analyse only the runs of these tasks, BIDS labels with or "
                             "without 'task-' that the recipe declares as [tasks.<label>], e.g. --task rest "
                             "(default: every task of the recipe). The group level ignores it")
    parser.add_argument("--julich-dir", type=Path, default=None, metavar="DIR",
                        help="a local copy of the Julich-Brain v3.1 files (else FCFLOW_JULICH_DIR, the cache, "
                             "a download)")
    parser.add_argument("--no-reports", action="store_true",
                        help="skip the HTML reports (OUTPUT_DIR/sub-<label>.html, OUTPUT_DIR/group.html) and "
                             "their figures")
    add_execution_arguments(parser)
    _add_group_arguments(parser)


def _add_group_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("group level")
    group.add_argument("--n-permutations", type=positive_type(int, "--n-permutations", "integer"), default=None,
                       metavar="N",
                       help="permutations per test, overriding the recipe's inference.n_permutations "
                            "(for demos and tests); at least 1/alpha (20 at alpha 0.05), and refused when its "
                            "null distributions would not fit in half of this machine's memory")


def _run_group(args: argparse.Namespace, recipe) -> int:
    import sys

    from fcflow.atlas.fetch import resolve_atlas_dir
    from fcflow.derivatives import utc_now, write_execution_record
    from fcflow.errors import AtlasError
    from fcflow.group.run import plan_group_level
    from fcflow.workflows.group import init_group_wf, invalidate_changed_units
    from fcflow.workflows.runner import run_workflow

    # the recipe that runs, with --n-permutations checked, for the group level and its report alike
    recipe = recipe.with_overrides(n_permutations=args.n_permutations)
    try:
        atlas_dir = resolve_atlas_dir(args.julich_dir)
    except AtlasError as exc:
        atlas_dir = None
        logging.getLogger("fcflow.group").warning(
            "The Julich-Brain atlas is unavailable, so the cluster tables list coordinates only (no area "
            "names): %s", exc)
    output_dir = args.output_dir.resolve()
    bids_dir = args.bids_dir.resolve()
    work_dir = (args.work_dir or output_dir.parent / f"{output_dir.name}_work").resolve()
    plugin, plugin_args = plugin_settings(args)
    command = ["fcflow", *sys.argv[1:]]
    started = utc_now()
    with lock_output_dir(output_dir, "group", command=command):
        plan = plan_group_level(output_dir, recipe, bids_dir=bids_dir, atlas_dir=atlas_dir)
        workflow = init_group_wf(plan, output_dir=output_dir, bids_dir=bids_dir, atlas_dir=atlas_dir,
                                 command=command)
        invalidate_changed_units(workflow, work_dir, output_dir)
        logging.getLogger("fcflow.group").info(
            "Group level: %d group tests of %d session analyses with %s; work directory %s",
            plan.n_tests, len(plan.units), plugin, work_dir)
        run_workflow(workflow, plugin=plugin, plugin_args=plugin_args, work_dir=work_dir)
        results = output_dir / "group" / "results.tsv"
        if not args.no_reports:
            from fcflow.reports.group import write_group_report

            report = write_group_report(output_dir, recipe, bids_dir=bids_dir, command=command)
            print(f"Group report: {report}")
        write_execution_record(output_dir, "group", command=command, started=started, settings={
            "n_permutations": recipe.inference.n_permutations,
            "n_permutations_recipe": load_recipe(args.recipe).inference.n_permutations,
            "plugin": plugin, "plugin_args": plugin_args, "work_dir": str(work_dir),
            "group_tests": plan.n_tests, "reports": not args.no_reports})
    print(f"Group level done: {results}")
    return 0


def _derivatives_dir(args: argparse.Namespace) -> Path:
    return args.derivatives if args.derivatives is not None else args.bids_dir / "derivatives" / "fmriprep"


def _check_output_dir(args: argparse.Namespace) -> None:
    """Refuse an OUTPUT_DIR that would write into the inputs (derivatives/<name> is fine)."""
    output = args.output_dir.resolve()
    bids = args.bids_dir.resolve()
    fmriprep = _derivatives_dir(args).resolve()
    inside_fmriprep = output == fmriprep or fmriprep in output.parents
    inside_raw = (output == bids or bids in output.parents) and (bids / "derivatives") not in output.parents
    if inside_fmriprep or inside_raw:
        raise InputDataError(
            f"OUTPUT_DIR {str(args.output_dir)!r} is inside the input dataset "
            f"{str(fmriprep if inside_fmriprep else bids)!r}: fcflow would write among its inputs. "
            f"Choose a folder outside it, e.g. {str(bids / 'derivatives' / 'fcflow')!r}."
        )
    if output.exists() and not output.is_dir():
        raise OutputError(errno.ENOTDIR, f"OUTPUT_DIR {str(args.output_dir)!r} is a file, not a folder: give a "
                                         "folder (it is created if missing).")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(exc.errno, f"Cannot create OUTPUT_DIR {str(args.output_dir)!r}: {exc.strerror}. Choose a "
                                     "folder you can write to.") from exc
    if not os.access(output, os.W_OK | os.X_OK):
        raise OutputError(errno.EACCES, f"OUTPUT_DIR {str(args.output_dir)!r} is not writable (read-only file system "
                                        "or permissions): choose a folder you can write to.")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe)
    bids_dir = args.bids_dir
    if not (bids_dir / "dataset_description.json").is_file():
        raise InputDataError(
            f"BIDS_DIR {str(bids_dir)!r} must be a BIDS dataset with a dataset_description.json; "
            "check the first argument."
        )
    _check_output_dir(args)
    if args.analysis_level == "participant":
        return _run_participant(args, recipe)
    return _run_group(args, recipe)


def _exclusion_line(output_dir: Path, runs) -> str:
    """How many of this invocation's runs were kept and why the others were not (their QC rows)."""
    from fcflow.derivatives import read_runs_qc
    from fcflow.qc import summarise_exclusions

    qc = read_runs_qc(output_dir)
    selected = {(r.subject, r.session or "", r.task, r.run or "") for r in runs}
    keys = zip(qc["participant"], qc["session"], qc["task"], qc["run"], strict=True)
    rows = qc[[key in selected for key in keys]]
    if len(rows) != len(runs):  # a QC table from elsewhere: say what ran, nothing more
        return f"{len(runs)} runs"
    return summarise_exclusions(rows) + " (the QC tables sub-*/sub-*_desc-runs_qc.tsv give each run's reason)"


def _run_participant(args: argparse.Namespace, recipe) -> int:
    import sys

    from fcflow.atlas.fetch import resolve_atlas_dir
    from fcflow.bids import collect_runs
    from fcflow.derivatives import utc_now, write_dataset_description, write_execution_record
    from fcflow.workflows.runner import run_workflow

    derivatives = _derivatives_dir(args)
    study = collect_runs(
        bids_dir=args.bids_dir, derivatives_dir=derivatives, space=recipe.space,
        group_column=recipe.group_column, groups=recipe.groups, sessions=recipe.sessions,
        tasks_with_events=[t.name for t in recipe.tasks if t.conditions], tasks=[t.name for t in recipe.tasks],
        participant_labels=args.participant_label, session_labels=args.session_label, task_labels=args.task,
    )
    pmap_areas = sorted({a for s in recipe.seeds if s.source == "pmap" for a in s.areas})
    needs_atlas = any(seed.mask is None for seed in recipe.seeds)
    atlas_dir = resolve_atlas_dir(args.julich_dir, with_pmaps_for=pmap_areas) if needs_atlas else None
    output_dir = args.output_dir.resolve()
    work_dir = (args.work_dir or output_dir.parent / f"{output_dir.name}_work").resolve()
    plugin, plugin_args = plugin_settings(args)
    subjects = sorted({r.subject for r in study.runs})
    started = utc_now()
    # One lock per participant: the SLURM array route runs one participant per process on one OUTPUT_DIR.
    with lock_output_dir(output_dir, "participant", subjects, command=["fcflow", *sys.argv[1:]]):
        write_dataset_description(output_dir, [args.bids_dir, derivatives])
        from fcflow.workflows.participant import init_fcflow_participant_wf

        workflow = init_fcflow_participant_wf(
            runs=study.runs, recipe=recipe, atlas_dir=atlas_dir, output_dir=output_dir, work_dir=work_dir,
            command=["fcflow", *sys.argv[1:]], reports=not args.no_reports,
        )
        LOGGER.info("Participant level: %d runs of %d participants; work directory %s", len(study.runs),
                    len(subjects), work_dir)
        run_workflow(workflow, plugin=plugin, plugin_args=plugin_args, work_dir=work_dir)
        write_execution_record(output_dir, "participant", command=["fcflow", *sys.argv[1:]], started=started,
                               settings={"plugin": plugin, "plugin_args": plugin_args, "work_dir": str(work_dir),
                                         "participants": [f"sub-{s}" for s in subjects],
                                         "n_runs": len(study.runs), "reports": not args.no_reports})
    print(f"Participant level done: {_exclusion_line(output_dir, study.runs)}; outputs in {output_dir}")
    if not args.no_reports:
        print(f"Participant reports: {', '.join(str(output_dir / f'sub-{s}.html') for s in subjects[:3])}"
              + (f" and {len(subjects) - 3} more" if len(subjects) > 3 else ""))
    return 0
