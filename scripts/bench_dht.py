"""Benchmark of the DHT on loopback: N nodes in one process, each with its own Host and port.

1. Start N nodes, each joining through a random node that joined before it (join time).
2. Store K keys, each from a random node; get each from a random other node, one at a time.
3. Stop a quarter of the nodes abruptly: half close their sockets (peers see connection
   errors), the other half keep every connection open but never read or answer again, and
   swallow new connections the same way (a machine that dropped off the network).
4. Get every key again from random surviving nodes.

Prints success rate, get latency p50/p99, RPCs and hops per get, join time and memory per
node, before and after the failures; the last line is the same as JSON.

    .venv/bin/python scripts/bench_dht.py [--nodes 100] [--keys 200] [--kill 0.25] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overlay.cli.arguments import positive_int  # counts: refused when below 1
from overlay.dht.driver import DHT
from overlay.host import Host
from overlay.runtime import new_event_loop


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]




async def get_round(dhts, alive, keys, writers, rng) -> dict:
    latencies, rpcs, hops, ok = [], [], [], 0
    for i, key in enumerate(keys):
        reader = rng.choice([d for d in alive if d is not writers[i]])
        start = time.perf_counter()
        result = await reader.get_records([key])
        latencies.append(time.perf_counter() - start)
        records = result.records[key]
        rpcs.append(result.stats.requests)
        hops.append(result.stats.hops)
        if records and records[0].value == expected_value(i):
            ok += 1
    return {
        "success_rate": ok / len(keys),
        "get_p50_ms": percentile(latencies, 50) * 1000,
        "get_p99_ms": percentile(latencies, 99) * 1000,
        "get_max_ms": max(latencies) * 1000,
        "rpcs_per_get": statistics.mean(rpcs),
        "hops_per_get": statistics.mean(hops),
    }


def expected_value(i: int) -> bytes:
    import msgpack

    return msgpack.packb({"i": i, "payload": "x" * 64}, use_bin_type=True)


async def main(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    gc.collect()
    rss_before = rss_bytes()
    hosts: list[Host] = []
    dhts: list[DHT] = []
    t0 = time.perf_counter()
    for _ in range(args.nodes):
        host = Host()
        await host.listen("/ip4/127.0.0.1/tcp/0")
        bootstrap = [str(rng.choice(hosts).addrs[0])] if hosts else []
        hosts.append(host)
        dhts.append(await DHT.start(host, bootstrap))
    join_s = time.perf_counter() - t0
    gc.collect()
    memory_per_node = (rss_bytes() - rss_before) / args.nodes

    keys = [f"bench-key-{i}".encode() for i in range(args.keys)]
    writers = []
    stored = 0
    t0 = time.perf_counter()
    for i, key in enumerate(keys):
        writer = rng.choice(dhts)
        writers.append(writer)
        stored += await writer.store(key, {"i": i, "payload": "x" * 64}, time.time() + 3600)
    store_s = time.perf_counter() - t0

    before = await get_round(dhts, dhts, keys, writers, rng)

    victims = rng.sample(range(args.nodes), round(args.kill * args.nodes))
    closed, silent = victims[: len(victims) // 2], victims[len(victims) // 2:]
    for i in victims:
        await dhts[i].close()  # a dead machine runs no timers either
    for i in closed:
        hosts[i].abort()
    for i in silent:
        hosts[i].freeze()
    dead = set(victims)
    alive = [d for i, d in enumerate(dhts) if i not in dead]
    lost = sum(
        1 for key in keys
        if not any(d.node.records.get(key, time.time()) for d in alive)
    )
    after = await get_round(dhts, alive, keys, writers, rng)

    for d in alive:
        await d.close()
    for host in hosts:
        try:
            await asyncio.wait_for(host.close(), 2.0)
        except (TimeoutError, Exception):
            pass
    return {
        "nodes": args.nodes,
        "keys": args.keys,
        "killed_closed": len(closed),
        "killed_silent": len(silent),
        "join_all_s": join_s,
        "memory_per_node_mib": memory_per_node / 2**20,
        "store_all_s": store_s,
        "stored_ok": stored,
        "keys_with_no_live_replica": lost,
        "before": before,
        "after": after,
    }


def report(result: dict) -> None:
    print(f"nodes {result['nodes']}, keys {result['keys']}, killed "
          f"{result['killed_closed']} (sockets closed) + {result['killed_silent']} (silent)")
    print(f"join all nodes: {result['join_all_s']:.2f} s; memory per node: "
          f"{result['memory_per_node_mib']:.2f} MiB; store all keys: "
          f"{result['store_all_s']:.2f} s ({result['stored_ok']} stored)")
    for phase in ("before", "after"):
        r = result[phase]
        print(f"{phase:6s}: success {r['success_rate'] * 100:.1f}%  get p50 "
              f"{r['get_p50_ms']:.2f} ms  p99 {r['get_p99_ms']:.2f} ms  max "
              f"{r['get_max_ms']:.2f} ms  RPCs/get {r['rpcs_per_get']:.2f}  "
              f"hops/get {r['hops_per_get']:.2f}")
    print(f"keys whose every replica was killed: {result['keys_with_no_live_replica']}")
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=positive_int, default=100)
    parser.add_argument("--keys", type=positive_int, default=200)
    parser.add_argument("--kill", type=float, default=0.25, help="fraction of nodes stopped")
    parser.add_argument("--seed", type=int, default=1)
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    cli_args = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        report(runner.run(main(cli_args)))
