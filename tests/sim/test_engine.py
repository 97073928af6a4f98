"""The event engine, the duration distributions and the churn models."""

import gc
import math
import random
import statistics

import pytest

from sim.churn import ChurnConfig, ChurnModel
from sim.distributions import Exponential, LogNormal, Weibull
from sim.engine import Simulator


def test_events_run_in_time_order_and_ties_in_scheduling_order():
    sim = Simulator(0)
    seen = []
    for label, when in [("c", 2.0), ("a", 1.0), ("b1", 1.5), ("b2", 1.5), ("b3", 1.5)]:
        sim.at(when, lambda label=label: seen.append((sim.now, label)))
    sim.run(10.0)
    assert seen == [(1.0, "a"), (1.5, "b1"), (1.5, "b2"), (1.5, "b3"), (2.0, "c")]
    assert sim.now == 10.0 and sim.events == 5


def test_run_stops_at_until_and_resumes():
    sim = Simulator(0)
    seen = []
    sim.at(1.0, seen.append, 1)
    sim.at(5.0, seen.append, 5)
    sim.run(3.0)
    assert seen == [1] and sim.now == 3.0 and sim.pending == 1
    sim.after(1.0, seen.append, 4)  # scheduled relative to the clock at 3.0
    sim.run(10.0)
    assert seen == [1, 4, 5]


def test_past_times_are_clamped_to_now():
    sim = Simulator(0)
    sim.run(5.0)
    sim.at(1.0, lambda: None)
    assert sim.next_time() == 5.0


def test_skipped_events_are_counted_apart():
    sim = Simulator(0)
    sim.at(1.0, sim.skip)
    sim.at(2.0, lambda: None)
    sim.run(3.0)
    assert (sim.events, sim.skipped) == (1, 1)


def test_progress_and_max_events():
    sim = Simulator(0)

    def tick(n):
        if n:
            sim.after(0.5, tick, n - 1)

    sim.at(0.0, tick, 99)
    calls = []
    sim.run(1e9, progress=lambda now, events: calls.append(events), progress_every=10,
            max_events=35)
    assert sim.events == 35 and calls == [10, 20, 30, 35]
    assert sim.now == 17.0  # stopped early: the clock stays at the last event


def test_same_seed_same_random_stream():
    a, b = Simulator(42), Simulator(42)
    assert [a.rng.random() for _ in range(5)] == [b.rng.random() for _ in range(5)]


@pytest.mark.parametrize("dist", [Exponential(10.0), Weibull(0.5, 20.0), Weibull(2.0, 5.0),
                                  LogNormal(3.0, 0.5)])
def test_distribution_means_and_residuals(dist):
    rng = random.Random(1)
    n = 40_000
    samples = [dist.sample(rng) for _ in range(n)]
    assert statistics.fmean(samples) == pytest.approx(dist.mean, rel=0.06)
    # Residual life of a renewal process: mean E[X^2] / (2 E[X]).
    second = statistics.fmean(x * x for x in samples)
    residuals = [dist.sample_residual(rng) for _ in range(n)]
    assert statistics.fmean(residuals) == pytest.approx(second / (2 * dist.mean), rel=0.12)


def test_weibull_median():
    w = Weibull(0.5, 2520.0)
    rng = random.Random(3)
    samples = sorted(w.sample(rng) for _ in range(20_001))
    assert samples[10_000] == pytest.approx(w.median, rel=0.05)
    assert w.median == pytest.approx(2520.0 * math.log(2) ** 2)


def _churn_run(config: ChurnConfig, n: int, duration: float, seed: int = 0):
    sim = Simulator(seed)
    model = ChurnModel(sim, config)
    up = model.plan(n)
    log = []
    model.start(duration, lambda i: log.append((sim.now, i, "down")),
                lambda i: log.append((sim.now, i, "up")))
    samples = []

    def sample():
        samples.append(model.up_count)
        sim.after(duration / 50, sample)

    sim.at(0.0, sample)
    sim.run(duration)
    return up, log, samples


def test_no_churn_keeps_everyone_up():
    up, log, samples = _churn_run(ChurnConfig("none"), 50, 1000.0)
    assert all(up) and log == [] and set(samples) == {50}


@pytest.mark.parametrize("kind", ["exp", "weibull"])
def test_stationary_churn_keeps_the_availability(kind):
    config = ChurnConfig(kind, shape=0.5, scale=600.0, down_shape=0.5, down_scale=200.0)
    up, log, samples = _churn_run(config, 2000, 7200.0)
    session, downtime = config.session().mean, config.downtime().mean
    availability = session / (session + downtime)
    assert sum(up) / len(up) == pytest.approx(availability, abs=0.04)
    assert statistics.fmean(samples) / 2000 == pytest.approx(availability, abs=0.04)
    downs = sum(1 for e in log if e[2] == "down")
    # Transitions per node per second in steady state: 1 / (E[S] + E[D]) each way.
    assert downs / (2000 * 7200.0) == pytest.approx(1 / (session + downtime), rel=0.15)


def test_mass_failure_takes_down_the_fraction_at_once_and_they_return():
    config = ChurnConfig("mass", mass_fraction=0.3, mass_at=100.0, down_shape=1.0,
                         down_scale=50.0)
    up, log, samples = _churn_run(config, 1000, 3000.0)
    downs = [e for e in log if e[2] == "down"]
    assert len(downs) == 300 and {e[0] for e in downs} == {100.0}
    ups = [e for e in log if e[2] == "up"]
    assert len(ups) == 300 and all(e[0] > 100.0 for e in ups)
    assert samples[-1] == 1000


def test_bad_churn_config():
    with pytest.raises(ValueError):
        ChurnConfig("sometimes")
    with pytest.raises(ValueError):
        Weibull(0.0, 1.0)


def _cyclic_garbage_of(run) -> list:
    """Objects that only the cycle collector could free, left by `run()` (kept alive)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        keep = run()
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was:
            gc.enable()
    del keep
    return garbage


def _ours(garbage: list) -> list:
    return [o for o in garbage
            if type(o).__module__.split(".")[0] in ("sim", "overlay", "blocks", "client")]


def test_run_switches_automatic_collection_off_and_back_on():
    sim = Simulator(0)
    states = []
    sim.at(1.0, lambda: states.append(gc.isenabled()))
    assert gc.isenabled()
    sim.run(2.0)
    assert states == [False] and gc.isenabled()


def test_dht_and_swarm_runs_make_no_reference_cycles():
    """What lets `run` switch the cycle collector off: a churning DHT and a swarm with
    churn, sessions and recoveries leave no object of ours that only it could free."""
    from sim.dht_scenario import DHTScenario, dht_churn_config
    from sim.swarm_config import SwarmScenarioConfig
    from sim.swarm_scenario import SwarmScenario

    def dht():
        scenario = DHTScenario("dht", dht_churn_config(nodes=300, duration=300.0, seed=1))
        return scenario, scenario.run()

    def swarm():
        config = SwarmScenarioConfig(servers=30, duration=900.0, seed=1, session_rate=0.05,
                                     step_failure_prob=0.01,
                                     churn=ChurnConfig("weibull", scale=300.0, down_scale=100.0))
        scenario = SwarmScenario("swarm", config)
        return scenario, scenario.run()

    for run in (dht, swarm):
        assert _ours(_cyclic_garbage_of(run)) == []
