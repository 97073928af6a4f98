"""Placement: Petals' block selection and rebalancing on hand-made swarms, and the greedy rule
measured against the exact optimum."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks import placement
from blocks.announcement import ServerInfo, ServerState
from blocks.placement import (
    PlacementError,
    best_start,
    block_throughputs,
    choose_best_blocks,
    greedy_placement,
    optimal_bottleneck,
    placement_bottleneck,
    should_choose_other_blocks,
    swarm_bottleneck,
)


def srv(start: int, end: int, throughput: float = 1.0, state=ServerState.ONLINE) -> ServerInfo:
    return ServerInfo(state, start, end, throughput)


def test_block_throughputs_count_joining_and_online_but_not_offline():
    infos = {
        "a": srv(0, 3, 2.0),
        "b": srv(2, 4, 1.5, ServerState.JOINING),
        "c": srv(0, 4, 100.0, ServerState.OFFLINE),
    }
    assert block_throughputs(infos, 5) == [2.0, 2.0, 3.5, 1.5, 0.0]
    assert swarm_bottleneck(infos, 5) == 0.0
    assert swarm_bottleneck({"a": srv(0, 5, 2.0)}, 5) == 2.0


def test_new_server_takes_the_weakest_window():
    # Blocks: 5 5 1 1 4 4 4 ; a 2-block server must land on the two blocks at 1.
    infos = {"a": srv(0, 2, 5.0), "b": srv(2, 4, 1.0), "c": srv(4, 7, 4.0)}
    assert choose_best_blocks(2, infos, 7) == 2
    # 3 blocks: windows containing both weak blocks: [1,4) sorts to (1,1,5), [2,5) to (1,1,4).
    assert choose_best_blocks(3, infos, 7) == 2
    # An empty block wins over everything.
    assert choose_best_blocks(2, {**infos, "d": srv(0, 7, 0.5)}, 8) == 6


def test_ties_go_to_the_lexicographic_order_then_the_lowest_start():
    # Both windows have minimum 1; the second values (2 vs 3) decide.
    assert best_start([1.0, 3.0, 9.0, 1.0, 2.0], 2) == 3
    assert best_start([0.0] * 6, 3) == 0
    assert best_start([2.0, 1.0, 2.0, 1.0, 2.0], 2) == 0
    with pytest.raises(PlacementError):
        best_start([1.0, 2.0], 3)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), min_size=1, max_size=14),
       st.integers(min_value=1, max_value=14))
def test_sliding_window_matches_sorting_every_window(throughputs, length):
    length = min(length, len(throughputs))
    naive = min(
        (sorted(throughputs[i:i + length]), i) for i in range(len(throughputs) - length + 1)
    )[1]
    assert best_start(throughputs, length) == naive


def test_servers_placing_one_by_one_cover_every_block():
    infos: dict[str, ServerInfo] = {}
    for i in range(4):  # 4 servers x 4 blocks on a 16-block model: exactly once each
        start = choose_best_blocks(4, infos, 16)
        infos[f"s{i}"] = srv(start, start + 4)
    assert block_throughputs(infos, 16) == [1.0] * 16
    for i in range(4, 12):  # 8 more, 8 blocks each: every block three times
        start = choose_best_blocks(8, infos, 16)
        infos[f"s{i}"] = srv(start, start + 8)
    assert block_throughputs(infos, 16) == [5.0] * 16


def balanced_swarm() -> dict[str, ServerInfo]:
    """Issue 6's scenario: 4 servers of 8 blocks on a 16-block model, every block twice."""
    infos: dict[str, ServerInfo] = {}
    for i in range(4):
        start = choose_best_blocks(8, infos, 16)
        infos[f"s{i}"] = srv(start, start + 8)
    return infos


def test_balanced_swarm_does_not_rebalance():
    infos = balanced_swarm()
    assert block_throughputs(infos, 16) == [2.0] * 16
    for seed in range(3):
        for peer in infos:
            assert not should_choose_other_blocks(peer, infos, 16, rng=random.Random(seed))


def test_swarm_recovers_coverage_after_servers_leave():
    infos = balanced_swarm()
    # Kill the two servers on the first half: blocks 0-7 are uncovered.
    gone = [p for p, info in infos.items() if info.start == 0]
    for peer in gone:
        del infos[peer]
    assert swarm_bottleneck(infos, 16) == 0.0
    rng = random.Random(1)
    movers = [p for p in sorted(infos) if should_choose_other_blocks(p, infos, 16, rng=rng)]
    assert movers, "an uncovered block must trigger rebalancing"
    # Each mover leaves and re-chooses, as a live server does, one balance period after another.
    for _ in range(3):
        for peer in sorted(infos):
            if should_choose_other_blocks(peer, infos, 16, rng=rng):
                rest = {p: i for p, i in infos.items() if p != peer}
                start = choose_best_blocks(8, rest, 16)
                infos[peer] = srv(start, start + 8)
    assert block_throughputs(infos, 16) == [1.0] * 16


@pytest.mark.parametrize(("extra", "moves"), [(0.2, False), (0.3, False), (0.4, True),
                                              (1.0, True)])
