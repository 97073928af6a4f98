"""Route choice on hand-made swarms: minimum latency, eligibility, sub-ranges, load spreading."""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.announcement import ServerInfo, ServerState, SwarmView
from blocks.placement import best_start
from client.routing import (
    HOP_OVERHEAD,
    MissingBlocksError,
    RouteNeeds,
    RoutePlanner,
    RouteSpan,
    RoutingConfig,
)


def online(start: int, end: int, throughput: float = 1.0, **kw) -> ServerInfo:
    return ServerInfo(ServerState.ONLINE, start, end, throughput, **kw)


def hand_swarm(c_rps: float) -> tuple[RoutePlanner, dict[str, float]]:
    """A: slow, all 4 blocks. B: fast, blocks 0-1, pings C at 20 ms. C: blocks 2-3."""
    servers = {
        "A": online(0, 4, inference_rps=10.0),
        "B": online(0, 2, inference_rps=100.0, next_pings={"C": 0.02}),
        "C": online(2, 4, inference_rps=c_rps),
    }
    return RoutePlanner(SwarmView.from_servers(4, servers)), {"A": 0.2, "B": 0.1, "C": 0.1}


def test_min_latency_route_on_a_hand_computed_example():
    planner, rtts = hand_swarm(c_rps=100.0)
    route = planner.inference_route(0, 4, client_rtts=rtts)
    assert route == [RouteSpan("B", 0, 2), RouteSpan("C", 2, 4)]
    # client->B 0.05 + 0.018, B computes 2 x 0.01, B->C 0.01 + 0.018, C 2 x 0.01, C->client 0.05
    expected = 0.05 + HOP_OVERHEAD + 0.02 + 0.01 + HOP_OVERHEAD + 0.02 + 0.05
    assert planner.route_latency(route, client_rtts=rtts) == pytest.approx(expected)
    # Alternatives, by hand: A alone 0.1 + 0.018 + 0.4 + 0.1 = 0.618.
    assert planner.route_latency([RouteSpan("A", 0, 4)], client_rtts=rtts) == pytest.approx(
        0.618)


def test_a_slow_server_is_avoided_and_an_unknown_link_costs_the_default():
    planner, rtts = hand_swarm(c_rps=5.0)
    # B->C: 0.05+0.018+0.02 + 0.01+0.018 + 0.4 + 0.05 = 0.566
    # B->A (no ping known: 0.15 one way): 0.05+0.018+0.02 + 0.15+0.018 + 0.2 + 0.1 = 0.556
    route = planner.inference_route(0, 4, client_rtts=rtts)
    assert route == [RouteSpan("B", 0, 2), RouteSpan("A", 2, 4)]
    assert planner.route_latency(route, client_rtts=rtts) == pytest.approx(0.556)


def test_unreachable_links_are_penalised_not_removed():
    servers = {
        "A": online(0, 2, inference_rps=100.0, next_pings={"B": math.inf, "C": 0.05}),
        "B": online(2, 4, inference_rps=1000.0),
        "C": online(2, 4, inference_rps=100.0),
    }
    planner = RoutePlanner(SwarmView.from_servers(4, servers))
    assert [s.peer_id for s in planner.inference_route(0, 4)] == ["A", "C"]
    only_b = RoutePlanner(SwarmView.from_servers(4, {k: servers[k] for k in "AB"}))
    assert [s.peer_id for s in only_b.inference_route(0, 4)] == ["A", "B"]


def test_the_cheapest_arrival_is_not_always_the_best_place_to_hop_from():
    # X reaches block 2 first but has no known link to Z (0.15 s); Y arrives later with a
    # measured 0 s link: X->Z costs 0.020 + 0.15 + 0.018, Y->Z 0.038 + 0 + 0.018.
    servers = {
        "X": online(0, 2, inference_rps=1000.0),
        "Y": online(0, 2, inference_rps=100.0, next_pings={"Z": 0.0}),
        "Z": online(2, 4, inference_rps=1000.0),
    }
    planner = RoutePlanner(SwarmView.from_servers(4, servers))
    rtts = {"X": 0.0, "Y": 0.0, "Z": 0.0}
    assert routed(planner, client_rtts=rtts) == ["Y", "Z"]
    assert planner.route_latency([RouteSpan("Y", 0, 2), RouteSpan("Z", 2, 4)],
                                 client_rtts=rtts) == pytest.approx(0.038 + 0.018 + 0.002)


