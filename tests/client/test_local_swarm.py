"""LocalSwarm's processes as the operating system sees them: they must not outlive their owner."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

# The owner starts its swarm from a thread that ends at once (as the demo's executor thread
# may), prints the children's pids, then waits to be killed.
OWNER = """
import sys, threading, time
from client.local_swarm import LocalSwarm
swarm = LocalSwarm(sys.argv[1], [(0, 2), (2, 4)])
starter = threading.Thread(target=swarm.start)
starter.start(); starter.join()
print(" ".join(str(p.proc.pid) for p in swarm.processes), flush=True)
time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@pytest.mark.skipif(os.name != "posix", reason="the lifeline pipe is POSIX only")
def test_children_stop_when_the_owner_is_killed(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(model_dir)], env=env,
                             stdout=subprocess.PIPE, text=True)
    children: list[int] = []
    try:
        line = owner.stdout.readline()  # bounded: the swarm's start_timeout, then an error
        children = [int(pid) for pid in line.split()]
        assert len(children) == 3, line
        time.sleep(1.0)  # the starting thread has ended: no parent-death signal fired
        assert all(alive(pid) for pid in children)
        owner.kill()
        owner.wait(timeout=10)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(alive(pid) for pid in children):
            time.sleep(0.2)
        assert [pid for pid in children if alive(pid)] == []
    finally:
        for pid in [owner.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        owner.wait(timeout=10)
        owner.stdout.close()


def test_a_lifeline_fd_that_is_not_open_is_one_line():
    result = subprocess.run([sys.executable, "-m", "overlay.cli.main", "join", "--listen",
                             "/ip4/127.0.0.1/tcp/0", "--lifeline-fd", "987"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == "overlay-node: --lifeline-fd 987: Bad file descriptor"
