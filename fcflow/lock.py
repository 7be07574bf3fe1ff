"""Output-directory locks: two fcflow processes never write the same outputs at once.

Each analysis level takes, before it writes anything, one lock file per unit of output it
writes, created atomically (``O_CREAT | O_EXCL``) in OUTPUT_DIR:

=====================================  ==============================================================
lock file                              taken by
=====================================  ==============================================================
``.fcflow-participant-sub-<label>.lock``  the participant level, one per participant it processes
``.fcflow-group.lock``                 the group level
=====================================  ==============================================================

Per-participant locks let the SLURM array route (``docs/slurm/fcflow_array.sbatch``: one
``fcflow participant --participant-label <label>`` per array task, all on one OUTPUT_DIR) run its
tasks side by side, while two processes that would write the same participant's files refuse to.
The group level reads every participant's maps, so it refuses while a participant lock is held by a
live process, and the participant level refuses while the group lock is held. Each process takes
its own locks first and then looks at the others', so two processes that start together cannot
both pass.

A lock file holds JSON: the holder's pid, host name, start time (UTC), command line and, on Linux,
the process start time (``/proc/<pid>/stat``, to tell a reused pid apart). A lock is **stale** when
it was taken on this host by a process that no longer exists (``os.kill(pid, 0)`` raises
``ProcessLookupError``, or the pid now belongs to a process started later): fcflow was killed
(SIGKILL, the OOM killer, a power cut). A stale lock is taken over with a warning, and the
temporary files that the killed run left in the outputs the lock protects (a write cut between
its temporary file and the rename, :mod:`fcflow.io`) are removed. A lock taken on
another host is never judged stale, because its process cannot be seen from here: the message
names it and says to delete it once sure that no fcflow runs there. Locks are removed when the
process ends normally, on an error, on Ctrl-C and on SIGTERM (SLURM's time limit), which this
module turns into an exception while a lock is held.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fcflow.errors import FcflowError, InputDataError

__all__ = ["LockHeldError", "LockInfo", "lock_output_dir", "lock_path"]

LOGGER = logging.getLogger("fcflow.lock")

_PREFIX = ".fcflow-"
_SUFFIX = ".lock"
# A lock file is written right after it is created; one that is still empty or unreadable after
# this long was left by a process that died in between.
_UNREADABLE_GRACE_S = 10.0


class LockHeldError(FcflowError):
    """Another fcflow process holds (or may hold) a lock this process needs."""


@dataclass(frozen=True)
class LockInfo:
    """What a lock file says about its holder."""

    pid: int
    hostname: str
    started: str
    command: tuple[str, ...]
    process_start: int | None = None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.hostname!r}, started {self.started}"


def lock_path(output_dir: str | os.PathLike[str], name: str) -> Path:
    """``OUTPUT_DIR/.fcflow-<name>.lock``, e.g. ``name='participant-sub-01'`` or ``'group'``."""
    return Path(output_dir) / f"{_PREFIX}{name}{_SUFFIX}"


def _process_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux), or None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text.rpartition(")")[2].split()
    try:
        return int(fields[19])  # field 22 of proc(5)
    except (IndexError, ValueError):
        return None


def _read(path: Path) -> LockInfo | None:
    """The lock's content, or None if it cannot be read as fcflow wrote it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockInfo(pid=int(data["pid"]), hostname=str(data["hostname"]), started=str(data["started"]),
                        command=tuple(str(c) for c in data.get("command", ())),
                        process_start=data.get("process_start"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_stale(info: LockInfo) -> bool:
    """True only when the holder is certainly gone: same host, and no such process (any more)."""
    if info.hostname != socket.gethostname():
        return False
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    if info.process_start is not None:
        current = _process_start(info.pid)
        if current is not None and current != info.process_start:
            return True  # the pid was reused by a later process
    return False


def _create(path: Path, command: Sequence[str]) -> bool:
    """Create ``path`` exclusively with this process as holder; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    payload: dict[str, Any] = {
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": list(command),
        "process_start": _process_start(os.getpid()),
    }
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    return True


def _held_message(path: Path, info: LockInfo | None, what: str) -> str:
    if info is None:
        return (f"{path}: {what} is locked by a lock file that cannot be read. If no fcflow process is "
                "running on this output folder, delete the file and rerun.")
    other_host = info.hostname != socket.gethostname()
    advice = (f"It was taken on another host, so fcflow cannot check whether that process still runs: "
              f"if you are sure it does not (e.g. its SLURM job ended), delete {path} and rerun."
              if other_host else
              f"Wait for it to finish (or stop it), then rerun; delete {path} only if that process is "
              "not fcflow.")
    return (f"{path}: {what} is locked by another fcflow process ({info.describe()}; command "
            f"{' '.join(info.command) or '?'}). Two fcflow processes must not write the same outputs. {advice}")


def _take(path: Path, what: str, command: Sequence[str]) -> bool:
    """Create the lock at ``path``, taking over a stale one; raise :class:`LockHeldError` otherwise.

    Returns True when a stale lock was taken over.
    """
    took_over = False
    for _ in range(3):
        if _create(path, command):
            return took_over
        info = _read(path)
        if info is None:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile
            if age < _UNREADABLE_GRACE_S:
                time.sleep(0.2)
                continue  # being written
            raise LockHeldError(_held_message(path, None, what))
        if not _is_stale(info):
            raise LockHeldError(_held_message(path, info, what))
        # Move the stale file aside under a name of our own; only one process wins the rename.
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        if _read(aside) != info:  # someone took it over between our read and our rename: give it back
            with contextlib.suppress(OSError):
                os.link(aside, path)
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        took_over = True
        LOGGER.warning("%s was left by an fcflow process that no longer runs (%s; killed?): taking it over. "
                       "Finished steps are reused; unfinished ones are redone.", path, info.describe())
    if not _create(path, command):
        raise LockHeldError(_held_message(path, _read(path), what))
    return took_over


def _remove_partial_files(output_dir: Path, areas: Sequence[str]) -> None:
    """Remove the temporary files a killed process left in the outputs it held the lock for.

    fcflow writes every output as ``.<name>.tmp-<pid><suffix>`` and renames it (:mod:`fcflow.io`):
    a process killed in between leaves that file. Only the areas this process now holds are
    cleaned, so no other process's write in progress is touched.
    """
    for area in areas:
        for tmp in output_dir.glob(area):
            if tmp.is_file() and ".tmp-" in tmp.name and tmp.name.startswith("."):
                LOGGER.warning("Removing %s, a partial file of the killed run.", tmp)
                tmp.unlink(missing_ok=True)


def _release(path: Path) -> None:
    info = _read(path)
    if info is not None and info.pid == os.getpid() and info.hostname == socket.gethostname():
        path.unlink(missing_ok=True)


def _live_blockers(output_dir: Path, pattern: str) -> list[tuple[Path, LockInfo | None]]:
    blockers = []
    for path in sorted(output_dir.glob(pattern)):
        info = _read(path)
        if info is not None and info.pid == os.getpid() and info.hostname == socket.gethostname():
            continue
        if info is not None and _is_stale(info):
            continue
        blockers.append((path, info))
    return blockers


class _Terminated(SystemExit):
    pass


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception (so the locks are released) in the main thread."""
    def handler(signum, frame):  # noqa: ARG001
        raise _Terminated(128 + signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def lock_output_dir(
    output_dir: str | os.PathLike[str],
    level: str,
    participants: Sequence[str] = (),
    *,
    command: Sequence[str] | None = None,
) -> Iterator[list[Path]]:
    """Hold the locks of one analysis level on ``output_dir`` for the duration of the block.

    Parameters
    ----------
    output_dir : path
        OUTPUT_DIR (created if missing).
    level : {"participant", "group"}
    participants : sequence of str
        Participant labels (without ``sub-``) that the participant level writes; one lock each.
    command : sequence of str, optional
        Recorded in the lock files (default: ``sys.argv``).

    Yields
    ------
    paths : list of Path
        The lock files held.

    Raises
    ------
    LockHeldError
        A lock is held by another live process (or one on another host), or the other level's
        lock is: the message names the file, the holder and what to do.
    """
    if level not in ("participant", "group"):
        raise InputDataError(f"'level' must be 'participant' or 'group'. Got {level!r}.")
    if level == "participant" and not participants:
        raise InputDataError("'participants' must name at least one participant for the participant level.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = list(sys.argv if command is None else command)
    # Each lock, what it protects, and where that level writes (for the partial files of a killed run).
    if level == "participant":
        wanted = [(lock_path(output_dir, f"participant-sub-{label}"), f"participant sub-{label}",
                   [f"sub-{label}/**/.*.tmp-*", f".sub-{label}.tmp-*"]) for label in sorted(set(participants))]
        other, other_what = f"{_PREFIX}group{_SUFFIX}", "the group level"
    else:
        wanted = [(lock_path(output_dir, "group"), "the group level", ["group/**/.*.tmp-*", ".group.tmp-*"])]
        other, other_what = f"{_PREFIX}participant-sub-*{_SUFFIX}", "the participant level"
    held: list[Path] = []
    try:
        with _sigterm_raises():
            for path, what, areas in wanted:
                if _take(path, what, command):
                    _remove_partial_files(output_dir, areas)
                held.append(path)
            blockers = _live_blockers(output_dir, other)
            if blockers:
                path, info = blockers[0]
                raise LockHeldError(
                    f"{path}: {other_what} is running on this output folder "
                    f"({info.describe() if info else 'holder unknown'}), and the {level} level must not run "
                    f"at the same time. Wait for it to finish, then rerun; if no fcflow process is running, "
                    f"delete {path}."
                )
            yield list(held)
    finally:
        for path in reversed(held):
            _release(path)
