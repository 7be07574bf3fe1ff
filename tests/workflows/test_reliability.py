"""Reliability of the analysis levels: kills, resumes, determinism, locks and the memory budget.

Every analysis runs through the real command line in a folder of its own with the same relative
paths (``fcflow bids out participant ...``, ``bids`` a link to the study), so that the recorded
command is the same and outputs can be compared byte for byte.

Participant level, on a tiny simulated study (1 subject per group, 6 mm, 60 volumes; rest at
baseline and infusion: 6 runs, with the HTML reports):

* **A**, the reference, ``--nprocs 2``, uninterrupted; while it runs, a second ``fcflow`` on the
  same OUTPUT_DIR and participant is refused by the lock.
* **B**: started and SIGKILLed (the whole process group) at random times until five kills have
  landed on a running process, then run to completion. Kill times are spread over A's working time
  (from taking its lock to its end), counted from the moment each restart took its lock. A killed run leaves its lock behind: the
  next run takes it over as stale.
* **C**: ``--nprocs 1``.

Group level, on first-level maps written by the test (4 subjects per group, two sessions, in the
participant level's file layout: the simulated study above has too few subjects for a design
with residual degrees of freedom): a reference run, a run killed five times then completed, and
a second fresh run with the Linear plugin instead of MultiProc.

B and C must hold exactly A's files with exactly A's bytes (reports, sidecars and the group
level's tables and maps included: fcflow's outputs hold no timestamps or durations, and execution
options such as ``--nprocs`` and ``--work-dir`` are not part of the command recorded in the
sidecars). Only ``logs/`` is left out: it is the one place that records, once per invocation, how
the work ran (plugin, processes, times), which is what differs between A, B and C. The nipype
working directories are compared with nothing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

N_KILLS = 5
# Offline: the group level looks for the Julich-Brain atlas for area names; refuse at once.
ENV = {**os.environ, "FCFLOW_JULICH_URL": "http://127.0.0.1:9/", "MPLBACKEND": "Agg"}

RECIPE = """\
[study]
name = "reliability"
space = "MNI152NLin2009cAsym"

[groups]
levels = ["placebo", "ketamine", "lamotrigine_ketamine"]

[sessions]
levels = ["baseline", "infusion"]

[tasks.rest]
measures = ["correlation"]
high_pass = 0.01          # no low-pass: 60 volumes hold only 17 cosines of 0.01-0.08 Hz (min_dof)

[seeds.pgACC]
mask = "{seed}"

[denoising]
strategy = "24P"

[contrasts]
sessions = ["infusion - baseline"]
groups = ["ketamine - placebo", "lamotrigine_ketamine - placebo"]

[inference]
primary = "tfce"
methods = ["tfce", "maxt"]
n_permutations = 100
random_seed = 3
covariates = []
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory, group_first_level) -> dict:
    from fcflow.simulate import simulate_study

    root = tmp_path_factory.mktemp("reliability")
    bids = root / "study"
    simulate_study(bids, n_per_group=1, resolution_mm=6, n_volumes=60, seed=17)
    (seed,) = (bids / "derivatives" / "ground_truth").glob("*_desc-pgACC_mask.nii.gz")
    recipe = root / "reliability.toml"
    recipe.write_text(RECIPE.format(seed=seed))
    return {"root": root, "bids": bids, "recipe": recipe, "write_group_first_level": group_first_level}


def _folder(study: dict[str, Path], name: str) -> Path:
    """A folder of its own with ``bids`` linked to the study: every run has the same command line."""
    folder = study["root"] / name
    folder.mkdir()
    (folder / "bids").symlink_to(study["bids"])
    return folder


def _args(study: dict[str, Path], level: str, *extra: str) -> list[str]:
    return ["bids", "out", level, "--recipe", str(study["recipe"]), *extra]


def _start(folder: Path, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "fcflow", *args], cwd=folder, stdout=handle,
                                stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _wait_for_own_lock(proc: subprocess.Popen, out: Path) -> float | None:
    """When ``proc`` took its lock (its work begins: imports and input checks are done); None if it ended first."""
    while proc.poll() is None:
        for path in out.glob(".fcflow-*.lock"):
            try:
                if json.loads(path.read_text())["pid"] == proc.pid:
                    return time.monotonic()
            except (OSError, ValueError, KeyError):
                pass  # being written or removed
        time.sleep(0.02)
    return None


