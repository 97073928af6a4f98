"""`overlay-node join` x3, then `overlay-node dht put` / `dht get`, as real processes."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "overlay.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_join(*bootstrap: str) -> tuple[subprocess.Popen, str]:
    args = [*CLI, "-q", "join", "--listen", "/ip4/127.0.0.1/tcp/0"]
    for addr in bootstrap:
        args += ["--bootstrap", addr]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=ENV, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(30)
    sel.close()
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("/ip4/127.0.0.1/tcp/"):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        raise AssertionError(f"join printed no address: {line!r}")
    return proc, line


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=60)


@pytest.mark.slow
def test_join_put_get_across_processes():
    procs: list[subprocess.Popen] = []
    try:
        first, addr0 = start_join()  # a new network
        procs.append(first)
        second, _ = start_join(addr0)
        procs.append(second)
        third, third_addr = start_join(addr0)
        procs.append(third)

        put = cli("dht", "put", "greeting", "hello overlay", "--bootstrap", addr0, "--ttl", "60")
        assert put.returncode == 0, put.stderr
        assert "stored 'greeting' on" in put.stdout

        got = cli("dht", "get", "greeting", "--bootstrap", third_addr)
        assert got.returncode == 0, got.stderr
        assert got.stdout.splitlines()[-1] == "hello overlay"

        missing = cli("dht", "get", "no-such-key", "--bootstrap", third_addr)
        assert missing.returncode == 1 and "not found" in missing.stderr

        unreachable = cli("dht", "get", "greeting", "--bootstrap",
                          "/ip4/127.0.0.1/tcp/1", "--timeout", "5")
        assert unreachable.returncode != 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
