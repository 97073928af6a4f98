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


# Never dialed: a record no node would accept is refused before the client joins.
UNDIALED = "/ip4/127.0.0.1/tcp/1"


@pytest.mark.parametrize(
    ("args", "message"),
    [(["k", "v", "--ttl", "100000"], "at most 86400 seconds"),
     (["k", "v", "--ttl", "nan"], "at most 86400 seconds"),
     (["k", "v", "--ttl", "inf"], "at most 86400 seconds"),
     (["k", "v", "--ttl", "0"], "more than 0"),
     (["", "v"], "key of 0 bytes (limit 1024)"),
     (["k", "x" * 100_000], "value of 100005 bytes (limit 65536)")],
)
def test_put_refuses_a_record_no_node_would_accept(args, message):
    put = cli("dht", "put", *args, "--bootstrap", UNDIALED, "--timeout", "5")
    assert put.returncode == 2, put.stderr
    assert "Traceback" not in put.stderr
    last = put.stderr.strip().splitlines()[-1]
    assert last.startswith("overlay-node dht put: ") and message in last


@pytest.mark.parametrize("command", [["get", "k"], ["put", "k", "v"]])
@pytest.mark.parametrize("timeout", ["nan", "0", "-1", "inf"])
def test_timeout_must_be_finite_positive_seconds(command, timeout):
    """Refused while parsing: nan used to end in a traceback, -1 in 'no answer within -1 s'."""
    bad = cli("dht", *command, "--bootstrap", UNDIALED, "--timeout", timeout)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines()[-1].endswith(
        f"argument --timeout: must be a finite number of seconds > 0, got {timeout}")


def test_put_help_names_the_limits():
    usage = cli("dht", "put", "--help")
    assert usage.returncode == 0
    text = " ".join(usage.stdout.split())
    assert "at most 86400" in text and "1 to 1024 bytes" in text and "at most 65536 bytes" in text


def test_get_refuses_a_key_no_node_would_hold():
    """Refused before dialing (the bootstrap address is never dialed)."""
    for key, message in (("", "1 to 1024 bytes, not 0"), ("k" * 1025, "not 1025")):
        got = cli("dht", "get", key, "--bootstrap", UNDIALED, "--timeout", "5")
        assert got.returncode == 2 and "Traceback" not in got.stderr
        last = got.stderr.strip().splitlines()[-1]
        assert last.startswith("overlay-node dht get: ") and message in last


@pytest.mark.parametrize("command", [["get", "k"], ["put", "k", "v"]])
def test_timeout_covers_dialing_a_silent_bootstrap_peer(command):
    """A peer that accepts TCP but never answers the handshake: --timeout 2 gives up after
    about 2 s (it used to wait out the 10 s dial timeout first), with one clear line."""
    import socket
    import time

    from overlay.identity import Identity

    with socket.socket() as silent:  # the kernel accepts connections; nobody ever reads
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        addr = f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{Identity.generate().peer_id}"
        began = time.monotonic()
        done = cli("-q", "dht", *command, "--bootstrap", addr, "--timeout", "2")
        elapsed = time.monotonic() - began
    assert done.returncode == 1, done.stderr
    assert elapsed < 7, elapsed
    assert done.stderr.strip() == f"overlay-node dht {command[0]}: no answer within 2 s"


@pytest.mark.slow
async def test_get_prints_values_json_cannot_hold_in_one_line():
    """Any msgpack client may store maps with bytes keys or deep nesting: `dht get` used to
    end in a traceback (TypeError: keys must be str, ...; RecursionError)."""
    import asyncio
    import time

    from overlay.dht.driver import DHT
    from overlay.host import Host

    proc, addr = start_join()
    host = Host()
    try:
        dht = await DHT.start(host, [addr], serve=False)
        deep: list = []
        for _ in range(1020):
            deep = [deep]
        expiration = time.time() + 60
        stored = await dht.store_many([("bytes-keys", {b"raw": 1, 2: [b"\x00"]}, expiration,
                                        None), ("deep", deep, expiration, None)],
                                      republish=False)
        await dht.close()
        assert stored == [1, 1]
        got = await asyncio.to_thread(cli, "dht", "get", "bytes-keys", "--bootstrap", addr)
        assert got.returncode == 0, got.stderr
        assert got.stdout.splitlines()[-1] == '{"b\'raw\'": 1, "2": ["b\'\\\\x00\'"]}'
        got = await asyncio.to_thread(cli, "dht", "get", "deep", "--bootstrap", addr)
        assert got.returncode == 1 and "Traceback" not in got.stderr
        assert got.stderr == ("overlay-node dht get: the value of 'deep' is nested too deeply "
                              "to print as JSON\n")
    finally:
        await host.close()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
