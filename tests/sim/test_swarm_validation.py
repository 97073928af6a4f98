"""Validation of the swarm scenario: placement against the exact optimum, recovery by replay
against restarting (Petals NeurIPS 2023, Table 1), sessions under churn.

The scenario runs blocks/placement.py, client/routing.py and client/recovery.py as they are;
the optimum comes from blocks.placement.optimal_bottleneck (an exact search).
"""

import random
import statistics

import pytest

from blocks.announcement import ANNOUNCE_EXPIRATION, ServerInfo, ServerState
from sim.churn import ChurnConfig
from sim.swarm_config import ModelSpec, ServerClass, SwarmScenarioConfig
from sim.swarm_scenario import SwarmScenario
from sim.swarm_servers import Directory

SMALL_MODEL = ModelSpec(num_blocks=16, hidden_size=4096)
CLASSES = (
    ServerClass("big", 0.3, 8, 300.0, 4000.0, 1e9, 65_536),
    ServerClass("mid", 0.4, 6, 200.0, 2400.0, 1e9, 65_536),
    ServerClass("small", 0.3, 4, 100.0, 600.0, 1e9, 65_536),
)


def _run(**kw) -> dict:
    config = SwarmScenarioConfig(model=SMALL_MODEL, classes=CLASSES, **kw)
    return SwarmScenario("swarm", config).run().metrics


def test_placement_reaches_ninety_percent_of_optimal_on_small_instances():
    """Random heterogeneous swarms (3 to 7 servers, 8 to 12 blocks, enough of them to cover
    the model) that join at random moments and rebalance for half an hour with the real
    rules. Per instance the rules can stay lower (a move must promise 1/0.75 = 1.33x, and a
    sole holder never moves); on average they reach 90% of the exact optimum, never more."""
    rng = random.Random(7)
    ratios = []
    while len(ratios) < 12:
        blocks = rng.randint(8, 12)
        classes = tuple(
            ServerClass(f"s{i}", 1.0, rng.choice([2, 4, 6]), 200.0,
                        rng.choice([400.0, 1200.0, 3000.0]) * rng.uniform(0.8, 1.2), 1e9,
                        65_536)
            for i in range(rng.randint(3, 7))
        )
        if sum(c.num_blocks for c in classes) < blocks:
            continue  # cannot cover the model: the optimum is 0
        config = SwarmScenarioConfig(
            servers=len(classes), classes=classes, seed=len(ratios), duration=1800.0,
            model=ModelSpec(num_blocks=blocks, hidden_size=4096), session_rate=0.0,
        )
        m = SwarmScenario("swarm", config).run().metrics
        ratio = m["bottleneck_ratio_to_optimal"]
        assert ratio is not None and 0 < ratio <= 1 + 1e-9, m
        ratios.append(ratio)
    assert statistics.mean(ratios) >= 0.9, ratios


def test_rebalancing_never_makes_the_placement_worse_here():
    with_moves = _run(servers=7, seed=4, duration=1800.0, session_rate=0.0)
    without = _run(servers=7, seed=4, duration=1800.0, session_rate=0.0, rebalance=False)
    assert with_moves["bottleneck_throughput_final"] >= without["bottleneck_throughput_final"]


def test_a_healthy_swarm_completes_every_session_without_recovery():
    m = _run(servers=8, seed=2, duration=1500.0, session_rate=0.01, max_tokens=512)
    assert m["sessions_completed"] >= 10
    assert m["session_completion_rate"] == 1.0
    assert m["step_failures"] == 0 and m["recoveries"] == 0 and m["restarts"] == 0
    assert m["full_coverage_fraction"] == 1.0
    assert m["tokens_per_s"] == m["tokens_computed_per_s"] > 0


@pytest.mark.parametrize("failure_prob", [1e-3, 1e-2])
def test_replay_beats_restart(failure_prob):
    """Petals (NeurIPS 2023) Table 1: with a per-step failure probability of 1e-3 and 1e-2,
    restoring the failed span's cache from the client's history keeps generation going,
    while restarting from scratch loses more and more of it. Same clients in both runs."""
    common = dict(servers=8, seed=1, duration=3600.0, session_rate=0.005,
                  step_failure_prob=failure_prob)
    replay = _run(recovery="replay", **common)
    restart = _run(recovery="restart", **common)
    assert replay["sessions_started"] == restart["sessions_started"] > 10
    assert replay["recoveries"] > 0 and replay["restarts"] == 0
    assert restart["restarts"] > 0 and restart["recoveries"] == 0
    assert replay["session_tokens_per_s_mean"] > 1.1 * restart["session_tokens_per_s_mean"]
    assert replay["tokens_per_s"] > restart["tokens_per_s"]
    assert replay["sessions_completed"] >= restart["sessions_completed"]


