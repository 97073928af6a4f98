"""An in-memory network that drives DHT node cores on a virtual clock.

The smallest possible driver of `DHTNode`: a heap of timed events, a fixed one-way latency,
and three kinds of peers: alive, dead (requests to it fail at once, as a closed socket) and
silent (requests to it are never answered, as a machine that vanished with its connection
open). Tests use it to check lookups against brute force without sockets or sleeps; with
`wire=True` every message goes through the msgpack codec as on a real network.

Pure: no real clock, no sockets; randomness from the seed.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from itertools import count

from overlay.dht.config import DHTConfig
from overlay.dht.contact import Contact
from overlay.dht.effects import OperationDone, SendRequest
from overlay.dht.messages import (
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from overlay.dht.node import DHTNode
from overlay.identity import Identity, PeerId


class MemoryNetwork:
    """Nodes, a virtual clock and the messages in flight between them."""

    def __init__(
        self,
        seed: int = 0,
        config: DHTConfig | None = None,
        latency: float = 0.001,
        *,
        wire: bool = False,
        start: float = 1_000_000.0,
    ):
        self.rng = random.Random(seed)
        self.config = config or DHTConfig()
        self.latency = latency
        self.wire = wire
        self.now = start
        self.nodes: dict[PeerId, DHTNode] = {}
        self.dead: set[PeerId] = set()
        self.silent: set[PeerId] = set()
        self.results: dict[tuple[PeerId, int], object] = {}
        self.messages = 0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = count()
        self._timer_at: dict[PeerId, float] = {}  # time of each node's queued timer event

    def add_node(self, *, serves: bool = True, identity: Identity | None = None) -> DHTNode:
        if identity is None:
            peer = PeerId.from_public_key(self.rng.randbytes(32))
            sign = None
        else:
            peer, sign = identity.peer_id, identity.sign
        node = DHTNode(
            peer,
            self.config,
            rng=random.Random(self.rng.getrandbits(64)),
            now=self.now,
            serves=serves,
            addrs=(f"/memory/{len(self.nodes)}",) if serves else (),
            sign=sign,
        )
        self.nodes[peer] = node
        return node

    def contact(self, node: DHTNode) -> Contact:
        return Contact(node.peer_id, node.addrs)

    # -- the event loop ----------------------------------------------------------------

    def _at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action))

    def after_input(self, node: DHTNode) -> None:
        """Carry out the node's effects and re-arm its timer (what every driver does)."""
        for effect in node.take_effects():
            if isinstance(effect, OperationDone):
                self.results[(node.peer_id, effect.op_id)] = effect.result
            elif isinstance(effect, SendRequest):
                self._send(node, effect)
        deadline = node.next_deadline()
        if deadline is None:
            return
        scheduled = self._timer_at.get(node.peer_id)
        # One timer event per node: a later deadline waits for the event already queued,
        # which re-arms on firing; only an earlier one queues a new event.
        if scheduled is None or deadline < scheduled:
            self._timer_at[node.peer_id] = deadline
            self._at(max(deadline, self.now), lambda: self._fire_timer(node, deadline))

    def _fire_timer(self, node: DHTNode, at: float) -> None:
        if self._timer_at.get(node.peer_id) != at:
            return  # superseded by an earlier event
        del self._timer_at[node.peer_id]
        if node.peer_id in self.dead:
            return
        deadline = node.next_deadline()
        if deadline is not None and deadline <= self.now:
            node.handle_timer(self.now)
        self.after_input(node)

    def _send(self, sender: DHTNode, effect: SendRequest) -> None:
        self.messages += 1
        target = self.nodes.get(effect.contact.peer)
        req_id = effect.req_id
        if target is None or effect.contact.peer in self.dead or not target.serves:
            self._at(self.now + self.latency, lambda: self._fail(sender, req_id))
            return
        if effect.contact.peer in self.silent:
            return  # the sender's own timeout will fire
        request = effect.request
        if self.wire:
            request = decode_request(encode_request(request))

        def deliver() -> None:
            response = target.handle_request(sender.peer_id, request, self.now)
            self.after_input(target)
            reply = response
            if self.wire:
                reply = decode_response(encode_response(response), effect.request)
            self._at(self.now + self.latency, lambda: self._respond(sender, req_id, reply))

        self._at(self.now + self.latency, deliver)

    def _respond(self, node: DHTNode, req_id: int, response) -> None:
        if node.peer_id in self.dead:
            return
        node.on_response(req_id, response, self.now)
        self.after_input(node)

    def _fail(self, node: DHTNode, req_id: int) -> None:
        if node.peer_id in self.dead:
            return
        node.on_failure(req_id, self.now)
        self.after_input(node)

    def run(self, until: float | None = None, max_events: int = 10_000_000) -> None:
        """Process events in time order (up to `until`, or until none is left)."""
        for _ in range(max_events):
            if not self._events or (until is not None and self._events[0][0] > until):
                break
            when, _, action = heapq.heappop(self._events)
            self.now = max(self.now, when)
            action()
        if until is not None:
            self.now = max(self.now, until)

    def run_op(self, node: DHTNode, start: Callable[[float], int], limit: float = 60.0):
        """Start an operation on `node` and run until its result arrives (or `limit` s)."""
        op_id = start(self.now)
        self.after_input(node)
        key = (node.peer_id, op_id)
        deadline = self.now + limit
        while key not in self.results and self._events and self._events[0][0] <= deadline:
            when, _, action = heapq.heappop(self._events)
            self.now = max(self.now, when)
            action()
        return self.results.pop(key, None)

    def join_all(self, nodes: list[DHTNode] | None = None) -> None:
        """Bootstrap each node in turn through a random node that joined before it."""
        nodes = list(self.nodes.values()) if nodes is None else nodes
        joined: list[DHTNode] = []
        for node in nodes:
            if joined:
                seed = self.rng.choice(joined)
                self.run_op(
                    node, lambda now, n=node, s=seed: n.bootstrap([self.contact(s)], now)
                )
            joined.append(node)
