"""The bad-input catalogue: every case through the command line, one clear line, no output.

Each case corrupts a copy of one tiny simulated study (1 subject per group, 6 mm, 60 volumes;
the copy hard-links the study's files and replaces only those it corrupts) and runs
``fcflow BIDS_DIR OUTPUT_DIR participant`` (or ``group``) with :func:`fcflow.cli.main`. It
checks the exit status (1; 2 for the argparse usage error), that the error is the last line of
stderr and one line, that it names the offending file or parameter and says what to do, that the
run it concerns left no output under OUTPUT_DIR, that nothing partial was left anywhere (no
``*.tmp-*`` files) and that no lock file remains.

"before" cases are caught before anything runs (:func:`fcflow.bids.collect_runs`, the recipe, the
command line, the locks): OUTPUT_DIR then holds no file at all. "node" cases need the voxel data
and are caught by the step that reads them; the participant level then runs two runs of sub-01
(the affected baseline run and the healthy infusion run, ``--plugin Linear``): the healthy run's
maps are written, the affected run has none, and neither has sub-01's QC table.

=============================  ======  ============================================================
case                           when    expected message (fragment)
=============================  ======  ============================================================
bold-missing                   before  ``<bold>: expected fMRIPrep's preprocessed BOLD beside its brain mask``
bold-empty                     before  ``<bold>: expected fMRIPrep's preprocessed 4D BOLD series. Got an empty file``
bold-not-nifti                 before  ``<bold>: ... Got a file nibabel cannot read as NIfTI``
bold-truncated                 before  ``<bold>: expected a complete gzip stream ... ends early or is corrupt``
bold-3d                        before  ``<bold> must be a 4D BOLD series. Got shape``
bold-corrupted                 node    ``BOLD file <bold> cannot be decompressed (BadGzipFile: CRC check failed``
bold-nan                       node    ``BOLD file <bold> must hold finite values inside the mask. Got 3 NaN or Inf``
bold-inf                       node    ``BOLD file <bold> must hold finite values inside the mask. Got 1 NaN or Inf``
mask-missing                   before  ``the brain mask <mask> is missing``
mask-other-grid                before  ``the brain mask <mask> is on another grid than the BOLD run``
bold-one-volume                before  ``<bold>: expected a BOLD time series. Got 1 volume``
affine-oblique                 before  ``<bold>: expected an axis-aligned grid ... Got an oblique affine``
affine-lpi-flipped             --      handled: same maps as the RAS run (test_lpi_flipped_run_gives_the_same_maps)
space-other                    before  ``No *_space-MNI152NLin2009cAsym_*desc-preproc_bold.nii.gz ... Found other spaces: ['T1w']``
confounds-missing              before  ``the confounds file <confounds> is missing``
confounds-short                before  ``<confounds>: expected one row per volume ... (60 volumes). Got 55 rows``
confounds-na-inside            node    ``<confounds>: expected numbers in every row after the first ... column 'trans_y'``
confounds-no-motion-columns    node    ``<confounds>: expected fMRIPrep's motion columns ['framewise_displacement', 'std_dvars']``
confounds-missing-columns      node    ``<confounds>: expected the confound columns of the denoising strategy '24P'``
tr-disagrees                   before  ``RepetitionTime 2.5 s in <sidecar> disagrees with the NIfTI header``
tr-missing                     before  ``No RepetitionTime for <bold>``
events-missing                 before  ``the events file <events> is missing``
events-beyond-run-end          node    ``'events' must lie within the run (60 volumes x 2 s = 120 s). Got 3 events in <events>``
participant-without-row        before  ``sub-<label> has data (<bold>) but no row in <participants.tsv>``
participant-without-group      before  ``sub-<label> has no 'group' in <participants.tsv> (n/a)``
participant-row-without-data   --      handled: a warning (test_participant_listed_without_data_is_a_warning)
participant-id-path            before  ``<participants.tsv>: 'participant_id' must be sub-<label> with letters and digits``
participant-label-path         before  ``participant labels must be letters and digits (BIDS)`` (argparse: exit 2)
participant-label-unknown      before  ``--participant-label ['07']: no preprocessed BOLD ... Participants with BOLD in
                                       MNI152NLin2009cAsym: 01, ...``
session-label-unknown          before  ``--session-label must name sessions of the recipe's [sessions] levels``
group-unknown                  before  ``'group' must be one of the recipe's groups ... Got ['esketamine']``
session-missing-for-a-subject  --      handled at the group level: the subject drops out of the contrasts that
                                       need the session, with the reason in the sidecars (tests/test_grouplevel.py)
duplicate-runs                 before  ``Two BOLD files for one run in MNI152NLin2009cAsym``
recipe-not-toml                before  ``<recipe>: is not valid TOML (... (at line 3, column 8)). Fix the syntax``
recipe-unknown-key             before  ``<recipe>: [study] has an unknown key 'colour'; expected one of [...]``
seed-misses-brain-mask         node    ``Seed 'pgACC' has 0 voxels inside the brain mask of sub-01_ses-baseline_task-rest``
output-inside-input            before  ``OUTPUT_DIR ... is inside the input dataset``
output-is-a-file               before  ``OUTPUT_DIR '<out>' is a file, not a folder: give a folder``
derivatives-missing            before  ``fMRIPrep derivatives folder <dir> does not exist: pass --derivatives``
participants-tsv-missing       before  ``<participants.tsv> is missing``
output-locked                  before  ``<.fcflow-participant-sub-01.lock>: participant sub-01 is locked by another fcflow process``
output-locked-other-host       before  ``... taken on another host ... delete <lock> and rerun``
group-before-participant       before  ``<OUTPUT_DIR>: expected the participant level's outputs``
=============================  ======  ============================================================
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fcflow.cli import main

SPACE = "MNI152NLin2009cAsym"
FUNC = Path("derivatives/fmriprep/sub-01/ses-baseline/func")
RUN = "sub-01_ses-baseline_task-rest"
BOLD = FUNC / f"{RUN}_space-{SPACE}_res-6_desc-preproc_bold.nii.gz"
MASK = FUNC / f"{RUN}_space-{SPACE}_res-6_desc-brain_mask.nii.gz"
CONFOUNDS = FUNC / f"{RUN}_desc-confounds_timeseries.tsv"
NBACK = "sub-01_ses-baseline_task-nback"
NBACK_BOLD = FUNC / f"{NBACK}_space-{SPACE}_res-6_desc-preproc_bold.nii.gz"
EVENTS = Path("sub-01/ses-baseline/func") / f"{NBACK}_events.tsv"
# The node cases run the affected run and one healthy run of the same participant.
NODE_FILTERS = ["--participant-label", "01", "--session-label", "baseline", "infusion", "--task", "rest",
                "--plugin", "Linear", "--no-reports"]

RECIPE = """\
[study]
name = "catalogue"
space = "MNI152NLin2009cAsym"

