"""Output-directory locks (fcflow.lock): exclusive, stale-aware, per participant, released on exit.

Two real fcflow processes on one OUTPUT_DIR, and a lock left by a SIGKILLed run, are tested end to
end in tests/workflows/test_reliability.py; these tests drive the lock itself, with the holders
played by real processes (``sleep``) so that liveness is checked as in real life.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fcflow.errors import FcflowError
from fcflow.lock import LockHeldError, lock_output_dir, lock_path


@pytest.fixture
def live_pid():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _plant(output_dir, name, pid, hostname=None):
    output_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(output_dir, name)
    path.write_text(json.dumps({"pid": pid, "hostname": hostname or socket.gethostname(),
                                "started": "2026-11-22T08:00:00+00:00", "command": ["fcflow", "b", "o", "participant"]}))
    return path


def test_lock_is_created_with_its_holder_and_removed_after(tmp_path):
    with lock_output_dir(tmp_path / "out", "participant", ["02", "01", "01"], command=["fcflow", "x"]) as paths:
        assert [p.name for p in paths] == [".fcflow-participant-sub-01.lock", ".fcflow-participant-sub-02.lock"]
        info = json.loads(paths[0].read_text())
        assert info["pid"] == os.getpid() and info["hostname"] == socket.gethostname()
        assert info["command"] == ["fcflow", "x"] and info["started"].endswith("+00:00")
    assert not list((tmp_path / "out").glob(".fcflow-*"))


def test_lock_is_released_on_an_error(tmp_path):
    with pytest.raises(RuntimeError), lock_output_dir(tmp_path, "group"):
        raise RuntimeError("boom")
    assert not lock_path(tmp_path, "group").exists()


def test_live_holder_refuses_with_who_and_what_to_do(tmp_path, live_pid):
    path = _plant(tmp_path, "participant-sub-01", live_pid)
    with pytest.raises(LockHeldError, match=(
            rf"{path}: participant sub-01 is locked by another fcflow process \(pid {live_pid} on host "
            rf"'{socket.gethostname()}', started 2026-11-22T08:00:00\+00:00; command fcflow b o participant\)\. "
            r"Two fcflow processes must not write the same outputs\. Wait for it to finish \(or stop it\), then "
            r"rerun")):
        with lock_output_dir(tmp_path, "participant", ["01", "02"]):
            pass
    assert json.loads(path.read_text())["pid"] == live_pid, "the holder's lock was touched"
    assert not lock_path(tmp_path, "participant-sub-02").exists(), "a partial set of locks was left"


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, dead_pid, caplog):
    path = _plant(tmp_path, "group", dead_pid)
    with caplog.at_level("WARNING", logger="fcflow.lock"), lock_output_dir(tmp_path, "group"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"was left by an fcflow process that no longer runs (pid {dead_pid}" in caplog.text
    assert "taking it over" in caplog.text
    assert not path.exists()


def test_reused_pid_is_stale(tmp_path, live_pid):
    path = _plant(tmp_path, "group", live_pid)
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "process_start": 1}))  # the pid now belongs to a later process
    with lock_output_dir(tmp_path, "group"):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_lock_from_another_host_is_never_judged_stale(tmp_path, dead_pid):
    path = _plant(tmp_path, "participant-sub-01", dead_pid, hostname="node042.cluster")
    with pytest.raises(LockHeldError, match=r"on host 'node042\.cluster'.*It was taken on another host, so fcflow "
                                            r"cannot check whether that process still runs: if you are sure it "
                                            rf"does not \(e\.g\. its SLURM job ended\), delete {path} and rerun\."):
        with lock_output_dir(tmp_path, "participant", ["01"]):
            pass


def test_unreadable_lock_refuses_once_old(tmp_path):
    path = lock_path(tmp_path, "group")
    path.write_text("")
    old = time.time() - 60
    os.utime(path, (old, old))
    with pytest.raises(LockHeldError, match=rf"{path}: the group level is locked by a lock file that cannot be read"):
        with lock_output_dir(tmp_path, "group"):
            pass


def test_participants_in_separate_processes_do_not_block_each_other(tmp_path, live_pid):
    """The SLURM array route: one participant per process on one OUTPUT_DIR."""
    _plant(tmp_path, "participant-sub-01", live_pid)
    with lock_output_dir(tmp_path, "participant", ["02"]) as paths:
        assert paths == [lock_path(tmp_path, "participant-sub-02")]


def test_group_and_participant_levels_exclude_each_other(tmp_path, live_pid, dead_pid):
    _plant(tmp_path, "participant-sub-07", live_pid)
    with pytest.raises(LockHeldError, match=r"\.fcflow-participant-sub-07\.lock: the participant level is running "
                                            r"on this output folder .* Wait for it to finish, then rerun"):
        with lock_output_dir(tmp_path, "group"):
            pass
    assert not lock_path(tmp_path, "group").exists()
    _plant(tmp_path, "participant-sub-07", dead_pid)  # a killed participant run does not block
    with lock_output_dir(tmp_path, "group"):
        pass
    _plant(tmp_path, "group", live_pid)
    with pytest.raises(LockHeldError, match=r"\.fcflow-group\.lock: the group level is running on this output "
                                            r"folder"):
        with lock_output_dir(tmp_path, "participant", ["01"]):
            pass
    assert not lock_path(tmp_path, "participant-sub-01").exists()


def test_lock_errors_are_user_errors():
    assert issubclass(LockHeldError, FcflowError)
    with pytest.raises(ValueError, match="'level' must be 'participant' or 'group'. Got 'both'."):
        with lock_output_dir(".", "both"):
            pass


def test_taking_over_a_stale_lock_removes_the_killed_run_s_partial_files(tmp_path, dead_pid):
    _plant(tmp_path, "participant-sub-01", dead_pid)
    func = tmp_path / "sub-01" / "ses-a" / "func"
    func.mkdir(parents=True)
    partial = func / f".sub-01_ses-a_bold.tmp-{dead_pid}.nii.gz"
    partial.write_bytes(b"half")
    report = tmp_path / f".sub-01.tmp-{dead_pid}.html"
    report.write_text("<html")
    other = tmp_path / "sub-02" / f".sub-02_x.tmp-{dead_pid}.tsv"  # another participant's: not ours to judge
    other.parent.mkdir()
    other.write_text("a")
    kept = func / "sub-01_ses-a_bold.nii.gz"
    kept.write_bytes(b"complete")
    with lock_output_dir(tmp_path, "participant", ["01"]):
        pass
    assert not partial.exists() and not report.exists()
    assert other.exists() and kept.exists()
