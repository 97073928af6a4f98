"""Performance of the simulator, and where the time of the DHT scenarios goes.

    python scripts/bench_sim.py            # engine, swarm, DHT, DHT-core hot spots (~2 min)
    python scripts/bench_sim.py --big      # also: 10,000-node dht-churn over one hour and a
                                           # 100,000-node dht-static run (long; run once)

Prints CPU seconds (process time: the machine is shared, wall time is noisy) and wall
seconds, events per CPU second, and for the DHT the request mix and CPU per request. The
hot-spot section times the DHT core's own functions on a converged 10,000-node table and,
next to each, a variant written here, to show what a change in overlay/dht would buy (the
simulator never edits the core; these variants are measurements, not patches).
"""

from __future__ import annotations

import argparse
import collections
import random
import resource
import subprocess
import sys
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from overlay.dht.config import DHTConfig  # noqa: E402
from overlay.dht.lookup import ClosestPeersLookup  # noqa: E402
from sim.dht_scenario import DHTScenario, dht_churn_config, dht_static_config  # noqa: E402
from sim.engine import Simulator  # noqa: E402
from sim.swarm_config import SwarmScenarioConfig  # noqa: E402
from sim.swarm_scenario import SwarmScenario  # noqa: E402


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def bench_engine(n_chains: int = 1000, length: int = 1000) -> None:
    sim = Simulator(0)

    def tick(left: int) -> None:
        if left:
            sim.after(0.001, tick, left - 1)

    for i in range(n_chains):
        sim.at(i * 1e-4, tick, length)
    _, cpu, wall = _timed(lambda: sim.run(1e12))
    print(f"engine: {sim.events:,} events (1,000 chains of timers, heap of 1,000) "
          f"in {cpu:.2f} s CPU / {wall:.2f} s wall = {sim.events / cpu:,.0f} events/s CPU")


def bench_swarm() -> None:
    config = SwarmScenarioConfig(servers=30, duration=1800.0, seed=0)
    result, cpu, wall = _timed(lambda: SwarmScenario("swarm", config).run())
    m = result.metrics
    print(f"swarm: 30 servers, 1800 s, {m['sessions_started']} sessions: {m['events']:,} events "
          f"in {cpu:.2f} s CPU / {wall:.2f} s wall = {m['events'] / cpu:,.0f} events/s CPU")


def _count_requests(scenario: DHTScenario) -> collections.Counter:
    types: collections.Counter = collections.Counter()
    send = scenario.dht._send

    def counting(sender, effect):
        types[type(effect.request).__name__] += 1
        return send(sender, effect)

    scenario.dht._send = counting  # type: ignore[method-assign]
    return types


def bench_dht(nodes: int, duration: float, churn: bool) -> None:
    make = dht_churn_config if churn else dht_static_config
    scenario = DHTScenario("dht", make(nodes=nodes, duration=duration, join="prefilled"))
    types = _count_requests(scenario)
    result, cpu, wall = _timed(scenario.run)
    m = result.metrics
    total = sum(types.values())
    mix = ", ".join(f"{k} {v / total:.0%}" for k, v in types.most_common())
    print(f"dht-{'churn' if churn else 'static'}: {nodes:,} nodes, {duration:.0f} s: "
          f"{m['events']:,} events, {total:,} requests ({mix}) in {cpu:.1f} s CPU / "
          f"{wall:.1f} s wall = {m['events'] / cpu:,.0f} events/s, "
          f"{cpu / total * 1e6:.0f} us CPU per request (table prefill included)")


def bench_core_hot_spots() -> None:
    """The DHT core's per-request work on a converged 10,000-node table."""
    scenario = DHTScenario("dht", dht_static_config(
        nodes=10_000, duration=0.0, join="prefilled", ops_per_s=0.0,
        dht=DHTConfig(bucket_refresh_interval=1e12)))
    scenario.run()
    rng = random.Random(1)
    peer = scenario.dht.peers[0]
    core = peer.dht
    table = core.table
    targets = [rng.getrandbits(256) for _ in range(200)]
    n = 2000

    def current():
        for t in targets:
            table.closest(t, 20)

    def by_xor_key():  # the same result, sorting node ids with a C-level key
        for t in targets:
            _variant_closest(table, t, 20)

    for t in targets[:20]:  # the variant returns the same contacts
        assert table.closest(t, 20) == _variant_closest(table, t, 20)
    a = min(timeit.repeat(current, number=n // len(targets), repeat=3)) / n * 1e6
    b = min(timeit.repeat(by_xor_key, number=n // len(targets), repeat=3)) / n * 1e6
    print(f"core: RoutingTable.closest(target, 20), table of {len(table)}: {a:.1f} us; "
          f"sorting node ids with key=target.__xor__: {b:.1f} us")

    health = core.health
    seeds = table.closest(targets[0], 40)

    def one_lookup():
        lookup = ClosestPeersLookup(targets[0], seeds, k=20, alpha=3,
                                    timeout_for=lambda c: health.soft_timeout(c.node_id),
                                    self_id=core.node_id)
        calls = 0
        now = 0.0
        while True:
            action = lookup.next(now)
            calls += 1
            if not hasattr(action, "node_id"):
                break
            lookup.on_success(action.node_id, (), now)
        return calls

    calls = one_lookup()
    per = min(timeit.repeat(one_lookup, number=50, repeat=3)) / 50 / calls * 1e6
    print(f"core: ClosestPeersLookup.next over 40 seeds: {per:.1f} us per call "
          f"(it rescans the candidate list from the nearest on every call)")


def _variant_closest(table, target: int, n: int) -> list:
    buckets = table._buckets  # a measurement of a proposed change to the core
    d = table.self_id ^ target
    indices = sorted(buckets)
    order = [i for i in reversed(indices) if (d >> i) & 1]
    order += [i for i in indices if not (d >> i) & 1]
    found: list = []
    for i in order:
        contacts = buckets[i].contacts
        if contacts:
            found.extend(contacts[x] for x in sorted(contacts, key=target.__xor__))
            if len(found) >= n:
                break
    return found[:n]


def big_runs() -> None:
    """The issue's targets, through the CLI as a user runs them."""
    for args in (
        ["run", "dht-churn", "--nodes", "10000", "--duration", "3600"],
        ["run", "dht-static", "--nodes", "100000", "--duration", "60"],
    ):
        out = Path("/tmp/bench-sim") / args[1]
        command = [sys.executable, "-m", "sim.cli", *args, "--out", str(out), "--no-plots",
                   "--quiet"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        print(f"{' '.join(args)}: {wall:.0f} s wall, {cpu:.0f} s CPU, peak RSS "
              f"{after.ru_maxrss / 1024:.0f} MiB (largest child so far)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true")
    args = parser.parse_args()
    bench_engine()
    bench_swarm()
    bench_dht(2000, 60.0, churn=False)
    bench_dht(2000, 60.0, churn=True)
    bench_core_hot_spots()
    if args.big:
        big_runs()


if __name__ == "__main__":
    main()