[groups]
levels = ["placebo", "ketamine", "lamotrigine_ketamine"]

[sessions]
levels = ["baseline", "infusion", "24h"]

[tasks.rest]
measures = ["correlation"]
high_pass = 0.01          # no low-pass: 60 volumes hold only 17 cosines of 0.01-0.08 Hz (min_dof)

[tasks.nback]
measures = ["gppi"]
conditions = ["0back", "2back"]
condition_contrasts = ["2back - 0back"]
high_pass = 0.008

[seeds.pgACC]
mask = "{seed}"

[denoising]
strategy = "24P"

[contrasts]
sessions = ["infusion - baseline"]
groups = ["ketamine - placebo"]

[inference]
methods = ["tfce"]
n_permutations = 100
covariates = []
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """The tiny study every case starts from (never modified: cases hard-link its files)."""
    from fcflow.simulate import simulate_study

    root = tmp_path_factory.mktemp("catalogue_study") / "bids"
    simulate_study(root, n_per_group=1, resolution_mm=6, n_volumes=60, seed=7)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o444)  # a case that wrote into a shared inode would fail loudly
    return root


@pytest.fixture(autouse=True)
def _offline_atlas(monkeypatch):
    """The group level looks for the Julich-Brain atlas: fail at once instead of downloading it."""
    monkeypatch.setenv("FCFLOW_JULICH_URL", "http://127.0.0.1:9/")


