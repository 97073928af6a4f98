"""The DHT protocol core: one node's state, request handling and operations, without I/O.

Inputs in, effects out (as aioquic's QuicConnection):
- `handle_request(sender, request, now) -> response` answers a peer (and learns about it);
- `get` / `store` / `find_closest` / `bootstrap` start operations and return an op id;
- `on_response(req_id, response, now)`, `on_failure(req_id, now)` report the fate of a
  `SendRequest`; `handle_timer(now)` is called at `next_deadline()`;
- `take_effects()` returns the `SendRequest`s to perform and `OperationDone`s to deliver.

The asyncio driver (driver.py) and the simulator drive exactly this class. It must not use
asyncio, sockets, the clock or the system's entropy: `now` and `rng` come in.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from heapq import heappop, heappush

from overlay.dht.config import DHTConfig
from overlay.dht.contact import Contact
from overlay.dht.effects import OperationDone, SendRequest
from overlay.dht.ids import key_id_of, node_id_of
from overlay.dht.lookup import ClosestPeersLookup
from overlay.dht.messages import (
    MAX_MESSAGE_BYTES,
    FindNode,
    FindNodeResponse,
    FindValue,
    FindValueResponse,
    FoundValue,
    Ping,
    PingResponse,
    Request,
    Response,
    Store,
    StoreResponse,
    contact_size,
)
from overlay.dht.operations import (
    BootstrapOperation,
    DirectStoreOperation,
    GetOperation,
    LookupOperation,
    Operation,
    PingOperation,
    StoreOperation,
)
from overlay.dht.peer_health import PeerHealth
from overlay.dht.records import (
    OWNED_SUBKEY_PREFIX,
    BadSignatureBudget,
    Record,
    RecordError,
    RecordStore,
    SignatureError,
    SignatureVerifier,
    StoreOutcome,
    check_record,
    owner_of,
    sign_record,
)
from overlay.dht.routing_table import PingLeastRecent, RoutingTable
from overlay.identity import PeerId
from overlay.log_limit import LogLimiter

log = logging.getLogger("overlay.dht")

_RESPONSE_TYPES = {
    Ping: PingResponse,
    FindNode: FindNodeResponse,
    FindValue: FindValueResponse,
    Store: StoreResponse,
}
# PingResponse has no fields: one instance answers every PING.
_PING_RESPONSE = PingResponse()
# Room kept for the closer-peer lists when filling a FIND_VALUE answer with records.
_PEERS_ALLOWANCE = 64 * 1024
# The most one FIND_VALUE peer list takes: k contacts of 200 bytes (an ordinary contact, two
# addresses, is ~110). Lists of fat contacts (8 addresses of 256 characters, 2 KiB each) had
# a share of the whole message, so 64 keys, a 348-byte request, drew a 950 KB answer.
_PEER_LIST_ROOM = 4 * 1024
# What an answer's map, op name and list headers take besides its records and contacts.
_ANSWER_ENVELOPE = 4 * 1024
# At most this many buckets are refreshed by one periodic refresh.
_MAX_REFRESH_TARGETS = 32
_INF = float("inf")


class DHTProtocolError(ValueError):
    """A well-formed request that this node refuses (the driver reports it to the caller)."""


class Pending:
    """A request in flight and what it was for."""

    __slots__ = ("contact", "deadline", "op", "request", "sent_at", "soft_deadline", "tag")

    def __init__(self, op: Operation, contact: Contact, request: Request, sent_at: float,
                 deadline: float, soft_deadline: float | None, tag: tuple):
        self.op = op
        self.contact = contact
        self.request = request
        self.sent_at = sent_at
        self.deadline = deadline
        self.soft_deadline = soft_deadline  # None once passed (or for non-lookup requests)
        self.tag = tag


class DHTNode:
    """One Kademlia node. `serves=False` makes a client that never enters routing tables."""

    def __init__(
        self,
        peer_id: PeerId,
        config: DHTConfig | None = None,
        *,
        rng: random.Random,
        now: float,
        serves: bool = True,
        addrs: Sequence[str] = (),
        sign: Callable[[bytes], bytes] | None = None,
        verifier: SignatureVerifier | None = None,
    ):
        self.peer_id = peer_id
        self.node_id = node_id_of(peer_id.raw)
        self.config = config = config or DHTConfig()
        self.serves = serves
        self.addrs: tuple[str, ...] = tuple(addrs)
        self.random_bits = rng.getrandbits
        self._sign = sign
        self.verifier = verifier or SignatureVerifier()
        self.bad_signatures = BadSignatureBudget(
            config.bad_signature_burst, config.bad_signature_interval, config.max_tracked_peers)
        self.table = RoutingTable(self.node_id, config, now)
        self.health = PeerHealth(config)
        self.records = RecordStore(config.limits)
        self._effects: list[SendRequest | OperationDone] = []
        self._pending: dict[int, Pending] = {}
        self._active: dict[int, Operation] = {}
        # Deadlines of requests (req id) and operations, as (when, seq, what): a lazy heap.
        # An entry is stale once its request is settled or its operation has re-armed (its
        # `armed_at` differs); stale entries are dropped when they reach the top.
        self._timers: list[tuple[float, int, int | Operation]] = []
        self._timer_seq = 0
        self._next_req = 0
        self._next_op = 0
        # (key, subkey) -> [record, next republish time]: what we published and keep alive
        self._owned: dict[tuple[bytes, str | None], list] = {}
        self._owned_next: float | None = None  # earliest republish time
        self._ping: Ping | None = None  # see ping_request
        # Lines peers cause at will (refused STOREs, bad answers: operations.py; malformed
        # messages: the driver's), rate-limited per kind (log_at: the clock is `now`).
        self.peer_log = LogLimiter(log)

    # -- effects -------------------------------------------------------------------------

    def take_effects(self) -> list[SendRequest | OperationDone]:
        effects, self._effects = self._effects, []
        return effects

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    @property
    def active_operations(self) -> int:
        return len(self._active)

    def set_addrs(self, addrs: Sequence[str]) -> None:
        self.addrs = tuple(addrs)

    def ping_request(self) -> Ping:
        """Our PING: one immutable message serves every ping while our addresses stay the
        same (a third of all requests are pings of questionable contacts)."""
        ping = self._ping
        if ping is None or ping.addrs is not self.addrs or ping.serves != self.serves:
            ping = self._ping = Ping(self.addrs, self.serves)
        return ping

    # -- starting operations ---------------------------------------------------------------

    def _new_op_id(self) -> int:
        self._next_op += 1
        return self._next_op

    def _run(self, op: Operation, now: float) -> int:
        self._active[op.op_id] = op
        self._drive(op, now)
        return op.op_id

    def _drive(self, op: Operation, now: float) -> None:
        op.step(self, now)
        if op.done:
            if self._active.pop(op.op_id, None) is not None and not op.internal:
                self._effects.append(OperationDone(op.op_id, op.result))  # type: ignore[arg-type]
            return
        deadline = op.deadline()
        if deadline != op.armed_at:
            op.armed_at = deadline
            if deadline is not None:
                self._push_timer(deadline, op)

    def _push_timer(self, when: float, what: int | Operation) -> None:
        self._timer_seq += 1
        heappush(self._timers, (when, self._timer_seq, what))

    def get(self, keys: Sequence[bytes], now: float) -> int:
        """Find the records of `keys`; ends with a `GetResult`."""
        keys = list(dict.fromkeys(keys))
        return self._run(GetOperation(self, self._new_op_id(), keys, now), now)

    def store(self, records: Sequence[Record], now: float, *, republish: bool = True) -> int:
        """Store records on the `num_replicas` nodes closest to each key; ends with a
        `StoreResult`. Raises RecordError for a record no node would accept. With
        `republish`, this node re-stores them before they expire (it is their owner)."""
        checked = [check_record(r, now, self.config.limits, self.verifier) for r in records]
        if republish:
            for record in checked:
                self._own(record, now)
        return self._run(
            StoreOperation(self, self._new_op_id(), checked, now, internal=False), now
        )

    def find_closest(self, targets: Sequence[int], now: float) -> int:
        """Find the k closest nodes to each target id; ends with a `FindResult`."""
        return self._run(LookupOperation(self, self._new_op_id(), list(targets), now), now)

    def bootstrap(self, seeds: Iterable[Contact], now: float) -> int:
        """Join through `seeds`; ends with a `BootstrapResult`."""
        seeds = tuple(c for c in seeds if c.node_id != self.node_id)
        return self._run(BootstrapOperation(self, self._new_op_id(), seeds, now), now)

    def make_record(
        self, key: bytes, value: bytes, expiration: float, subkey: str | None = None
    ) -> Record:
        """A record ready to store, signed when `subkey` is our own peer id."""
        owner = owner_of(subkey)
        if owner is None:
            return Record(key, subkey, value, float(expiration))
        if owner != self.peer_id or self._sign is None:
            raise RecordError(f"subkey {subkey} is owned by another peer")
        assert subkey is not None
        return sign_record(key, subkey, value, expiration, self._sign)

    def forget(self, key: bytes, subkey: str | None = None) -> None:
        """Stop republishing a record this node stored."""
        self._owned.pop((key, subkey), None)  # its republish time lapses harmlessly

    # -- used by operations ----------------------------------------------------------------

    def new_lookup(
        self, target: int, now: float, seeds: tuple[Contact, ...] = (), *, hedged: bool = False
    ) -> tuple[ClosestPeersLookup, bool]:
        """A lookup seeded with our closest contacts that are not backed off.

        Returns it with whether backed-off peers should be skipped: not when every known
        peer is backed off (our own link was probably down; section 4.1's concern).
        """
        config = self.config
        health = self.health
        self.table.mark_lookup(target, now)
        usable = self.table.closest(
            target, config.lookup_seeds, exclude=lambda c: health.is_backed_off(c.node_id, now)
        )
        skip = bool(usable) or not len(self.table)
        if not usable:
            usable = self.table.closest(target, config.lookup_seeds)
        lookup = ClosestPeersLookup(
            target,
            (*seeds, *usable),
            k=config.k,
            alpha=config.alpha,
            timeout_for=lambda c: health.soft_timeout(c.node_id),
            self_id=self.node_id,
            max_peers_per_response=config.max_peers_per_response,
            max_candidates=config.max_lookup_candidates,
            hedge_delay=self._hedge_delay() if hedged else None,
        )
        return lookup, skip

    def _hedge_delay(self) -> float | None:
        config = self.config
        if config.value_hedge_rtts <= 0:
            return None
        rtt = self.health.typical_rtt()
        if rtt is None:
            return config.min_soft_timeout
        delay = max(config.min_value_hedge_delay, config.value_hedge_rtts * rtt)
        return min(config.min_soft_timeout, delay)

    def send_for(
        self, op: Operation, contact: Contact, request: Request, now: float, tag: tuple,
        *, soft: bool = True,
    ) -> int:
        """Queue a SendRequest on behalf of `op` (soft: track the adaptive timeout too)."""
        self._next_req += 1
        req_id = self._next_req
        timeout = self.config.request_timeout
        soft_deadline = now + self.health.soft_timeout(contact.node_id) if soft else None
        self._pending[req_id] = Pending(
            op, contact, request, now, now + timeout, soft_deadline, tag
        )
        # a soft deadline always comes first (max_soft_timeout < request_timeout)
        self._push_timer(now + timeout if soft_deadline is None else soft_deadline, req_id)
        op.requests += 1
        self._effects.append(SendRequest(req_id, contact, request, timeout))
        return req_id

    def store_local(self, record: Record, now: float, storer: PeerId | None = None) -> bool:
        """Keep a record we are one of the closest nodes for; True when we now hold it.
        `storer`: the peer that asked (None: our own record), bounded by its quota."""
        outcome = self.records.store(record, now, storer)
        return outcome is StoreOutcome.STORED or self._holds(record)

    def _holds(self, record: Record) -> bool:
        return any(
            r.subkey == record.subkey
            and r.expiration == record.expiration
            and r.value == record.value
            for r in self.records.get(record.key, float("-inf"))
        )

    def start_direct_store(self, contact: Contact, records: list[Record], now: float) -> None:
        self._run(DirectStoreOperation(self, self._new_op_id(), contact, records, now), now)

    # -- incoming requests -----------------------------------------------------------------

    def handle_request(self, sender: PeerId, request: Request, now: float) -> Response:
        """Answer `request` from the authenticated peer `sender`."""
        if sender.raw == self.peer_id.raw:  # PeerId's dataclass __eq__ is a Python call
            raise DHTProtocolError("request from ourselves")
        sender_id = node_id_of(sender.raw)
        kind = type(request)
        if request.serves and request.addrs:
            # A PING's sender is recorded but never makes us ping in turn: it is checking
            # its own table, and if it could, every PING would introduce its sender to
            # another full bucket whose least recent contact then gets pinged: a chain
            # across the network.
            self._saw(self._contact_of(sender, sender_id, request.addrs), now,
                      may_ping=kind is not Ping)
        if kind is Ping:
            return _PING_RESPONSE
        k = self.config.k
        closest = self.table.closest_except
        if kind is FindNode:
            targets = request.targets  # type: ignore[union-attr]
            if len(targets) == 1:  # the common case (k contacts always fit), no generator
                return FindNodeResponse((tuple(closest(targets[0], k, sender_id)),))
            room = (MAX_MESSAGE_BYTES - _ANSWER_ENVELOPE) // len(targets)
            return FindNodeResponse(tuple(_within(closest(t, k, sender_id), room)
                                          for t in targets))
        if isinstance(request, FindValue):
            # Each key first gets a fair share of the records' room, then what the others
            # left goes to the keys in order (a fixed share alone dropped, with no sign, the
            # records of a key over 15 KiB in a get of 64 keys, with the answer mostly empty).
            # A key's records stay a prefix of its list: the first that does not fit ends it.
            total = MAX_MESSAGE_BYTES - _PEERS_ALLOWANCE
            share = total // len(request.keys)
            held = [self.records.get(key, now) for key in request.keys]
            found: list[list[Record]] = []
            used_total = 0
            for records_of_key in held:
                records = []
                used = 0
                for record in records_of_key:
                    size = record.size()
                    if used + size > share:
                        break
                    records.append(record)
                    used += size
                found.append(records)
                used_total += used
            for records_of_key, records in zip(held, found, strict=True):
                for record in records_of_key[len(records):]:
                    size = record.size()
                    if used_total + size > total:
                        break
                    records.append(record)
                    used_total += size
            # The closer peers share what the records left of the message.
            room = min(_PEER_LIST_ROOM,
                       (MAX_MESSAGE_BYTES - _ANSWER_ENVELOPE - used_total) // len(request.keys))
            results = []
            for key, records in zip(request.keys, found, strict=True):
                # Kademlia 2.3: a node that holds the value "just returns the stored value";
                # a reader that merges replicas asks for the closer peers too ("near"), or
                # its lookup could reach no replica beyond the first ones it knew.
                peers = () if records and not request.near else _within(
                    closest(key_id_of(key), k, sender_id), room)
                results.append(FoundValue(tuple(records), peers))
            return FindValueResponse(tuple(results))
        if isinstance(request, Store):
            stored = []
            sig_budget = self.bad_signatures
            refused: RecordError | None = None
            for record in request.records:
                subkey = record.subkey  # owned, or looking so (then refused anyway):
                if (subkey is not None and subkey.startswith(OWNED_SUBKEY_PREFIX)
                        and not sig_budget.may_check(sender, now)):
                    stored.append(False)  # it sent bad signatures: not worth checking
                    continue
                try:
                    record = check_record(record, now, self.config.limits, self.verifier)
                except RecordError as e:
                    if isinstance(e, SignatureError):
                        sig_budget.failed(sender, now)
                    refused = refused or e
                    stored.append(False)
                    continue
                stored.append(self.store_local(record, now, sender))
            if refused is not None:
                # One line per request, not per record: 256 refused records made 256 lines
                # at the default level, 9 ms of logging for a STORE of 5 KB.
                # (and a bounded number per interval: a peer sends STOREs at will)
                self.peer_log.log_at(now, logging.INFO, "refused records",
                                         "refusing %d of %d records from %s, the first "
                                         "because: %s", stored.count(False), len(stored),
                                         sender.short(), refused)
            return StoreResponse(tuple(stored))
        raise DHTProtocolError(f"unsupported request {type(request).__name__}")

    def _contact_of(self, sender: PeerId, sender_id: int, addrs: tuple[str, ...]) -> Contact:
        """The sender as a contact: the table's own when it holds the same one (contacts
        are immutable, so it is the same value, and it keeps its cached wire size)."""
        known = self.table.get(sender_id)
        if known is not None and known.addrs == addrs:
            return known
        return Contact(sender, addrs, sender_id)

    def _saw(self, contact: Contact, now: float, may_ping: bool = True) -> None:
        outcome = self.table.add_or_update(contact, now, may_ping=may_ping)
        if type(outcome) is PingLeastRecent:  # rare: most sightings update or add
            self._run(PingOperation(self, self._new_op_id(), outcome.contact, now), now)

    # -- results of our requests -----------------------------------------------------------

    def on_response(self, req_id: int, response: Response, now: float) -> None:
        pending = self._pending.pop(req_id, None)
        if pending is None:
            return  # already timed out or failed
        if not isinstance(response, _RESPONSE_TYPES[type(pending.request)]):
            self.peer_log.log_at(now, logging.WARNING, "wrong answer types",
                                 "%s answered with the wrong message type",
                                 pending.contact.peer.short())
            self._failed(pending, now)
            return
        self.health.on_success(pending.contact.node_id, now - pending.sent_at, now)
        self._saw(pending.contact, now)
        self.table.mark_answered(pending.contact.node_id, now)
        op = pending.op
        if not op.done:
            op.on_response(self, pending, response, now)
            self._drive(op, now)

    def on_failure(self, req_id: int, now: float) -> None:
        pending = self._pending.pop(req_id, None)
        if pending is not None:
            self._failed(pending, now)

    def _failed(self, pending: Pending, now: float) -> None:
        node_id = pending.contact.node_id
        self.health.on_failure(node_id, now)
        self.table.on_failure(node_id, now)
        op = pending.op
        if not op.done:
            op.on_failure(self, pending, now)
            self._drive(op, now)

    # -- time --------------------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        """Apply every deadline that has passed."""
        timers = self._timers
        due: list[int | Operation] = []
        while timers and timers[0][0] <= now:
            due.append(heappop(timers)[2])
        ops: list[Operation] = []
        for what in due:
            if type(what) is not int:
                ops.append(what)  # type: ignore[arg-type]
                continue
            pending = self._pending.get(what)  # type: ignore[arg-type]
            if pending is None:
                continue  # settled meanwhile
            if pending.soft_deadline is not None:
                if pending.soft_deadline > now:
                    continue  # not possible for a live entry; kept for safety
                pending.soft_deadline = None
                # Silent past its adaptive timeout: avoid it until it answers (sec. 2.3).
                self.health.on_failure(pending.contact.node_id, now)
                if pending.deadline > now:
                    self._push_timer(pending.deadline, what)
                    continue
            if pending.deadline <= now:
                self.on_failure(what, now)  # type: ignore[arg-type]
        seen: set[int] = set()
        for op in ops:
            if op.op_id in seen or op.op_id not in self._active:
                continue
            seen.add(op.op_id)
            deadline = op.deadline()
            if deadline is not None and deadline <= now:
                op.armed_at = None  # re-armed by _drive if still waiting
                self._drive(op, now)
        if self.serves:
            refresh_at = self.table.next_refresh_at()
            if refresh_at is not None and refresh_at <= now:
                self._refresh_buckets(now)
        self._republish_due(now)

    def _refresh_buckets(self, now: float) -> None:
        """Kademlia 2.3: a lookup of a random id in every bucket due for a refresh. With the
        traffic rule, the due buckets below our k-th closest contact share one lookup of our
        own id, which passes through all of them (`RoutingTable.neighbourhood_floor`)."""
        table = self.table
        due = table.refresh_due(now)
        if not due:
            return
        targets = []
        if self.config.traffic_refreshes_buckets:
            floor = table.neighbourhood_floor()
            if due[0] < floor:
                for i in due:
                    if i < floor:
                        table.mark_bucket(i, now)
                targets.append(self.node_id)
                due = [i for i in due if i >= floor]
        targets += [table.random_id_in_bucket(i, self.random_bits) for i in due]
        for target in targets[_MAX_REFRESH_TARGETS:]:  # their turn comes next time
            table.mark_lookup(target, now)
        op = LookupOperation(
            self, self._new_op_id(), targets[:_MAX_REFRESH_TARGETS], now, internal=True
        )
        self._run(op, now)

    def next_deadline(self) -> float | None:
        """When `handle_timer` must next be called (None: only after new input)."""
        timers = self._timers
        pending = self._pending
        while timers:
            when, _, what = timers[0]
            if type(what) is int:
                p = pending.get(what)  # type: ignore[arg-type]
                if p is not None and when == (
                    p.deadline if p.soft_deadline is None else p.soft_deadline
                ):
                    break
            elif what.armed_at == when and what.op_id in self._active:  # type: ignore[union-attr]
                break
            heappop(timers)
        best = timers[0][0] if timers else _INF
        if self.serves:
            d = self.table.next_refresh_at()
            if d is not None and d < best:
                best = d
        if self._owned_next is not None and self._owned_next < best:
            best = self._owned_next
        return None if best == _INF else best

    # -- republishing (Kademlia 2.5: the owner keeps its records alive) -----------------------

    def _republish_at(self, record: Record, now: float) -> float | None:
        config = self.config
        delay = (record.expiration - now) / 2
        delay = min(config.republish_interval, max(config.min_republish_interval, delay))
        at = now + delay
        return at if at < record.expiration else None

    def _own(self, record: Record, now: float) -> None:
        at = self._republish_at(record, now)
        self._owned[(record.key, record.subkey)] = [record, at]
        if at is not None and (self._owned_next is None or at < self._owned_next):
            self._owned_next = at

    def _republish_due(self, now: float) -> None:
        if self._owned_next is None or self._owned_next > now:
            return
        due: list[Record] = []
        upcoming: float | None = None
        for slot, entry in list(self._owned.items()):
            record, at = entry
            if record.expiration <= now:
                del self._owned[slot]
                continue
            if at is not None and at <= now:
                due.append(record)
                at = entry[1] = self._republish_at(record, now)
            if at is not None and (upcoming is None or at < upcoming):
                upcoming = at
        self._owned_next = upcoming
        if due:
            self._run(StoreOperation(self, self._new_op_id(), due, now, internal=True), now)


def _within(contacts: Iterable[Contact], room: int) -> tuple[Contact, ...]:
    """The first of `contacts` (nearest first) whose encoding takes at most `room` bytes. A
    contact may carry 8 addresses of 256 characters (2 KiB): k of them for each of 64
    targets made a 2.6 KB FIND_NODE draw a 2.7 MB answer, over the message limit that
    every requester enforces, so batched lookups failed wherever such contacts were known."""
    out = []
    for contact in contacts:
        room -= contact_size(contact)
        if room < 0:
            break
        out.append(contact)
    return tuple(out)
