"""Execution plumbing without a cluster: options, plugin arguments, node requests, array ids.

The real SLURM runs are in test_slurm.py; here ``squeue``/``scancel`` are small fakes on PATH.
"""

from __future__ import annotations

import argparse
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from nipype import Function, Node, Workflow
from nipype.interfaces.utility import IdentityInterface

import fcflow
from fcflow.cli import analysis
from fcflow.errors import FcflowError
from fcflow.workflows import options
from fcflow.workflows.execution import run_with_plugin
from fcflow.workflows.options import add_execution_arguments, parse_plugin_args, plugin_settings
from fcflow.workflows.slurm import (
    SlurmJob,
    check_nodes_finished,
    ensure_slurm_environment,
    participant_from_array,
    request_node_resources,
    set_node_resources,
    slurm_job_template,
    slurm_resource_args,
    wait_for_slurm_jobs,
)


@pytest.fixture(autouse=True)
def _outside_slurm(monkeypatch):
    """Tests run outside any SLURM job unless they say otherwise."""
    for name in ("SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcflow")
    add_execution_arguments(parser)
    return parser


def _parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(list(argv))


def _parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        _parse(*argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- command line ------------------------------------------------------------------------------
def test_defaults():
    args = _parse()
    assert args.plugin == "MultiProc"
    assert (args.nprocs, args.mem_gb, args.sbatch_args, args.plugin_args, args.work_dir) == (None,) * 5


def test_options_parse():
    args = _parse("--plugin", "SLURM", "--sbatch-args=--time=02:00:00", "--plugin-args", '{"max_jobs": 3}',
                  "--work-dir", "work")
    assert args.plugin == "SLURM"
    assert args.sbatch_args == "--time=02:00:00"
    assert args.plugin_args == {"max_jobs": 3}
    assert args.work_dir == Path("work")
    assert _parse("--nprocs", "3", "--mem-gb", "7.5").mem_gb == 7.5
    # argparse takes a dash-led value after a space only when it contains a space
    assert _parse("--sbatch-args", "--time=5 --mem=1G").sbatch_args == "--time=5 --mem=1G"


def test_options_join_the_analysis_parser_that_already_has_work_dir_and_nprocs():
    parser = argparse.ArgumentParser()
    analysis.add_arguments(parser)
    add_execution_arguments(parser)
    args = parser.parse_args(["bids", "out", "participant", "--plugin", "SLURMGraph", "--work-dir", "w"])
    assert args.work_dir == Path("w") and args.nprocs is None
    assert plugin_settings(args)[0] == "SLURMGraph"


def test_unknown_plugin_is_refused(capsys):
    assert "invalid choice: 'PBS'" in _parse_error(capsys, "--plugin", "PBS")


@pytest.mark.parametrize("flag, value, kind", [("--nprocs", "0", "int"), ("--nprocs", "two", "int"),
                                               ("--mem-gb", "-1", "float"), ("--mem-gb", "nan", "float")])
def test_nonpositive_resources_are_refused(capsys, flag, value, kind):
    err = _parse_error(capsys, flag, value)
    assert f"'{flag}' must be a positive {kind}. Got {value!r}." in err


def test_sbatch_args_with_unbalanced_quotes_are_refused(capsys):
    err = _parse_error(capsys, "--sbatch-args=--comment='open")
    assert "'--sbatch-args' must be sbatch options as one shell-quoted string" in err
    assert "Got \"--comment='open\"" in err


@pytest.mark.parametrize("text, found", [
    ("{max_jobs: 3}", "which is not valid JSON (Expecting property name enclosed in double quotes at character 1)"),
    ("", "which is not valid JSON (Expecting value at character 0)"),
    ("[1, 2]", "a JSON array"),
    ('"x"', "a JSON string"),
    ("3", "a JSON number"),
])
def test_plugin_args_must_be_a_json_object(capsys, text, found):
    message = f"'--plugin-args' must be a JSON object such as '{{\"max_jobs\": 20}}'. Got {text!r}, {found}"
    with pytest.raises(FcflowError, match="^" + _re(message)):
        parse_plugin_args(text)
    assert message in _parse_error(capsys, "--plugin-args", text)


def _re(text: str) -> str:
    import re

    return re.escape(text)


# ---- plugin arguments ---------------------------------------------------------------------------
def test_multiproc_settings(monkeypatch):
    monkeypatch.setattr(options, "_usable_cpus", lambda: 8)
    monkeypatch.setattr(options, "_allocation_cpus", lambda: None)
    name, settings = plugin_settings(_parse("--nprocs", "3", "--mem-gb", "6"))
    assert name == "MultiProc"
    assert settings == {"n_procs": 3, "memory_gb": 6.0, "raise_insufficient": False}


def test_nprocs_above_the_cpus_is_capped_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(options, "_usable_cpus", lambda: 2)
    monkeypatch.setattr(options, "_allocation_cpus", lambda: None)
    with caplog.at_level("WARNING", logger="fcflow"):
        settings = plugin_settings(_parse("--nprocs", "1000"))[1]
    assert settings["n_procs"] == 2
    assert "--nprocs 1000 is more than the 2 CPU(s) this process may use: running 2 worker(s)." in caplog.text


def test_multiproc_defaults_to_the_cpus_this_process_may_use():
    settings = plugin_settings(_parse())[1]
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert settings["n_procs"] == usable
    assert "memory_gb" not in settings  # nipype's own default: 90 % of the machine


def test_multiproc_inside_a_slurm_job_uses_the_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "16384")
    assert plugin_settings(_parse())[1] == {"n_procs": 4, "memory_gb": 16.0, "raise_insufficient": False}
    monkeypatch.delenv("SLURM_MEM_PER_NODE")
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1536")
    assert plugin_settings(_parse())[1]["memory_gb"] == 6.0
    assert plugin_settings(_parse("--nprocs", "2", "--mem-gb", "3"))[1]["n_procs"] == 2  # flags win


