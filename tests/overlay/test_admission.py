"""Which connection a host at its limit closes for a newcomer (overlay/admission.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from overlay.admission import (
    HandshakeLimiter,
    address_group,
    charged_groups,
    choose_victim,
    is_loopback,
)


@dataclass
class Conn:
    address_group: str | None
    unused: bool = False
    inbound_handshaking: bool = False


def test_a_handshaking_connection_goes_first_then_an_unused_one():
    busy, unused, shaking = Conn("10.0.0.1"), Conn("10.0.0.2", unused=True), Conn("10.0.0.3")
    shaking.inbound_handshaking = True
    assert choose_victim([busy, unused, shaking], "10.0.0.9") is shaking
    assert choose_victim([busy, unused], "10.0.0.9") is unused
    later_unused = Conn("10.0.0.4", unused=True)
    assert choose_victim([busy, unused, later_unused], None) is unused  # the oldest


def test_busy_connections_give_way_only_from_the_most_represented_group():
    honest = [Conn(f"10.0.1.{i}") for i in range(4)]
    hog = [Conn("10.0.0.66") for _ in range(4)]
    conns = [*hog[:2], *honest, *hog[2:]]
    assert choose_victim(conns, "10.0.0.9") is hog[-1]  # the newest of the hog's
    assert choose_victim(conns, "10.0.0.66") is None  # the hog only competes with itself
    assert choose_victim(conns, "10.0.1.0") is hog[-1]  # 4 > 1 + 1
    assert choose_victim(honest, "10.0.0.9") is None  # one each: nobody is over
    two = [Conn("a"), Conn("a"), Conn("b")]
    assert choose_victim(two, "b") is None  # 2 vs 1: closing would only swap them
    assert choose_victim(two, "c") is two[1]


def test_unknown_addresses_are_no_group():
    conns = [Conn(None), Conn(None), Conn(None)]
    assert choose_victim(conns, "10.0.0.1") is None
    assert choose_victim([], "10.0.0.1") is None


@pytest.mark.parametrize(("address", "group"), [
    (("203.0.113.7", 4001), "203.0.113.7"),
    (("2001:db8:1:2:aaaa::1", 4001, 0, 0), "2001:db8:1:2::/64"),
    (("2001:db8:1:2:bbbb::9%eth0", 4001, 0, 3), "2001:db8:1:2::/64"),
    (("::ffff:198.51.100.4", 4001, 0, 0), "198.51.100.4"),
    (("not an address", 1), None),
    (None, None),
])
def test_address_groups(address, group):
    assert address_group(address) == group


def test_handshakes_per_group_are_a_burst_then_a_steady_rate():
    limiter = HandshakeLimiter(burst=5, rate=2.0)
    assert [limiter.admit("10.0.0.1", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.admit("10.0.0.2", 0.0)  # other groups have buckets of their own
    assert not limiter.admit("10.0.0.1", 0.4)  # 0.8 of a token refilled
    assert limiter.admit("10.0.0.1", 0.5) and not limiter.admit("10.0.0.1", 0.5)
    assert sum(limiter.admit("10.0.0.1", 100.0) for _ in range(9)) == 5  # never above burst


def test_handshake_buckets_stay_bounded_and_forget_the_least_recently_seen_once_refilled():
    limiter = HandshakeLimiter(burst=2, rate=0.001, max_groups=3)
    for _ in range(2):
        assert limiter.admit("a", 0.0)
    assert limiter.admit("b", 1.0) and limiter.admit("c", 2.0)
    assert not limiter.admit("a", 3.0)  # a is empty, and now the most recently seen
    assert limiter.admit("d", 4.0)  # b has not refilled: d is charged to the overflow
    assert list(limiter._buckets) == ["b", "c", "a"]
    assert limiter.admit("d", 2000.0)  # b has refilled (nothing to remember): it goes
    assert list(limiter._buckets) == ["c", "a", "d"]
    assert limiter.admit("a", 2001.0)


def test_cycling_more_address_groups_than_the_table_holds_gives_no_fresh_buckets():
    limiter = HandshakeLimiter(burst=2, rate=1.0, max_groups=4)
    addrs = [f"10.0.{i // 256}.{i % 256}" for i in range(1000)]
    admitted = sum(limiter.admit(a, 0.0) for _ in range(3) for a in addrs)
    # four groups' bursts, then one overflow bucket (16 bursts) for all the others; the
    # table was evicting the least recently seen, so each group got a fresh burst: 2,000
    assert admitted == 4 * 2 + 16 * 2
    assert not limiter.admit("10.9.9.9", 0.0)  # an honest newcomer waits for room
    assert limiter.admit("10.9.9.9", 2.0)  # the table's buckets have refilled by then


def test_ipv6_handshakes_are_charged_to_the_48_and_32_as_well():
    assert charged_groups("2001:db8:1:2::/64") == [
        ("2001:db8:1:2::/64", 1), ("2001:db8:1::/48", 4), ("2001:db8::/32", 16)]
    assert charged_groups("203.0.113.7") == [("203.0.113.7", 1)]
    assert charged_groups(None) == [(None, 1)]
    limiter = HandshakeLimiter(burst=2, rate=1.0)
    one_48 = [address_group((f"2001:db8:1:{i:x}::1", 1, 0, 0)) for i in range(5000)]
    assert sum(limiter.admit(g, 0.0) for g in one_48) == 4 * 2  # the /48's bucket
    one_32 = [address_group((f"2001:db8:{i:x}:1::1", 1, 0, 0)) for i in range(2, 5000)]
    assert sum(limiter.admit(g, 0.0) for g in one_32) == 16 * 2 - 4 * 2  # the /32's
    assert not limiter.admit("2001:db8:1:ffff::/64", 0.0)  # a refusal takes no token...
    assert limiter.admit("2001:db9:1:2::/64", 0.0)  # ...and other /32s have their own
    assert sum(limiter.admit(g, 1.0) for g in one_48) == 4  # the /48 refills 4 a second


@pytest.mark.parametrize("address, loopback", [
    (("127.0.0.1", 4001), True), (("127.5.0.1", 1), True), (("::1", 1, 0, 0), True),
    (("::ffff:127.0.0.1", 1, 0, 0), True), (("::2", 1, 0, 0), False),
    (("10.0.0.1", 1), False), (None, False), (("garbage", 1), False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback
