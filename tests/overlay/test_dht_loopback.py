"""The asyncio driver on real sockets: 50 DHT nodes in one process on 127.0.0.1.

Stores and finds 100 keys, then stops a quarter of the nodes without warning (half reset
their sockets, half keep their connections open and go silent) and finds them again.
Also: peers answering garbage or lies are survived.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import msgpack
import pytest

from overlay.dht.driver import DHT, DHTError
from overlay.dht.messages import RPC_METHOD, FindNode, Ping, decode_response, encode_request
from overlay.host import Host


async def start_nodes(n: int, rng: random.Random) -> tuple[list[Host], list[DHT]]:
    hosts, dhts = [], []
    for _ in range(n):
        host = Host()
        await host.listen("/ip4/127.0.0.1/tcp/0")
        bootstrap = [str(rng.choice(hosts).addrs[0])] if hosts else []
        hosts.append(host)
        dhts.append(await DHT.start(host, bootstrap))
    return hosts, dhts


async def shutdown(hosts, dhts) -> None:
    for dht in dhts:
        await dht.close()
    for host in hosts:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(host.close(), 2)


@pytest.mark.slow
async def test_fifty_nodes_store_and_find_then_survive_a_quarter_failing():
    rng = random.Random(3)
    async with asyncio.timeout(150):
        hosts, dhts = await start_nodes(50, rng)
        try:
            keys = [f"loopback-{i}" for i in range(100)]
            for i, key in enumerate(keys):
                assert await rng.choice(dhts).store(key, {"i": i}, time.time() + 300)
            for i, key in enumerate(keys):
                assert await rng.choice(dhts).get(key) == {"i": i}

            victims = rng.sample(range(50), 12)
            for j, index in enumerate(victims):
                await dhts[index].close()
                (Host.abort if j % 2 else Host.freeze)(hosts[index])
            alive = [d for i, d in enumerate(dhts) if i not in victims]
            slowest = 0.0
            checked = 0
            for i, key in enumerate(keys):
                if not any(d.node.records.get(key.encode(), time.time()) for d in alive):
                    continue  # all five replicas were among the victims
                checked += 1
                start = time.perf_counter()
                assert await rng.choice(alive).get(key) == {"i": i}
                slowest = max(slowest, time.perf_counter() - start)
            assert checked >= 95
            # No get waits out the 3 s request timeout of a silent peer.
            assert slowest < 1.5
        finally:
            await shutdown(hosts, dhts)


async def test_garbage_and_lying_peers_are_failures_not_crashes():
    rng = random.Random(4)
    async with asyncio.timeout(60):
        hosts, dhts = await start_nodes(8, rng)
        liars = []
        try:
            for answer in (b"\xc1garbage", None):
                liar = Host()
                await liar.listen("/ip4/127.0.0.1/tcp/0")
                liars.append(liar)

                async def handler(ctx, payload, answer=answer, me=liar):
                    if answer is not None:
                        return answer
                    # an answer of the wrong kind, claiming only itself
                    return msgpack.packb({"v": 1, "op": "find_node",
                                          "peers": [[[me.peer_id.raw, []]]]})

                liar.add_handler(RPC_METHOD, handler)
                # the liar announces itself as a DHT server to every node
                ping = encode_request(Ping(tuple(str(a) for a in liar.addrs), True))
                for host in hosts:
                    await liar.call(host.peer_id if host.connection_to(liar.peer_id) else
                                    host.addrs[0], RPC_METHOD, ping)
            for dht in dhts:
                assert any(c.peer == liars[0].peer_id for c in dht.node.table)
            for i in range(20):
                assert await rng.choice(dhts).store(f"g{i}", i, time.time() + 60)
                assert await rng.choice(dhts).get(f"g{i}") == i
            for dht in dhts:  # with 10 nodes and k = 20, these lookups ask everyone
                assert liars[0].peer_id not in await dht.find_closest("anything")
            # every node that asked the garbage peer counted a failure (and backed it off)
            garbage = dhts[0].node.table.get(
                next(c.node_id for c in dhts[0].node.table if c.peer == liars[0].peer_id)
            )
            assert garbage is not None
            assert all(d.node.health.failures(garbage.node_id) > 0 for d in dhts)
            # a request that is not DHT msgpack is refused with a typed remote error
            from overlay.host import RemoteError

            with pytest.raises(RemoteError) as refused:
                await liars[0].call(hosts[0].addrs[0], RPC_METHOD, b"\x00\x01garbage")
            assert refused.value.code == "bad_request"
            # and one larger than any DHT message is refused before it is read whole
            with pytest.raises(RemoteError) as refused:
                await liars[0].call(hosts[0].addrs[0], RPC_METHOD, bytes(64 << 20))
            assert refused.value.code == "too_large"
        finally:
            for liar in liars:
                await liar.close()
            await shutdown(hosts, dhts)


async def test_a_flood_of_bad_requests_logs_a_bounded_number_of_lines(caplog):
    from overlay.host import RemoteError
    from overlay.log_limit import DEFAULT_BURST

    async with asyncio.timeout(30):
        hosts, dhts = await start_nodes(1, random.Random(5))
        attacker = Host()
        try:
            with caplog.at_level(logging.INFO, logger="overlay.dht"):
                for _ in range(3 * DEFAULT_BURST):
                    with pytest.raises(RemoteError):
                        await attacker.call(hosts[0].addrs[0], RPC_METHOD, b"\x00garbage")
            lines = [r for r in caplog.records if "bad dht request" in r.getMessage()]
            assert len(lines) == DEFAULT_BURST  # one line each before: 3x as many
        finally:
            await attacker.close()
            await shutdown(hosts, dhts)


async def test_unreachable_bootstrap_is_a_clear_error():
    host = Host()
    await host.listen("/ip4/127.0.0.1/tcp/0")
    try:
        with pytest.raises(DHTError, match="bootstrap"):
            await DHT.start(host, ["/ip4/127.0.0.1/tcp/1"], bootstrap_timeout=2)
    finally:
        await host.close()


async def test_undialable_announced_addresses_are_not_handed_out():
    """A peer announcing itself with text that is no multiaddr, port 0, a multicast or
    broadcast host or another peer's /p2p suffix entered the table with those addresses,
    and every find_node handed them to others."""
    async with asyncio.timeout(30):
        hosts, dhts = await start_nodes(1, random.Random(5))
        [node] = hosts
        liar, asker = Host(), Host()
        try:
            other = Host().peer_id
            good = "/ip4/127.0.0.1/tcp/4001"
            bad = ["not a multiaddr", "/ip4/10.0.0.1/tcp/0", "/ip4/224.0.0.1/tcp/80",
                   "/ip4/255.255.255.255/tcp/80", f"/ip4/10.0.0.1/tcp/80/p2p/{other}"]
            await liar.call(node.addrs[0], RPC_METHOD, encode_request(Ping(tuple(bad), True)))
            assert not any(c.peer == liar.peer_id for c in dhts[0].node.table)
            await liar.call(node.peer_id, RPC_METHOD,
                            encode_request(Ping((*bad[:3], good), True)))
            request = FindNode((0,))
            answer = decode_response(
                await asker.call(node.addrs[0], RPC_METHOD, encode_request(request)), request)
            [contact] = [c for c in answer.peers[0] if c.peer == liar.peer_id]
            assert contact.addrs == (good,)
        finally:
            await liar.close()
            await asker.close()
            await shutdown(hosts, dhts)


def test_wildcard_addresses_are_replaced_by_the_observed_one():
    from types import SimpleNamespace

    from overlay.dht.driver import _observed

    ctx = SimpleNamespace(connection=SimpleNamespace(remote_address=("10.1.2.3", 50000)))
    peer = "12D3KooWEtQ5j9AYhEQNRpZXpMkyR4dMm4jPotWUdqzYzKvv71Ri"
    addrs = (f"/ip4/0.0.0.0/tcp/4001/p2p/{peer}", "/ip4/192.168.1.5/tcp/4001")
    assert _observed(addrs, ctx) == (f"/ip4/10.1.2.3/tcp/4001/p2p/{peer}", addrs[1])


def test_dialable_addresses_are_given_out_once():
    """A dual-stack listener announces `/ip4/0.0.0.0/tcp/P` and `/ip6/::/tcp/P`: both became
    the observed address, and the table handed the same text out twice (a dial tried twice,
    a slot of the 8-address limit spent), unlike the host's own `expand_wildcards`."""
    from types import SimpleNamespace

    from overlay.dht.driver import _dialable

    ctx = SimpleNamespace(peer=None,
                          connection=SimpleNamespace(remote_address=("10.1.2.3", 50000)))
    addrs = ("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001", "/ip4/10.1.2.3/tcp/4001",
             "/ip4/10.1.2.3/tcp/4002")
    assert _dialable(addrs, ctx) == ("/ip4/10.1.2.3/tcp/4001", "/ip4/10.1.2.3/tcp/4002")


