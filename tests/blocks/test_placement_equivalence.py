"""The faster rebalancing code decides exactly as the plain loops did (placement_reference.py):
the same answer, the same random draws (or none, when the capacity bound answers alone), on
many random swarms and throughput arrays, including the shapes the rules meet in practice
(servers of a few hardware classes stacked on aligned windows: piecewise-constant
throughputs, many identical spans)."""

from __future__ import annotations

import random

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from blocks import placement
from blocks.announcement import ServerInfo, ServerState
from tests.blocks import placement_reference as reference

_STATES = (ServerState.ONLINE, ServerState.ONLINE, ServerState.JOINING, ServerState.OFFLINE)


@st.composite
def swarms(draw):
    num_blocks = draw(st.integers(1, 40))
    classes = draw(st.lists(
        st.tuples(st.integers(1, num_blocks),
                  st.sampled_from([0.0, 1.0, 2.5, 3.0, 7.25, 1e-4, 0.1, 1e6])),
        min_size=1, max_size=4))
    align = draw(st.sampled_from([1, 2, 4]))
    count = draw(st.integers(0, 40))
    infos = {}
    for i in range(count):
        length, throughput = draw(st.sampled_from(classes))
        if draw(st.booleans()):
            throughput = draw(st.floats(0.0, 100.0, allow_nan=False))
        last = num_blocks - length
        start = min(last, draw(st.integers(0, last)) // align * align)
        state = draw(st.sampled_from(_STATES))
        infos[f"s{i:03d}"] = ServerInfo(state, start, start + length, throughput)
    local = draw(st.sampled_from([*sorted(infos), "absent"]))
    quality = draw(st.sampled_from([0.75, 0.75, 0.9, 1.0, 0.5, 0.0, 2.0]))
    seed = draw(st.integers(0, 2**32))
    return num_blocks, infos, local, quality, seed


@settings(max_examples=400, deadline=None)
@given(swarms())
def test_rebalancing_decides_as_the_plain_loops(swarm):
    num_blocks, infos, local, quality, seed = swarm
    ours, theirs = random.Random(seed), random.Random(seed)
    got = placement.should_choose_other_blocks(local, infos, num_blocks, rng=ours,
                                               balance_quality=quality)
    want = reference.should_choose_other_blocks(local, infos, num_blocks, rng=theirs,
                                                balance_quality=quality)
    assert got == want
    # The same draws, or none at all when the capacity bound settled the answer (False)
    # without simulating the others' response.
    if ours.getstate() != theirs.getstate():
        assert ours.getstate() == random.Random(seed).getstate() and not got


@settings(max_examples=300, deadline=None)
@given(swarms())
def test_capacity_shortcut_only_skips_checks_that_cannot_move(swarm):
    """Whenever the cheap capacity test says "no move", the full simulation says so too,
    on random swarms (an answer it gives is the simulation's own). Above 1 the quality means
    "always move" and the shortcut is never asked (should_choose_other_blocks answers first)."""
    num_blocks, infos, local, quality, seed = swarm
    assume(quality <= 1.0)
    threshold = quality - placement.STAY_BIAS
    if placement._near_capacity(infos, num_blocks, threshold):
        assert not reference.should_choose_other_blocks(
            local, infos, num_blocks, rng=random.Random(seed), balance_quality=quality)


def test_capacity_shortcut_fires_on_a_balanced_swarm_and_not_on_a_lopsided_one():
    balanced = {f"s{i}": ServerInfo(ServerState.ONLINE, 4 * (i % 2), 4 * (i % 2) + 4, 1.0)
                for i in range(4)}
    assert placement._near_capacity(balanced, 8, 0.75 - placement.STAY_BIAS)
    lopsided = {"a": ServerInfo(ServerState.ONLINE, 0, 4, 1.0),
                "b": ServerInfo(ServerState.ONLINE, 0, 8, 1.0),
                "c": ServerInfo(ServerState.ONLINE, 0, 4, 1.0)}
    assert not placement._near_capacity(lopsided, 8, 0.75 - placement.STAY_BIAS)
    assert placement.should_choose_other_blocks("c", lopsided, 8, rng=random.Random(0))


def test_settle_ends_in_the_same_placement_on_large_random_swarms():
    """The settle loop itself (the costly part) on swarms of the simulator's size: the same
    final spans and numbers, and the same draws."""
    rng = random.Random(7)
    for trial in range(12):
        num_blocks = 80
        spans = {}
        for i in range(rng.choice([30, 120, 300])):
            length, own = rng.choice([(40, 600.0), (12, 500.0), (12, 500.0), (8, 187.5)])
            start = rng.randrange(0, num_blocks - length + 1) // 4 * 4
            spans[f"p{i:04d}"] = (start, length, own)
        ours, theirs = dict(spans), dict(spans)
        t_ours = placement._throughputs_of(ours, num_blocks)
        t_theirs = reference._throughputs_of(theirs, num_blocks)
        assert t_ours == t_theirs
        r_ours, r_theirs = random.Random(trial), random.Random(trial)
        placement._settle(ours, t_ours, r_ours)
        reference._settle(theirs, t_theirs, r_theirs)
        assert ours == theirs and t_ours == t_theirs
        assert r_ours.getstate() == r_theirs.getstate()


plateaus = st.lists(
    st.tuples(st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.5, 3.0, 1e-300, float("inf")]),
              st.integers(1, 6)),
    min_size=1, max_size=25,
).map(lambda runs: [value for value, times in runs for _ in range(times)])


@settings(max_examples=600, deadline=None)
@given(st.one_of(plateaus, st.lists(st.floats(allow_nan=True), min_size=1, max_size=60)),
       st.data())
def test_best_start_equals_the_sliding_window(throughputs, data):
    length = data.draw(st.integers(1, len(throughputs)))

    def outcome(best_start):  # NaNs (never announced: ServerInfo refuses them) may raise
        try:
            return best_start(throughputs, length)
        except IndexError:
            return IndexError

    assert outcome(placement.best_start) == outcome(reference.best_start)


@settings(max_examples=200, deadline=None)
@given(swarms())
def test_block_throughputs_are_bit_identical(swarm):
    num_blocks, infos, *_ = swarm
    spans = reference._spans(infos, num_blocks)
    assert placement.block_throughputs(infos, num_blocks) == reference._throughputs_of(
        spans, num_blocks)
