"""SLURM: per-node ``sbatch`` requests, the job template, waiting for ``SLURMGraph`` jobs, array tasks.

nipype's SLURM plugins do not turn ``Node(mem_gb=..., n_procs=...)`` into an ``sbatch`` request:
:func:`set_node_resources` and :func:`request_node_resources` write ``--mem``/``--cpus-per-task``
into each node's ``plugin_args`` after ``--sbatch-args``. ``SLURMGraph`` returns once it has
submitted: :func:`wait_for_slurm_jobs` polls ``squeue`` and :func:`check_nodes_finished` checks
every node's result. :func:`participant_from_array` maps an array task to its participant
(``docs/slurm/``).
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fcflow.errors import FcflowError

logger = logging.getLogger(__name__)


PLUGINS = ("Linear", "MultiProc", "SLURM", "SLURMGraph")


SLURM_PLUGINS = ("SLURM", "SLURMGraph")


# measured): a smaller per-node request would only invite the cluster's OOM killer.
MIN_JOB_MEM_GB = 0.5


# nipype's Node defaults; nodes that keep them get no per-node sbatch request.
_NIPYPE_DEFAULT_MEM_GB = 0.20


_NIPYPE_DEFAULT_N_PROCS = 1


# squeue states of a job that can still change.
_ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                  "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def slurm_job_template(python: str | os.PathLike[str] | None = None) -> str:
    """Return the header of every job script, for nipype's ``template`` plugin argument.

    nipype appends ``<python> <node script>`` to it. The header puts the driver's interpreter
    (``sys.executable``) first on ``PATH`` and, when fcflow is imported from a source folder
    rather than an installed package, that folder on ``PYTHONPATH``: jobs then import the same
    fcflow and dependencies as the driver even where the site submits with
    ``--export=NONE``.
    """
    python = Path(python or sys.executable)
    lines = [
        "#!/bin/bash",
        "# fcflow: run this nipype node with the Python (and fcflow) of the process that submitted it",
        f"export PATH={shlex.quote(str(python.parent))}:\"$PATH\"",
    ]
    if sys.prefix != sys.base_prefix and python == Path(sys.executable):
        lines.append(f"export VIRTUAL_ENV={shlex.quote(sys.prefix)}")
    import fcflow

    source_root = Path(fcflow.__file__).resolve().parent.parent
    if not any(source_root == Path(p).resolve() for p in _site_dirs()):
        lines.append(f"export PYTHONPATH={shlex.quote(str(source_root))}${{PYTHONPATH:+:$PYTHONPATH}}")
    return "\n".join(lines)


def _site_dirs() -> list[str]:
    import site

    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return dirs


def slurm_resource_args(mem_gb: float | None = None, n_procs: int | None = None) -> str:
    """Return the sbatch options that request ``mem_gb`` GB and ``n_procs`` CPUs for one job.

    Memory is rounded up to whole MB and is at least :data:`MIN_JOB_MEM_GB` (the job's Python
    alone needs about 0.2 GB). The string starts with a space because nipype's ``SLURMGraph``
    appends a node's ``sbatch_args`` to the plugin's without a separator.
    """
    parts = []
    if mem_gb is not None:
        if not (isinstance(mem_gb, (int, float)) and math.isfinite(mem_gb) and mem_gb > 0):
            raise FcflowError(f"'mem_gb' must be a positive number of GB. Got {mem_gb!r}.")
        parts.append(f"--mem={math.ceil(max(mem_gb, MIN_JOB_MEM_GB) * 1024)}M")
    if n_procs is not None:
        if not (isinstance(n_procs, int) and not isinstance(n_procs, bool) and n_procs > 0):
            raise FcflowError(f"'n_procs' must be a positive integer. Got {n_procs!r}.")
        parts.append(f"--cpus-per-task={n_procs}")
    return "".join(" " + part for part in parts)


def set_node_resources(node, *, mem_gb: float | None = None, n_procs: int | None = None) -> None:
    """Declare what one nipype ``node`` needs, for MultiProc and for SLURM alike.

    MultiProc reads ``node.mem_gb`` and ``node.n_procs``; the SLURM plugins read only
    ``node.plugin_args["sbatch_args"]``, so both are set. With ``overwrite=False`` nipype appends
    the node's request to ``--sbatch-args``; sbatch takes the last ``--mem``/``--cpus-per-task``
    it is given, so the node's own request wins.
    """
    request = slurm_resource_args(mem_gb, n_procs)
    if mem_gb is not None:
        node._mem_gb = mem_gb  # nipype's Node has no public setter for mem_gb
    if n_procs is not None:
        node.n_procs = n_procs
    if request:
        node.plugin_args = {**(node.plugin_args or {}), "sbatch_args": request, "overwrite": False}


def request_node_resources(workflow) -> list[str]:
    """Turn every node's ``mem_gb``/``n_procs`` into its SLURM request (:func:`set_node_resources`).

    Only nodes whose resources differ from nipype's defaults (0.2 GB, 1 CPU) and that have no
    ``sbatch_args`` of their own are changed; the others run with ``--sbatch-args`` alone.
    Returns the names of the nodes that got a request.
    """
    changed = []
    for name in workflow.list_node_names():
        node = workflow.get_node(name)
        if node is None or "sbatch_args" in (node.plugin_args or {}):
            continue
        mem_gb, n_procs = node.mem_gb, node.n_procs
        mem_request = mem_gb if mem_gb is not None and mem_gb != _NIPYPE_DEFAULT_MEM_GB else None
        cpu_request = n_procs if n_procs != _NIPYPE_DEFAULT_N_PROCS else None
        if mem_request is None and cpu_request is None:
            continue
        set_node_resources(node, mem_gb=mem_request, n_procs=cpu_request)
        changed.append(name)
    return changed


def ensure_slurm_environment(plugin: str) -> None:
    """Check and complete the environment nipype's SLURM plugins need, before they run.

    Sets ``LOGNAME`` when it is missing (nipype's SLURM plugin names jobs with
    ``os.environ["LOGNAME"]`` and fails with a bare ``KeyError`` in CI and cron jobs).

    Raises
    ------
    FcflowError
        If ``sbatch`` or ``squeue`` is not on ``PATH``.
    """
    if plugin not in SLURM_PLUGINS:
        return
    for tool in ("sbatch", "squeue"):
        if shutil.which(tool) is None:
            raise FcflowError(
                f"--plugin {plugin} needs SLURM's '{tool}' on PATH, and it is not there. Run fcflow "
                "on a login node of the cluster (module load slurm?), or use --plugin MultiProc."
            )
    if not os.environ.get("LOGNAME"):
        try:
            os.environ["LOGNAME"] = getpass.getuser()
        except (KeyError, OSError):
            os.environ["LOGNAME"] = f"uid{os.getuid()}"


@dataclass(frozen=True)
class SlurmJob:
    """One job as ``squeue`` last listed it."""

    job_id: int
    state: str
    reason: str
    script: str

    @property
    def active(self) -> bool:
        return self.state in _ACTIVE_STATES

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def squeue() -> list[SlurmJob]:
    """This user's jobs as SLURM lists them, finished ones included (for MinJobAge, 300 s by default)."""
    done = subprocess.run(
        ["squeue", "--me", "--noheader", "--states=all", "--format=%i|%T|%r|%o"],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise FcflowError(f"squeue failed while waiting for SLURM jobs: {done.stderr.strip()}")
    jobs = []
    for line in done.stdout.splitlines():
        fields = line.strip().split("|", 3)
        if len(fields) == 4 and fields[0].isdigit():
            jobs.append(SlurmJob(int(fields[0]), fields[1], fields[2], fields[3]))
    return jobs


def _submitted_scripts(submit_file: Path) -> list[str]:
    scripts = []
    for line in submit_file.read_text().splitlines():
        if "$(sbatch " in line:
            words = shlex.split(line.split("$(sbatch ", 1)[1].split("|", 1)[0])
            scripts.append(words[-1])
    return scripts


def wait_for_slurm_jobs(
    submit_file: str | os.PathLike[str],
    *,
    ignore_job_ids: Iterable[int] = (),
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> list[SlurmJob]:
    """Wait until the jobs that nipype's SLURMGraph submitted have all left the queue.

    nipype writes ``<base_dir>/<workflow>/batch/submit_jobs.sh`` (one ``sbatch`` line per job,
    each with its own ``batchscript_*.sh``) and runs it, keeping the job ids only in that
    script's shell variables. The jobs are found again in ``squeue`` by their batch script.
    A job whose dependency failed stays PENDING forever (reason ``DependencyNeverSatisfied``)
    unless the site sets ``kill_invalid_depend``: such jobs are cancelled here.

    Parameters
    ----------
    ignore_job_ids : iterable of int
        Jobs listed before the submission (earlier runs with the same scripts).
    timeout_s : float, optional
        Raise after this long, leaving the jobs queued (default: no limit).

    Returns
    -------
    jobs : list of SlurmJob
        The jobs as last seen, in submission order; finished jobs that SLURM has already
        forgotten are missing (check the results with :func:`check_nodes_finished`).
    """
    submit_file = Path(submit_file)
    if not submit_file.is_file():
        raise FcflowError(f"nipype's SLURMGraph left no job list at {submit_file}; nothing was submitted.")
    scripts = set(_submitted_scripts(submit_file))
    ignore = set(ignore_job_ids)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: dict[int, SlurmJob] = {}
    cancelled: set[int] = set()
    while scripts:
        current = {job.job_id: job for job in squeue() if job.script in scripts and job.job_id not in ignore}
        seen.update(current)
        stuck = [job.job_id for job in current.values()
                 if job.state == "PENDING" and job.reason == "DependencyNeverSatisfied"
                 and job.job_id not in cancelled]
        if stuck:
            logger.warning("Cancelling %d SLURM jobs whose dependencies failed: %s",
                           len(stuck), " ".join(map(str, stuck)))
            subprocess.run(["scancel", *map(str, stuck)], capture_output=True, check=False)
            cancelled.update(stuck)
        if not any(job.active for job in current.values()):
            break
        if deadline is not None and time.monotonic() > deadline:
            active = sorted(job.job_id for job in current.values() if job.active)
            raise FcflowError(
                f"SLURM jobs {' '.join(map(str, active))} of {submit_file.parent} were still queued "
                f"or running after {timeout_s:g} s; they keep running: rerun the same command "
                "once they are done to collect the results."
            )
        time.sleep(poll_s)
    return sorted(seen.values(), key=lambda job: job.job_id)


def _node_error(node) -> str | None:
    """Why ``node`` has no usable result, or None if it has one (nipype saves failed results too)."""
    from nipype.pipeline.engine.utils import load_resultfile

    result_file = Path(node.output_dir()) / f"result_{node.name}.pklz"
    if not result_file.is_file():
        return "no result"
    try:
        result = load_resultfile(result_file)
    except Exception as exc:  # a truncated or foreign pickle is as good as none
        return f"unreadable result ({exc})"
    runtimes = result.runtime if isinstance(result.runtime, list) else [result.runtime]
    for runtime in runtimes:
        traceback = getattr(runtime, "traceback", None)
        if traceback:
            lines = traceback if isinstance(traceback, list) else [traceback]
            lines = [line.strip() for item in lines for line in str(item).splitlines() if line.strip()]
            return lines[-1] if lines else "failed"
    return None


def check_nodes_finished(
    execgraph,
    *,
    jobs: Sequence[SlurmJob] = (),
    crash_dir: str | os.PathLike[str] | None = None,
    since: float | None = None,
) -> None:
    """Raise unless every node of nipype's execution graph left a result without an error.

    Raises
    ------
    FcflowError
        Naming the nodes without results, the failed SLURM jobs and their logs, and the crash
        files nipype wrote (in ``crash_dir``, newer than ``since``).
    """
    errors = {}
    for node in execgraph.nodes():
        error = _node_error(node)
        if error is not None:
            errors[os.path.relpath(node.output_dir(), node.base_dir or "/")] = error
    failed = [job for job in jobs if not job.ok]
    if not errors and not failed:
        return
    lines = []
    if errors:
        lines.append(f"{len(errors)} of {execgraph.number_of_nodes()} nodes did not finish: " + "; ".join(
            f"{name} ({error})" for name, error in sorted(errors.items())
        ) + ".")
    if failed:
        lines.append("SLURM jobs that did not complete: " + ", ".join(
            f"{job.job_id} {job.state} ({job.reason}) log {job.script}.e" for job in failed
        ) + ".")
    if crash_dir is not None and Path(crash_dir).is_dir():
        crashes = sorted(str(path) for path in Path(crash_dir).glob("crash-*")
                         if since is None or path.stat().st_mtime >= since)
        if crashes:
            lines.append("Crash files: " + ", ".join(crashes) + ".")
    lines.append("Fix the cause and rerun the same command: finished nodes are not run again.")
    raise FcflowError(" ".join(lines))


def _read_participants(source: str | os.PathLike[str] | Sequence[str]) -> tuple[list[str], str]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FcflowError(
                f"The participants list {str(path)!r} does not exist: give a text file with one "
                "label per line or a BIDS participants.tsv."
            )
        if path.suffix == ".tsv":
            from fcflow.bids import read_participants_table

            labels = list(read_participants_table(path)[1])
        else:
            text = path.read_text(encoding="utf-8").splitlines()
            labels = [line.split("#", 1)[0].strip() for line in text]
            labels = [label for label in labels if label]
        where = str(path)
    else:
        labels = [str(label).strip() for label in source]
        where = "the participants list"
    labels = [label[4:] if label.startswith("sub-") else label for label in labels]
    bad = [label for label in labels if not label.isalnum() or not label.isascii()]
    if bad:
        raise FcflowError(
            f"Participant labels in {where} must be letters and digits (BIDS), with or without "
            f"'sub-'. Got {bad[:5]!r}."
        )
    if not labels:
        raise FcflowError(f"{where} names no participants.")
    return labels, where


def participant_from_array(
    participants: str | os.PathLike[str] | Sequence[str],
    task_id: int | str | None = None,
) -> str:
    """Return the participant label that this SLURM array task processes.

    Task ids are **0-based**: submit ``sbatch --array=0-<N-1>`` for N participants; task ``i``
    processes the ``i``-th label in file order.

    Parameters
    ----------
    participants : path or sequence of str
        A text file with one label per line (``#`` comments and blank lines ignored), a BIDS
        ``participants.tsv`` (its ``participant_id`` column), or the labels themselves; with or
        without ``sub-``.
    task_id : int or str, optional
        Default: the ``SLURM_ARRAY_TASK_ID`` environment variable.

    Returns
    -------
    label : str
        The label without ``sub-``, as ``--participant-label`` takes it.

    Raises
    ------
    FcflowError
        If there is no task id, it is not an integer, or it is out of range.
    """
    labels, where = _read_participants(participants)
    if task_id is None:
        task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
        if task_id is None:
            raise FcflowError(
                "SLURM_ARRAY_TASK_ID is not set: run this inside an array job "
                f"(sbatch --array=0-{len(labels) - 1}) or pass the task id."
            )
    text = str(task_id).strip()
    if not text.lstrip("-").isdigit():
        raise FcflowError(f"'SLURM_ARRAY_TASK_ID' must be an integer. Got {task_id!r}.")
    index = int(text)
    if not 0 <= index < len(labels):
        raise FcflowError(
            f"'SLURM_ARRAY_TASK_ID' must be between 0 and {len(labels) - 1}: task ids are 0-based "
            f"and {where} lists {len(labels)} participants. Got {index}; submit with "
            f"--array=0-{len(labels) - 1}."
        )
    return labels[index]
