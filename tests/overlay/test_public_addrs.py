"""What a host gives out for others to dial: never a wildcard host."""

from __future__ import annotations

import ipaddress

import pytest

from overlay.host import Host
from overlay.identity import Identity
from overlay.multiaddr import Multiaddr, MultiaddrError
from overlay.public_addrs import default_route_host, expand_wildcards

PEER = Identity.generate().peer_id


def test_wildcards_become_the_route_host_or_loopback() -> None:
    addrs = [Multiaddr.parse(a) for a in ("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001",
                                          "/ip4/10.1.2.3/tcp/5", "/dns/example.org/tcp/6")]
    routes = {"ip4": "192.168.7.9", "ip6": None}
    expanded = [str(a) for a in expand_wildcards(addrs, routes.get)]
    assert expanded == ["/ip4/192.168.7.9/tcp/4001", "/ip6/::1/tcp/4001", "/ip4/10.1.2.3/tcp/5",
                        "/dns/example.org/tcp/6"]
    with_peer = Multiaddr.parse("/ip4/0.0.0.0/tcp/7").with_peer(PEER)
    assert expand_wildcards([with_peer], lambda _: None) == [
        Multiaddr("ip4", "127.0.0.1", 7, PEER)]
    # two wildcards that expand to one address, or one already listed, are given out once
    twice = [Multiaddr.parse("/ip4/0.0.0.0/tcp/7"), Multiaddr.parse("/ip4/127.0.0.1/tcp/7")]
    assert [str(a) for a in expand_wildcards(twice, lambda _: None)] == ["/ip4/127.0.0.1/tcp/7"]


def test_the_default_route_host_is_a_concrete_address_or_none() -> None:
    for protocol, version in (("ip4", 4), ("ip6", 6)):
        host = default_route_host(protocol)
        if host is not None:
            address = ipaddress.ip_address(host.split("%")[0])
            assert address.version == version and not address.is_unspecified


async def test_a_host_on_a_wildcard_gives_out_a_concrete_address() -> None:
    host = Host()  # one host, no connection: multi-node tests stay on 127.0.0.1
    try:
        await host.listen("/ip4/0.0.0.0/tcp/0")
        [listened] = host.addrs
        assert listened.host == "0.0.0.0"
        [public] = host.public_addrs
        assert public == expand_wildcards([listened])[0]
        assert public.host != "0.0.0.0" and public.port == listened.port
        assert public.peer_id == host.peer_id
    finally:
        await host.close()


async def test_a_host_on_loopback_gives_out_its_listen_address() -> None:
    server, client = Host(), Host()
    try:
        [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
        assert server.public_addrs == [addr]

        async def echo(ctx, payload: bytes) -> bytes:
            return payload

        server.add_handler("echo", echo)
        assert await client.call(server.public_addrs[0], "echo", b"hi") == b"hi"
    finally:
        await client.close()
        await server.close()


async def test_public_addresses_set_by_the_operator() -> None:
    host = Host()
    try:
        await host.listen("/ip4/127.0.0.1/tcp/0")
        host.set_public_addrs(["/ip4/203.0.113.7/tcp/4242", f"/dns/node.example/tcp/1/p2p/"
                               f"{host.peer_id}"])
        assert [str(a.without_peer()) for a in host.public_addrs] == [
            "/ip4/203.0.113.7/tcp/4242", "/dns/node.example/tcp/1"]
        assert all(a.peer_id == host.peer_id for a in host.public_addrs)
        with pytest.raises(MultiaddrError, match="wildcard"):
            host.set_public_addrs(["/ip4/0.0.0.0/tcp/1"])
        with pytest.raises(MultiaddrError, match="another peer"):
            host.set_public_addrs([f"/ip4/203.0.113.7/tcp/1/p2p/{PEER}"])
        host.set_public_addrs(None)
        assert host.public_addrs == host.addrs
    finally:
        await host.close()
