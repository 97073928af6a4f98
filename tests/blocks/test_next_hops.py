"""What a server pings for its `next_pings`, and how it keeps the results (pure)."""

from __future__ import annotations

import math
import random

import pytest

from blocks.announcement import MAX_NEXT_PINGS, ServerInfo, ServerState
from blocks.next_hops import (
    MAX_ANNOUNCED,
    MAX_PINGED,
    PING_EMA_ALPHA,
    NextPingTable,
    choose_targets,
    next_hop_candidates,
)


def info(start: int, end: int, state=ServerState.ONLINE) -> ServerInfo:
    return ServerInfo(state, start, end, 1.0)


def test_candidates_are_the_other_live_servers_of_the_next_block():
    entry = {"me": info(0, 6), "a": info(4, 8), "b": info(2, 5),
             "gone": info(4, 8, ServerState.OFFLINE), "joining": info(4, 6, ServerState.JOINING),
             "stale": info(0, 4)}  # a record whose span does not contain block 4
    assert next_hop_candidates("me", 4, entry) == ["a", "b", "joining"]


def test_at_most_max_pinged_targets_and_all_of_them_over_rounds():
    candidates = [f"p{i}" for i in range(12)]
    rng = random.Random(1)
    seen = set()
    for _ in range(30):
        targets = choose_targets(candidates, rng)
        assert len(targets) == MAX_PINGED == len(set(targets))
        seen |= set(targets)
    assert seen == set(candidates)
    assert choose_targets(candidates[:3], rng) == candidates[:3]


def test_measurements_are_smoothed_and_unreachable_is_inf():
    table = NextPingTable()
    table.record("a", 0.1, now=0.0)
    table.record("a", 0.2, now=1.0)
    assert table.snapshot(1.0)["a"] == pytest.approx(PING_EMA_ALPHA * 0.2 +
                                                     (1 - PING_EMA_ALPHA) * 0.1)
    table.record("a", None, now=2.0)
    assert table.snapshot(2.0)["a"] == math.inf
    table.record("a", 0.05, now=3.0)  # back: a fresh value, not averaged with inf
    assert table.snapshot(3.0)["a"] == 0.05
    with pytest.raises(ValueError):
        table.record("a", math.nan, now=4.0)


def test_the_table_stays_small_and_forgets():
    table = NextPingTable(expiration=10.0)
    for i in range(100):
        table.record(f"p{i}", 0.01, now=float(i))
    snap = table.snapshot(99.0)
    assert len(snap) <= MAX_ANNOUNCED <= MAX_NEXT_PINGS
    assert set(snap) == {f"p{i}" for i in range(89, 100)}  # older than 10 s: gone
    table.keep_only(["p95"])
    assert list(table.snapshot(99.0)) == ["p95"]
    # what is announced always passes the announcement's own validation
    ServerInfo(ServerState.ONLINE, 0, 1, 1.0, next_pings=snap)
