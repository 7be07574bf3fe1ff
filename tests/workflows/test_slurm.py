"""fcflow's workflows on a real SLURM cluster, through nipype's SLURM and SLURMGraph plugins.

A small stand-in workflow (two simulated runs -> a seed correlation map each -> their mean)
runs with MultiProc, SLURM and SLURMGraph; the SLURM runs must go through sbatch (every node
records its SLURM_JOB_ID) and write byte-identical outputs. CI brings up a one-node cluster
with ``.ci/slurm/up.sh`` and sets FCFLOW_TEST_SLURM=1; without a cluster these tests skip,
and with FCFLOW_TEST_SLURM=1 but no answering cluster they fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

nipype = pytest.importorskip("nipype")
from nipype import Function, JoinNode, Node, Workflow  # noqa: E402

import fcflow  # noqa: E402
from fcflow.errors import FcflowError  # noqa: E402
from fcflow.workflows.execution import run_with_plugin  # noqa: E402
from fcflow.workflows.options import plugin_settings  # noqa: E402
from fcflow.workflows.slurm import set_node_resources  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARRAY_SCRIPT = REPO / "docs" / "slurm" / "fcflow_array.sbatch"
SEEDS = (1, 2)
N_NODES = 2 * len(SEEDS) + 1  # simulate and correlate per run, then one mean
FAIL_ENV = "FCFLOW_TEST_FAIL_SEED"  # read inside the jobs; not an input, so not in nipype's hash


# ---- the stand-in workflow: Function nodes carry their source, so jobs need no test module ----
def _simulate_run(seed, shape):
    import os

    import nibabel as nib
    import numpy as np

    import fcflow  # noqa: F401  (fcflow's own nodes need it: slurm_job_template provides it)

    rng = np.random.default_rng(seed)
    bold = rng.standard_normal((*shape, 30)).astype(np.float32)
    weights = np.linspace(0, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    bold += weights[..., None] * bold[0, 0, 0]  # a planted seed network
    bold_file = os.path.abspath(f"sub-{seed:02d}_bold.nii.gz")
    nib.Nifti1Image(bold, np.diag([3.0, 3.0, 3.0, 1.0])).to_filename(bold_file)
    return bold_file, os.environ.get("SLURM_JOB_ID", "")


def _correlate_with_seed(bold_file):
    import os

    import nibabel as nib
    import numpy as np

    fail_seed = os.environ.get("FCFLOW_TEST_FAIL_SEED")
    if fail_seed and f"sub-{int(fail_seed):02d}_" in os.path.basename(bold_file):
        raise RuntimeError(f"planted failure for {bold_file}")
    img = nib.load(bold_file)
    bold = np.asarray(img.dataobj, dtype=np.float64)
    signals = bold.reshape(-1, bold.shape[-1]).T  # (n_timepoints, n_voxels)
    seed = signals[:, 0]
    z = (signals - signals.mean(0)) / signals.std(0)
    r = (z * ((seed - seed.mean()) / seed.std())[:, None]).mean(0)
    r_file = os.path.abspath("r_map.nii.gz")
    nib.Nifti1Image(r.reshape(bold.shape[:-1]).astype(np.float32), img.affine).to_filename(r_file)
    return r_file, os.environ.get("SLURM_JOB_ID", "")


def _average_maps(r_files):
    import os

    import nibabel as nib
    import numpy as np

    mean = np.mean([np.asarray(nib.load(f).dataobj) for f in r_files], axis=0)
    mean_file = os.path.abspath("mean_r.npy")
    np.save(mean_file, mean)
    return mean_file, os.environ.get("SLURM_JOB_ID", "")


def _standin_wf(base_dir: Path) -> Workflow:
    simulate = Node(Function(input_names=["seed", "shape"], output_names=["bold_file", "job_id"],
                             function=_simulate_run), name="simulate")
    simulate.inputs.shape = (7, 8, 9)
    simulate.iterables = ("seed", list(SEEDS))
    correlate = Node(Function(input_names=["bold_file"], output_names=["r_file", "job_id"],
                              function=_correlate_with_seed), name="correlate")
    average = JoinNode(Function(input_names=["r_files"], output_names=["mean_file", "job_id"],
                                function=_average_maps),
                       joinsource="simulate", joinfield=["r_files"], name="average")
    # Asks for more than the cluster's DefMemPerCPU and for 2 CPUs: checked in scontrol.
    set_node_resources(average, mem_gb=0.5, n_procs=2)
    wf = Workflow(name="standin", base_dir=str(base_dir))
    wf.connect([(simulate, correlate, [("bold_file", "bold_file")]),
                (correlate, average, [("r_file", "r_files")])])
    wf.config["execution"].update(
        remove_unnecessary_outputs=False,  # the job ids are outputs nobody consumes
        crashdump_dir=str(base_dir / "crash"),
    )
    return wf


def _outputs(base_dir: Path) -> dict[str, bytes]:
    files = [*base_dir.rglob("*.nii.gz"), *base_dir.rglob("*.npy")]
    return {str(f.relative_to(base_dir)): f.read_bytes() for f in files}


def _job_ids(base_dir: Path) -> dict[str, str]:
    """node directory -> the SLURM_JOB_ID its node recorded, for the nodes that succeeded."""
    from nipype.pipeline.engine.utils import load_resultfile

    ids = {}
    for result_file in sorted((base_dir / "standin").rglob("result_*.pklz")):
        outputs = load_resultfile(result_file).outputs  # None where the node failed
        if outputs is not None:
            ids[str(result_file.parent.relative_to(base_dir))] = outputs.job_id
    return ids


def _args(**kwargs):
    import argparse

    return argparse.Namespace(**{"plugin": "MultiProc", "nprocs": None, "mem_gb": None,
                                 "sbatch_args": None, "plugin_args": None, **kwargs})


def _run(base_dir: Path, plugin: str, **kwargs):
    name, plugin_args = plugin_settings(_args(plugin=plugin, **kwargs))
    # 1 s polls: a one-user test cluster can take the squeue calls
    return run_with_plugin(_standin_wf(base_dir), name, plugin_args,
                           poll_sleep_s=1.0 if plugin != "MultiProc" else None)


def _scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout


def _active_jobs() -> list[str]:
    out = subprocess.run(["squeue", "--me", "-h", "-o", "%i %T %r"], capture_output=True, text=True).stdout
    return out.splitlines()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    base_dir = tmp_path_factory.mktemp("multiproc")
    _run(base_dir, "MultiProc", nprocs=2)
    outputs = _outputs(base_dir)
    assert len(outputs) == 2 * len(SEEDS) + 1
    assert set(_job_ids(base_dir).values()) == {""}  # not run through SLURM
    return outputs


@pytest.fixture
def no_logname(monkeypatch):
    """CI has no LOGNAME, which nipype's SLURM plugin reads; run_with_plugin must supply it."""
    monkeypatch.setenv("LOGNAME", "placeholder")
    monkeypatch.delenv("LOGNAME")


