"""End a run's worker processes when the process that started them dies, however it dies.

nipype's MultiProc workers are children of the fcflow process. When that process ends normally
it shuts its pool down; when it is killed (``SIGKILL``, the OOM killer, a node's hard time limit)
the workers are re-parented to init and keep computing for a run nobody waits for (measured
before this module: still alive 10 minutes after a ``kill -9``). Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) would end them, but it must be set inside each worker, which
nipype's pool does not let a caller do through a public interface.

:func:`guard_children` instead forks one small watcher before the pool starts. The watcher
records the main process's children (``/proc/<pid>/task/*/children``, with each child's start
time so that a re-used process id is never mistaken for a worker) twice a second, and when the
main process has gone it sends ``SIGTERM`` to the recorded children still alive, then ``SIGKILL``
after a grace period. It uses only ``/proc`` and signals, so it is a no-op where ``/proc`` is
missing (macOS) and under plugins that run nodes elsewhere (SLURM jobs are the scheduler's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["guard_children"]

#: Seconds between SIGTERM and SIGKILL of the orphans.
GRACE_S = 5.0
#: Seconds between two looks at the main process's children.
POLL_S = 0.5


def _start_time(pid: int) -> str | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks), None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return text.rsplit(")", 1)[1].split()[19]


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as handle:
                out |= {int(c) for c in handle.read().split()}
    return out


def _watch(main: int) -> None:
    """The watcher's loop (runs in the forked child; never returns)."""
    me = os.getpid()
    seen: dict[int, str] = {}
    try:
        while os.getppid() == main:
            for child in _children(main) - {me}:
                start = _start_time(child)
                if start is not None:
                    seen.setdefault(child, start)
            time.sleep(POLL_S)
        alive = [pid for pid, start in seen.items() if _start_time(pid) == start]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in alive:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and any(_start_time(p) == seen[p] for p in alive):
                time.sleep(0.1)
            alive = [pid for pid in alive if _start_time(pid) == seen[pid]]
            if not alive:
                break
    finally:
        os._exit(0)


@contextlib.contextmanager
def guard_children() -> Iterator[int | None]:
    """While the block runs, a watcher ends this process's children if this process dies.

    Yields the watcher's process id (None where ``/proc`` is missing). On leaving the block
    normally the watcher is stopped (the pool has shut its workers down itself).
    """
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        yield None
        return
    main = os.getpid()
    watcher = os.fork()
    if watcher == 0:  # the watcher: plain syscalls only (the parent may hold locks of other threads)
        _watch(main)
    try:
        yield watcher
    finally:
        with contextlib.suppress(OSError):
            os.kill(watcher, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(watcher, 0)