@pytest.fixture(autouse=True)
def _log_handlers_on_this_tests_stderr():
    """fcflow's and nipype's log handlers keep the stream they were made with: an earlier test's
    captured (and now closed) stderr. Point them at this test's."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # setStream would flush the closed one


# ----------------------------------------------------------------------------------------------
# Corrupting a hard-linked copy
# ----------------------------------------------------------------------------------------------
def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as a new file (the old one is a hard link into the study)."""
    path.unlink()
    path.write_bytes(data)


def _save(img: nib.Nifti1Image, path: Path) -> None:
    path.unlink()
    img.to_filename(path)


def _edit_bold(path: Path, change: Callable[[np.ndarray], np.ndarray] | None = None, affine=None) -> None:
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    data = change(data.copy()) if change else data
    _save(nib.Nifti1Image(data, img.affine if affine is None else affine, img.header), path)


def _edit_table(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    table = change(pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False))
    path.unlink()
    table.to_csv(path, sep="\t", index=False)


def _nan(data):
    data = data.astype(np.float32)
    data[20, 20, 15, 5:8] = np.nan  # inside the brain, 3 volumes
    return data


def _inf(data):
    data = data.astype(np.float32)
    data[20, 20, 15, 9] = np.inf
    return data


def _rotated(path: Path) -> np.ndarray:
    angle = np.deg2rad(10)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation @ nib.load(path).affine


def _oblique(root: Path) -> None:
    affine = _rotated(root / BOLD)
    _edit_bold(root / BOLD, affine=affine)
    _edit_bold(root / MASK, affine=affine)


