"""The `next_pings` a block server announces: round-trip times to the servers a client may
chain right after it, i.e. those serving the block just past its span (client/routing.py
reads them to cost a server -> server hop).

What to ping (`choose_targets`) and how to keep the results (`NextPingTable`) are pure, so
the simulator can use the same rules; blocks/next_hop_pinger.py does the pinging. The table
never holds more than `max_peers` entries, far under the announcement's MAX_NEXT_PINGS, so a
record stays small whatever the swarm looks like.

Pure: no torch, no asyncio, no I/O, no clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from blocks.announcement import MAX_NEXT_PINGS, ServerInfo, ServerState

# Petals `ModuleAnnouncerThread(max_pinged=5)`: servers pinged per round.
MAX_PINGED = 5
# Petals `PingAggregator(ema_alpha=0.2, expiration=300)`: smoothing of repeated measurements
# and how long one is kept without a fresh one.
PING_EMA_ALPHA = 0.2
PING_EXPIRATION = 300.0
# Ours: entries announced at most (a few rounds of MAX_PINGED; well under MAX_NEXT_PINGS).
MAX_ANNOUNCED = 16
assert MAX_ANNOUNCED <= MAX_NEXT_PINGS


def next_hop_candidates(me: str, end: int, block_servers: Mapping[str, ServerInfo]) -> list[str]:
    """Servers (other than `me`) that are online or joining and whose span contains block
    `end` (the one after ours), sorted; `block_servers` is that block's DHT entry."""
    return sorted(peer for peer, info in block_servers.items()
                  if peer != me and info.state != ServerState.OFFLINE
                  and info.start <= end < info.end)


def choose_targets(candidates: list[str], rng: random.Random,
                   limit: int = MAX_PINGED) -> list[str]:
    """Up to `limit` of the candidates, drawn at random (Petals `sample_up_to`), so that over
    a few rounds every next server gets measured even when there are many."""
    if len(candidates) <= limit:
        return list(candidates)
    return rng.sample(candidates, limit)


@dataclass(slots=True)
class _Entry:
    rtt: float
    measured: float


class NextPingTable:
    """Smoothed round-trip seconds per peer; `math.inf` = tried and unreachable."""

    __slots__ = ("_entries", "alpha", "expiration", "max_peers")

    def __init__(self, alpha: float = PING_EMA_ALPHA, expiration: float = PING_EXPIRATION,
                 max_peers: int = MAX_ANNOUNCED):
        self.alpha = alpha
        self.expiration = expiration
        self.max_peers = max_peers
        self._entries: dict[str, _Entry] = {}

    def record(self, peer: str, rtt: float | None, now: float) -> None:
        """A measurement: seconds, or None when the peer did not answer."""
        value = math.inf if rtt is None else float(rtt)
        if not value >= 0:
            raise ValueError(f"a round-trip time is >= 0, got {rtt}")
        held = self._entries.get(peer)
        if held is not None and math.isfinite(held.rtt) and math.isfinite(value):
            value = self.alpha * value + (1 - self.alpha) * held.rtt
        self._entries[peer] = _Entry(value, now)
        if len(self._entries) > self.max_peers:  # drop the oldest measurement
            oldest = min(self._entries, key=lambda p: self._entries[p].measured)
            del self._entries[oldest]

    def keep_only(self, peers: Iterable[str]) -> None:
        """Forget peers that no longer serve the next block."""
        wanted = set(peers)
        for peer in [p for p in self._entries if p not in wanted]:
            del self._entries[peer]

    def snapshot(self, now: float) -> dict[str, float]:
        """What to announce: every measurement younger than `expiration`."""
        horizon = now - self.expiration
        for peer in [p for p, e in self._entries.items() if e.measured < horizon]:
            del self._entries[peer]
        return {peer: entry.rtt for peer, entry in self._entries.items()}
