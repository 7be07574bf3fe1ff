"""Run a nipype workflow and turn node failures into one readable fcflow error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from nipype import config as nipype_config
from nipype.pipeline import engine as pe

from fcflow.errors import FcflowError
from fcflow.workflows.execution import run_with_plugin

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
    try:
        return run_with_plugin(workflow, plugin, plugin_args)
    except RuntimeError as exc:
        crashes = sorted(set(crash_dir.glob("crash-*.txt")) - before)
        messages = [_crash_message(path) for path in crashes]
        if not messages:
            raise
        lines = "\n".join(f"  - {m}" for m in messages[:10])
        more = f"\n  ... and {len(messages) - 10} more" if len(messages) > 10 else ""
        raise FcflowError(
            f"{len(messages)} step(s) failed; fix the input and rerun the same command to resume "
            f"(crash reports in {crash_dir}):\n{lines}{more}"
        ) from exc


def _crash_message(path: Path) -> str:
    """The last line of the traceback in a nipype text crash file (the exception's own message)."""
    text = path.read_text(errors="replace").strip().splitlines()
    node = next((line.split(":", 1)[1].strip() for line in text if line.startswith("Node:")), path.name)
    errors = [line for line in text if ("Error: " in line or "Exception: " in line) and not line.startswith(" ")]
    return f"{node}: {errors[-1] if errors else text[-1]}"
