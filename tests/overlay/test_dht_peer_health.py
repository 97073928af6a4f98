"""Adaptive soft timeouts: RFC 6298 per path, and a patient timeout for unmeasured peers."""

import math
import random

from overlay.dht.config import DHTConfig
from overlay.dht.peer_health import (
    RTO_GRANULARITY,
    TAIL_MIN_PEERS,
    TAIL_REFRESH_SAMPLES,
    TAIL_Z,
    PeerHealth,
)


def test_steady_path_keeps_a_granularity_margin():
    health = PeerHealth(DHTConfig(min_soft_timeout=0.001))
    for i in range(200):  # the same RTT every time: RTTVAR decays to ~0
        health.on_success(1, 0.300, float(i))
    assert health.soft_timeout(1) >= 0.300 + RTO_GRANULARITY - 1e-9


def test_unmeasured_peer_uses_the_initial_timeout_until_enough_peers_are_measured():
    config = DHTConfig()
    health = PeerHealth(config)
    for peer in range(TAIL_MIN_PEERS - 1):
        health.on_success(peer, 0.05, 0.0)
    assert health.soft_timeout(10_000) == config.initial_soft_timeout
    health.on_success(TAIL_MIN_PEERS, 0.05, 0.0)
    assert health.soft_timeout(10_000) < 0.1  # a uniform network: a few round trips


def test_unmeasured_peer_waits_far_into_the_tail_of_measured_paths():
    """Log-normal paths: a peer never measured gets exp(m + z s) of the tracked SRTTs, far
    above the recent average (which live slow peers exceed), and above every path but the
    extreme tail; the running sums agree with a recomputation from the records."""
    rng = random.Random(3)
    config = DHTConfig(max_tracked_peers=400)
    health = PeerHealth(config)
    rtts = {peer: 0.08 * rng.lognormvariate(0.0, 0.6) for peer in range(600)}
    for peer, rtt in rtts.items():  # the first 200 are forgotten again (LRU of 400)
        health.on_success(peer, rtt, 0.0)
        health.on_success(peer, rtt * 1.1, 0.0)
    for _ in range(TAIL_REFRESH_SAMPLES // 3):  # recent samples all fast
        health.on_success(599, 0.02, 0.0)
    logs = [math.log(health.srtt(p)) for p in rtts if health.srtt(p) is not None]
    assert len(logs) == 400
    m = sum(logs) / len(logs)
    s = math.sqrt(sum((x - m) ** 2 for x in logs) / len(logs))
    assert math.isclose(health.unmeasured_timeout(), math.exp(m + TAIL_Z * s), rel_tol=1e-6)
    assert health.soft_timeout(10_000) > 5 * health.typical_rtt()
    slower = sum(rtt > health.soft_timeout(10_000) for rtt in rtts.values())
    assert slower <= 1
    # a measured peer keeps its own, much tighter, estimate
    assert health.soft_timeout(599) < 0.2
