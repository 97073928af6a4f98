"""Performance of the simulator: events per second per scenario, and the 10,000-node target.

    python scripts/bench_sim.py          # engine, swarm, the rebalancing rule against the
                                         # plain loops, DHT scenarios, 10,000-node dht-churn
                                         # over 600 simulated s, extrapolated to an hour (~5 min)
    python scripts/bench_sim.py --big    # also: the full 10,000-node dht-churn hour and a
                                         # 100,000-node dht-static run, through the CLI (long)

Prints, per scenario, events per CPU second and per wall second (the machine is shared:
CPU time is the steadier figure), and, as the baseline measured in the same run, the ratio to
the bare engine's event rate (a heap of no-op timers: what the machine does per event with
no model at all). For the DHT scenarios also the request mix and CPU per request.
"""

from __future__ import annotations

import argparse
import collections
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.dht_scenario import DHTScenario, dht_churn_config, dht_static_config  # noqa: E402
from sim.engine import Simulator  # noqa: E402
from sim.swarm_config import SwarmScenarioConfig  # noqa: E402
from sim.swarm_scenario import SwarmScenario  # noqa: E402

ENGINE_RATE = 0.0  # events per CPU second of the bare engine, measured first


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def bench_engine(n_chains: int = 1000, length: int = 1000) -> None:
    global ENGINE_RATE
    sim = Simulator(0)

    def tick(left: int) -> None:
        if left:
            sim.after(0.001, tick, left - 1)

    for i in range(n_chains):
        sim.at(i * 1e-4, tick, length)
    _, cpu, wall = _timed(lambda: sim.run(1e12))
    ENGINE_RATE = sim.events / cpu
    print(f"engine: {sim.events:,} events (1,000 chains of timers, heap of 1,000) "
          f"in {cpu:.2f} s CPU / {wall:.2f} s wall = {ENGINE_RATE:,.0f} events/s CPU "
          f"(the baseline below)")


def _rates(events: int, cpu: float, wall: float) -> str:
    return (f"{events / cpu:,.0f} events/s CPU ({events / wall:,.0f} wall), "
            f"{events / cpu / ENGINE_RATE:.3f} x the bare engine")


def bench_swarm(servers: int, duration: float, churn: str, session_rate: float) -> None:
    config = SwarmScenarioConfig(servers=servers, duration=duration, seed=0,
                                 session_rate=session_rate)
    config = replace(config, churn=replace(config.churn, kind=churn))
    result, cpu, wall = _timed(lambda: SwarmScenario("swarm", config).run())
    m = result.metrics
    print(f"swarm: {servers} servers, {duration:.0f} s, churn {churn}, "
          f"{m['sessions_started']} sessions, {m['server_moves']} moves: {m['events']:,} "
          f"events in {cpu:.2f} s CPU / {wall:.2f} s wall = {_rates(m['events'], cpu, wall)}")


def bench_rebalancing_rule(servers: int = 300, duration: float = 300.0) -> None:
    """The rebalancing check against the plain loops it replaced (tests/blocks/
    placement_reference.py), on the very checks a swarm run makes: each check's swarm and
    random state are recorded, then both implementations decide them, alternating."""
    import random

    import blocks.placement as placement
    import sim.swarm_servers as swarm_servers
    from tests.blocks import placement_reference as reference

    checks = []
    live = swarm_servers.should_choose_other_blocks

    def recording(peer, infos, num_blocks, *, rng, balance_quality):
        checks.append((peer, dict(infos), num_blocks, rng.getstate(), balance_quality))
        return live(peer, infos, num_blocks, rng=rng, balance_quality=balance_quality)

    swarm_servers.should_choose_other_blocks = recording  # type: ignore[assignment]
    try:
        config = SwarmScenarioConfig(servers=servers, duration=duration, seed=0, session_rate=0.2)
        SwarmScenario("swarm", replace(config, churn=replace(config.churn, kind="weibull"))).run()
    finally:
        swarm_servers.should_choose_other_blocks = live  # type: ignore[assignment]

    def decide(module) -> tuple[float, list]:
        out = []
        cpu = time.process_time()
        for peer, infos, num_blocks, state, quality in checks:
            rng = random.Random()
            rng.setstate(state)
            out.append((module.should_choose_other_blocks(
                peer, infos, num_blocks, rng=rng, balance_quality=quality),
                rng.getstate() == state, rng.getstate()))
        return time.process_time() - cpu, out

    times: dict[str, list[float]] = {"plain": [], "ours": []}
    same = True
    draws_same = skipped = 0
    for _ in range(3):
        t_plain, plain = decide(reference)
        t_ours, ours = decide(placement)
        times["plain"].append(t_plain)
        times["ours"].append(t_ours)
        same = same and [p[0] for p in plain] == [o[0] for o in ours]
        # the same draws, or none where the capacity bound answered without simulating
        draws_same = sum(1 for p, o in zip(plain, ours) if p[2] == o[2])
        skipped = sum(1 for p, o in zip(plain, ours) if p[2] != o[2] and o[1])
        same = same and draws_same + skipped == len(checks)
    best_plain, best_ours = min(times["plain"]), min(times["ours"])
    print(f"rebalancing rule: {len(checks)} checks of a {servers}-server swarm ({duration:.0f} s, "
          f"Weibull churn): plain loops {best_plain / len(checks) * 1e3:.2f} ms CPU per check, "
          f"ours {best_ours / len(checks) * 1e3:.3f} ms: {best_plain / best_ours:.1f}x faster "
          f"(best of 3, alternating); same decisions: {same}; same random draws in "
          f"{draws_same}, none drawn (capacity bound) in {skipped} where the plain loops drew")