def _run(folder: Path, args: list[str], log_name: str) -> tuple[float, str]:
    """Run fcflow to completion; return how long it worked (from taking its lock to the end) and its log."""
    log = folder / f"{log_name}.log"
    proc = _start(folder, args, log)
    locked = _wait_for_own_lock(proc, folder / "out")
    proc.wait(timeout=900)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert locked is not None, "fcflow ended before it took its lock"
    return time.monotonic() - locked, text


def _files(out: Path, under: str | None = None) -> dict[str, bytes]:
    base = out / under if under else out
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "logs"}


def _execution_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "logs").glob("*_execution.json"))]


def _participant_files(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(out).items() if not k.startswith("group")}


def _group_files(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in _files(out).items() if k.startswith(("group/", "group.html"))}


def _assert_same(got: dict[str, bytes], expected: dict[str, bytes], what: str) -> None:
    assert sorted(got) == sorted(expected), f"{what}: other files than the reference"
    differ = [name for name in expected if got[name] != expected[name]]
    assert not differ, f"{what}: {len(differ)} files differ from the reference, e.g. {differ[:5]}"


def _kill_and_resume(folder: Path, args: list[str], work_s: float, rng: random.Random,
                     expected: Sequence[str] = ()) -> bool:
    """Start, SIGKILL at a random time, repeat until N_KILLS kills landed; then complete.

    Each kill comes a random fraction of the work still to do after the process took its lock
    (before that it only imports and checks its inputs): the uninterrupted run's working time
    times the share of the ``expected`` output files not written yet (all of it when
    ``expected`` is empty), so kills keep landing on a run that resumes. A restart that finishes
    before its kill time does not count as a kill. Returns whether a killed run left a (stale)
    lock behind.
    """
    landed, attempts, logs = 0, 0, []
    lock_left = False
    while landed < N_KILLS:
        attempts += 1
        assert attempts <= 3 * N_KILLS, f"only {landed} of {attempts} kills landed on a running fcflow"
        log = folder / f"killed-{attempts}.log"
        proc = _start(folder, args, log)
        written = sum((folder / "out" / name).is_file() for name in expected)
        left = 1.0 - written / len(expected) if expected else 1.0
        delay = rng.uniform(0.05, 0.95) * work_s * max(left, 0.1)
        if _wait_for_own_lock(proc, folder / "out") is None:
            assert proc.returncode == 0, log.read_text()[-4000:]
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            landed += 1
        logs.append(log.read_text())
        lock_left |= any((folder / "out").glob(".fcflow-*.lock"))
    _, text = _run(folder, args, "completed")
    logs.append(text)
    assert not any((folder / "out").glob(".fcflow-*.lock")), "the completed run left its lock"
    assert not list((folder / "out").rglob(".*.tmp-*")), "a killed write left a temporary file"
    if lock_left:
        assert any("no longer runs" in text and "taking it over" in text for text in logs[1:]), \
            "a stale lock was left by a killed run but no later run said it took it over"
    return lock_left


@pytest.fixture(scope="module")
def reference(study) -> dict:
    """Run A: participant level (a second process on the same outputs is refused), then group level."""
    folder = _folder(study, "A")
    args = _args(study, "participant", "--nprocs", "2", "--work-dir", str(folder / "work"))
    log = folder / "participant.log"
    proc = _start(folder, args, log)
    locked = _wait_for_own_lock(proc, folder / "out")
    assert locked is not None, log.read_text()[-4000:]
    second = subprocess.run(
        [sys.executable, "-m", "fcflow", *_args(study, "participant", "--participant-label", "01", "--work-dir",
                                                 str(folder / "work2"))],
        cwd=folder, capture_output=True, text=True, env=ENV, timeout=300)
    proc.wait(timeout=900)
    work_s = time.monotonic() - locked
    assert proc.returncode == 0, log.read_text()[-4000:]
    return {"folder": folder, "participant_s": work_s, "second": second,
            "participant": _participant_files(folder / "out")}


