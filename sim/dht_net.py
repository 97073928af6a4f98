"""The simulator's driver of the DHT core: thousands of `DHTNode`s over the modelled network.

It does for `overlay.dht.node.DHTNode` what the asyncio driver does on real sockets, and
nothing more: after every input it drains `take_effects()`, carries each `SendRequest`
through the network model (size of the real msgpack encoding, queued uplink, latency,
loss), hands the request to the target's `handle_request`, carries the response back to
`on_response` (or reports `on_failure`), delivers `OperationDone`s to the scenario, and keeps
one timer per node armed at `next_deadline()`. Every routing, lookup, storage and timeout
decision is the core's own.

A node that goes down loses its process: its `DHTNode` is dropped and a new one (same peer
id, empty state) bootstraps through a live node when it comes back. A departure is either
"refused" (the machine is up, the port closed: requests to it fail after one round trip)
or "silent" (the machine vanished: requests to it are never answered and the core's own
timeout fires).

Pure: no sockets, no clock, no threads; the Simulator's clock and random source only.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from overlay.dht.config import DHTConfig
from overlay.dht.contact import Contact
from overlay.dht.effects import OperationDone, SendRequest
from overlay.dht.ids import ID_BITS, node_id_of
from overlay.dht.messages import request_size, response_size
from overlay.dht.node import DHTNode, DHTProtocolError
from overlay.identity import PeerId
from sim.checks import fraction
from sim.engine import Simulator
from sim.network import NetworkModel
from sim.oracle import AliveIndex

# A refused connection costs a round trip (SYN out, RST back); its size is negligible.
_REFUSED_BYTES = 0


@dataclass(frozen=True, slots=True)
class DriverConfig:
    # Fraction of departures in which the machine vanishes (no answer at all) rather than
    # refusing connections. Ours: half and half, no measurement behind it.
    silent_fraction: float = 0.5
    # Charge each message its exact encoded size (request_size / response_size: the length
    # encode_request / encode_response would give, without encoding); False charges 512.
    exact_sizes: bool = True

    def __post_init__(self) -> None:
        fraction(silent_fraction=self.silent_fraction)


class SimPeer:
    """One machine of the simulated DHT (which may be down)."""

    __slots__ = ("addrs", "contact", "dht", "epoch", "index", "peer_id", "silent", "timer_at")

    def __init__(self, index: int, peer_id: PeerId, addrs: tuple[str, ...]):
        self.index = index
        self.peer_id = peer_id
        self.addrs = addrs
        self.contact = Contact(peer_id, addrs)
        self.dht: DHTNode | None = None  # None while down
        self.epoch = 0  # bumped at every up/down: events of a past life are ignored
        self.silent = False  # how the last departure looks to others
        self.timer_at: float | None = None


DoneFn = Callable[[SimPeer, OperationDone], None]


class SimDHT:
    """All peers, their cores, and the messages between them."""

    def __init__(
        self,
        sim: Simulator,
        network: NetworkModel,
        config: DHTConfig,
        driver: DriverConfig = DriverConfig(),
        on_done: DoneFn | None = None,
    ):
        self.sim = sim
        self.network = network
        self.config = config
        self.driver = driver
        self.on_done: DoneFn = on_done or (lambda peer, done: None)
        self.peers: list[SimPeer] = []
        self.by_node_id: dict[int, int] = {}
        self.alive = AliveIndex()
        self.requests = 0
        self.failures_refused = 0
        self.protocol_errors = 0

    # -- population ----------------------------------------------------------------------

    def add_peer(self) -> SimPeer:
        """A new machine (down until `start`), with a random identity and a network slot."""
        index = self.network.add_node()
        rng = self.sim.rng
        while True:
            peer_id = PeerId.from_public_key(rng.randbytes(32))
            node_id = node_id_of(peer_id.raw)
            if node_id not in self.by_node_id:
                break
        addrs = (f"/ip4/10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}/tcp/4001",)
        peer = SimPeer(index, peer_id, addrs)
        self.peers.append(peer)
        self.by_node_id[peer.contact.node_id] = index
        return peer

    def _new_core(self, peer: SimPeer, created_at: float) -> DHTNode:
        return DHTNode(
            peer.peer_id, self.config, rng=self.sim.rng, now=created_at, addrs=peer.addrs
        )

    def start_prefilled(self, peers: list[SimPeer], refresh_spread: float) -> None:
        """Bring `peers` up at once with routing tables as a converged network has them.

        For every node and bucket, min(k, members) contacts are drawn uniformly from the
        live nodes in that bucket's range and offered to the core's own `add_or_update`.
        Each table's bucket-refresh clock is set back by a uniform part of
        `refresh_spread`, so refreshes are spread over time as in a network running for
        long, instead of all firing together one hour in.
        """
        sim, rng, k = self.sim, self.sim.rng, self.config.k
        for peer in peers:
            self.alive.add(peer.index, peer.contact.node_id)
        ids = self.alive.sorted_ids
        contact_of = {p.contact.node_id: p.contact for p in peers}
        from bisect import bisect_left

        for peer in peers:
            me = peer.contact.node_id
            created = sim.now - rng.random() * refresh_spread
            core = self._new_core(peer, created)
            table = core.table
            for bit in range(ID_BITS - 1, -1, -1):
                lo_id = ((me >> bit) ^ 1) << bit
                lo = bisect_left(ids, lo_id)
                hi = bisect_left(ids, lo_id + (1 << bit))
                if hi > lo:
                    picks = rng.sample(range(lo, hi), min(k, hi - lo))
                    for j in picks:
                        table.add_or_update(contact_of[ids[j]], created)
                # Nodes sharing our prefix down to this bit: when only we remain, every
                # lower bucket is empty.
                base = (me >> bit) << bit
                if bisect_left(ids, base + (1 << bit)) - bisect_left(ids, base) <= 1:
                    break
            peer.dht = core
            peer.epoch += 1
            self._arm(peer)

    def start(self, peer: SimPeer, bootstrap: bool = True) -> int | None:
        """Bring `peer` up with an empty table; joins through a random live node.

        Returns the op id of the bootstrap (None when nobody else is up)."""
        peer.epoch += 1
        peer.dht = core = self._new_core(peer, self.sim.now)
        seed_index = self.alive.random(self.sim.rng, exclude=peer.index)
        self.alive.add(peer.index, peer.contact.node_id)
        op = None
        if bootstrap and seed_index is not None:
            op = core.bootstrap([self.peers[seed_index].contact], self.sim.now)
        self.after_input(peer)
        return op

    def stop(self, peer: SimPeer, silent: bool | None = None) -> None:
        """Take `peer` down: its process and all its state are gone."""
        if peer.dht is None:
            return
        if silent is None:
            silent = self.sim.rng.random() < self.driver.silent_fraction
        peer.silent = silent
        peer.dht = None
        peer.epoch += 1
        peer.timer_at = None
        self.alive.remove(peer.index, peer.contact.node_id)

    # -- the driver loop -----------------------------------------------------------------

    def after_input(self, peer: SimPeer) -> None:
        """Carry out the core's effects and re-arm its timer."""
        core = peer.dht
        if core is None:
            return
        for effect in core.take_effects():
            if type(effect) is SendRequest:
                self._send(peer, effect)
            else:
                self.on_done(peer, effect)
        self._arm(peer)

    def _arm(self, peer: SimPeer) -> None:
        deadline = peer.dht.next_deadline()  # type: ignore[union-attr]
        if deadline is not None and (peer.timer_at is None or deadline < peer.timer_at):
            peer.timer_at = deadline
            self.sim.at(deadline, self._fire_timer, peer, peer.epoch, deadline)

    def _fire_timer(self, peer: SimPeer, epoch: int, deadline: float) -> None:
        if peer.epoch != epoch or peer.timer_at != deadline:
            self.sim.skip()
            return
        peer.timer_at = None
        core = peer.dht
        assert core is not None
        due = core.next_deadline()
        if due is not None and due <= self.sim.now:
            core.handle_timer(self.sim.now)
            self.after_input(peer)
        else:  # what was due has been answered meanwhile: just re-arm
            self.sim.skip()
            self._arm(peer)

    def _send(self, sender: SimPeer, effect: SendRequest) -> None:
        self.requests += 1
        now = self.sim.now
        target_index = self.by_node_id.get(effect.contact.node_id)
        target = None if target_index is None else self.peers[target_index]
        size = request_size(effect.request) if self.driver.exact_sizes else 512
        if target is None or target.dht is None:
            if target is not None and target.silent:
                self.network.transfer(sender.index, target.index, size, now)
                return  # never answered: the core's own timeout fires
            self.failures_refused += 1
            there = target.index if target is not None else sender.index
            back = now + self.network.rtt(sender.index, there)
            self.sim.at(back, self._fail, sender, sender.epoch, effect.req_id)
            return
        # one delay for the pair, for the request and whatever comes back
        delay = self.network.one_way(sender.index, target.index)
        arrival = self.network.transfer(sender.index, target.index, size, now, delay)
        if arrival is None:
            return  # lost: the requester's timeout fires
        self.sim.at(
            arrival, self._deliver, sender, sender.epoch, target, target.epoch, effect, delay
        )

    def _deliver(
        self, sender: SimPeer, sender_epoch: int, target: SimPeer, target_epoch: int,
        effect: SendRequest, delay: float,
    ) -> None:
        core = target.dht
        if core is None or target.epoch != target_epoch:
            # It went down while the request travelled (and may be back as a new process,
            # which knows nothing of the old connection).
            if core is None and target.silent:
                return
            self.sim.at(self.sim.now + delay, self._fail, sender, sender_epoch, effect.req_id)
            return
        now = self.sim.now
        try:
            response = core.handle_request(sender.peer_id, effect.request, now)
        except DHTProtocolError:
            self.protocol_errors += 1
            self.sim.at(now + delay, self._fail, sender, sender_epoch, effect.req_id)
            return
        self.after_input(target)
        size = response_size(response) if self.driver.exact_sizes else 512
        arrival = self.network.transfer(target.index, sender.index, size, now, delay)
        if arrival is not None:
            self.sim.at(arrival, self._respond, sender, sender_epoch, effect.req_id, response)

    def _respond(self, peer: SimPeer, epoch: int, req_id: int, response: object) -> None:
        core = peer.dht
        if core is None or peer.epoch != epoch:
            self.sim.skip()
            return
        core.on_response(req_id, response, self.sim.now)  # type: ignore[arg-type]
        self.after_input(peer)

    def _fail(self, peer: SimPeer, epoch: int, req_id: int) -> None:
        core = peer.dht
        if core is None or peer.epoch != epoch:
            self.sim.skip()
            return
        core.on_failure(req_id, self.sim.now)
        self.after_input(peer)

    # -- starting operations ---------------------------------------------------------------

    def run_op(self, peer: SimPeer, start: Callable[[DHTNode, float], int]) -> int:
        """Start an operation on a live peer's core; returns its op id."""
        core = peer.dht
        if core is None:
            raise ValueError("peer is down")
        op_id = start(core, self.sim.now)
        self.after_input(peer)
        return op_id

    def random_live(self, rng: random.Random | None = None) -> SimPeer | None:
        index = self.alive.random(rng or self.sim.rng)
        return None if index is None else self.peers[index]
