"""The issue's placement test, with real processes on 127.0.0.1: a bootstrap node
(`overlay-node join`) and 4 `overlay-node serve --num-blocks 8` on a 16-block model cover
every block twice; after the 2 serving [0, 8) are killed (SIGKILL, no goodbye), the other two
re-cover every block within 3 balance periods. Coverage is read from the DHT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time

import pytest

from blocks.announcement import ServerState
from blocks.model_files import default_model_id
from client.swarm import SwarmClient
from tests.model_factory import save_model

BALANCE_PERIOD = 5.0
SERVE_ARGS = [
    "--num-blocks", "8", "--throughput", "100",  # equal servers: the right answer is unique
    "--announce-period", "0.5",  # a killed server's records expire after 1 s
    "--balance-period", str(BALANCE_PERIOD), "--block-selection-delay", "0.5",
    "--handover-grace", "1", "--cache-tokens", "256", "--max-length", "256",
]
START_TIMEOUT = 120.0  # five Python processes importing torch on a busy 2-core machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("llama16"), num_layers=16)


def spawn(args: list[str], log_path, env) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "overlay.cli.main", *args],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                start_new_session=True)


def first_line(proc: subprocess.Popen, deadline: float, log_path) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline().strip()
                if line:
                    return line
    raise AssertionError(f"no address from {proc.args}; log:\n{log_path.read_text()[-3000:]}")


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def coverage(view, alive: set[str]) -> list[int]:
    """ONLINE servers per block, counting only the processes still running."""
    return [len({s.peer_id for s in view.covering(b)
                 if s.info.state == ServerState.ONLINE and s.peer_id in alive})
            for b in range(view.num_blocks)]


@pytest.mark.slow
async def test_four_servers_cover_twice_and_recover_from_two_kills(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "OVERLAY_NODE_THROUGHPUT_CACHE": str(tmp_path / "throughput.json")}
    model_id = default_model_id(model_dir)
    procs: list[subprocess.Popen] = []
    client = None
    try:
        boot_log = tmp_path / "bootstrap.log"
        procs.append(spawn(["join", "--listen", "/ip4/127.0.0.1/tcp/0"], boot_log, env))
        bootstrap = first_line(procs[0], time.monotonic() + START_TIMEOUT, boot_log)
        logs = [tmp_path / f"server{i}.log" for i in range(4)]
        servers = [spawn(["serve", str(model_dir), "--bootstrap", bootstrap,
                          "--listen", "/ip4/127.0.0.1/tcp/0", *SERVE_ARGS], log, env)
                   for log in logs]
        procs += servers
        deadline = time.monotonic() + START_TIMEOUT
        peer_of = {first_line(p, deadline, log).rsplit("/p2p/", 1)[1]: p
                   for p, log in zip(servers, logs)}
        alive = set(peer_of)
        client = await SwarmClient.connect([bootstrap])

        async def wait_until(condition, timeout: float):
            end = time.monotonic() + timeout
            while True:
                view = await client.view(model_id, 16)
                if condition(view) or time.monotonic() > end:
                    return view
                await asyncio.sleep(0.2)

        # 1. started together, they spread out: every block twice (collisions, if the random
        # delays did not separate them, are undone by rebalancing)
        view = await wait_until(lambda v: coverage(v, alive) == [2] * 16, 12 * BALANCE_PERIOD)
        assert coverage(view, alive) == [2] * 16, [(s.peer_id[-6:], s.start, s.end, s.info.state)
                                                   for s in view.spans]

        # 2. kill both servers of [0, 8)
        victims = {peer for peer in alive
                   if {(s.start, s.end) for s in view.spans if s.peer_id == peer} == {(0, 8)}}
        assert len(victims) == 2
        for peer in victims:
            os.kill(peer_of[peer].pid, signal.SIGKILL)
            peer_of[peer].wait(timeout=10)
        killed_at = time.monotonic()
        alive -= victims
        view = await wait_until(lambda v: min(coverage(v, alive)) >= 1, 6 * BALANCE_PERIOD)
        took = time.monotonic() - killed_at
        assert coverage(view, alive) == [1] * 16, [(s.peer_id[-6:], s.start, s.end,
                                                    s.info.state) for s in view.spans]
        assert took < 3 * BALANCE_PERIOD, f"re-covered after {took:.1f} s"
        print(f"every block re-covered {took:.1f} s after the kill "
              f"({took / BALANCE_PERIOD:.2f} balance periods)")
        assert all(p.poll() is None for peer, p in peer_of.items() if peer in alive)
    finally:
        if client is not None:
            await client.close()
        stop(procs)


def test_serve_placement_options_parse_and_refuse_bad_values(capsys):
    from overlay.cli.main import build_parser

    def parse(*extra: str):
        argv = ["serve", "model", "--num-blocks", "4", *extra]
        return build_parser(argv).parse_args(argv)

    args = parse()
    assert (args.throughput, args.balance_period, args.balance_quality) == ("auto", 120.0, 0.75)
    assert (args.block_selection_delay, args.handover_grace, args.network_mbps) == (5.0, 120.0,
                                                                                   None)
    assert parse("--throughput", "eval").throughput == "eval"
    assert parse("--throughput", "12.5", "--balance-quality", "0").throughput == 12.5
    for bad in (["--throughput", "fast"], ["--throughput", "-1"], ["--throughput", "nan"],
                ["--balance-period", "0"], ["--balance-quality", "-0.5"],
                ["--handover-grace", "inf"], ["--network-mbps", "0"]):
        with pytest.raises(SystemExit):
            parse(*bad)
        assert bad[0] in capsys.readouterr().err