def test_slurm_settings():
    name, settings = plugin_settings(_parse("--plugin", "SLURM", "--sbatch-args=--time=1:00:00"))
    assert name == "SLURM"
    assert settings["sbatch_args"] == "--time=1:00:00"
    assert settings["max_jobs"] == options.DEFAULT_MAX_JOBS
    assert settings["template"] == slurm_job_template()


def test_slurmgraph_settings_resume_and_plugin_args_win():
    name, settings = plugin_settings(_parse("--plugin", "SLURMGraph", "--plugin-args", '{"sbatch_args": "-p x"}'))
    assert name == "SLURMGraph"
    assert settings["dont_resubmit_completed_jobs"] is True
    assert settings["sbatch_args"] == "-p x"
    assert plugin_settings(argparse.Namespace(plugin="Linear", plugin_args='{"a": 1}')) == ("Linear", {"a": 1})


@pytest.mark.parametrize("argv, message", [
    (["--plugin", "SLURM", "--nprocs", "4"],
     "'--nprocs' is only used by --plugin MultiProc. Got --nprocs 4 with --plugin SLURM. Ask SLURM"),
    (["--plugin", "Linear", "--mem-gb", "2"],
     "'--mem-gb' is only used by --plugin MultiProc. Got --mem-gb 2.0 with --plugin Linear."),
    (["--sbatch-args=--time=5"],
     "'--sbatch-args' is only used by --plugin SLURM or SLURMGraph. Got --sbatch-args '--time=5' with --plugin MultiProc."),
])
def test_options_the_plugin_would_ignore_are_refused(argv, message):
    with pytest.raises(FcflowError, match=_re(message)):
        plugin_settings(_parse(*argv))


