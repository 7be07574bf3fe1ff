"""fcflow's execution options (``--plugin``, ``--nprocs``, ``--mem-gb``, ``--sbatch-args``, ``--plugin-args``,
``--work-dir``) and the nipype plugin arguments they make (:func:`plugin_settings`).

Inside a SLURM allocation ``--nprocs`` and ``--mem-gb`` default to what SLURM granted; see
:mod:`fcflow.workflows.execution` for what each plugin does.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
from pathlib import Path
from typing import Any

from fcflow.errors import FcflowError
from fcflow.workflows.slurm import PLUGINS, SLURM_PLUGINS, slurm_job_template

# nipype's plugin submits at most this many jobs at a time (override: --plugin-args).
DEFAULT_MAX_JOBS = 64


_PLUGIN_ARGS_EXAMPLE = '\'{"max_jobs": 20}\''


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


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