def test_slurm_plugin_runs_every_node_as_a_job(tmp_path, reference, no_logname):
    _run(tmp_path, "SLURM", sbatch_args="--time=5")
    assert _outputs(tmp_path) == reference
    ids = _job_ids(tmp_path)
    assert len(ids) == N_NODES
    assert all(ids.values()) and len(set(ids.values())) == N_NODES, ids
    # nipype's SLURM plugin sends each job's output to batch/slurm-<id>.out
    logs = {p.name for p in (tmp_path / "standin" / "batch").glob("slurm-*.out")}
    assert logs == {f"slurm-{i}.out" for i in ids.values()}
    average_job = ids["standin/average"]
    record = _scontrol(average_job)
    assert "MinMemoryNode=512M" in record and "NumCPUs=2" in record, record
    assert "JobState=COMPLETED" in record


def test_slurmgraph_waits_for_the_submitted_graph(tmp_path, reference, no_logname):
    # --export=NONE, as some sites impose: the job template alone must find Python and fcflow
    _run(tmp_path, "SLURMGraph", sbatch_args="--export=NONE")
    assert _outputs(tmp_path) == reference  # run_with_plugin returned only once all jobs finished
    ids = _job_ids(tmp_path)
    assert len(ids) == N_NODES and all(ids.values()) and len(set(ids.values())) == N_NODES, ids
    submit = (tmp_path / "standin" / "batch" / "submit_jobs.sh").read_text()
    assert submit.count("$(sbatch ") == N_NODES
    assert submit.count("--dependency=afterok:") == len(SEEDS) + 1
    assert "MinMemoryNode=512M" in _scontrol(ids["standin/average"])


def test_slurm_rerun_after_a_failed_node_submits_only_what_is_missing(tmp_path, reference, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "2")
    with pytest.raises(RuntimeError, match="planted failure"):
        _run(tmp_path, "SLURM")
    first = _job_ids(tmp_path)
    logs = tmp_path / "standin" / "batch"
    n_first = len(list(logs.glob("slurm-*.out")))
    assert n_first == N_NODES - 1  # the mean never started
    assert len(first) == N_NODES - 2  # and the failed node left no result

    monkeypatch.delenv(FAIL_ENV)
    _run(tmp_path, "SLURM")
    second = _job_ids(tmp_path)
    assert _outputs(tmp_path) == reference
    assert {k: v for k, v in second.items() if k in first} == first  # finished nodes not rerun
    assert len(list(logs.glob("slurm-*.out"))) - n_first == 2  # the failed node and the mean