def test_job_template_runs_fcflow_without_the_submitters_environment(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(slurm_job_template() + "\npython -c 'import sys, fcflow; print(sys.prefix); print(fcflow.__file__)'\n")
    assert slurm_job_template().startswith("#!/bin/bash\n")
    # as under sbatch --export=NONE: no PATH to the venv, no PYTHONPATH
    done = subprocess.run(["/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "/bin/bash", str(script)],
                          capture_output=True, text=True, cwd="/", check=True)
    prefix, fcflow_file = done.stdout.split()
    assert prefix == sys.prefix
    assert Path(fcflow_file).resolve() == Path(fcflow.__file__).resolve()


# ---- per-node requests --------------------------------------------------------------------------
def test_slurm_resource_args():
    assert slurm_resource_args(0.5, 2) == " --mem=512M --cpus-per-task=2"
    assert slurm_resource_args(1.0001) == " --mem=1025M"  # rounded up, never below the request
    assert slurm_resource_args(0.2) == " --mem=512M"  # the job's Python needs memory too
    assert slurm_resource_args(n_procs=1) == " --cpus-per-task=1"
    assert slurm_resource_args() == ""


@pytest.mark.parametrize("kwargs, message", [
    ({"mem_gb": 0}, "'mem_gb' must be a positive number of GB. Got 0."),
    ({"mem_gb": math.inf}, "'mem_gb' must be a positive number of GB. Got inf."),
    ({"n_procs": 1.5}, "'n_procs' must be a positive integer. Got 1.5."),
    ({"n_procs": True}, "'n_procs' must be a positive integer. Got True."),
])
def test_slurm_resource_args_are_validated(kwargs, message):
    with pytest.raises(FcflowError, match=_re(message)):
        slurm_resource_args(**kwargs)


def _node(name: str, **kwargs) -> Node:
    return Node(IdentityInterface(fields=["x"]), name=name, **kwargs)


def test_set_node_resources_serves_multiproc_and_slurm():
    node = _node("heavy")
    node.plugin_args = {"template": "#!/bin/bash"}
    set_node_resources(node, mem_gb=3, n_procs=4)
    assert (node.mem_gb, node.n_procs) == (3, 4)
    assert node.plugin_args == {"template": "#!/bin/bash", "sbatch_args": " --mem=3072M --cpus-per-task=4",
                                "overwrite": False}


def test_node_request_follows_sbatch_args_in_slurmgraph():
    # SLURMGraph concatenates the plugin's and the node's sbatch_args without a separator
    # (nipype's GraphPluginBase._get_args): the node's leading space keeps them apart.
    from nipype.pipeline.plugins.slurmgraph import SLURMGraphPlugin

    node = _node("heavy")
    set_node_resources(node, mem_gb=1)
    plugin = SLURMGraphPlugin(plugin_args=plugin_settings(_parse("--plugin", "SLURMGraph", "--sbatch-args=--mem=4G"))[1])
    template, sbatch_args = plugin._get_args(node, ["template", "sbatch_args"])
    assert sbatch_args == "--mem=4G --mem=1024M"  # sbatch takes the last --mem
    assert template == slurm_job_template()


def test_request_node_resources_builds_requests_for_the_whole_graph():
    inner = Workflow(name="inner")
    inner.add_nodes([_node("threads", n_procs=4), _node("plain")])
    outer = Workflow(name="outer")
    pinned = _node("pinned", mem_gb=8)
    pinned.plugin_args = {"sbatch_args": "--partition=bigmem"}
    outer.add_nodes([inner, _node("big", mem_gb=2.5), _node("small"), pinned])
    assert request_node_resources(outer) == ["big", "inner.threads"]
    assert outer.get_node("big").plugin_args["sbatch_args"] == " --mem=2560M"
    assert outer.get_node("inner.threads").plugin_args["sbatch_args"] == " --cpus-per-task=4"
    assert outer.get_node("small").plugin_args == {}
    assert outer.get_node("pinned").plugin_args == {"sbatch_args": "--partition=bigmem"}


# ---- environment and running --------------------------------------------------------------------
def _fake_tools(folder: Path, **scripts: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = folder / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def test_slurm_environment_needs_sbatch(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FcflowError, match="--plugin SLURM needs SLURM's 'sbatch' on PATH, and it is not there"):
        ensure_slurm_environment("SLURM")
    ensure_slurm_environment("MultiProc")  # nothing to check


def test_slurm_environment_sets_logname(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(_fake_tools(tmp_path / "bin", sbatch="", squeue="")))
    monkeypatch.setenv("LOGNAME", "x")
    monkeypatch.delenv("LOGNAME")
    ensure_slurm_environment("SLURMGraph")
    assert os.environ["LOGNAME"]


def _add(x):
    return x + 1


def _tiny_wf(base_dir: Path) -> Workflow:
    wf = Workflow(name="tiny", base_dir=str(base_dir))
    first = Node(Function(input_names=["x"], output_names=["y"], function=_add), name="first")
    first.inputs.x = 1
    second = Node(Function(input_names=["x"], output_names=["y"], function=_add), name="second")
    wf.connect(first, "y", second, "x")
    wf.config["execution"]["crashdump_dir"] = str(base_dir / "crash")
    return wf


def test_run_with_plugin_linear_and_check_nodes_finished(tmp_path):
    execgraph = run_with_plugin(_tiny_wf(tmp_path), "Linear")
    assert sorted(node.name for node in execgraph.nodes()) == ["first", "second"]
    check_nodes_finished(execgraph)
    (tmp_path / "tiny" / "second" / "result_second.pklz").unlink()
    jobs = [SlurmJob(7, "COMPLETED", "None", "a.sh"), SlurmJob(8, "TIMEOUT", "TimeLimit", "b.sh")]
    with pytest.raises(FcflowError, match=_re("1 of 2 nodes did not finish: tiny/second (no result). "
                                              "SLURM jobs that did not complete: 8 TIMEOUT (TimeLimit) log b.sh.e.")):
        check_nodes_finished(execgraph, jobs=jobs)


def test_run_with_plugin_refuses_bad_plugins_and_slurm_without_base_dir(tmp_path):
    with pytest.raises(FcflowError, match="'plugin' must be one of Linear, MultiProc, SLURM, SLURMGraph. Got 'PBS'."):
        run_with_plugin(_tiny_wf(tmp_path), "PBS")
    wf = _tiny_wf(tmp_path)
    wf.base_dir = None
    with pytest.raises(FcflowError, match="Workflow 'tiny' needs a base_dir"):
        run_with_plugin(wf, "SLURM", {})


# ---- waiting for SLURMGraph (fake squeue: one listing per call, the last one repeats) ------------
def _fake_queue(tmp_path: Path, monkeypatch, listings: list[str]) -> Path:
    state = tmp_path / "queue"
    state.mkdir()
    for i, listing in enumerate(listings):
        (state / f"{i}.txt").write_text(listing)
    squeue = f"""
n=$(cat {state}/calls 2>/dev/null || echo 0); echo $((n + 1)) > {state}/calls
f={state}/$n.txt; [ -f "$f" ] || f={state}/{len(listings) - 1}.txt
cat "$f"
"""
    tools = _fake_tools(tmp_path / "bin", squeue=squeue, scancel=f'echo "$@" >> {state}/cancelled\n')
    monkeypatch.setenv("PATH", f"{tools}{os.pathsep}{os.environ['PATH']}")
    return state


def _submit_file(tmp_path: Path) -> Path:
    submit = tmp_path / "submit_jobs.sh"
    submit.write_text(
        "#!/usr/bin/env bash\n# Condense format attempted\n"
        "j0_a=$(sbatch -o /w/a.sh.o -e /w/a.sh.e  -J j0_a /w/a.sh | awk '/^Submitted/ {print $4}')\n"
        "j1_b=$(sbatch -o /w/b.sh.o -e /w/b.sh.e  --dependency=afterok:${j0_a} -J j1_b /w/b.sh | awk '/^Submitted/ {print $4}')\n"
    )
    return submit


def test_wait_follows_the_submitted_jobs_only(tmp_path, monkeypatch):
    state = _fake_queue(tmp_path, monkeypatch, [
        "5|COMPLETED|None|/w/a.sh\n11|RUNNING|None|/w/a.sh\n12|PENDING|Dependency|/w/b.sh\n13|RUNNING|None|/x/c.sh\n",
        "5|COMPLETED|None|/w/a.sh\n11|COMPLETED|None|/w/a.sh\n12|RUNNING|None|/w/b.sh\n13|RUNNING|None|/x/c.sh\n",
        "5|COMPLETED|None|/w/a.sh\n11|COMPLETED|None|/w/a.sh\n12|COMPLETED|None|/w/b.sh\n13|RUNNING|None|/x/c.sh\n",
    ])
    jobs = wait_for_slurm_jobs(_submit_file(tmp_path), ignore_job_ids={5}, poll_s=0)
    assert jobs == [SlurmJob(11, "COMPLETED", "None", "/w/a.sh"), SlurmJob(12, "COMPLETED", "None", "/w/b.sh")]
    assert (state / "calls").read_text().strip() == "3"
    assert not (state / "cancelled").exists()


def test_wait_cancels_jobs_whose_dependency_failed(tmp_path, monkeypatch):
    state = _fake_queue(tmp_path, monkeypatch, [
        "11|FAILED|NonZeroExitCode|/w/a.sh\n12|PENDING|DependencyNeverSatisfied|/w/b.sh\n",
        "11|FAILED|NonZeroExitCode|/w/a.sh\n12|CANCELLED|DependencyNeverSatisfied|/w/b.sh\n",
    ])
    jobs = wait_for_slurm_jobs(_submit_file(tmp_path), poll_s=0)
    assert (state / "cancelled").read_text().split() == ["12"]
    assert [job.ok for job in jobs] == [False, False]


def test_wait_gives_up_after_the_timeout(tmp_path, monkeypatch):
    _fake_queue(tmp_path, monkeypatch, ["11|RUNNING|None|/w/a.sh\n12|PENDING|Dependency|/w/b.sh\n"])
    with pytest.raises(FcflowError, match="SLURM jobs 11 12 of .* were still queued or running after 0.05 s"):
        wait_for_slurm_jobs(_submit_file(tmp_path), poll_s=0.01, timeout_s=0.05)


def test_wait_needs_the_job_list(tmp_path):
    with pytest.raises(FcflowError, match="nipype's SLURMGraph left no job list at .*submit_jobs.sh"):
        wait_for_slurm_jobs(tmp_path / "submit_jobs.sh")


# ---- array route -----------------------------------------------------------------------------------
def test_participant_from_array_is_zero_based(monkeypatch):
    labels = ["sub-07", "12", "sub-3a"]
    assert [participant_from_array(labels, i) for i in range(3)] == ["07", "12", "3a"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert participant_from_array(labels) == "12"
    assert participant_from_array(labels, "2") == "3a"  # an explicit id wins


def test_participant_from_array_reads_a_list_or_participants_tsv(tmp_path):
    listing = tmp_path / "participants.txt"
    listing.write_text("# drug arm\nsub-07\n\n12  # late scan\n")
    assert participant_from_array(listing, 1) == "12"
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("age\tparticipant_id\n31\tsub-07\n28\tsub-12\n")
    assert participant_from_array(str(tsv), 1) == "12"


@pytest.mark.parametrize("task_id, message", [
    (3, "'SLURM_ARRAY_TASK_ID' must be between 0 and 2: task ids are 0-based and the participants list lists "
        "3 participants. Got 3; submit with --array=0-2."),
    (-1, "'SLURM_ARRAY_TASK_ID' must be between 0 and 2"),
    ("1.0", "'SLURM_ARRAY_TASK_ID' must be an integer. Got '1.0'."),
])
def test_participant_from_array_refuses_bad_ids(task_id, message):
    with pytest.raises(FcflowError, match=_re(message)):
        participant_from_array(["a", "b", "c"], task_id)


def test_participant_from_array_needs_a_task_id():
    with pytest.raises(FcflowError, match=_re("SLURM_ARRAY_TASK_ID is not set: run this inside an array job "
                                              "(sbatch --array=0-1) or pass the task id.")):
        participant_from_array(["a", "b"])


def test_participant_lists_are_validated(tmp_path):
    with pytest.raises(FcflowError, match="The participants list '.*nowhere.txt' does not exist"):
        participant_from_array(tmp_path / "nowhere.txt", 0)
    with pytest.raises(FcflowError, match=_re("Participant labels in the participants list must be letters and "
                                              "digits (BIDS), with or without 'sub-'. Got ['0_7'].")):
        participant_from_array(["sub-0_7"], 0)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n")
    with pytest.raises(FcflowError, match=f"{_re(str(empty))} names no participants."):
        participant_from_array(empty, 0)
    tsv = tmp_path / "participants.tsv"
    tsv.write_text("subject\tage\nsub-07\t31\n")
    with pytest.raises(FcflowError, match=_re("must have a 'participant_id' column (BIDS participants.tsv). "
                                              "Got columns ['subject', 'age'].")):
        participant_from_array(tsv, 0)


def test_array_template_is_valid_bash():
    script = Path(__file__).resolve().parents[2] / "docs" / "slurm" / "fcflow_array.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "participant_from_array" in text and "--plugin MultiProc" in text