def routed(planner: RoutePlanner, **kw) -> list[str]:
    return [s.peer_id for s in planner.inference_route(0, 4, **kw)]


def test_inference_respects_cache_bans_states_adapters_and_version():
    servers = {
        "fast": online(0, 4, inference_rps=1000.0, cache_tokens_left=100, adapters=("lora",)),
        "slow": online(0, 4, inference_rps=10.0, cache_tokens_left=10_000),
        "joining": ServerInfo(ServerState.JOINING, 0, 4, 1.0, inference_rps=1e6),
        "leaving": ServerInfo(ServerState.OFFLINE, 0, 4, 1.0, inference_rps=1e6),
        "future": online(0, 4, inference_rps=1e6, version=2),
    }
    planner = RoutePlanner(SwarmView.from_servers(4, servers))
    assert routed(planner) == ["fast"]
    assert routed(planner, needs=RouteNeeds(cache_tokens=100)) == ["fast"]
    assert routed(planner, needs=RouteNeeds(cache_tokens=101)) == ["slow"]
    assert routed(planner, banned={"fast"}) == ["slow"]
    assert routed(planner, needs=RouteNeeds(adapter="lora")) == ["fast"]
    with pytest.raises(MissingBlocksError) as err:
        routed(planner, needs=RouteNeeds(adapter="lora"), banned={"fast"})
    assert err.value.missing == [0, 1, 2, 3]
    assert routed(planner, needs=RouteNeeds(version=2)) == ["future"]
    # The error says why each server holding the blocks was left out.
    with pytest.raises(MissingBlocksError) as err:
        routed(planner, needs=RouteNeeds(cache_tokens=20_000), banned={"fast"})
    why = {peer: reason for peer, _, _, reason in err.value.excluded}
    assert why == {"fast": "banned after a failure",
                   "slow": "10000 free cache tokens, 20000 needed",
                   "joining": "joining", "leaving": "offline",
                   "future": "protocol version 2 (ours: 1)"}
    assert "...slow[0:4) 10000 free cache tokens, 20000 needed" in str(err.value)


def test_servers_whose_request_limit_is_below_the_smallest_request_are_left_out():
    """A session's step can be cut down to one position of every row, no further: a server
    taking fewer tokens than the session has rows cannot run it (forward and inference)."""
    servers = {
        "fast": online(0, 4, 100.0, inference_rps=1000.0, max_request_tokens=4),
        "slow": online(0, 4, 1.0, inference_rps=10.0),  # announced nothing: 16384
    }
    planner = RoutePlanner(SwarmView.from_servers(4, servers))
    assert routed(planner, needs=RouteNeeds(request_tokens=4)) == ["fast"]
    assert routed(planner, needs=RouteNeeds(request_tokens=5)) == ["slow"]
    spread = planner.spread_route(0, 4, random.Random(0), needs=RouteNeeds(request_tokens=5))
    assert spread == [RouteSpan("slow", 0, 4)]
    with pytest.raises(MissingBlocksError) as err:
        routed(planner, needs=RouteNeeds(request_tokens=5), banned={"slow"})
    assert "...fast[0:4) takes at most 4 tokens per request, 5 needed" in str(err.value)


def test_servers_whose_backward_limit_is_below_one_row_are_left_out_of_training():
    """A training pass cuts its requests by whole rows: a server whose forward or backward
    limit is below one row's length cannot run it, whatever its other limit; when no server
    is left, the error names the limits."""
    servers = {
        "fwd": online(0, 2, 100.0, max_request_tokens=64, max_backward_tokens=16),
        "bwd": online(0, 2, 1.0, max_request_tokens=16, max_backward_tokens=64),
        "old": online(2, 4, 1.0),  # announced neither: 16384 and 8192
    }
    planner = RoutePlanner(SwarmView.from_servers(4, servers))

    def first(request: int, backward: int) -> str:
        route = planner.spread_route(0, 4, random.Random(0), needs=RouteNeeds(
            request_tokens=request, backward_tokens=backward))
        assert route[1:] == [RouteSpan("old", 2, 4)]
        return route[0].peer_id

    assert first(20, 0) == "fwd"  # a forward alone: bwd takes 16 tokens per request
    assert first(16, 20) == "bwd"  # fwd's backward takes 16
    with pytest.raises(MissingBlocksError) as err:
        first(20, 20)
    assert "...fwd[0:2) takes at most 16 tokens per backward request, 20 needed" \
        in str(err.value)
    assert "...bwd[0:2) takes at most 16 tokens per request, 20 needed" in str(err.value)
    assert planner.spread_route(2, 4, random.Random(0), needs=RouteNeeds(
        request_tokens=8192, backward_tokens=8192)) == [RouteSpan("old", 2, 4)]
    with pytest.raises(MissingBlocksError, match=r"old\[2:4\) takes at most 8192 tokens per "
                                                 r"backward request, 8193 needed"):
        planner.spread_route(2, 4, random.Random(0), needs=RouteNeeds(backward_tokens=8193))


