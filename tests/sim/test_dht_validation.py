"""Validation of the DHT scenarios against Kademlia's theory and against brute force.

These run the overlay's own DHT core (overlay/dht) inside the simulator; the oracle is
sim.oracle, which sorts the live ids and never asks the DHT.
"""

import math
import random
from dataclasses import replace

import pytest

from overlay.dht.config import DHTConfig
from sim.dht_scenario import DHTScenario, dht_static_config

K = 20
# Soft timeout pinned at 2 s: the protocol-join fixture tests the join, not the timeouts
# (test_k_closest_with_the_default_soft_timeout tests the defaults).
PATIENT = DHTConfig(min_soft_timeout=2.0, max_soft_timeout=2.0)
NO_REFRESH = 1e12  # bucket refreshes would only add traffic to these short static runs


def _static(nodes: int, join: str, dht: DHTConfig, seed: int = 0, **kw) -> DHTScenario:
    config = dht_static_config(nodes=nodes, join=join, dht=dht, seed=seed, duration=1.0,
                               ops_per_s=0.0, settle=5.0, **kw)
    scenario = DHTScenario("dht-static", config)
    scenario.run()
    return scenario


def _find_from_random_nodes(scenario: DHTScenario, count: int, seed: int):
    """Run `count` FIND_NODE lookups of random ids from random nodes; returns
    [(requester, target, found ids)]."""
    rng = random.Random(seed)
    results = []
    dht = scenario.dht
    dht.on_done = lambda peer, done: results.append((peer, done.result))
    for i in range(count):
        peer = dht.peers[rng.randrange(len(dht.peers))]
        target = rng.getrandbits(256)
        scenario.sim.at(scenario.sim.now + i * 0.5, dht.run_op, peer,
                        lambda core, now, t=target: core.find_closest([t], now))
    scenario.sim.run(scenario.sim.now + count * 0.5 + 60.0)
    assert len(results) == count
    out = []
    for peer, result in results:
        (target, closest), = result.closest.items()
        out.append((peer, target, [c.node_id for c in closest], result.stats.hops))
    return out


def _truth(scenario: DHTScenario, peer, target: int) -> list[int]:
    me = peer.contact.node_id
    return [x for x in scenario.dht.alive.closest(target, K + 1) if x != me][:K]


@pytest.fixture(scope="module")
def joined() -> DHTScenario:
    """200 nodes that joined one by one through the core's own bootstrap."""
    return _static(200, "protocol", replace(PATIENT, bucket_refresh_interval=NO_REFRESH))


def _expected_occupancy(n: int, j: int, k: int) -> float:
    """E[min(k, X)], X ~ Binomial(n, 2^-(j+1)): the other nodes that fall in the bucket
    covering 2^-(j+1) of the id space (j = 0 is the farther half), capped at k."""
    p = 2.0 ** -(j + 1)

    def pmf(x: int) -> float:
        log = (math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1)
               + x * math.log(p) + (n - x) * math.log1p(-p))
        return math.exp(log)

    below = sum(x * pmf(x) for x in range(k))
    return below + k * (1.0 - sum(pmf(x) for x in range(k)))


def test_bucket_occupancy_matches_n_2_pow_minus_i_capped_at_k(joined):
    n = len(joined.dht.peers)
    for j in range(10):
        bucket = 255 - j
        observed = sum(len(p.dht.table.bucket(bucket)) for p in joined.dht.peers) / n
        expected = _expected_occupancy(n - 1, j, K)
        naive = min(K, (n - 1) * 2.0 ** -(j + 1))
        assert observed == pytest.approx(expected, rel=0.12, abs=0.12), (j, observed, naive)
    # The far buckets are full, the near ones hold everybody there is.
    assert all(len(p.dht.table.bucket(255)) == K for p in joined.dht.peers)


def test_k_closest_found_equal_brute_force(joined):
    for peer, target, found, _ in _find_from_random_nodes(joined, 60, seed=1):
        assert found == _truth(joined, peer, target)


def test_k_closest_with_the_default_soft_timeout():
    """The adaptive soft timeout must not give up on slow live peers: a peer never measured
    waits into the tail of the paths measured so far (overlay/dht/peer_health.py), so on a
    static log-normal network lookups return the true k closest (before that fix, a quarter
    of them missed one). The timeout is a quantile, not a bound: a peer slower than it
    (about 0.5% of lookups meet one) may still be missed, never the closest node."""
    scenario = _static(
        600, "prefilled", DHTConfig(bucket_refresh_interval=NO_REFRESH)
    )
    results = _find_from_random_nodes(scenario, 200, seed=2)
    exact = sum(found == _truth(scenario, peer, target) for peer, target, found, _ in results)
    assert exact >= 0.99 * len(results)
    assert all(found[0] == _truth(scenario, peer, target)[0] for peer, target, found, _ in results)


def test_hop_count_grows_like_log_n():
    sizes = (100, 400, 1600, 3200)
    means = []
    for n in sizes:
        scenario = _static(n, "prefilled", DHTConfig(bucket_refresh_interval=NO_REFRESH),
                           seed=n)
        hops = [h for *_, h in _find_from_random_nodes(scenario, 80, seed=n)]
        means.append(sum(hops) / len(hops))
    xs = [math.log(n) for n in sizes]
    mx, my = sum(xs) / len(xs), sum(means) / len(means)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, means)) / sum((x - mx) ** 2 for x in xs)
    fitted = [my + slope * (x - mx) for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(means, fitted))
    ss_tot = sum((y - my) ** 2 for y in means)
    assert slope > 0.1, means  # grows with N ...
    assert 1 - ss_res / ss_tot > 0.85, means  # ... linearly in log N ...
    # ... and slowly: 32x the nodes, well under 2x the hops (a linear law would be 32x).
    assert means[-1] < 2 * means[0], means
    assert all(m <= math.log2(n) for m, n in zip(means, sizes))
