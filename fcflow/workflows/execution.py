"""Run fcflow's nipype workflows on a laptop or on a SLURM cluster.

fcflow does not schedule anything itself: it hands its workflows to nipype's plugins and only
builds their arguments, checks the environment they need, and waits where nipype does not.

======================  ====================================================================
``--plugin``            what happens
======================  ====================================================================
``Linear``              one node after the other in this process (debugging)
``MultiProc`` (default) a process pool on this machine, within ``--nprocs`` and ``--mem-gb``;
                        inside a SLURM allocation both default to what SLURM granted
``SLURM``               this process stays alive as the driver and submits one ``sbatch`` job
                        per node as soon as its inputs are ready (nipype ``SLURMPlugin``)
``SLURMGraph``          the whole graph is submitted at once, chained with
                        ``--dependency=afterok``; nipype returns at once, so
                        :func:`run_with_plugin` waits for the jobs (:func:`wait_for_slurm_jobs`)
                        and checks that every node finished (:func:`check_nodes_finished`)
======================  ====================================================================

Both SLURM plugins resume: a rerun with the same ``--work-dir`` submits only the nodes whose
results are missing or out of date (nipype's hash check; for ``SLURMGraph`` through
``dont_resubmit_completed_jobs``). Jobs that a killed driver left queued are not cancelled:
``scancel`` them before rerunning, or they run twice.

Per-node resources. nipype's SLURM plugins do not turn ``Node(mem_gb=..., n_procs=...)`` into an
``sbatch`` request: every job gets ``--sbatch-args`` only. :func:`set_node_resources` (one node)
and :func:`request_node_resources` (every node of a workflow whose resources differ from
nipype's defaults; :func:`run_with_plugin` calls it for the SLURM plugins) write
``--mem=<MB>M --cpus-per-task=<n>`` (at least :data:`MIN_JOB_MEM_GB`) into the node's
``plugin_args``, after ``--sbatch-args``, so a node's own request wins over the workflow-wide one
for that node, downwards too. ``Node(mem_gb=...)`` is therefore the memory of the whole job.

The array route (one participant per array task, then a dependent group job) needs no driver at
all: see :func:`participant_from_array` and ``docs/slurm/``.
"""

from __future__ import annotations

import argparse
import getpass
import json
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
from typing import Any

from fcflow.errors import FcflowError

__all__ = [
    "MIN_JOB_MEM_GB",
    "PLUGINS",
    "check_memory_budget",
    "SLURM_PLUGINS",
    "SlurmJob",
    "add_execution_arguments",
    "check_nodes_finished",
    "ensure_slurm_environment",
    "parse_plugin_args",
    "participant_from_array",
    "plugin_settings",
    "request_node_resources",
    "run_with_plugin",
    "set_node_resources",
    "slurm_job_template",
    "slurm_resource_args",
    "wait_for_slurm_jobs",
]

logger = logging.getLogger(__name__)

PLUGINS = ("Linear", "MultiProc", "SLURM", "SLURMGraph")
SLURM_PLUGINS = ("SLURM", "SLURMGraph")

# nipype's plugin submits at most this many jobs at a time (override: --plugin-args).
DEFAULT_MAX_JOBS = 64
# nipype polls every 2 s by default, most of the wall time of small local nodes. The SLURM
# plugin runs one `squeue -j` per queued job at every poll: keep nipype's 2 s for the
# scheduler's sake. MultiProc: a finished node's successors start at the next poll; 0.1 s
# instead of 0.5 s took 18 runs at 2 mm on 2 processes from 77.3 s to 68.6-69.5 s (two repeats;
# benchmarks/bench_study.py), and the scheduler's loop costs little CPU at that rate.
_POLL_SLEEP_S = {"Linear": 2.0, "MultiProc": 0.1, "SLURM": 2.0, "SLURMGraph": 2.0}
# Every SLURM job is a fresh Python importing nipype, nibabel and nilearn (0.19 GB resident,
# measured): a smaller per-node request would only invite the cluster's OOM killer.
MIN_JOB_MEM_GB = 0.5
# nipype's Node defaults; nodes that keep them get no per-node sbatch request.
_NIPYPE_DEFAULT_MEM_GB = 0.20
_NIPYPE_DEFAULT_N_PROCS = 1
# squeue states of a job that can still change.
_ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                  "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}
_PLUGIN_ARGS_EXAMPLE = '\'{"max_jobs": 20}\''
_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def positive_type(kind: type, flag: str, noun: str | None = None):
    """An argparse type: a positive ``int`` or finite ``float``, with fcflow's error message.

    ``noun`` names the expected value in the message (default: the type's name).
    """
    noun = noun or kind.__name__

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"'{flag}' must be a positive {noun}. Got {text!r}.")
        return value

    return parse


