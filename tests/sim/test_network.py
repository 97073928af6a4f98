"""The network model (latency, bandwidth, loss) and the brute-force oracle."""

import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.network import TCP_RTO_MIN, NetworkConfig, NetworkModel
from sim.oracle import AliveIndex, xor_closest


def _model(config: NetworkConfig, n: int, seed: int = 0) -> NetworkModel:
    model = NetworkModel(config, random.Random(seed))
    for _ in range(n):
        model.add_node()
    return model


def test_pair_latency_is_symmetric_fixed_and_seeded():
    a = _model(NetworkConfig(), 200, seed=1)
    b = _model(NetworkConfig(), 200, seed=1)
    c = _model(NetworkConfig(), 200, seed=2)
    pairs = [(i, j) for i in range(0, 200, 7) for j in range(0, 200, 11) if i != j]
    assert all(a.one_way(i, j) == a.one_way(j, i) == b.one_way(i, j) for i, j in pairs)
    assert sum(a.one_way(i, j) != c.one_way(i, j) for i, j in pairs) > 0.9 * len(pairs)
    assert a.one_way(5, 5) == 0.0


def test_lognormal_latency_follows_its_distribution():
    config = NetworkConfig(latency="lognormal", one_way_median=0.04, one_way_sigma=0.6)
    model = _model(config, 400)
    delays = sorted(model.one_way(i, j) for i in range(400) for j in range(i + 1, 400))
    assert statistics.median(delays) == pytest.approx(0.04, rel=0.05)
    # 84th percentile of a log-normal: median * e^sigma.
    assert delays[int(0.8413 * len(delays))] == pytest.approx(0.04 * 2.7183**0.6, rel=0.06)


def test_region_latency_follows_the_matrix():
    config = NetworkConfig(latency="regions", region_jitter_sigma=0.0)
    model = _model(config, 300)
    for i in range(0, 300, 13):
        for j in range(1, 300, 17):
            if i != j:
                expected = config.region_rtt_ms[model.region[i]][model.region[j]] / 2000
                assert model.one_way(i, j) == pytest.approx(expected)
    shares = [model.region.count(r) / 300 for r in range(len(config.regions))]
    assert shares[0] == pytest.approx(config.regions[0].share, abs=0.1)


def test_uplink_queues_messages_and_charges_size_over_bandwidth():
    config = NetworkConfig(latency="constant", one_way_median=0.01)
    model = NetworkModel(config, random.Random(0))
    a = model.add_node((8e6, 8e6))  # 1 MB/s
    b = model.add_node((80e6, 80e6))
    first = model.transfer(a, b, 500_000, now=0.0)
    second = model.transfer(a, b, 500_000, now=0.0)
    assert first == pytest.approx(0.5 + 0.01)
    assert second == pytest.approx(1.0 + 0.01)  # waited for the first on the uplink
    # The slower end of the pair sets the rate.
    assert model.transfer(b, a, 1_000_000, now=10.0) == pytest.approx(10.0 + 1.0 + 0.01)
    assert (model.messages, model.bytes_sent) == (3, 2_000_000)


def test_loss_drop_and_retransmit():
    drop = _model(NetworkConfig(latency="constant", loss=0.2, loss_mode="drop"), 2)
    outcomes = [drop.transfer(0, 1, 100, 0.0) for _ in range(5000)]
    assert sum(o is None for o in outcomes) / 5000 == pytest.approx(0.2, abs=0.02)
    retransmit = _model(NetworkConfig(latency="constant", loss=0.2), 2)
    base = retransmit.one_way(0, 1)
    late = [retransmit.transfer(0, 1, 100, t * 100.0) - t * 100.0 for t in range(3000)]
    assert all(x is not None for x in late)
    delayed = [x for x in late if x > base + 0.01]
    assert len(delayed) / 3000 == pytest.approx(0.2, abs=0.03)
    assert min(delayed) >= base + TCP_RTO_MIN


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), loss=st.sampled_from([0.0, 0.3]),
       latency=st.sampled_from(["lognormal", "regions", "uniform"]))
def test_transfer_with_the_pair_delay_given_equals_transfer_computing_it(seed, loss, latency):
    """The DHT driver hands a request's one-way delay to its answer's transfer: the same
    arrivals, byte counts and random draws as when transfer looks the delay up itself."""
    config = NetworkConfig(latency=latency, loss=loss)
    plain, given_delay = _model(config, 30, seed), _model(config, 30, seed)
    rng = random.Random(seed)
    for step in range(200):
        src, dst = rng.sample(range(30), 2)
        size, now = rng.randint(1, 50_000), step * 0.01
        delay = given_delay.one_way(dst, src)  # symmetric: the answer's pair reversed
        assert plain.transfer(src, dst, size, now) == given_delay.transfer(
            src, dst, size, now, delay)
    assert (plain.messages, plain.bytes_sent, plain.lost) == (
        given_delay.messages, given_delay.bytes_sent, given_delay.lost)
    assert plain.rng.random() == given_delay.rng.random()


def test_bad_network_config():
    with pytest.raises(ValueError):
        NetworkConfig(latency="carrier-pigeon")
    with pytest.raises(ValueError):
        NetworkConfig(loss=1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, (1 << 256) - 1), min_size=1, max_size=300, unique=True),
    st.integers(0, (1 << 256) - 1),
    st.integers(1, 40),
)
def test_xor_closest_equals_brute_force(ids, target, k):
    ids.sort()
    assert xor_closest(ids, target, k) == sorted(ids, key=lambda x: x ^ target)[:k]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=100, unique=True), st.integers(0, 255),
       st.integers(1, 10))
def test_xor_closest_on_clustered_ids(small, target, k):
    # Ids that share long prefixes stress the descent through the implicit trie.
    ids = sorted((1 << 255) | x for x in small)
    t = (1 << 255) | target
    assert xor_closest(ids, t, k) == sorted(ids, key=lambda x: x ^ t)[:k]


def test_alive_index_add_remove_random():
    index = AliveIndex()
    rng = random.Random(0)
    ids = {i: rng.getrandbits(256) for i in range(50)}
    for i, node_id in ids.items():
        index.add(i, node_id)
    for i in range(0, 50, 2):
        index.remove(i, ids[i])
    assert len(index) == 25 and 3 in index and 4 not in index
    assert index.sorted_ids == sorted(ids[i] for i in range(1, 50, 2))
    drawn = {index.random(rng) for _ in range(2000)}
    assert drawn == set(range(1, 50, 2))
    assert index.random(rng, exclude=1) != 1
    target = rng.getrandbits(256)
    assert index.closest(target, 5) == sorted(index.sorted_ids, key=lambda x: x ^ target)[:5]
