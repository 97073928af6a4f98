"""overlay/runtime.py: how every command ends on SIGINT/SIGTERM (real subprocesses)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A command that is busy in blocking work on a thread (as `serve` loading a model) when the
# signal comes; it prints "ready" once the work has started.
SCRIPT = """
import sys, time
from overlay.runtime import in_daemon_thread, run

async def main():
    waiting = in_daemon_thread(time.sleep, 60)
    print("ready", flush=True)
    await waiting
    return 0

sys.exit(run(main(), stopping_is_success=sys.argv[1] == "service"))
"""


@pytest.mark.parametrize("kind, signum, status", [
    ("service", signal.SIGINT, 0),  # join, serve: being stopped is their normal end
    ("command", signal.SIGINT, 130),  # generate, status...: interrupted, not done
    ("command", signal.SIGTERM, 143),
])
def test_a_signal_stops_blocking_work_at_once(kind, signum, status):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, kind], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        began = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == status
        # the 60 s of work were not waited for (the default executor would have)
        assert time.monotonic() - began < 20
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
