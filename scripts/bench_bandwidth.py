#!/usr/bin/env python3
"""What the link measurement (overlay/bandwidth.py) gives on loopback, next to a plain asyncio
TCP bulk transfer in the same run, and what a real `overlay-node serve` measured at start.

One run:
1. an `overlay-node join` process and a plain asyncio TCP sink/source process (this script
   with `--plain-server`: no encryption, no multiplexer; uvloop, as our runtime) on 127.0.0.1;
2. from this process, alternating, `--repeat` times: `measure_link` against the node (the
   whole test: probe, sizing, upload then download), and against the plain server an upload
   and a download of the size our test ended with (8 MiB), timed by the same rule
   (request to last byte or answer, less one round trip);
3. one `overlay-node serve` of the small test model (tests/model_factory.py) bootstrapped on
   the node; its log line `network measured ...` says what it measured and how long it took.

    flock /work/bench.lock env OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_bandwidth.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overlay.bandwidth import SpeedTestConfig, transfer_bps
from overlay.bandwidth_service import measure_link
from overlay.cli.arguments import positive_int  # counts: refused when below 1
from overlay.host import Host
from overlay.multiaddr import Multiaddr
from overlay.runtime import new_event_loop

_OP = struct.Struct(">BQ")  # op (0 ping, 1 upload, 2 download), bytes
CHUNK = 256 << 10
READ_LIMIT = 4 << 20  # StreamReader buffers: the default 64 KiB makes bulk reads tiny


# -- the plain baseline ----------------------------------------------------------------------


async def plain_server() -> None:
    zeros = bytes(CHUNK)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                op, nbytes = _OP.unpack(await reader.readexactly(_OP.size))
                if op == 1:
                    left = nbytes
                    while left:
                        left -= len(await reader.read(min(left, READ_LIMIT)))
                elif op == 2:
                    left = nbytes
                    while left:
                        size = min(CHUNK, left)
                        writer.write(zeros[:size])
                        left -= size
                        await writer.drain()
                writer.write(_OP.pack(op, nbytes) if op != 2 else b"")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=READ_LIMIT)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


class PlainClient:
    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.zeros = bytes(CHUNK)

    async def ping(self) -> float:
        began = time.perf_counter()
        self.writer.write(_OP.pack(0, 0))
        await self.reader.readexactly(_OP.size)
        return time.perf_counter() - began

    async def upload(self, nbytes: int) -> float:
        began = time.perf_counter()
        self.writer.write(_OP.pack(1, nbytes))
        left = nbytes
        while left:
            size = min(CHUNK, left)
            self.writer.write(self.zeros[:size])
            left -= size
            await self.writer.drain()
        await self.reader.readexactly(_OP.size)
        return time.perf_counter() - began

    async def download(self, nbytes: int) -> float:
        began = time.perf_counter()
        self.writer.write(_OP.pack(2, nbytes))
        left = nbytes
        while left:
            left -= len(await self.reader.read(min(left, READ_LIMIT)))
        return time.perf_counter() - began


# -- the run ---------------------------------------------------------------------------------


def first_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().strip()
        if line:
            return line
        if proc.poll() is not None:
            break
    raise RuntimeError(f"{proc.args} printed nothing")


async def compare(node_addr: str, plain_port: int, repeat: int) -> None:
    config = SpeedTestConfig()
    host = Host()
    reader, writer = await asyncio.open_connection("127.0.0.1", plain_port, limit=READ_LIMIT)
    plain = PlainClient(reader, writer)
    try:
        peer = await host.connect(Multiaddr.parse(node_addr))
        ours_up, ours_down, ours_s, ours_mib = [], [], [], []
        plain_up, plain_down = [], []
        for _ in range(repeat):
            measured, failures = await measure_link(host, [peer], config)
            if measured is None:
                raise RuntimeError(f"measurement failed: {failures}")
            ours_up.append(measured.upload_bps)
            ours_down.append(measured.download_bps)
            ours_s.append(measured.seconds)
            ours_mib.append(measured.total_bytes / (1 << 20))
            rtt = min([await plain.ping() for _ in range(3)])
            plain_up.append(transfer_bps(config.max_bytes, await plain.upload(config.max_bytes),
                                         rtt))
            plain_down.append(transfer_bps(config.max_bytes,
                                           await plain.download(config.max_bytes), rtt))
    finally:
        writer.close()
        await host.close()
    med = statistics.median
    print("\n| | upload Mbit/s | download Mbit/s | min Mbit/s | test s | MiB moved |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| ours: `measure_link`, Noise + mux (median of {repeat}) | {med(ours_up) / 1e6:.0f} | "
          f"{med(ours_down) / 1e6:.0f} | "
          f"{med(min(u, d) for u, d in zip(ours_up, ours_down)) / 1e6:.0f} | "
          f"{med(ours_s):.3f} | {med(ours_mib):.1f} |")
    print(f"| plain asyncio TCP, {config.max_bytes >> 20} MiB each way (median of {repeat}) | "
          f"{med(plain_up) / 1e6:.0f} | {med(plain_down) / 1e6:.0f} | "
          f"{med(min(u, d) for u, d in zip(plain_up, plain_down)) / 1e6:.0f} | | |")
    print(f"| ratio ours / plain | {med(ours_up) / med(plain_up):.2f} | "
          f"{med(ours_down) / med(plain_down):.2f} | | | |")
    print("per run, ours (up/down Mbit/s, s): " + ", ".join(
        f"{u / 1e6:.0f}/{d / 1e6:.0f} {s:.2f}" for u, d, s in zip(ours_up, ours_down, ours_s)))


def serve_once(node_addr: str, env: dict) -> None:
    from tests.model_factory import NUM_LAYERS, save_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model("llama", Path(tmp) / "llama")
        log_path = Path(tmp) / "serve.log"
        began = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "overlay.cli.main", "serve", str(model_dir), "--blocks",
                 f"0:{NUM_LAYERS}", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", node_addr,
                 "--throughput", "auto"],
                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            first_line(proc)
            took = time.monotonic() - began
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            proc.stdout.close()
        text = log_path.read_text()
        lines = [line for line in text.splitlines() if "network" in line]
        print(f"\n`overlay-node serve` (announced {took:.1f} s after it was started):")
        for line in lines:
            print("    " + re.sub(r"^\S+ ", "", line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=positive_int, default=5)
    parser.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_server:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(plain_server())
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; python "
          f"{platform.python_version()}")
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    procs = []
    try:
        join = subprocess.Popen([sys.executable, "-m", "overlay.cli.main", "join", "--listen",
                                 "/ip4/127.0.0.1/tcp/0"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        procs.append(join)
        plain = subprocess.Popen([sys.executable, __file__, "--plain-server"],
                                 stdout=subprocess.PIPE, text=True, env=env)
        procs.append(plain)
        node_addr, plain_port = first_line(join), int(first_line(plain))
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(compare(node_addr, plain_port, args.repeat))
        serve_once(node_addr, env)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
            proc.stdout.close()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