def _corrupt_middle(root: Path) -> None:
    data = bytearray((root / BOLD).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    _replace(root / BOLD, bytes(data))


def _remove_run_files(root: Path, pattern: str) -> None:
    for path in root.rglob(pattern):
        path.unlink()


def _rename_space(root: Path) -> None:
    for path in list((root / "derivatives" / "fmriprep").rglob(f"*space-{SPACE}*")):
        path.rename(path.with_name(path.name.replace(f"space-{SPACE}", "space-T1w")))


def _sidecar(root: Path, payload: dict) -> None:
    path = root / "sub-01/ses-baseline/func" / f"{RUN}_bold.json"
    _replace(path, json.dumps(payload).encode())
    deriv = root / BOLD.with_name(BOLD.name.replace(".nii.gz", ".json"))
    if deriv.exists():  # fMRIPrep's sidecar of the preprocessed run repeats the TR
        meta = json.loads(deriv.read_text())
        meta.pop("RepetitionTime", None)
        _replace(deriv, json.dumps(meta).encode())


def _participants(root: Path, change: Callable[[str], str]) -> None:
    path = root / "participants.tsv"
    _replace(path, change(path.read_text()).encode())


def _seed_outside_brain(root: Path) -> list[str]:
    mask = nib.load(root / MASK)
    seed = np.zeros(mask.shape, dtype=np.uint8)
    seed[0, 0, 0] = 1  # a corner of the field of view, outside every brain mask
    seed_file = root.parent / "corner_seed.nii.gz"
    nib.Nifti1Image(seed, mask.affine).to_filename(seed_file)
    recipe = root.parent / "corner_seed.toml"
    recipe.write_text(RECIPE.format(seed=seed_file))
    return ["--recipe", str(recipe)]


def _lock(root: Path, hostname: str | None) -> list[str]:
    out = root.parent / "out"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    root.parent.joinpath("holder.pid").write_text(str(holder.pid))
    (out / ".fcflow-participant-sub-01.lock").write_text(json.dumps({
        "pid": holder.pid, "hostname": hostname or socket.gethostname(), "started": "2026-01-01T00:00:00+00:00",
        "command": ["fcflow", "bids", "out", "participant"]}))
    return []


@dataclass(frozen=True)
class Case:
    """One bad input: how to make it, the command's extra arguments and what the message says."""

    corrupt: Callable[[Path], list[str] | None]
    names: str  # regex: the offending file or parameter
    fix: str  # regex: what the message tells the user to do
    node: bool = False  # caught by a step that reads the data, not before the run
    args: list[str] = field(default_factory=list)
    level: str = "participant"
    status: int = 1


CASES: dict[str, Case] = {
    "bold-missing": Case(lambda r: (r / BOLD).unlink(), re.escape(BOLD.name),
                         r"fMRIPrep did not finish this run.*Re-run fMRIPrep"),
    "bold-empty": Case(lambda r: _replace(r / BOLD, b""), re.escape(BOLD.name) + r": expected .* Got an empty file",
                       "Re-run fMRIPrep for this run or copy the file again"),
    "bold-not-nifti": Case(lambda r: _replace(r / BOLD, b"<html>404 Not Found</html>\n" * 20),
                           re.escape(BOLD.name) + r": expected .*cannot read as NIfTI",
                           "Re-run fMRIPrep for this run or copy the file again"),
    "bold-truncated": Case(lambda r: _replace(r / BOLD, (r / BOLD).read_bytes()[:(r / BOLD).stat().st_size // 2]),
                           re.escape(BOLD.name) + r": expected a complete gzip stream",
                           r"ends early or is corrupt .*copy the file again"),
    "bold-3d": Case(lambda r: _edit_bold(r / BOLD, lambda d: d[..., 0]), re.escape(BOLD.name), r"must be a 4D BOLD series"),
    "bold-one-volume": Case(lambda r: _edit_bold(r / BOLD, lambda d: d[..., :1]),
                            re.escape(BOLD.name) + r": expected a BOLD time series\. Got 1 volume",
                            r"Re-run fMRIPrep for this run or copy the file again"),
    "bold-corrupted": Case(_corrupt_middle, re.escape(BOLD.name), r"truncated or corrupt: re-run fMRIPrep", node=True,
                           args=NODE_FILTERS),
    "bold-nan": Case(lambda r: _edit_bold(r / BOLD, _nan), re.escape(BOLD.name) + r" must hold finite values .*Got 3 NaN",
                     r"re-run fMRIPrep or re-copy the file, or check the brain mask", node=True, args=NODE_FILTERS),
    "bold-inf": Case(lambda r: _edit_bold(r / BOLD, _inf), re.escape(BOLD.name) + r" must hold finite values .*Got 1 NaN",
                     r"re-run fMRIPrep or re-copy the file", node=True, args=NODE_FILTERS),
    "mask-missing": Case(lambda r: (r / MASK).unlink(), re.escape(MASK.name), r"is missing \(fMRIPrep writes it beside"),
    "mask-other-grid": Case(lambda r: _save(nib.Nifti1Image(np.ones((7, 8, 9), np.uint8), np.eye(4)), r / MASK),
                            re.escape(MASK.name) + r" is on another grid", r"Use the mask fMRIPrep wrote"),
    "affine-oblique": Case(_oblique, re.escape(BOLD.name) + r": expected an axis-aligned grid.*oblique affine",
                           r"Check its space- entity, or resample it"),
    "space-other": Case(_rename_space, r"No \*_space-MNI152NLin2009cAsym_.*Found other spaces: \['T1w'\]",
                        r"Run fMRIPrep with --output-spaces MNI152NLin2009cAsym"),
    "confounds-missing": Case(lambda r: (r / CONFOUNDS).unlink(), re.escape(CONFOUNDS.name) + " is missing",
                              r"fcflow needs fMRIPrep's confounds TSV"),
    "confounds-short": Case(lambda r: _edit_table(r / CONFOUNDS, lambda t: t.iloc[:-5]),
                            re.escape(CONFOUNDS.name) + r": expected one row per volume .*\(60 volumes\)\. Got 55 rows",
                            r"Use the confounds file fMRIPrep wrote for this run"),
    "confounds-no-motion-columns": Case(
        lambda r: _edit_table(r / CONFOUNDS, lambda t: t.drop(columns=["framewise_displacement"])),
        re.escape(CONFOUNDS.name) + r": expected fMRIPrep's motion columns .*Got no \['framewise_displacement'\]",
        r"Use the confounds TSV fMRIPrep wrote for this run", node=True, args=NODE_FILTERS),
    "confounds-na-inside": Case(
        lambda r: _edit_table(r / CONFOUNDS, lambda t: t.assign(trans_y=t["trans_y"].where(t.index != 7, "n/a"))),
        re.escape(CONFOUNDS.name) + r": expected numbers in every row after the first .*column 'trans_y' at data "
                                    r"row\(s\) \[8\]",
        r"Use the confounds TSV fMRIPrep wrote for this run", node=True, args=NODE_FILTERS),
    "confounds-missing-columns": Case(
        lambda r: _edit_table(r / CONFOUNDS, lambda t: t.drop(columns=["trans_x"])),
        re.escape(CONFOUNDS.name) + r": expected the confound columns of the denoising strategy '24P'.*trans_x",
        r"choose another \[denoising\] strategy", node=True, args=NODE_FILTERS),
    "tr-disagrees": Case(lambda r: _sidecar(r, {"RepetitionTime": 2.5, "TaskName": "rest"}),
                         re.escape(f"{RUN}_bold.json") + r" disagrees with the NIfTI header", r"Fix whichever is wrong"),
    "tr-missing": Case(lambda r: _sidecar(r, {"TaskName": "rest"}), r"No RepetitionTime for " + re.escape(BOLD.name),
                       r"Add it to the run's BOLD sidecar"),
    "events-missing": Case(lambda r: (r / EVENTS).unlink(), re.escape(EVENTS.name) + " is missing",
                           r"needs it \(onset, duration, trial_type\)"),
    "events-beyond-run-end": Case(
        lambda r: _edit_table(r / EVENTS, lambda t: t.assign(onset=(t["onset"].astype(float) + 500).astype(str))),
        r"'events' must lie within the run \(60 volumes x 2 s = 120 s\)\. Got \d+ events in .*" + re.escape(EVENTS.name),
        r"check the events file, the run and its t_r", node=True,
        args=["--participant-label", "01", "--session-label", "baseline", "infusion", "--task", "nback",
              "--plugin", "Linear", "--no-reports"]),
    "participant-without-row": Case(lambda r: _participants(r, lambda t: "\n".join(t.splitlines()[:3]) + "\n"),
                                    r"sub-03 has data .* but no row in .*participants\.tsv",
                                    r"add it with its 'group', or leave it out with --participant-label"),
    "participant-without-group": Case(lambda r: _participants(r, lambda t: t.replace("lamotrigine_ketamine", "n/a")),
                                      r"sub-0\d has no 'group' in .*participants\.tsv \(n/a\)",
                                      r"every analysed participant needs a group"),
    "participant-id-path": Case(lambda r: _participants(r, lambda t: t.replace("sub-03\t", "sub-../x\t")),
                                r"participants\.tsv: 'participant_id' must be sub-<label> with letters and digits"
                                r".*Got \['sub-\.\./x'\]", r"Fix the table"),
    "participant-label-path": Case(lambda r: None, r"Got '\.\./x'", r"participant labels must be letters and digits",
                                   args=["--participant-label", "../x"], status=2),
    "participant-label-unknown": Case(lambda r: None, r"--participant-label \['07'\]",
                                      r"no preprocessed BOLD in space .* Participants with BOLD in "
                                      r"MNI152NLin2009cAsym: 01", args=["--participant-label", "07"]),
    "session-label-unknown": Case(lambda r: None, r"Got \['day1'\]",
                                  r"--session-label must name sessions of the recipe's \[sessions\] levels "
                                  r"\['baseline', 'infusion', '24h'\]", args=["--session-label", "day1"]),
    "group-unknown": Case(lambda r: _participants(r, lambda t: t.replace("\tketamine\t", "\tesketamine\t")),
                          r"participants\.tsv: 'group' must be one of the recipe's groups .*Got \['esketamine'\]",
                          r"Fix the table or the recipe's \[groups\] levels"),
    "duplicate-runs": Case(lambda r: os.link(r / BOLD, r / BOLD.with_name(BOLD.name.replace("res-6", "res-2"))),
                           r"Two BOLD files for one run in MNI152NLin2009cAsym: .*res-2.*res-6",
                           r"Keep one resolution \(res-\) or description per run"),
    "recipe-not-toml": Case(lambda r: ["--recipe", str(_write(r.parent / "broken.toml", "[study]\nname = 'x'\nspace =\n"))],
                            r"broken\.toml: is not valid TOML \(.*at line 3", r"Fix the syntax at that line"),
    "recipe-unknown-key": Case(
        lambda r: ["--recipe", str(_write(r.parent / "colour.toml", RECIPE.replace('name = "catalogue"',
                                                                                   'name = "c"\ncolour = "red"')))],
        r"colour\.toml: \[study\] has an unknown key 'colour'", r"[Ee]xpected|did you mean|[Aa]llowed|keys"),
    # The seed misses every run: one run only, or each would fail (and the message list them all).
    "seed-misses-brain-mask": Case(_seed_outside_brain, r"Seed 'pgACC' has 0 voxels inside the brain mask of " + RUN,
                                   r"check that the BOLD run is in MNI152NLin2009cAsym", node=True,
                                   args=["--participant-label", "01", "--session-label", "baseline", "--task", "rest",
                                         "--plugin", "Linear", "--no-reports"]),
    "output-inside-input": Case(lambda r: None, r"OUTPUT_DIR .* is inside the input dataset",
                                r"Choose a folder outside it"),
    "output-is-a-file": Case(lambda r: (r.parent / "out").write_text("not a folder") and None,
                             r"OUTPUT_DIR .*out' is a file, not a folder", r"give a folder"),
    "derivatives-missing": Case(lambda r: ["--derivatives", str(r / "derivatives" / "nowhere")],
                                r"derivatives folder .*nowhere does not exist", r"pass --derivatives with the folder"),
    "participants-tsv-missing": Case(lambda r: (r / "participants.tsv").unlink(), r"participants\.tsv is missing",
                                     r"Add the file \(BIDS: participant_id and group\)"),
    "output-locked": Case(lambda r: _lock(r, None),
                          r"\.fcflow-participant-sub-01\.lock: participant sub-01 is locked by another fcflow process "
                          r"\(pid \d+ on host", r"Wait for it to finish \(or stop it\), then rerun"),
    "output-locked-other-host": Case(lambda r: _lock(r, "elsewhere.example.org"),
                                     r"\.fcflow-participant-sub-01\.lock: .*on host 'elsewhere\.example\.org'",
                                     r"taken on another host.*if you are sure it does not .* delete .* and rerun"),
    "group-before-participant": Case(lambda r: None, r"out: expected the participant level's outputs",
                                     r"run 'fcflow BIDS_DIR OUTPUT_DIR participant' first", level="group"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _case_dir(study: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bids"
    # Hard links: cases replace a file (unlink, then write) and never write into one.
    shutil.copytree(study, root, copy_function=os.link)
    (tmp_path / "recipe.toml").write_text(RECIPE.format(seed=next((study / "derivatives" / "ground_truth").glob(
        "*_desc-pgACC_mask.nii.gz"))))
    return root


def _run_case(name: str, study: Path, tmp_path: Path, capsys) -> tuple[int, str, Path]:
    case = CASES[name]
    root = _case_dir(study, tmp_path)
    extra = case.corrupt(root) or []
    out = root / "derivatives" / "fmriprep" / "fcflow" if name == "output-inside-input" else tmp_path / "out"
    argv = [str(root), str(out), case.level, "--recipe", str(tmp_path / "recipe.toml"),
            "--work-dir", str(tmp_path / "work"), *case.args, *extra]
    capsys.readouterr()
    try:
        try:
            status = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            status = exc.code
        return status, capsys.readouterr().err, out
    finally:
        pid_file = tmp_path / "holder.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), 9)


def _outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else []


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_with_one_clear_line(name, study, tmp_path, capsys):
    case = CASES[name]
    status, err, out = _run_case(name, study, tmp_path, capsys)
    lines = err.rstrip("\n").splitlines()
    assert status == case.status, err[-3000:]
    assert lines, "no message"
    message = lines[-1]
    if case.status == 2:  # argparse: usage line, then "fcflow: error: ..."
        assert message.startswith("fcflow: error: argument --participant-label")
    else:
        assert message.startswith("fcflow: error: "), err[-3000:]
        assert sum(line.startswith("fcflow: error:") for line in lines) == 1
        assert "Traceback" not in err
    assert re.search(case.names, message), f"the message does not name the input:\n{message}"
    assert re.search(case.fix, message), f"the message does not say what to do:\n{message}"
    print(f"{name}: {message}")

    written = _outputs(out)
    assert not [p for p in written if ".tmp-" in p.name], "a partial file was left behind"
    assert not [p for p in written if p.name.endswith(".lock") and name not in ("output-locked",
                                                                                 "output-locked-other-host")]
    if case.node:
        assert not [p for p in written if RUN in p.name or NBACK in p.name], "the affected run has outputs"
        assert not (out / "sub-01" / "sub-01_desc-runs_qc.tsv").exists()
        healthy = "sub-01_ses-infusion_task-nback" if name == "events-beyond-run-end" else "sub-01_ses-infusion_task-rest"
        if name != "seed-misses-brain-mask":
            assert [p for p in written if p.name.startswith(healthy) and p.name.endswith("_statmap.nii.gz")], \
                "the healthy run of the same participant should have its maps"
    else:
        assert [p for p in written if not p.name.startswith(".fcflow-")] == [], "output written before the check"


# ----------------------------------------------------------------------------------------------
# Inputs that are not errors
# ----------------------------------------------------------------------------------------------
def test_participant_listed_without_data_is_a_warning(study, tmp_path, capsys, caplog, monkeypatch):
    """participants.tsv rows without data are reported and the run goes on (nothing to analyse for them)."""
    import fcflow.workflows.runner

    root = _case_dir(study, tmp_path)
    _participants(root, lambda t: t + "sub-04\tplacebo\t30\tF\n")
    ran = []
    monkeypatch.setattr(fcflow.workflows.runner, "run_workflow", lambda workflow, **kwargs: ran.append(workflow))
    status = main([str(root), str(tmp_path / "out"), "participant", "--recipe", str(tmp_path / "recipe.toml"),
                   "--work-dir", str(tmp_path / "work")])
    # stderr, or pytest's log capture when an earlier in-process run left fcflow's logger propagating
    err = capsys.readouterr().err + caplog.text
    assert status == 0 and len(ran) == 1
    assert "1 participant(s) in participants.tsv have no runs to analyse: ['sub-04']" in err
    assert not list((tmp_path / "out").glob(".fcflow-*.lock"))


def _flip_x(path: Path) -> None:
    img = nib.load(path)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, img.shape[0] - 1
    _save(nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1].copy(), img.affine @ flip, img.header), path)


def test_lpi_flipped_run_gives_the_same_maps(study, tmp_path, capsys):
    """A run stored with its first axis flipped (LPI) is read through its affine, never misread."""
    maps = {}
    for orientation in ("RAS", "LPI"):
        case = tmp_path / orientation
        root = _case_dir(study, case)
        if orientation == "LPI":
            _flip_x(root / BOLD)
            _flip_x(root / MASK)
        status = main([str(root), str(case / "out"), "participant", "--recipe", str(case / "recipe.toml"),
                       "--work-dir", str(case / "work"), "--participant-label", "01", "--session-label",
                       "baseline", "--task", "rest", "--plugin", "Linear"])
        assert status == 0, capsys.readouterr().err[-3000:]
        (z_file,) = (case / "out").rglob("*_stat-z_desc-correlation_statmap.nii.gz")
        maps[orientation] = nib.load(z_file)
    ras, lpi = maps["RAS"], maps["LPI"]
    assert lpi.affine[0, 0] < 0 < ras.affine[0, 0]
    back = nib.as_closest_canonical(lpi)
    np.testing.assert_allclose(back.affine, ras.affine, atol=1e-4)
    np.testing.assert_allclose(back.get_fdata(), ras.get_fdata(), atol=1e-5)
    assert np.count_nonzero(ras.get_fdata()) > 1000