def test_missing_blocks_are_named():
    servers = {
        "a": online(0, 3),
        "b": online(5, 8),
        "c": online(2, 6),
    }
    planner = RoutePlanner(SwarmView.from_servers(9, servers))
    with pytest.raises(MissingBlocksError) as err:
        planner.inference_route(0, 9)
    assert err.value.missing == [8]
    assert err.value.excluded == []
    assert str(err.value).endswith("(no server announces them)")
    crowd = {f"s{i}": online(0, 9) for i in range(20)}
    with pytest.raises(MissingBlocksError) as err:
        RoutePlanner(SwarmView.from_servers(9, crowd)).inference_route(0, 9, banned=set(crowd))
    assert len(err.value.excluded) == 20 and str(err.value).endswith("; 12 more)")
    with pytest.raises(MissingBlocksError) as err:
        planner.spread_route(0, 9, random.Random(0), banned={"c"})
    assert err.value.missing == [3, 4, 8]
    assert "3-4, 8" in str(err.value)
    excluded = [(peer, why) for peer, _, _, why in err.value.excluded]
    assert excluded == [("c", "banned after a failure")]
    # The same swarm serves a sub-range that avoids the holes.
    assert planner.inference_route(0, 8)[-1].end == 8


def test_sub_ranges_are_covered_exactly():
    servers = {"a": online(0, 6, inference_rps=50.0), "b": online(3, 10, inference_rps=50.0),
               "c": online(5, 10, inference_rps=500.0)}
    planner = RoutePlanner(SwarmView.from_servers(10, servers))
    for start, end in [(0, 10), (2, 7), (4, 5), (6, 10), (0, 1)]:
        for route in (planner.inference_route(start, end),
                      planner.spread_route(start, end, random.Random(start))):
            assert route[0].start == start and route[-1].end == end
            assert all(x.end == y.start for x, y in itertools.pairwise(route))
            assert all(s.start < s.end for s in route)
    assert planner.inference_route(4, 4) == []
    with pytest.raises(ValueError):
        planner.inference_route(3, 11)


def test_forward_routes_spread_in_proportion_to_throughput():
    servers = {"x": online(0, 6, 1.0), "y": online(0, 6, 2.0), "z": online(0, 6, 7.0),
               "banned": online(0, 6, 50.0)}
    planner = RoutePlanner(SwarmView.from_servers(6, servers))
    rng = random.Random(1234)
    draws = 6000
    counts = Counter(planner.spread_route(0, 6, rng, banned={"banned"})[0].peer_id
                     for _ in range(draws))
    assert set(counts) == {"x", "y", "z"}
    for peer, share in (("x", 0.1), ("y", 0.2), ("z", 0.7)):
        # 4 standard deviations of a binomial proportion: fails only if the weighting is off.
        sigma = math.sqrt(share * (1 - share) / draws)
        assert abs(counts[peer] / draws - share) < 4 * sigma


def test_spread_route_hops_to_the_next_covering_server():
    servers = {"a": online(0, 2, 1.0), "b": online(1, 4, 1.0), "c": online(2, 4, 3.0)}
    planner = RoutePlanner(SwarmView.from_servers(4, servers))
    seen = set()
    for seed in range(200):
        route = planner.spread_route(0, 4, random.Random(seed))
        seen.add(tuple((s.peer_id, s.start, s.end) for s in route))
    assert seen == {(("a", 0, 2), ("b", 2, 4)), (("a", 0, 2), ("c", 2, 4))}


