"""A server that does not answer a ping is remembered as unreachable for a while, not pinged
again by every session (a vanished server stays announced until its records expire)."""

from __future__ import annotations

import math
import socket

from client.swarm import UNREACHABLE_TTL, SwarmClient
from overlay.host import Host
from overlay.identity import Identity


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_peers_are_inf_and_not_pinged_again_at_once():
    host, alive = Host(Identity.generate()), Host(Identity.generate())
    try:
        [alive_addr] = await alive.listen("/ip4/127.0.0.1/tcp/0")
        gone = Identity.generate().peer_id
        host.add_peer_addrs(alive.peer_id, [alive_addr])
        host.add_peer_addrs(gone, [f"/ip4/127.0.0.1/tcp/{closed_port()}"])
        client = SwarmClient(host, dht=None, owns_host=False)  # rtts() needs no DHT
        pinged: list[str] = []
        ping = client._ping

        async def counting(peer: str) -> float | None:  # the real ping, counted
            pinged.append(peer)
            return await ping(peer)

        client._ping = counting
        peers = [str(alive.peer_id), str(gone)]
        first = await client.rtts(peers)
        assert 0 < first[str(alive.peer_id)] < 1 and first[str(gone)] == math.inf
        assert sorted(pinged) == sorted(peers)
        assert await client.rtts(peers) == first and len(pinged) == 2  # remembered, both
        rtt, at = client._rtts[str(gone)]
        client._rtts[str(gone)] = (rtt, at - UNREACHABLE_TTL - 1)  # as if 16 s had passed
        await client.rtts(peers)
        assert pinged[2:] == [str(gone)]  # tried again; the live peer's RTT is still fresh
    finally:
        await host.close()
        await alive.close()