def test_moves_only_if_the_bottleneck_grows_past_the_quality_threshold(extra, moves):
    # Block 0: a + c + d = 1 + 2x; block 1: b = 1. If c moves to block 1 the bottleneck
    # becomes 1 + x; quality = 1 / (1 + x) must be below 0.75 (x above 1/3) to move.
    infos = {"a": srv(0, 1, 1.0), "b": srv(1, 2, 1.0), "c": srv(0, 1, extra),
             "d": srv(0, 1, extra)}
    assert should_choose_other_blocks("c", infos, 2, rng=random.Random(0)) is moves
    # A stricter quality threshold (smaller) needs a bigger gain; above 1 forces a move.
    assert not should_choose_other_blocks("c", infos, 2, rng=random.Random(0),
                                          balance_quality=0.2)
    assert should_choose_other_blocks("c", infos, 2, rng=random.Random(0), balance_quality=1.5)


def test_absent_or_offline_local_server_does_not_move():
    infos = {"a": srv(0, 1), "b": srv(0, 2, 5.0, ServerState.OFFLINE)}
    assert not should_choose_other_blocks("zz", infos, 2, rng=random.Random(0))
    assert not should_choose_other_blocks("b", infos, 2, rng=random.Random(0))


def test_sole_holder_never_moves_even_far_from_optimal():
    """Known limitation of Petals' rule: a server that alone holds some block stays, so this
    swarm is stuck at half its optimal bottleneck (found by the exact search)."""
    throughputs, lengths, blocks = [1.0, 1.0, 2.5, 2.5], [2, 2, 4, 4], 9
    starts = [0, 2, 4, 5]
    infos = {f"s{i}": srv(s, s + n, t) for i, (s, n, t) in
             enumerate(zip(starts, lengths, throughputs))}
    assert swarm_bottleneck(infos, blocks) == 1.0
    assert optimal_bottleneck(throughputs, lengths, blocks) == 2.0
    assert not any(should_choose_other_blocks(p, infos, blocks, rng=random.Random(0))
                   for p in infos)


# -- the exact optimum ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=1, max_value=7).flatmap(lambda blocks: st.tuples(
    st.just(blocks),
    st.lists(st.tuples(st.sampled_from([0.0, 1.0, 2.0, 3.3]),
                       st.integers(min_value=1, max_value=blocks)), min_size=1, max_size=5),
)))
def test_optimal_bottleneck_equals_brute_force(instance):
    blocks, servers = instance
    throughputs = [t for t, _ in servers]
    lengths = [n for _, n in servers]
    brute = max(
        placement_bottleneck(starts, throughputs, lengths, blocks)
        for starts in itertools.product(*[range(blocks - n + 1) for n in lengths])
    )
    assert optimal_bottleneck(throughputs, lengths, blocks) == pytest.approx(brute, rel=1e-12)


def test_optimal_search_has_a_budget(monkeypatch):
    monkeypatch.setattr(placement, "OPTIMAL_MAX_NODES", 50)
    with pytest.raises(PlacementError, match="too large"):
        optimal_bottleneck([1.0, 1.3, 2.0, 2.2, 3.1, 4.0] * 2, [2, 3, 2, 4, 3, 5] * 2, 16)


def test_bad_instances_are_refused():
    with pytest.raises(PlacementError):
        optimal_bottleneck([1.0], [3], 2)
    with pytest.raises(PlacementError):
        optimal_bottleneck([float("nan")], [1], 2)
    with pytest.raises(PlacementError):
        greedy_placement([1.0, 2.0], [1], 2, random.Random(0))


# -- greedy against optimal --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=4, max_value=14).flatmap(lambda blocks: st.tuples(
    st.just(blocks),
    st.integers(min_value=1, max_value=blocks // 2),
    st.integers(min_value=1, max_value=8),
    st.sampled_from([1.0, 2.5, 6.0]),
)))
def test_identical_servers_reach_ninety_percent_of_optimal(instance):
    blocks, length, count, throughput = instance
    throughputs, lengths = [throughput] * count, [length] * count
    optimum = optimal_bottleneck(throughputs, lengths, blocks)
    starts = greedy_placement(throughputs, lengths, blocks, random.Random(0))
    reached = placement_bottleneck(starts, throughputs, lengths, blocks)
    assert reached <= optimum * (1 + 1e-12)
    assert reached >= 0.9 * optimum  # measured: always exactly optimal on this family


def test_heterogeneous_swarms_reach_ninety_percent_of_optimal_on_average():
    """Mixed GPU classes (throughput and span length from memory), 3 to 7 servers on 8 to 12
    blocks. Per instance the rule can be stuck lower (see the sole-holder test); on average
    joining plus rebalancing stays above 90% of the exact optimum."""
    rng = random.Random(2024)
    ratios, joined_only = [], []
    while len(ratios) < 25:
        blocks = rng.randint(8, 12)
        kinds = [rng.choice([(1.0, 2), (2.5, 4), (6.0, 6)]) for _ in range(rng.randint(3, 7))]
        throughputs = [t * rng.uniform(0.8, 1.2) for t, _ in kinds]
        lengths = [n for _, n in kinds]
        optimum = optimal_bottleneck(throughputs, lengths, blocks)
        if optimum == 0:
            continue
        for rounds, out in ((0, joined_only), (4, ratios)):
            starts = greedy_placement(throughputs, lengths, blocks, random.Random(len(ratios)),
                                      rebalance_rounds=rounds)
            reached = placement_bottleneck(starts, throughputs, lengths, blocks)
            assert reached <= optimum * (1 + 1e-12)
            out.append(reached / optimum)
    assert statistics.mean(ratios) >= 0.9
    assert statistics.mean(ratios) >= statistics.mean(joined_only)
