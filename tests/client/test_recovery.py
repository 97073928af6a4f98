"""Fault-recovery decisions: bans with backoff, retry delays within a deadline, route splicing,
and the whole decision loop of a client losing a server, run on a virtual clock."""

from __future__ import annotations

import random

import pytest

from blocks.announcement import ServerInfo, ServerState, SwarmView
from client.recovery import (
    BAN_BASE,
    BAN_MAX,
    BAN_STREAK_MEMORY,
    RETRY_MAX_BACKOFF,
    BanList,
    PassDeadline,
    RetryPolicy,
    splice_route,
)
from client.routing import MissingBlocksError, RoutePlanner, RouteSpan


def test_bans_double_on_repeated_failures_up_to_a_cap():
    bans = BanList()
    now, durations = 0.0, []
    for _ in range(8):
        until = bans.ban("p", now)
        durations.append(until - now)
        assert bans.is_banned("p", until - 1e-6)
        assert not bans.is_banned("p", until)
        now = until + 1.0
    assert durations == [15.0, 30.0, 60.0, 120.0, 240.0, 300.0, 300.0, 300.0]
    assert durations[0] == BAN_BASE and durations[-1] == BAN_MAX


def test_a_success_resets_the_streak():
    bans = BanList()
    bans.ban("p", 0.0)
    bans.ban("p", 20.0)  # 30 s
    bans.success("p")
    assert not bans.is_banned("p", 21.0)
    assert bans.ban("p", 21.0) == 21.0 + BAN_BASE


def test_failures_during_a_ban_are_one_incident():
    bans = BanList()
    first = bans.ban("p", 0.0)
    assert bans.ban("p", 1.0) == first  # in-flight requests failing too: no escalation
    assert bans.ban("p", first + 1) == first + 1 + 2 * BAN_BASE


def test_banned_set_and_next_unban():
    bans = BanList()
    bans.ban("a", 0.0)
    bans.ban("b", 5.0)
    assert bans.banned(1.0) == {"a"} | {"b"}
    assert bans.next_unban(1.0) == 15.0
    assert bans.banned(16.0) == {"b"}
    assert bans.next_unban(16.0) == 20.0
    assert bans.banned(20.0) == frozenset() and bans.next_unban(20.0) is None


def test_old_streaks_are_forgotten_so_the_list_stays_bounded():
    bans = BanList()
    for i in range(100):
        bans.ban(f"p{i}", 0.0)
    later = BAN_BASE + BAN_STREAK_MEMORY + 1
    assert bans.ban("p0", later) == later + BAN_BASE  # streak forgotten: base ban again
    assert len(bans) == 1


def test_retry_delays_grow_with_jitter_and_respect_the_deadline():
    policy = RetryPolicy(random.Random(7))
    assert policy.next_delay(0, 0.0, 100.0) == 0.0
    for attempt in range(1, 12):
        nominal = min(2.0 ** (attempt - 1), RETRY_MAX_BACKOFF)
        delays = [policy.next_delay(attempt, 0.0, 1e6) for _ in range(200)]
        assert all(nominal / 2 <= d <= nominal for d in delays)
        assert max(delays) - min(delays) > nominal * 0.3  # really jittered
    assert policy.next_delay(20, 95.0, 100.0) == 5.0  # never past the deadline
    assert policy.next_delay(3, 100.0, 100.0) is None
    assert policy.next_delay(3, 101.0, 100.0) is None
    assert policy.next_delay(8, 0.0, 100.0, wake_at=2.5) == 2.5  # a ban lifts sooner
    with pytest.raises(ValueError):
        policy.next_delay(-1, 0.0, 1.0)


def test_retry_policy_is_reproducible_with_a_seed():
    a = [RetryPolicy(random.Random(3)).next_delay(k, 0.0, 1e9) for k in range(10)]
    b = [RetryPolicy(random.Random(3)).next_delay(k, 0.0, 1e9) for k in range(10)]
    assert a == b