def _group_folder(study: dict[str, Path], name: str) -> Path:
    folder = study["root"] / name
    folder.mkdir()
    study["write_group_first_level"](folder / "bids", folder / "out")
    return folder


@pytest.fixture(scope="module")
def group_reference(study) -> dict:
    folder = _group_folder(study, "group_A")
    duration, _ = _run(folder, _args(study, "group"), "group")
    return {"folder": folder, "group_s": duration, "group": _group_files(folder / "out")}


def test_second_process_on_the_same_participant_is_refused(reference):
    second = reference["second"]
    assert second.returncode == 1, second.stderr[-3000:]
    message = second.stderr.strip().splitlines()[-1]
    assert message.startswith("fcflow: error: ")
    assert ".fcflow-participant-sub-01.lock: participant sub-01 is locked by another fcflow process (pid " in message
    assert "Wait for it to finish (or stop it), then rerun" in message
    assert not (reference["folder"] / "work2").exists(), "the refused process started work"


def test_reference_outputs_are_complete(reference, group_reference):
    files = reference["participant"]
    assert len([f for f in files if f.endswith("_stat-z_desc-correlation_statmap.nii.gz")]) >= 5
    assert len([f for f in files if f.endswith("_desc-runs_qc.tsv")]) == 3
    assert not [f for f in files if ".tmp-" in f or f.endswith(".lock")]
    group = group_reference["group"]
    assert "group/results.tsv" in group and "group/baseline_results.tsv" in group
    # one nipype node per group test (2 contrasts x the session contrast and the baseline), each
    # finished in the working directory, which is the only resume cache (issue 20)
    work = group_reference["folder"] / "out_work" / "fcflow_group_wf"
    units = sorted(p.name for p in work.glob("test_*") if (p / f"result_{p.name}.pklz").is_file())
    assert units == [
        f"test_ses_{ses}_task_rest_seed_pgACC_desc_correlation_contrast_{c}"
        for ses in ("baseline", "infusionMinusBaseline") for c in ("ketamineMinusPlacebo", "lamotrigineKetamineMinusPlacebo")]
    assert not [f for f in group if f.startswith("group/.fcflow-resume")]
    assert not [f for f in group if ".tmp-" in f]


def test_participant_level_killed_five_times_then_resumed_equals_uninterrupted(study, reference):
    folder = _folder(study, "B")
    args = _args(study, "participant", "--nprocs", "2", "--work-dir", str(folder / "work"))
    # Seeded: several of the kill times fall after the lock is taken, so a stale lock is left behind.
    assert _kill_and_resume(folder, args, reference["participant_s"], random.Random(20261122),
                            expected=list(reference["participant"]))
    _assert_same(_participant_files(folder / "out"), reference["participant"], "participant level after kills")


def test_group_level_killed_five_times_then_resumed_equals_uninterrupted(study, group_reference):
    folder = _group_folder(study, "group_B")
    _kill_and_resume(folder, _args(study, "group"), group_reference["group_s"], random.Random(11))
    _assert_same(_group_files(folder / "out"), group_reference["group"], "group level after kills")


def test_participant_outputs_do_not_depend_on_nprocs(study, reference):
    folder = _folder(study, "C")
    _run(folder, _args(study, "participant", "--nprocs", "1", "--work-dir", str(folder / "work")), "participant")
    _assert_same(_participant_files(folder / "out"), reference["participant"], "participant level with --nprocs 1")


def test_group_level_twice_gives_the_same_bytes(study, group_reference):
    # A ran with MultiProc (the default); this fresh run with another plugin must write the same bytes
    folder = _group_folder(study, "group_C")
    _run(folder, _args(study, "group", "--plugin", "Linear"), "group")
    _assert_same(_group_files(folder / "out"), group_reference["group"], "a second group level with Linear")


def test_each_invocation_records_its_effective_execution_once(study, reference, group_reference):
    """Issue 17: how a level ran (plugin, processes, permutations) is recorded once per invocation, in
    logs/, and nowhere in the derivatives (whose bytes do not depend on it)."""
    (participant,) = _execution_records(reference["folder"] / "out")
    assert participant["Level"] == "participant" and "--nprocs" in participant["Command"]
    assert participant["Effective"]["plugin"] == "MultiProc"
    assert participant["Effective"]["plugin_args"]["n_procs"] == 2
    assert participant["Effective"]["participants"] == ["sub-01", "sub-02", "sub-03"]
    assert participant["StartedUTC"] <= participant["FinishedUTC"]
    (group,) = _execution_records(group_reference["folder"] / "out")
    assert group["Level"] == "group" and group["Effective"]["n_permutations"] == 100
    # C ran with one process: its record says so, its derivatives are A's (test above)
    records = _execution_records(study["root"] / "C" / "out")
    if records:  # present when test_participant_outputs_do_not_depend_on_nprocs ran first
        assert records[-1]["Effective"]["plugin_args"]["n_procs"] == 1


def test_sidecars_rebuild_the_command(reference):
    sidecar = json.loads(next(v for k, v in reference["participant"].items()
                              if k.endswith("_stat-z_desc-correlation_statmap.json")))
    assert sidecar["Command"][:3] == ["fcflow", "bids", "out"]
    assert "--nprocs" not in sidecar["Command"] and "--work-dir" not in sidecar["Command"]
    assert sidecar["RecipeSHA256"] and sidecar["Recipe"]["inference"]["n_permutations"] == 100
    assert sidecar["Software"]["fcflow"]
    assert all(len(source["sha256"]) == 64 for source in sidecar["Sources"].values())


# ----------------------------------------------------------------------------------------------
# Memory budget
# ----------------------------------------------------------------------------------------------
def _intervals(work: Path, node: str) -> list[tuple[str, str, str]]:
    from nipype.pipeline.engine.utils import load_resultfile

    out = []
    for path in sorted(work.rglob(f"{node}/result_{node}.pklz")):
        runtime = load_resultfile(path).runtime
        out.append((runtime.startTime, runtime.endTime, path.parent.parent.name))
    return out


def test_budget_for_one_run_at_a_time_runs_them_one_at_a_time(study):
    from fcflow.workflows.participant import estimate_run_mem_gb

    (bold,) = study["bids"].glob("derivatives/fmriprep/sub-01/ses-baseline/func/*task-rest*_desc-preproc_bold.nii.gz")
    mask = Path(str(bold).replace("desc-preproc_bold", "desc-brain_mask"))
    need = estimate_run_mem_gb(bold, mask)
    folder = _folder(study, "M")
    budget = round(need * 1.5, 2)  # one run and the small steps fit, two runs do not
    _run(folder, _args(study, "participant", "--participant-label", "01", "02", "--nprocs", "2", "--mem-gb",
                       str(budget), "--no-reports", "--work-dir", str(folder / "work")), "participant")
    runs = sorted(_intervals(folder / "work", "run_maps"))
    assert len(runs) == 4
    for (_, end, first), (start, _, second) in zip(runs, runs[1:]):
        assert end <= start, f"{first} and {second} ran at the same time within a {budget} GB budget"


def test_run_larger_than_the_memory_budget_fails_before_any_node_starts(study, capsys):
    from fcflow.cli import main

    folder = _folder(study, "small_budget")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        status = main(_args(study, "participant", "--participant-label", "01", "--mem-gb", "0.3", "--work-dir",
                            str(folder / "work")))
    finally:
        os.chdir(cwd)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 1
    assert message.startswith("fcflow: error: sub-01_ses-")
    assert "its step 'run_maps' needs an estimated 0.4" in message
    assert "more than the memory budget of 0.30 GB (--mem-gb" in message
    assert "Raise --mem-gb to at least 0.5 if this machine has the memory, or run on a SLURM cluster" in message
    assert not list((folder / "work").rglob("result_*.pklz")), "a node ran"
    assert not list((folder / "out").rglob("sub-01*")), "outputs were written"
    assert not list((folder / "out").glob(".fcflow-*.lock"))
