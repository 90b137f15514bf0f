"""The test helpers themselves: a command that times out must not leave workers running."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_group

# A worker that ignores SIGTERM (as training workers do, to checkpoint first) under a parent that waits.
WORKER = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_timed_out_command_takes_its_workers_with_it(tmp_path):
    pid_file = tmp_path / "worker.pid"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {WORKER!r}, {str(pid_file)!r}])"
    with pytest.raises(subprocess.TimeoutExpired):
        run_group([sys.executable, "-c", parent], timeout=5)
    worker = int(pid_file.read_text())
    deadline = time.time() + 10
    while _alive(worker) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def test_a_finished_command_gives_its_output_and_status():
    proc = run_group([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                     timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")
