"""A client's connection to a swarm: a Host, a DHT client, and what it has measured.

`SwarmClient.view(model_id, num_blocks)` reads every block's announcements from the DHT and
builds the pure `SwarmView` that route choice works on; server addresses go to the host's
address book so routes can be dialled by peer id. Round-trip times to servers are measured
with the multiplexer's PING and cached for a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable

from blocks.announcement import SwarmView
from blocks.swarm_reader import DICTIONARY_QUORUM, read_view
from overlay.dht.config import DHTConfig
from overlay.dht.driver import DHT
from overlay.host import Host
from overlay.identity import Identity, IdentityError, PeerId

log = logging.getLogger(__name__)

RTT_TTL = 60.0  # seconds a measured round-trip time is trusted
PING_TIMEOUT = 5.0
# Seconds a peer that did not answer a ping stays "unreachable" (RTT inf) before it is pinged
# again: a vanished server stays announced until its records expire, and without this every
# session opened meanwhile waited PING_TIMEOUT for it. Petals avoids a peer that failed for
# `ClientConfig(ban_timeout=15)` seconds; the same here.
UNREACHABLE_TTL = 15.0
MAX_KNOWN_RTTS = 4096  # entries kept; expired ones are dropped beyond this
# DICTIONARY_QUORUM (blocks/swarm_reader.py): a view merges every DHT replica of a record.


class SwarmClient:
    def __init__(self, host: Host, dht: DHT, owns_host: bool = True):
        self.host = host
        self.dht = dht
        self._owns_host = owns_host
        self._rtts: dict[str, tuple[float, float]] = {}  # peer -> (rtt, measured at)

    @classmethod
    async def connect(cls, bootstrap: Iterable[str], identity: Identity | None = None,
                      host: Host | None = None) -> SwarmClient:
        """Join as a DHT client (not a DHT server: one-shot clients stay out of routing
        tables)."""
        owns = host is None
        host = host or Host(identity)
        try:
            dht = await DHT.start(host, list(bootstrap), DHTConfig(value_quorum=DICTIONARY_QUORUM),
                                  serve=False)
        except BaseException:
            if owns:
                await host.close()
            raise
        return cls(host, dht, owns_host=owns)

    async def view(self, model_id: str, num_blocks: int) -> SwarmView:
        view = await read_view(self.dht, model_id, num_blocks)
        for peer, info in view.servers.items():
            with contextlib.suppress(IdentityError, ValueError):
                self.host.add_peer_addrs(PeerId.from_string(peer), info.addrs)
        return view

    async def rtts(self, peers: Iterable[str]) -> dict[str, float]:
        """Round-trip seconds to each peer (measured now unless known recently); a peer that
        did not answer is math.inf (route choice penalises it) for UNREACHABLE_TTL seconds."""
        now = time.monotonic()
        peers = list(peers)
        stale = [p for p in peers if self._stale(p, now)]
        if stale:
            measured = await asyncio.gather(*(self._ping(p) for p in stale))
            for peer, rtt in zip(stale, measured):
                self._rtts[peer] = (math.inf if rtt is None else rtt, now)
            if len(self._rtts) > MAX_KNOWN_RTTS:  # servers that came and went
                for peer in [p for p in self._rtts if self._stale(p, now)]:
                    del self._rtts[peer]
        return {p: self._rtts[p][0] for p in peers if p in self._rtts}

    def _stale(self, peer: str, now: float) -> bool:
        known = self._rtts.get(peer)
        if known is None:
            return True
        rtt, at = known
        return now - at > (UNREACHABLE_TTL if rtt == math.inf else RTT_TTL)

    async def _ping(self, peer_text: str) -> float | None:
        return await self.host.round_trip(peer_text, PING_TIMEOUT)

    def forget_rtt(self, peer: str) -> None:
        self._rtts.pop(peer, None)

    async def close(self) -> None:
        await self.dht.close()
        if self._owns_host:
            await self.host.close()
