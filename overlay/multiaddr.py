"""Multiaddrs in text form, `/ip4/127.0.0.1/tcp/4001/p2p/12D3KooW...` (overlay/PROTOCOL.md).

Only what the overlay dials and listens on: one network component (`/ip4`, `/ip6`, `/dns`,
`/dns4`, `/dns6`), one `/tcp` port, and an optional trailing `/p2p/<peer id>`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, replace

from overlay.identity import IdentityError, PeerId

_NET_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.?)+$")


class MultiaddrError(ValueError):
    """Raised for text that is not a multiaddr the overlay can use."""


@dataclass(frozen=True, slots=True)
class Multiaddr:
    protocol: str  # one of _NET_PROTOCOLS
    host: str
    port: int
    peer_id: PeerId | None = None

    @classmethod
    def parse(cls, text: str | Multiaddr) -> Multiaddr:
        if isinstance(text, Multiaddr):
            return text
        if not isinstance(text, str) or not text.startswith("/"):
            raise MultiaddrError(f"multiaddr must start with '/': {text!r}")
        parts = text.split("/")[1:]
        if text.endswith("/"):
            parts = parts[:-1]
        if len(parts) not in (4, 6):
            raise MultiaddrError(
                f"expected /ip4|ip6|dns/<host>/tcp/<port>[/p2p/<peer id>], got {text!r}"
            )
        proto, host, transport, port_text = parts[:4]
        if proto not in _NET_PROTOCOLS:
            raise MultiaddrError(f"unsupported protocol /{proto} in {text!r}")
        host = _check_host(proto, host, text)
        if transport != "tcp":
            raise MultiaddrError(f"only /tcp is supported, got /{transport} in {text!r}")
        # ASCII digits only: str.isdigit() is also true of "²" (which int() refuses) and of
        # other scripts' digits (which int() takes, but other implementations do not).
        if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
            raise MultiaddrError(f"invalid TCP port {port_text!r} in {text!r}")
        peer_id = None
        if len(parts) == 6:
            if parts[4] not in ("p2p", "ipfs"):
                raise MultiaddrError(f"unexpected /{parts[4]} in {text!r} (expected /p2p)")
            try:
                peer_id = PeerId.from_string(parts[5])
            except IdentityError as e:
                raise MultiaddrError(f"{e} in {text!r}") from None
        return cls(proto, host, int(port_text), peer_id)

    def with_peer(self, peer_id: PeerId | None) -> Multiaddr:
        return replace(self, peer_id=peer_id)

    def without_peer(self) -> Multiaddr:
        return replace(self, peer_id=None)

    def __str__(self) -> str:
        text = f"/{self.protocol}/{self.host}/tcp/{self.port}"
        return text if self.peer_id is None else f"{text}/p2p/{self.peer_id}"

    @classmethod
    def from_socket_address(cls, host: str, port: int, peer_id: PeerId | None = None) -> Multiaddr:
        proto = "ip6" if ":" in host else "ip4"
        return cls(proto, _check_host(proto, host, host), port, peer_id)


def _check_host(proto: str, host: str, text: str) -> str:
    if proto == "ip4":
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise MultiaddrError(f"invalid IPv4 address {host!r} in {text!r}") from None
    if proto == "ip6":
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise MultiaddrError(f"invalid IPv6 address {host!r} in {text!r}") from None
        if address.scope_id is not None:
            # ipaddress takes "fe80::1%eth0", but the zone names an interface of one machine:
            # no other can dial it, and multiaddrs spell zones /ip6zone/, which we do not use.
            raise MultiaddrError(f"IPv6 zone id %{address.scope_id} in {text!r}: an address "
                                 "scoped to one machine's interface cannot be dialed by others")
        return str(address)
    if not _DNS_NAME.match(host):
        raise MultiaddrError(f"invalid DNS name {host!r} in {text!r}")
    return host