def test_recovery_counts_include_the_sessions_still_running_at_the_end():
    """replayed_tokens counted only finished sessions (recoveries counted all of them)."""
    config = SwarmScenarioConfig(model=SMALL_MODEL, classes=CLASSES, servers=8, seed=1,
                                 duration=900.0, session_rate=0.02, step_failure_prob=0.01)
    scenario = SwarmScenario("swarm", config)
    m = scenario.run().metrics
    running = list(scenario.runner.active.values())
    assert sum(s.replayed for s in running) > 0  # the case at stake: replays not yet done
    every = [*scenario.finished, *running]
    assert m["replayed_tokens"] == sum(s.replayed for s in every)
    assert m["recoveries"] == sum(s.recoveries for s in every)


def test_sessions_survive_a_mass_failure_by_replay():
    # Enough sessions (~90) that some are running when the servers fail, whatever the draws.
    m = _run(servers=12, seed=3, duration=1800.0, session_rate=0.05,
             churn=ChurnConfig("mass", mass_fraction=0.3, mass_at=600.0, down_shape=1.0,
                               down_scale=600.0))
    assert m["server_departures"] == round(0.3 * 12)
    assert m["failures_down"] + m["failures_moved"] > 0 and m["recoveries"] > 0
    assert m["session_completion_rate"] >= 0.9


def test_weibull_churn_run_keeps_serving():
    m = _run(servers=12, seed=5, duration=1800.0, session_rate=0.01,
             churn=ChurnConfig("weibull", scale=300.0, down_scale=100.0))
    assert m["server_departures"] > 0 and m["server_joins"] > 0
    assert m["sessions_completed"] > 0
    assert m["coverage_min_mean"] > 0


def test_directory_records_expire_like_dht_records():
    directory = Directory(4)
    info = ServerInfo(ServerState.ONLINE, 0, 2, 10.0)
    directory.announce("12D3KooWpeer", info, now=100.0)
    assert directory.infos(100.0 + ANNOUNCE_EXPIRATION - 1) == {"12D3KooWpeer": info}
    assert directory.view(100.0).coverage() == [1, 1, 0, 0]
    assert directory.infos(100.0 + ANNOUNCE_EXPIRATION) == {}
    assert directory.view(100.0 + ANNOUNCE_EXPIRATION).coverage() == [0, 0, 0, 0]


def test_a_crashed_server_is_replaced_by_replaying_the_history():
    """One session; the first server of its route crashes (refusing connections) halfway.
    The client bans it, re-routes that span alone and replays the positions so far."""
    config = SwarmScenarioConfig(
        servers=4, model=SMALL_MODEL, classes=(ServerClass("half", 1.0, 8, 200.0, 2000.0,
                                                           1e9, 65_536),),
        session_rate=0.0, graceful_fraction=0.0, silent_fraction=0.0, rebalance=False,
    )
    scenario = SwarmScenario("swarm", config)
    sim, fleet, runner = scenario.sim, scenario.fleet, scenario.runner
    fleet.add_servers()
    for i in range(len(fleet.servers)):
        fleet.bring_up(i)
    sim.run(config.warmup)
    assert all(s.online for s in fleet.servers)
    runner.arrive(400)
    (session,) = runner.active.values()
    sim.run(sim.now + 30.0)
    position = session.position
    assert 0 < position < 400 and session.state == "running"
    victim = fleet.by_peer[session.route[0].peer_id]
    fleet.take_down(fleet.servers.index(victim))
    sim.run(sim.now + 600.0)
    assert session.state == "done" and session.position == 400
    assert session.recoveries == 1 and session.restarts == 0
    assert session.replayed >= position  # the new server recomputed at least that history
    assert victim.peer not in {span.peer_id for span in session.route}
    assert runner.failure_causes["down"] == 1