def test_splice_route():
    route = [RouteSpan("a", 0, 3), RouteSpan("b", 3, 8), RouteSpan("c", 8, 10)]
    new = splice_route(route, 1, [RouteSpan("d", 3, 5), RouteSpan("e", 5, 8)])
    assert [s.peer_id for s in new] == ["a", "d", "e", "c"]
    with pytest.raises(ValueError):
        splice_route(route, 1, [RouteSpan("d", 3, 5)])  # leaves 5-8 out
    with pytest.raises(ValueError):
        splice_route(route, 1, [RouteSpan("d", 3, 5), RouteSpan("e", 6, 8)])  # a gap
    with pytest.raises(ValueError):
        splice_route(route, 1, [])
    with pytest.raises(IndexError):
        splice_route(route, 3, [])


def test_client_loses_a_server_and_recovers_within_its_deadline():
    """The decision loop a client runs, on a virtual clock: fail, ban, re-route exactly the
    failed range, splice; when nothing is left, wait and retry until the deadline."""
    servers = {
        "head": ServerInfo(ServerState.ONLINE, 0, 4, 1.0, inference_rps=500.0),
        "mid": ServerInfo(ServerState.ONLINE, 4, 8, 1.0, inference_rps=500.0),
        "mid2": ServerInfo(ServerState.ONLINE, 4, 6, 1.0, inference_rps=100.0),
        "mid3": ServerInfo(ServerState.ONLINE, 6, 8, 1.0, inference_rps=100.0),
        "tail": ServerInfo(ServerState.ONLINE, 8, 12, 1.0, inference_rps=500.0),
    }
    planner = RoutePlanner(SwarmView.from_servers(12, servers))
    bans, retry = BanList(), RetryPolicy(random.Random(0))
    route = planner.inference_route(0, 12)
    assert [s.peer_id for s in route] == ["head", "mid", "tail"]

    # "mid" dies at t=10: ban it, re-route exactly its blocks, splice.
    now = 10.0
    bans.ban("mid", now)
    failed = route[1]
    patch = planner.inference_route(failed.start, failed.end, banned=bans.banned(now))
    route = splice_route(route, 1, patch)
    assert [s.peer_id for s in route] == ["head", "mid2", "mid3", "tail"]

    # "mid3" dies too: blocks 6-7 have nobody left; wait and retry within a 60 s deadline.
    now = 11.0
    bans.ban("mid3", now)
    deadline, attempt, patch = now + 60.0, 0, None
    while patch is None:
        try:
            patch = planner.inference_route(6, 8, banned=bans.banned(now))
        except MissingBlocksError as err:
            assert err.missing == [6, 7]
            delay = retry.next_delay(attempt, now, deadline, wake_at=bans.next_unban(now))
            assert delay is not None, "the first ban lifts at t=25, well before the deadline"
            now += delay
            attempt += 1
    # The earliest moment a server for blocks 6-7 could be used again is when a ban lifts.
    assert 25.0 <= now <= 26.0
    assert [s.peer_id for s in patch] == ["mid"]  # banned first, so its ban lifted first

    # With a deadline shorter than any ban, the client gives up and names the blocks.
    bans2, now, deadline, attempt = BanList(), 0.0, 5.0, 0
    for peer in ("mid", "mid3"):
        bans2.ban(peer, now)
    with pytest.raises(MissingBlocksError) as err:
        while True:
            try:
                planner.inference_route(6, 8, banned=bans2.banned(now))
                break
            except MissingBlocksError:
                delay = retry.next_delay(attempt, now, deadline, wake_at=bans2.next_unban(now))
                if delay is None:
                    raise
                now += delay
                attempt += 1
    assert err.value.missing == [6, 7]
    assert now == deadline


def test_a_pass_deadline_starts_at_the_first_failure_and_is_shared():
    recovery = PassDeadline(timeout=10.0)
    assert recovery.deadline is None
    assert recovery.failed(100.0) == 110.0  # the first failure always gets an attempt
    assert recovery.failed(105.0) == 110.0  # later ones: the same deadline, not 115
    assert recovery.deadline == 110.0
    assert recovery.failed(110.0) is None  # passed: give up
    late = PassDeadline(timeout=10.0)
    assert late.failed(500.0) == 510.0
