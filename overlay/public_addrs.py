"""The addresses a host gives out for others to dial, when it listens on a wildcard.

A server that listens on 0.0.0.0 (the `serve` default) must not announce `/ip4/0.0.0.0/...`:
on another machine that address means that machine itself. What it announces instead is the
address of its interface on the default route, found the way the kernel would pick it: a UDP
socket "connected" to a documentation address (RFC 5737 / RFC 3849), whose local end is then
read back; connecting a UDP socket sends no packet. A machine without a
default route announces loopback. Behind NAT neither is what others can reach: there the
operator names the public address (`serve --announce-addr`, `Host.set_public_addrs`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterable

from overlay.multiaddr import Multiaddr

WILDCARD_HOSTS = {"ip4": "0.0.0.0", "ip6": "::"}
LOOPBACK_HOSTS = {"ip4": "127.0.0.1", "ip6": "::1"}
# Documentation addresses (RFC 5737 TEST-NET-1, RFC 3849): outside any real network, so the
# route lookup toward them picks the default route's interface. Nothing is sent to them.
_ROUTE_PROBES = {"ip4": (socket.AF_INET, "192.0.2.1"), "ip6": (socket.AF_INET6, "2001:db8::1")}
_PROBE_PORT = 9  # discard; no packet leaves for a connect() of a UDP socket anyway


def default_route_host(protocol: str) -> str | None:
    """This machine's address on its default route for `protocol` ("ip4" or "ip6"), or None
    where there is no such route."""
    family, probe = _ROUTE_PROBES[protocol]
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((probe, _PROBE_PORT))
        host = sock.getsockname()[0]
        if host not in (WILDCARD_HOSTS[protocol], "") and "%" not in host:  # (a zone: local)
            return host
    return None


def expand_wildcards(
    addrs: Iterable[Multiaddr],
    route_host: Callable[[str], str | None] = default_route_host,
) -> list[Multiaddr]:
    """`addrs` with each wildcard host replaced by `route_host(protocol)` (loopback where that
    is None); duplicates dropped, order kept."""
    out: list[Multiaddr] = []
    for addr in addrs:
        if addr.protocol in WILDCARD_HOSTS and addr.host == WILDCARD_HOSTS[addr.protocol]:
            host = route_host(addr.protocol) or LOOPBACK_HOSTS[addr.protocol]
            addr = Multiaddr(addr.protocol, host, addr.port, addr.peer_id)
        if addr not in out:
            out.append(addr)
    return out
