"""Run a nipype workflow and turn node failures into one readable fcflow error."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from nipype import config as nipype_config
from nipype.interfaces.utility import Merge
from nipype.pipeline import engine as pe

from fcflow.errors import FcflowError
from fcflow.workflows.execution import run_with_plugin
from fcflow.workflows.orphans import guard_children

LOGGER = logging.getLogger("fcflow.workflow")


def run_workflow(workflow: pe.Workflow, *, plugin: str, plugin_args: dict[str, Any], work_dir: Path) -> Any:
    """Run ``workflow``; on failure raise :class:`FcflowError` with each failed node's own message.

    Crash files go to ``WORK_DIR/crash``; finished nodes stay cached in ``WORK_DIR``, so running the
    same command again resumes where it stopped.
    """
    crash_dir = Path(work_dir) / "crash"
    crash_dir.mkdir(parents=True, exist_ok=True)
    workflow.base_dir = str(work_dir)
    workflow.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "remove_unnecessary_outputs": False,
        "stop_on_first_crash": False,
    })
    nipype_config.set("execution", "check_version", "false")
    before = set(crash_dir.glob("crash-*.txt"))
    if plugin != "SLURMGraph":  # graph plugins submit everything at once and take no callback
        plugin_args = {**plugin_args, "status_callback": ProgressReporter(workflow)}
    if not LOGGER.isEnabledFor(logging.DEBUG):
        logging.getLogger("nipype.workflow").setLevel(logging.WARNING)
    try:
        # MultiProc's workers are this process's children: end them if it is killed
        with guard_children() if plugin == "MultiProc" else contextlib.nullcontext():
            return run_with_plugin(workflow, plugin, plugin_args)
    except RuntimeError as exc:
        crashes = sorted(set(crash_dir.glob("crash-*.txt")) - before)
        messages = [_crash_message(path) for path in crashes]
        if not messages:
            raise
        if len(messages) == 1:
            # One failed step (most often one bad input): one line, as every other user error.
            raise FcflowError(
                f"{messages[0]} Fix it and rerun the same command to resume (crash report {crashes[0]})."
            ) from exc
        lines = "\n".join(f"  - {m}" for m in messages[:10])
        more = f"\n  ... and {len(messages) - 10} more" if len(messages) > 10 else ""
        raise FcflowError(
            f"{len(messages)} step(s) failed; fix the input and rerun the same command to resume "
            f"(crash reports in {crash_dir}):\n{lines}{more}"
        ) from exc


#: list plumbing nodes, not steps of the analysis: left out of the progress count
_PLUMBING = (Merge,)


class ProgressReporter:
    """A nipype ``status_callback`` that logs which node ran and how many are left.

    Cached nodes (a resumed run) count as done without being announced one by one.
    """

    def __init__(self, workflow: pe.Workflow) -> None:
        from nipype.interfaces.utility import IdentityInterface

        # nipype drops identity nodes before it runs the graph; they are never reported.
        nodes = workflow._create_flat_graph().nodes()
        self.total = sum(not isinstance(node.interface, (IdentityInterface, *_PLUMBING)) for node in nodes)
        self.done = 0
        self.failed = 0

    def __call__(self, node: pe.Node, status: str) -> None:
        if isinstance(node.interface, _PLUMBING) and status != "exception":
            return  # list plumbing (Merge) is not a step of the analysis
        if status == "start":
            LOGGER.debug("started %s", node.fullname)
            return
        self.done += 1
        if status == "exception":
            self.failed += 1
        # Name the run and step (e.g. sub_01_ses_infusion_task_rest_wf.run_maps) rather than the full path.
        short = ".".join(node.fullname.split(".")[-2:])
        state = "FAILED" if status == "exception" else "done"
        LOGGER.info("[%d/%d] %s %s%s", self.done, self.total, short, state,
                    f" ({self.failed} failed so far)" if self.failed else "")


def _crash_message(path: Path) -> str:
    """The last line of the traceback in a nipype text crash file (the exception's own message)."""
    text = path.read_text(errors="replace").strip().splitlines()
    node = next((line.split(":", 1)[1].strip() for line in text if line.startswith("Node:")), path.name)
    errors = [line.strip() for line in text if ("Error: " in line or "Exception: " in line)
              and not line.startswith(" ")]
    error = errors[-1] if errors else text[-1].strip()
    # fcflow's own errors already name the file and the fix: drop the exception's module path.
    for prefix in ("fcflow.errors.InputDataError: ", "fcflow.errors.RecipeError: ", "fcflow.errors.AtlasError: ",
                   "fcflow.errors.FcflowError: "):
        error = error.removeprefix(prefix)
    return f"{node}: {error}"
