"""Workers end when the process that started them is killed (issue 17, item 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")

MAIN = """
import multiprocessing, sys, time
from fcflow.workflows.orphans import guard_children

def work():
    time.sleep(120)

if __name__ == "__main__":
    with guard_children():
        workers = [multiprocessing.get_context("fork").Process(target=work) for _ in range(2)]
        for w in workers:
            w.start()
        print(" ".join(str(w.pid) for w in workers), flush=True)
        if sys.argv[1] == "normal":
            for w in workers:
                w.terminate()
                w.join()
            print("done", flush=True)
        else:
            time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_when_the_main_process_is_killed(tmp_path, how):
    script = tmp_path / "main.py"
    script.write_text(MAIN)
    main = subprocess.Popen([sys.executable, str(script), "kill"], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in main.stdout.readline().split()]
    assert len(workers) == 2 and all(_alive(p) for p in workers)
    time.sleep(1.5)  # the watcher records the children twice a second
    os.kill(main.pid, how)
    main.wait(timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.2)
    # without the watcher both would sleep on for two minutes, re-parented to init
    assert not any(_alive(p) for p in workers)


def test_a_normal_exit_stops_the_watcher(tmp_path):
    script = tmp_path / "main.py"
    script.write_text(MAIN)
    done = subprocess.run([sys.executable, str(script), "normal"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "done" in done.stdout