def _plugin_args_type(text: str) -> dict[str, Any]:
    try:
        return parse_plugin_args(text)
    except FcflowError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sbatch_args_type(text: str) -> str:
    try:
        shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"'--sbatch-args' must be sbatch options as one shell-quoted string, such as "
            f"'--time=02:00:00 --account=lab'. Got {text!r} ({exc})."
        ) from None
    return text


def add_execution_arguments(parser: argparse.ArgumentParser) -> None:
    """Add fcflow's execution options to ``parser``.

    ``--plugin``, ``--nprocs``, ``--mem-gb``, ``--sbatch-args``, ``--plugin-args`` and
    ``--work-dir``. An option the parser already has (``fcflow.cli.analysis`` defines
    ``--work-dir`` and ``--nprocs``) is left as it is; :func:`plugin_settings` reads the same
    ``args`` attributes either way.
    """
    group = parser.add_argument_group("execution (nipype plugins, SLURM)")

    def add(flag: str, **kwargs) -> None:
        try:
            group.add_argument(flag, **kwargs)
        except argparse.ArgumentError:  # "conflicting option string": the parser has it already
            pass

    add("--plugin", choices=PLUGINS, default="MultiProc",
        help="nipype plugin: Linear (one node at a time), MultiProc (this machine), SLURM (one "
             "sbatch job per node, this process waits), SLURMGraph (whole graph submitted with "
             "dependencies; fcflow waits for it) (default: %(default)s)")
    add("--nprocs", type=positive_type(int, "--nprocs"), default=None, metavar="N",
        help="MultiProc: processes at once (default: SLURM_CPUS_PER_TASK inside a SLURM job, "
             "else the CPUs this process may use)")
    add("--mem-gb", type=positive_type(float, "--mem-gb"), default=None, metavar="GB",
        help="MultiProc: memory budget in GB shared by the running nodes (default: the job's "
             "memory inside a SLURM job, else 90%% of this machine's)")
    add("--sbatch-args", type=_sbatch_args_type, default=None, metavar="ARGS",
        help="SLURM/SLURMGraph: options for every sbatch call as one string; write it with '=' "
             "because it starts with a dash: --sbatch-args='--time=02:00:00 --account=lab "
             "--mem=4G'. Nodes with their own memory or CPU needs add --mem/--cpus-per-task "
             "after these")
    add("--plugin-args", type=_plugin_args_type, default=None, metavar="JSON",
        help="extra nipype plugin arguments as a JSON object, merged last, such as "
             f"{_PLUGIN_ARGS_EXAMPLE}")
    add("--work-dir", type=Path, default=None,
        help="nipype working directory; rerun with the same one to resume")