# -- the DP equals exhaustive search over all routes ---------------------------------------------


def all_routes(view: SwarmView, block: int, end: int, eligible: set[str]):
    if block == end:
        yield []
        return
    for span in view.covering(block):
        if span.peer_id in eligible:
            stop = min(span.end, end)
            for rest in all_routes(view, stop, end, eligible):
                yield [RouteSpan(span.peer_id, block, stop), *rest]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_inference_route_is_the_cheapest_of_all_routes(data):
    blocks = data.draw(st.integers(min_value=1, max_value=6))
    count = data.draw(st.integers(min_value=2, max_value=7))
    peers = [f"p{i}" for i in range(count)]
    servers = {}
    for peer in peers:
        start = data.draw(st.integers(min_value=0, max_value=blocks - 1))
        end = data.draw(st.integers(min_value=start + 1, max_value=blocks))
        pings = data.draw(st.dictionaries(st.sampled_from(peers),
                                          st.sampled_from([0.0, 0.01, 0.3, 2.0, math.inf]),
                                          max_size=count))
        rps = data.draw(st.sampled_from([None, 5.0, 50.0, 800.0]))
        servers[peer] = online(start, end, inference_rps=rps, next_pings=pings)
    rtts = data.draw(st.dictionaries(st.sampled_from(peers),
                                     st.sampled_from([0.0, 0.02, 0.4, math.inf]),
                                     max_size=count))
    banned = set(data.draw(st.lists(st.sampled_from(peers), max_size=1)))
    start = data.draw(st.integers(min_value=0, max_value=blocks - 1))
    end = data.draw(st.one_of(st.just(blocks), st.integers(min_value=start + 1, max_value=blocks)))
    view = SwarmView.from_servers(blocks, servers)
    planner = RoutePlanner(view, RoutingConfig(relay=data.draw(st.booleans())))
    candidates = list(all_routes(view, start, end, set(peers) - banned))
    if not candidates:
        with pytest.raises(MissingBlocksError):
            planner.inference_route(start, end, client_rtts=rtts, banned=banned)
        return
    route = planner.inference_route(start, end, client_rtts=rtts, banned=banned)
    assert route in candidates
    best = min(planner.route_latency(r, client_rtts=rtts) for r in candidates)
    assert planner.route_latency(route, client_rtts=rtts) == pytest.approx(best, rel=1e-12)


# -- speed: what the simulator needs -----------------------------------------------------------


def big_swarm(blocks: int = 80, count: int = 300) -> tuple[RoutePlanner, dict[str, float]]:
    rng = random.Random(5)
    peers = [f"p{i:03d}" for i in range(count)]
    per_block = [0.0] * blocks
    servers = {}
    for peer in peers:
        throughput, length = rng.choice([(1.0, 8), (2.5, 16), (6.0, 32)])
        start = best_start(per_block, length)
        for b in range(start, start + length):
            per_block[b] += throughput
        servers[peer] = online(start, start + length, throughput,
                               inference_rps=rng.uniform(50, 500),
                               cache_tokens_left=rng.randint(0, 10_000),
                               next_pings={q: rng.uniform(0.01, 0.2)
                                           for q in rng.sample(peers, 5)})
    rtts = {p: rng.uniform(0.01, 0.3) for p in rng.sample(peers, 50)}
    return RoutePlanner(SwarmView.from_servers(blocks, servers)), rtts


def test_planning_80_blocks_over_300_servers_is_fast():
    planner, rtts = big_swarm()
    timings = []
    for _ in range(5):
        began = time.perf_counter()
        route = planner.inference_route(0, 80, client_rtts=rtts,
                                        needs=RouteNeeds(cache_tokens=2048))
        timings.append(time.perf_counter() - began)
    assert route[0].start == 0 and route[-1].end == 80
    # Measured about 4 ms on the shared 2-core dev machine; generous bound against noise.
    assert statistics.median(timings) < 0.05


# -- push vs relay: which links a step crosses --------------------------------------------------