def test_slurmgraph_failure_raises_cancels_stuck_jobs_and_resumes(tmp_path, reference, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "1")
    with pytest.raises(FcflowError, match=r"2 of 5 nodes did not finish: standin/_seed_1/correlate \(RuntimeError: planted failure.*"
                       r"standin/average \(no result\).*FAILED.*CANCELLED \(DependencyNeverSatisfied\)"):
        _run(tmp_path, "SLURMGraph")
    # the mean waited on a failed job (DependencyNeverSatisfied) and was cancelled, not left queued
    mine = [line for line in _active_jobs() if "PENDING" in line or "RUNNING" in line]
    assert mine == []
    first = _job_ids(tmp_path)
    assert len(first) == N_NODES - 2
    assert list((tmp_path / "crash").glob("crash-*correlate*"))

    monkeypatch.delenv(FAIL_ENV)
    _run(tmp_path, "SLURMGraph")
    assert _outputs(tmp_path) == reference
    submit = (tmp_path / "standin" / "batch" / "submit_jobs.sh").read_text()
    assert submit.count("$(sbatch ") == 2  # dont_resubmit_completed_jobs
    second = _job_ids(tmp_path)
    assert {k: v for k, v in second.items() if k in first} == first


def _queue(*options: str) -> list[str]:
    return subprocess.run(["squeue", "--me", "-h", *options], capture_output=True, text=True).stdout.split()


def test_slurm_rerun_after_the_driver_was_killed_submits_only_what_is_missing(tmp_path, reference):
    # The driver is a separate process running this module's stand-in workflow, killed once both
    # correlate jobs are queued: they finish without it, and the rerun must only add the mean.
    driver = (
        "import importlib.util, sys\n"
        "from pathlib import Path\n"
        f"spec = importlib.util.spec_from_file_location('standin', {str(Path(__file__))!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"module._run(Path({str(tmp_path)!r}), 'SLURM')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(fcflow.__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", driver], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            scripts = _queue("-t", "all", "-o", "%o")
            if sum(str(tmp_path) in s and "correlate" in s for s in scripts) == len(SEEDS):
                break
            time.sleep(0.2)
        assert process.poll() is None, "the driver ended before it could be killed"
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 120
    while any(str(tmp_path) in s for s in _queue("-o", "%o")):  # the orphaned jobs finish
        assert time.monotonic() < deadline, _queue("-o", "%i|%T|%r|%o")
        time.sleep(0.2)
    logs = tmp_path / "standin" / "batch"
    first = _job_ids(tmp_path)
    n_first = len(list(logs.glob("slurm-*.out")))
    assert len(first) == n_first == N_NODES - 1

    _run(tmp_path, "SLURM")
    assert _outputs(tmp_path) == reference
    second = _job_ids(tmp_path)
    assert {k: v for k, v in second.items() if k in first} == first
    assert len(list(logs.glob("slurm-*.out"))) - n_first == 1  # only the mean


_FAKE_FCFLOW = """\
import json, os, sys
from pathlib import Path
bids_dir, output_dir, level, *options = sys.argv[1:]
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
if level == "group":
    done = sorted(p.name for p in out.glob("participant-*.json"))
    assert len(done) == 2, done  # the dependency held the group job back
label = options[options.index("--participant-label") + 1] if level == "participant" else ""
record = {"argv": sys.argv[1:], "job": os.environ["SLURM_JOB_ID"],
          "task": os.environ.get("SLURM_ARRAY_TASK_ID"), "cpus": os.environ.get("SLURM_CPUS_PER_TASK")}
(out / f"{level}-{label}.json").write_text(json.dumps(record))
"""


def test_array_route_runs_one_participant_per_task_then_the_group(tmp_path, submit_array_then_group):
    import json

    bids_dir = tmp_path / "bids"
    bids_dir.mkdir()
    (bids_dir / "participants.tsv").write_text("participant_id\tgroup\nsub-07\tdrug\nsub-12\tplacebo\n")
    fake = tmp_path / "fake_fcflow.py"
    fake.write_text(_FAKE_FCFLOW)
    output_dir = tmp_path / "out"
    env = {
        **os.environ,
        "BIDS_DIR": str(bids_dir), "OUTPUT_DIR": str(output_dir), "WORK_DIR": str(tmp_path / "work"),
        "FCFLOW_PYTHON": sys.executable, "FCFLOW_CMD": f"{sys.executable} {fake}",
        # fcflow may be importable from a source checkout only
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(fcflow.__file__).parents[1]),
                                                    os.environ.get("PYTHONPATH")])),
    }
    # the template's own requests (4 CPUs, 16G) exceed the CI node: override them, as users may
    resources = ["--cpus-per-task=1", "--mem=200M", "--time=5", f"--chdir={tmp_path}"]
    _, group_id = submit_array_then_group(str(ARRAY_SCRIPT), env, resources, timeout_s=120)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert "JobState=COMPLETED" in _scontrol(group_id), logs

    records = {p.stem: json.loads(p.read_text()) for p in output_dir.glob("*.json")}
    assert set(records) == {"participant-07", "participant-12", "group-"}, logs
    for task, label in (("0", "07"), ("1", "12")):
        record = records[f"participant-{label}"]
        assert record["task"] == task
        assert record["argv"][:3] == [str(bids_dir), str(output_dir), "participant"]
        assert record["argv"][record["argv"].index("--work-dir") + 1] == str(tmp_path / "work" / f"sub-{label}")
        assert "--plugin" in record["argv"] and "MultiProc" in record["argv"]
    assert records["group-"]["argv"][2] == "group"
    assert "sub-07" in logs and "sub-12" in logs
