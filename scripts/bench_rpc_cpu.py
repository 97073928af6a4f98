#!/usr/bin/env python3
"""CPU work per 1 KiB unary RPC (issue 2), measured so that a loaded machine matters little.

Both ends run in this one process, over 127.0.0.1, so nothing sleeps and the CPU time per
call (getrusage, user + system, both ends) is the work itself, not the scheduling of two
processes on shared cores. Side by side in one run, alternating rounds (best round kept):
  * ours: Host.call -> echo handler, over our Noise + multiplexer + RPC;
  * baseline: a plain asyncio TCP echo (streams, TCP_NODELAY), the same layout;
  * Python bytecodes executed per call by each (sys.settrace opcode events): a count that
    does not depend on the load at all.
Ends with one JSON line.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_rpc_cpu.py [--rounds 15] [--calls 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import socket
import sys

from overlay.cli.arguments import positive_int  # counts: refused when below 1
from overlay.host import Host
from overlay.runtime import keep_large_buffers_in_heap, new_event_loop

SMALL = 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def cpu_per_call(one_call, calls: int) -> float:
    began = cpu_seconds()
    for _ in range(calls):
        await one_call()
    return (cpu_seconds() - began) / calls


async def bytecodes_per_call(one_call, calls: int = 200) -> float:
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        frame.f_trace_opcodes = True
        if event == "opcode":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        for _ in range(calls):
            await one_call()
    finally:
        sys.settrace(None)
    return count / calls


async def run(args: argparse.Namespace) -> dict:
    server, client = Host(), Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")

    async def echo(ctx, payload: bytes) -> bytes:
        return payload

    server.add_handler("echo", echo)
    await client.connect(addr)
    payload = os.urandom(SMALL)

    async def ours():
        await client.call(addr.peer_id, "echo", payload)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                writer.write(await reader.readexactly(SMALL + 5))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    raw = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", raw.sockets[0].getsockname()[1])
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message = b"\x00" + SMALL.to_bytes(4, "big") + payload

    async def baseline():
        writer.write(message)
        await reader.readexactly(len(message))

    for _ in range(300):  # warm up both
        await ours()
        await baseline()
    rpc, base = [], []
    for _ in range(args.rounds):
        rpc.append(await cpu_per_call(ours, args.calls))
        base.append(await cpu_per_call(baseline, args.calls))
    result = {
        "rpc_cpu_us": round(min(rpc) * 1e6, 1),
        "echo_cpu_us": round(min(base) * 1e6, 1),
        "rpc_bytecodes": round(await bytecodes_per_call(ours)),
        "echo_bytecodes": round(await bytecodes_per_call(baseline)),
    }
    writer.close()
    raw.close()
    await client.close()
    await server.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=15,
                        help="alternating rounds; best kept")
    parser.add_argument("--calls", type=positive_int, default=1000, help="calls per round")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    keep_large_buffers_in_heap()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        result = runner.run(run(args))
    print(f"machine: {platform.machine()} cpus={os.cpu_count()} "
          f"python={platform.python_version()} loop={type(new_event_loop()).__module__} "
          f"load={os.getloadavg()[0]:.1f}")
    print("command: OMP_NUM_THREADS=1 python scripts/bench_rpc_cpu.py " + " ".join(sys.argv[1:]))
    print(f"{'per 1 KiB call, both ends':<30}{'ours':>10}{'echo':>10}{'ratio':>8}")
    for name, ours, base in (("CPU (us, best round)", result["rpc_cpu_us"], result["echo_cpu_us"]),
                             ("Python bytecodes", result["rpc_bytecodes"],
                              result["echo_bytecodes"])):
        print(f"{name:<30}{ours:>10}{base:>10}{ours / base:>8.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
