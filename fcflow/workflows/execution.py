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
                        :func:`run_with_plugin` waits for the jobs (:func:`fcflow.workflows.slurm.wait_for_slurm_jobs`)
                        and checks that every node finished (:func:`fcflow.workflows.slurm.check_nodes_finished`)
======================  ====================================================================

Both SLURM plugins resume: a rerun with the same ``--work-dir`` submits only the nodes whose
results are missing or out of date (nipype's hash check; for ``SLURMGraph`` through
``dont_resubmit_completed_jobs``). Jobs that a killed driver left queued are not cancelled:
``scancel`` them before rerunning, or they run twice.

Per-node resources. nipype's SLURM plugins do not turn ``Node(mem_gb=..., n_procs=...)`` into an
``sbatch`` request: every job gets ``--sbatch-args`` only. :func:`fcflow.workflows.slurm.set_node_resources` (one node)
and :func:`fcflow.workflows.slurm.request_node_resources` (every node of a workflow whose resources differ from
nipype's defaults; :func:`run_with_plugin` calls it for the SLURM plugins) write
``--mem=<MB>M --cpus-per-task=<n>`` (at least :data:`fcflow.workflows.slurm.MIN_JOB_MEM_GB`) into the node's
``plugin_args``, after ``--sbatch-args``, so a node's own request wins over the workflow-wide one
for that node, downwards too. ``Node(mem_gb=...)`` is therefore the memory of the whole job.

The array route (one participant per array task, then a dependent group job) needs no driver at
all: see :func:`fcflow.workflows.slurm.participant_from_array` and ``docs/slurm/``.

The options are built in :mod:`fcflow.workflows.options`, the SLURM specifics live in
:mod:`fcflow.workflows.slurm`; this module runs a workflow with its plugin.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from fcflow.errors import FcflowError
from fcflow.workflows.slurm import (
    PLUGINS,
    SLURM_PLUGINS,
    check_nodes_finished,
    ensure_slurm_environment,
    request_node_resources,
    squeue,
    wait_for_slurm_jobs,
)

logger = logging.getLogger(__name__)


# nipype polls every 2 s by default, most of the wall time of small local nodes. The SLURM
# plugin runs one `squeue -j` per queued job at every poll: keep nipype's 2 s for the
# scheduler's sake. MultiProc: a finished node's successors start at the next poll; 0.1 s
# instead of 0.5 s took 18 runs at 2 mm on 2 processes from 77.3 s to 68.6-69.5 s (two repeats;
# benchmarks/bench_study.py), and the scheduler's loop costs little CPU at that rate.
_POLL_SLEEP_S = {"Linear": 2.0, "MultiProc": 0.1, "SLURM": 2.0, "SLURMGraph": 2.0}


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
        known_ids = {job.job_id for job in squeue()}
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