def _count_requests(scenario: DHTScenario) -> collections.Counter:
    types: collections.Counter = collections.Counter()
    send = scenario.dht._send

    def counting(sender, effect):
        types[type(effect.request).__name__] += 1
        return send(sender, effect)

    scenario.dht._send = counting  # type: ignore[method-assign]
    return types


def bench_dht(nodes: int, duration: float, churn: bool) -> tuple[float, float]:
    """One run; returns (CPU s, wall s) of the measured part (table prefill excluded)."""
    make = dht_churn_config if churn else dht_static_config
    scenario = DHTScenario("dht", make(nodes=nodes, duration=duration, join="prefilled"))
    types = _count_requests(scenario)
    marks: list[tuple[float, float]] = []
    join = scenario._join_phase

    def timed_join() -> float:  # building the tables: timed apart from the measured run
        marks.append((time.process_time(), time.perf_counter()))
        out = join()
        marks.append((time.process_time(), time.perf_counter()))
        return out

    scenario._join_phase = timed_join  # type: ignore[method-assign]
    start = (time.process_time(), time.perf_counter())
    result = scenario.run()
    end = (time.process_time(), time.perf_counter())
    prefill_cpu, prefill_wall = marks[1][0] - marks[0][0], marks[1][1] - marks[0][1]
    run_cpu = end[0] - start[0] - prefill_cpu
    run_wall = end[1] - start[1] - prefill_wall
    m = result.metrics
    total = sum(types.values())
    mix = ", ".join(f"{k} {v / total:.0%}" for k, v in types.most_common())
    print(f"dht-{'churn' if churn else 'static'}: {nodes:,} nodes, {duration:.0f} s: "
          f"{m['events']:,} events, {total:,} requests ({mix}); tables prefilled in "
          f"{prefill_cpu:.1f} s CPU, then {run_cpu:.1f} s CPU / {run_wall:.1f} s wall = "
          f"{_rates(m['events'], run_cpu, run_wall)}, {run_cpu / total * 1e6:.0f} us CPU "
          f"per request; lookups exact {m['lookup_exact_rate']:.3f}, success "
          f"{m['lookup_success_rate']:.3f}, latency p50 {m['lookup_latency_p50_s']:.3f} s")
    return run_cpu + prefill_cpu, run_wall + prefill_wall


def bench_10k_churn_extrapolated(duration: float = 600.0) -> None:
    cpu, wall = bench_dht(10_000, duration, churn=True)
    print(f"  -> 10,000-node dht-churn hour, extrapolated linearly from {duration:.0f} s "
          f"(prefill counted once): ~{cpu * 3600 / duration / 60:.1f} min CPU, "
          f"~{wall * 3600 / duration / 60:.1f} min wall (target < 5 min)")


def big_runs() -> None:
    """The issue's targets, through the CLI as a user runs them."""
    for args in (
        ["run", "dht-churn", "--nodes", "10000", "--duration", "3600"],
        ["run", "dht-static", "--nodes", "100000", "--duration", "10"],
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
        print(f"overlay-sim {' '.join(args)}: {wall:.0f} s wall, {cpu:.0f} s CPU, peak RSS "
              f"{after.ru_maxrss / 1024:.0f} MiB (largest child so far)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; command: "
          f"{' '.join([Path(sys.executable).name, *sys.argv])}")
    bench_engine()
    bench_swarm(30, 1800.0, "none", SwarmScenarioConfig().session_rate)
    bench_swarm(300, 300.0, "weibull", 0.2)
    bench_rebalancing_rule()
    bench_dht(2000, 60.0, churn=False)
    bench_dht(2000, 60.0, churn=True)
    bench_10k_churn_extrapolated()
    if args.big:
        big_runs()


if __name__ == "__main__":
    main()