def near_far_swarm() -> tuple[SwarmView, dict[str, float]]:
    """N1, N2 are near the client but far from each other; F1, F2 far from the client, near
    each other. Pushing along F1 -> F2 wins; relaying through the client favours N1 -> N2."""
    servers = {
        "N1": online(0, 2, inference_rps=1000.0, next_pings={"N2": 0.4, "F2": 0.4}),
        "F1": online(0, 2, inference_rps=1000.0, next_pings={"F2": 0.002}),
        "N2": online(2, 4, inference_rps=1000.0),
        "F2": online(2, 4, inference_rps=1000.0),
    }
    return SwarmView.from_servers(4, servers), {"N1": 0.02, "N2": 0.02, "F1": 0.2, "F2": 0.2}


def test_push_routes_use_server_to_server_pings():
    view, rtts = near_far_swarm()
    planner = RoutePlanner(view)
    route = planner.inference_route(0, 4, client_rtts=rtts)
    assert route == [RouteSpan("F1", 0, 2), RouteSpan("F2", 2, 4)]
    # client->F1 0.1 + hop, 2 blocks 0.002, F1->F2 0.001 + hop, 0.002, F2->client 0.1
    assert planner.route_latency(route, client_rtts=rtts) == pytest.approx(
        0.1 + HOP_OVERHEAD + 0.002 + 0.001 + HOP_OVERHEAD + 0.002 + 0.1)
    near = [RouteSpan("N1", 0, 2), RouteSpan("N2", 2, 4)]
    assert planner.route_latency(near, client_rtts=rtts) == pytest.approx(
        0.01 + HOP_OVERHEAD + 0.002 + 0.2 + HOP_OVERHEAD + 0.002 + 0.01)


def test_relay_routes_cross_the_client_between_spans():
    view, rtts = near_far_swarm()
    planner = RoutePlanner(view, RoutingConfig(relay=True))
    route = planner.inference_route(0, 4, client_rtts=rtts)
    assert route == [RouteSpan("N1", 0, 2), RouteSpan("N2", 2, 4)]
    # N1 -> client -> N2 is 0.01 + 0.01 one way: next_pings do not matter when relaying
    assert planner.route_latency(route, client_rtts=rtts) == pytest.approx(
        0.01 + HOP_OVERHEAD + 0.002 + 0.02 + HOP_OVERHEAD + 0.002 + 0.01)
    far = [RouteSpan("F1", 0, 2), RouteSpan("F2", 2, 4)]
    assert planner.route_latency(far, client_rtts=rtts) == pytest.approx(
        0.1 + HOP_OVERHEAD + 0.002 + 0.2 + HOP_OVERHEAD + 0.002 + 0.1)


def test_servers_without_free_cache_are_avoided_even_when_fastest():
    servers = {
        "fast": online(0, 4, inference_rps=10_000.0, cache_tokens_left=100),
        "slow": online(0, 4, inference_rps=10.0, cache_tokens_left=10_000),
    }
    planner = RoutePlanner(SwarmView.from_servers(4, servers))
    assert planner.inference_route(0, 4, needs=RouteNeeds(cache_tokens=64))[0].peer_id == "fast"
    route = planner.inference_route(0, 4, needs=RouteNeeds(cache_tokens=1024))
    assert route == [RouteSpan("slow", 0, 4)]


def test_spread_routes_avoid_servers_the_client_cannot_reach():
    servers = {
        "big": online(0, 4, throughput=1000.0),
        "small": online(0, 4, throughput=1.0),
    }
    planner = RoutePlanner(SwarmView.from_servers(4, servers))
    rng = random.Random(3)
    chosen = Counter(planner.spread_route(0, 4, rng, client_rtts={"big": math.inf})[0].peer_id
                     for _ in range(300))
    assert chosen["small"] == 300
    alone = RoutePlanner(SwarmView.from_servers(4, {"big": servers["big"]}))
    assert alone.spread_route(0, 4, rng, client_rtts={"big": math.inf}) == [
        RouteSpan("big", 0, 4)]  # unreachable but alone: still tried


def test_the_models_error_keeps_the_reasons():
    """RemoteModel re-raises a routing failure naming its model; the reasons must survive
    (`generate` said "no server announces them" of a server with no free cache)."""
    from client.model import ModelUnavailableError

    routing = MissingBlocksError([2, 3], [("12D3KooWpeer", 2, 4, "0 free cache tokens, 7 needed")])
    error = ModelUnavailableError("tiny", routing.missing, routing.excluded)
    assert error.excluded == routing.excluded
    assert "0 free cache tokens, 7 needed" in str(error) and "'tiny'" in str(error)