def test_a_wildcard_becomes_the_observed_address_of_its_own_family_only():
    """`/ip6/::/tcp/P` announced over IPv4 became `/ip4/<sender>/tcp/P`, but asyncio binds
    :: IPv6-only: nothing listens there for IPv4. A wildcard is now replaced only by an
    observed address of its family (an IPv4-mapped one counts as IPv4), else dropped; so is
    an observed link-local address with a zone, which nobody else could dial."""
    from types import SimpleNamespace

    from overlay.dht.driver import _observed

    def seen_from(*remote):
        return SimpleNamespace(connection=SimpleNamespace(remote_address=remote))

    addrs = ("/ip6/::/tcp/4001", "/ip4/0.0.0.0/tcp/4002", "/dns/example.org/tcp/1")
    assert _observed(addrs, seen_from("192.0.2.7", 5)) == (
        "/ip4/192.0.2.7/tcp/4002", addrs[2])
    assert _observed(addrs, seen_from("::ffff:192.0.2.7", 5, 0, 0)) == (
        "/ip4/192.0.2.7/tcp/4002", addrs[2])
    assert _observed(addrs, seen_from("2001:db8::7", 5, 0, 0)) == (
        "/ip6/2001:db8::7/tcp/4001", addrs[2])
    assert _observed(addrs, seen_from("fe80::7%eth0", 5, 0, 2)) == (addrs[2],)
