"""A contact: what a DHT node knows about another node (peer id, DHT id, listen addresses).

Addresses are kept as the multiaddr strings the peer announced; the core never parses or
dials them, it only hands them to the driver. Equality and hashing use the node id.

Pure: no I/O.
"""

from __future__ import annotations

from overlay.dht.ids import node_id_of
from overlay.identity import PeerId


class Contact:
    """A DHT node as seen by another: immutable after creation."""

    __slots__ = ("addrs", "node_id", "peer", "wire_size")

    def __init__(self, peer: PeerId, addrs: tuple[str, ...] = (), node_id: int | None = None):
        self.peer = peer
        self.addrs = addrs
        self.wire_size: int | None = None  # msgpack size in a peer list (messages.py fills it)
        # Callers that already hashed the peer id (the simulator) pass node_id to skip SHA-256.
        self.node_id = node_id_of(peer.raw) if node_id is None else node_id

    def with_addrs(self, addrs: tuple[str, ...]) -> Contact:
        return Contact(self.peer, addrs, self.node_id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Contact) and other.node_id == self.node_id

    def __hash__(self) -> int:
        return hash(self.node_id)

    def __repr__(self) -> str:
        return f"Contact({self.peer.short()}, {list(self.addrs)})"
