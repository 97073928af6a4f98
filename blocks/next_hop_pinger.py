"""Measures a block server's `next_pings` (blocks/next_hops.py) on the overlay: every period
it reads the DHT entry of the block after its span, pings up to MAX_PINGED of the servers
found there with the multiplexer's PING, and keeps the smoothed results for the Announcer.
It also tells the server's PushService where all those servers listen (the only addresses a
push dials), and reads the entry again early when a push names a server it has not seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from blocks.announcement import AnnouncementError, ServerInfo
from blocks.next_hops import NextPingTable, choose_targets, next_hop_candidates
from overlay.identity import IdentityError, PeerId

log = logging.getLogger(__name__)

PING_TIMEOUT = 5.0  # seconds; a peer that does not answer counts as unreachable (inf)
# Ours: seconds between two reads of the next block's servers at least, however often pushes
# name servers we have not seen (a client naming made-up peers costs one DHT read per this).
MIN_REFRESH = 5.0


class NextHopPinger:
    def __init__(self, dht, host, server, num_blocks: int, period: float,
                 rng: random.Random | None = None):
        self.dht = dht
        self.host = host
        self.server = server  # its span's end (which may move) is the block whose servers we ping
        self.num_blocks = num_blocks
        self.period = period
        self.table = NextPingTable()
        self._rng = rng or random.Random()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()  # refresh_soon

    def next_pings(self) -> dict[str, float]:
        """What the announcement carries now."""
        return self.table.snapshot(time.monotonic())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def refresh_soon(self) -> None:
        """Read the next block's servers again now (at most every MIN_REFRESH seconds): a push
        named one we do not know, maybe a server that joined since the last round."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            self._wake.clear()
            try:
                await self.measure()
            except Exception:  # a DHT hiccup must not stop the server
                log.exception("measuring next_pings failed; retrying next period")
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       self.period * self._rng.uniform(0.9, 1.1))
            except TimeoutError:
                continue
            spacing = min(MIN_REFRESH, self.period)  # woken early: not more often than this
            await asyncio.sleep(max(0.0, started + spacing - time.monotonic()))

    async def measure(self) -> dict[str, float]:
        """One round: find the next servers, ping some, return the updated snapshot."""
        end = self.server.served[1]
        if end >= self.num_blocks:  # the last span: nobody comes after it
            self.table.keep_only(())
            return {}
        key = f"{self.server.config.model_id}.{end}"
        result = await self.dht.get_records([key])
        infos: dict[str, ServerInfo] = {}
        for record in result.records.get(key.encode(), []):
            if record.subkey is None:
                continue
            try:
                infos[str(record.subkey)] = ServerInfo.from_bytes(record.value)
            except AnnouncementError:
                continue
        candidates = next_hop_candidates(str(self.host.peer_id), end, infos)
        self.table.keep_only(candidates)
        push = self.server.push
        if push is not None:  # where a push to any of them may dial (blocks/push.py)
            push.learn_hops({peer: infos[peer].addrs for peer in candidates})
        targets = choose_targets(candidates, self._rng)
        for peer in targets:
            with contextlib.suppress(IdentityError, ValueError):
                self.host.add_peer_addrs(PeerId.from_string(peer), infos[peer].addrs)
        rtts = await asyncio.gather(*(self._ping(peer) for peer in targets))
        now = time.monotonic()
        for peer, rtt in zip(targets, rtts):
            self.table.record(peer, rtt, now)
        return self.table.snapshot(now)

    async def _ping(self, peer_text: str) -> float | None:
        return await self.host.round_trip(peer_text, PING_TIMEOUT)
