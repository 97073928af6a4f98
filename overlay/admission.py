"""Which connection a host at its connection limit closes to admit a newcomer (pure logic).

A host holds at most `max_connections` connections. Refusing every newcomer at the limit lets
whoever holds the connections lock everyone else out, so a newcomer closes one, chosen by
these rules, in order (the first that finds a connection wins):

1. The oldest inbound connection still in its handshake: it serves nobody yet.
2. The oldest unused connection: no stream open, or only streams the peer opened that have not
   brought their request header (those serve nothing either, and a peer that keeps one such
   stream open on each of its connections, a fresh one before the request header timeout
   resets the last, held them all busy for good).
3. The newest connection of the address group that holds the most connections, if it holds
   at least two more than the newcomer's group (so that closing it spreads the connections
   more evenly, never just the other way round): a peer that keeps real requests going on
   each of its connections can hold the host's connections only from as many address groups.
   Otherwise the newcomer is refused.

Why not a fixed limit of connections per address: the nodes of a local swarm (tests, the
demo, benchmarks with a hundred DHT nodes) all come from 127.0.0.1, and an operator's own
machines may share an address behind NAT; rule 3 only ever applies at the limit, and only
takes from the most represented group. An address group is one IPv4 address or one IPv6 /64
(what one subscriber typically holds: counting IPv6 addresses one by one would give an
attacker 2^64 groups).

Candidates are the host's connections, oldest first: objects with the attributes
`inbound_handshaking`, `unused` and `address_group` (overlay/connection.py has them).
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Sequence

IPV6_GROUP_PREFIX = 64


def _socket_ip(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a socket address (host, port, ...), its zone dropped and an IPv4-mapped
    IPv6 address as its IPv4 one; None when unknown."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%", 1)[0])
    except ValueError:
        return None
    return getattr(ip, "ipv4_mapped", None) or ip  # a dual-stack socket's IPv4 peer


def address_group(address) -> str | None:
    """The group of a socket address (host, port, ...): the IPv4 address, or the /64 of an
    IPv6 one (an IPv4-mapped IPv6 address counts as its IPv4 address); None when unknown."""
    ip = _socket_ip(address)
    if ip is None:
        return None
    if ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_GROUP_PREFIX}", strict=False))
    return str(ip)


def choose_victim(connections: Sequence, newcomer_group: str | None):
    """The connection to close so that a newcomer from `newcomer_group` fits (rules of the
    module docstring), or None: then the newcomer is refused."""
    for conn in connections:
        if conn.inbound_handshaking:
            return conn
    for conn in connections:
        if conn.unused:
            return conn
    counts = Counter(conn.address_group for conn in connections)
    counts.pop(None, None)  # (addresses unknown: not a group)
    if not counts:
        return None
    group, most = counts.most_common(1)[0]
    if most < counts.get(newcomer_group, 0) + 2:
        return None
    return next(conn for conn in reversed(connections) if conn.address_group == group)


# Inbound handshakes per address group (ours): answering a Noise message 1 costs the
# responder ~200 us of X25519 work while the dialer spends none, so one address could keep a
# core busy with a few thousand empty handshakes a second. An honest peer opens one
# connection to us and redials only after losing it: a burst of 64 and 16 a second are far
# above that, and an address group over them is refused before any cryptography.
HANDSHAKE_BURST = 64
HANDSHAKE_RATE = 16.0  # handshakes per second, refilled continuously
MAX_HANDSHAKE_GROUPS = 4096  # buckets kept at once (see HandshakeLimiter)
# An IPv6 /64 is cheap to change (a site typically holds a /48, an ISP a /32: 65,536 and
# 2^32 of them), so its handshakes are also charged to the /48 and the /32 that hold it,
# whose buckets are this many times larger and faster (room for many honest subscribers).
IPV6_WIDER_GROUPS = ((48, 4), (32, 16))
# The bucket that groups share while every kept bucket is in use (HandshakeLimiter): as
# large and fast as a /32's.
OVERFLOW_SCALE = 16


def is_loopback(address) -> bool:
    """Whether socket address `address` (host, port, ...) is this machine (127.0.0.0/8, ::1,
    also IPv4-mapped): local swarms (tests, the demo, benchmarks of a hundred nodes) start
    every node from there at once."""
    ip = _socket_ip(address)
    return ip is not None and ip.is_loopback


def charged_groups(group: str | None) -> list[tuple[str | None, int]]:
    """The buckets a handshake from `group` (what address_group returns) is charged to, each
    with its scale: the group itself, and for an IPv6 /64 the wider groups holding it."""
    if group is None or "/" not in group:
        return [(group, 1)]
    network = ipaddress.ip_network(group)
    return [(group, 1)] + [(str(network.supernet(new_prefix=prefix)), scale)
                           for prefix, scale in IPV6_WIDER_GROUPS]


class HandshakeLimiter:
    """Token buckets for inbound handshakes per address group (pure: `now` passed in).

    A handshake takes a token from each bucket charged_groups names, or is refused (taking
    none) when one of them is empty. At most `max_groups` buckets are kept, the least
    recently seen first in line: a newcomer's bucket replaces that one only if it has
    refilled (it holds nothing to remember; the check is O(1)); otherwise every bucket
    kept is in use, and the newcomer is charged to one overflow bucket that such groups
    share. Evicting regardless gave each address group past the table's size a fresh
    bucket, so cycling 4,097 IPv6 /64s (one /48 holds 65,536) meant no limit at all."""

    def __init__(self, burst: int = HANDSHAKE_BURST, rate: float = HANDSHAKE_RATE,
                 max_groups: int = MAX_HANDSHAKE_GROUPS):
        if burst < 1 or rate <= 0:
            raise ValueError(f"burst must be >= 1 and rate > 0, not {burst}, {rate}")
        self.burst = burst
        self.rate = rate
        self.max_groups = max_groups
        # group -> [tokens, as of, scale], the least recently seen first
        self._buckets: OrderedDict[str | None, list[float]] = OrderedDict()
        self._overflow = [float(burst * OVERFLOW_SCALE), 0.0, float(OVERFLOW_SCALE)]

    def admit(self, group: str | None, now: float) -> bool:
        """Whether a handshake from `group` may start now (it takes a token of each of its
        buckets if so)."""
        buckets = []
        for key, scale in charged_groups(group):
            bucket = self._bucket(key, scale, now)
            if all(bucket is not other for other in buckets):  # (the overflow: once)
                buckets.append(bucket)
        if any(bucket[0] < 1.0 for bucket in buckets):
            return False
        for bucket in buckets:
            bucket[0] -= 1.0
        return True

    def _bucket(self, key: str | None, scale: int, now: float) -> list[float]:
        """The bucket of `key`, refilled to `now`: its own, a new one, or the overflow."""
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is not None:
            buckets.move_to_end(key)
        elif len(buckets) >= self.max_groups and not self._evict_refilled(now):
            bucket = self._overflow  # every kept bucket is in use
        else:
            bucket = buckets[key] = [float(self.burst * scale), now, float(scale)]
            return bucket
        bucket[0] = self._refilled(bucket, now)
        bucket[1] = now
        return bucket

    def _evict_refilled(self, now: float) -> bool:
        """Drop the least recently seen bucket if it has refilled (it remembers nothing)."""
        oldest = next(iter(self._buckets.values()))
        if self._refilled(oldest, now) < self.burst * oldest[2]:
            return False
        self._buckets.popitem(last=False)
        return True

    def _refilled(self, bucket: list[float], now: float) -> float:
        tokens, since, scale = bucket
        return min(self.burst * scale, tokens + max(0.0, now - since) * self.rate * scale)