def parse_plugin_args(text: str) -> dict[str, Any]:
    """Parse ``--plugin-args``: a JSON object (nipype plugin arguments).

    Raises
    ------
    FcflowError
        If ``text`` is not JSON or not a JSON object.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FcflowError(
            f"'--plugin-args' must be a JSON object such as {_PLUGIN_ARGS_EXAMPLE}. "
            f"Got {text!r}, which is not valid JSON ({exc.msg} at character {exc.pos}); "
            "quote the whole object for the shell."
        ) from None
    if not isinstance(value, dict):
        raise FcflowError(
            f"'--plugin-args' must be a JSON object such as {_PLUGIN_ARGS_EXAMPLE}. "
            f"Got {text!r}, a JSON {_JSON_KINDS.get(type(value), type(value).__name__)}."
        )
    return value


# ---------------------------------------------------------------------------------------------
# Plugin arguments
# ---------------------------------------------------------------------------------------------
def _allocation_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK")
    return int(value) if value and value.isdigit() and int(value) > 0 else None


def _allocation_mem_gb() -> float | None:
    per_node = os.environ.get("SLURM_MEM_PER_NODE")
    if per_node and per_node.isdigit() and int(per_node) > 0:
        return int(per_node) / 1024
    per_cpu = os.environ.get("SLURM_MEM_PER_CPU")
    cpus = _allocation_cpus()
    if per_cpu and per_cpu.isdigit() and int(per_cpu) > 0 and cpus:
        return int(per_cpu) * cpus / 1024
    return None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


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


def plugin_settings(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Return ``(plugin_name, plugin_args)`` for ``workflow.run`` from the parsed options.

    ========== ==============================================================================
    plugin     plugin_args
    ========== ==============================================================================
    Linear     ``{}``
    MultiProc  ``n_procs``, ``memory_gb`` (if known), ``raise_insufficient=False``: a node that
               asks for more CPUs than ``n_procs`` runs alone instead of nipype stopping the whole
               run before it starts with a bare "Insufficient resources" error; a node that asks
               for more memory than the budget stops the run before it starts, with a message
               that names it (:func:`check_memory_budget`, called by :func:`run_with_plugin`)
    SLURM      ``sbatch_args``, ``max_jobs`` (64), ``template`` (:func:`slurm_job_template`)
    SLURMGraph ``sbatch_args``, ``template``, ``dont_resubmit_completed_jobs=True`` (resume)
    ========== ==============================================================================

    ``--plugin-args`` is merged last and wins. nipype's polling interval is workflow
    configuration, not a plugin argument: :func:`run_with_plugin` sets it.

    Raises
    ------
    FcflowError
        If an option is given that the chosen plugin would silently ignore, or
        ``--plugin-args`` (as text) is not a JSON object.
    """
    plugin = getattr(args, "plugin", None) or "MultiProc"
    if plugin not in PLUGINS:
        raise FcflowError(f"'--plugin' must be one of {', '.join(PLUGINS)}. Got {plugin!r}.")
    nprocs = getattr(args, "nprocs", None)
    mem_gb = getattr(args, "mem_gb", None)
    sbatch_args = getattr(args, "sbatch_args", None)
    extra = getattr(args, "plugin_args", None) or {}
    if isinstance(extra, str):
        extra = parse_plugin_args(extra)

    if plugin != "MultiProc":
        for flag, value in (("--nprocs", nprocs), ("--mem-gb", mem_gb)):
            if value is not None:
                hint = (" Ask SLURM for memory and CPUs per job with --sbatch-args "
                        "(\"--mem=8G --cpus-per-task=4\")." if plugin in SLURM_PLUGINS else "")
                raise FcflowError(
                    f"'{flag}' is only used by --plugin MultiProc. Got {flag} {value} with "
                    f"--plugin {plugin}.{hint}"
                )
    if plugin not in SLURM_PLUGINS and sbatch_args:
        raise FcflowError(
            f"'--sbatch-args' is only used by --plugin SLURM or SLURMGraph. Got --sbatch-args "
            f"{sbatch_args!r} with --plugin {plugin}."
        )

    settings: dict[str, Any]
    if plugin == "Linear":
        settings = {}
    elif plugin == "MultiProc":
        available = _allocation_cpus() or _usable_cpus()
        if nprocs is not None and nprocs > available:
            # more worker processes than CPUs only adds forks and memory (issue 17: --nprocs 1000
            # forked about 1000 workers for one run)
            logging.getLogger("fcflow").warning(
                "--nprocs %d is more than the %d CPU(s) this process may use: running %d worker(s).",
                nprocs, available, available)
            nprocs = available
        settings = {
            "n_procs": nprocs or available,
            "raise_insufficient": False,
        }
        memory_gb = mem_gb or _allocation_mem_gb()
        if memory_gb:
            settings["memory_gb"] = memory_gb
    elif plugin == "SLURM":
        settings = {
            "sbatch_args": sbatch_args or "",
            "max_jobs": DEFAULT_MAX_JOBS,
            "template": slurm_job_template(),
        }
    else:
        settings = {
            "sbatch_args": sbatch_args or "",
            "template": slurm_job_template(),
            "dont_resubmit_completed_jobs": True,
        }
    settings.update(extra)
    return plugin, settings


# ---------------------------------------------------------------------------------------------
# Per-node SLURM requests
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
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


def run_with_plugin(
    workflow,
    plugin: str = "MultiProc",
    plugin_args: dict[str, Any] | None = None,
    *,
    poll_sleep_s: float | None = None,
    timeout_s: float | None = None,
):
    """Run ``workflow`` with one of :data:`PLUGINS` and return nipype's execution graph.

    For the SLURM plugins, first :func:`ensure_slurm_environment` and
    :func:`request_node_resources`. For ``SLURMGraph``, which returns as soon as the jobs are
    submitted, wait for them (:func:`wait_for_slurm_jobs`) and check every node finished
    (:func:`check_nodes_finished`), so that all plugins either return a finished graph or raise.

    Parameters
    ----------
    workflow : nipype Workflow
        With ``base_dir`` set to a folder the compute nodes see (SLURM plugins).
    plugin_args : dict, optional
        As built by :func:`plugin_settings`.
    poll_sleep_s : float, optional
        nipype's ``poll_sleep_duration`` and the SLURMGraph wait's polling interval
        (default: 0.5 s for MultiProc; 2 s, nipype's default, for the SLURM plugins, because
        nipype's SLURM plugin calls ``squeue`` once per queued job at every poll).
    timeout_s : float, optional
        SLURMGraph only: give up waiting after this long (default: wait as long as it takes).

    Raises
    ------
    FcflowError
        If a SLURMGraph job failed or a node did not finish. MultiProc and SLURM raise nipype's
        own ``RuntimeError`` naming the crash files.
    """
    if plugin not in PLUGINS:
        raise FcflowError(f"'plugin' must be one of {', '.join(PLUGINS)}. Got {plugin!r}.")
    plugin_args = dict(plugin_args or {})
    poll = _POLL_SLEEP_S[plugin] if poll_sleep_s is None else poll_sleep_s
    workflow.config["execution"]["poll_sleep_duration"] = poll
    if plugin in SLURM_PLUGINS:
        if not workflow.base_dir:
            raise FcflowError(
                f"Workflow {workflow.name!r} needs a base_dir (--work-dir) on a file system the "
                f"compute nodes see to run with --plugin {plugin}."
            )
        ensure_slurm_environment(plugin)
        requested = request_node_resources(workflow)
        if requested:
            logger.info("Per-node SLURM requests for %d nodes: %s", len(requested), ", ".join(requested))
    if plugin == "MultiProc":
        check_memory_budget(workflow, plugin_args.get("memory_gb"))
    if plugin == "SLURMGraph":
        # nipype reads dont_resubmit_completed_jobs only from a non-empty plugin_args.
        plugin_args.setdefault("dont_resubmit_completed_jobs", True)
        known_ids = {job.job_id for job in _squeue()}
        started = time.time()
    execgraph = workflow.run(plugin=plugin, plugin_args=plugin_args)
    if plugin == "SLURMGraph":
        submit_file = Path(workflow.base_dir) / workflow.name / "batch" / "submit_jobs.sh"
        jobs = wait_for_slurm_jobs(
            submit_file, ignore_job_ids=known_ids, poll_s=poll, timeout_s=timeout_s
        )
        crash_dir = workflow.config["execution"].get("crashdump_dir") or os.getcwd()
        check_nodes_finished(execgraph, jobs=jobs, crash_dir=crash_dir, since=started)
    return execgraph


def check_memory_budget(workflow, memory_gb: float | None) -> None:
    """Refuse, before any node starts, a workflow with a node whose memory estimate exceeds the budget.

    MultiProc runs nodes side by side while the sum of their ``mem_gb`` fits ``memory_gb``, so a
    run is never started next to others it would not fit beside. A node that alone needs more
    than the whole budget cannot be scheduled within it: nipype would either stop with a bare
    "Insufficient resources" error or (``raise_insufficient=False``) start it anyway, beyond the
    budget, where the operating system or SLURM may kill it.

    Parameters
    ----------
    workflow : nipype Workflow
    memory_gb : float or None
        MultiProc's budget (``--mem-gb``); None means nipype's default, 90% of this machine's memory.

    Raises
    ------
    FcflowError
        Naming the largest such node (its run), its estimate, the budget and what to do.
    """
    if memory_gb is None:
        from nipype.utils.profiler import get_system_total_memory_gb

        memory_gb, source = 0.9 * get_system_total_memory_gb(), "90% of this machine's memory; no --mem-gb"
    else:
        source = "--mem-gb, or the SLURM job's memory"
    nodes = [node for node in workflow._create_flat_graph().nodes() if node.mem_gb > memory_gb]
    if not nodes:
        return
    node = max(nodes, key=lambda n: n.mem_gb)
    run = getattr(node.inputs, "run_name", None) or ".".join(node.fullname.split(".")[-2:-1]) or node.fullname
    raise FcflowError(
        f"{run}: its step '{node.name}' needs an estimated {node.mem_gb:.2f} GB, more than the memory budget "
        f"of {memory_gb:.2f} GB ({source}); {len(nodes)} step(s) exceed it, so nothing was started. Raise "
        f"--mem-gb to at least {math.ceil(node.mem_gb * 10) / 10:g} if this machine has the memory, or run on "
        "a SLURM cluster (--plugin SLURM, or the array route, with enough --mem per job). README, 'Memory', "
        "explains the estimate."
    )


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


def _squeue() -> list[SlurmJob]:
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
        current = {job.job_id: job for job in _squeue() if job.script in scripts and job.job_id not in ignore}
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


# ---------------------------------------------------------------------------------------------
# Array jobs: one participant per task
# ---------------------------------------------------------------------------------------------
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
