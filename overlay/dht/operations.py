"""Operations of a DHT node as state machines: get, store, find closest, bootstrap, ping.

An operation never sends anything itself: it asks the node (`node.send_for`) and is fed the
answers back. Several lookups of one operation run together, and requests that different
lookups want to send to the same peer at the same moment travel as one batched message.

Pure: no I/O, no clock, no randomness except the node's injected source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from overlay.dht.contact import Contact
from overlay.dht.effects import (
    BootstrapResult,
    FindResult,
    GetResult,
    LookupStats,
    StoreResult,
)
from overlay.dht.ids import key_id_of
from overlay.dht.lookup import ClosestPeersLookup, Waiting
from overlay.dht.messages import (
    MAX_BATCH,
    MAX_MESSAGE_BYTES,
    MAX_STORE_BATCH,
    FindNode,
    FindNodeResponse,
    FindValue,
    FindValueResponse,
    Request,
    Store,
    StoreResponse,
)
from overlay.dht.records import Record, RecordError, RecordStore, check_record

if TYPE_CHECKING:
    from overlay.dht.node import DHTNode, Pending

log = logging.getLogger("overlay.dht")

# STORE requests are split so that one stays well inside the message limit.
_STORE_BATCH_BYTES = MAX_MESSAGE_BYTES // 2
# The tag of a request of an operation's only lookup (tags are read, never changed).
_SINGLE_TAG = ("find", (0,))
_PING_TAG = ("ping", ())


class Operation:
    """Base: `step` issues requests, `on_response` / `on_failure` take results in."""

    __slots__ = ("armed_at", "done", "internal", "op_id", "requests", "result")

    def __init__(self, op_id: int, internal: bool):
        self.op_id = op_id
        self.armed_at: float | None = None  # the deadline the node's timer heap holds for us
        self.internal = internal  # started by the node itself: no OperationDone effect
        self.done = False
        self.result: object = None
        self.requests = 0

    def step(self, node: DHTNode, now: float) -> None:
        pass

    def on_response(self, node: DHTNode, pending: Pending, response: object, now: float) -> None:
        pass

    def on_failure(self, node: DHTNode, pending: Pending, now: float) -> None:
        pass

    def deadline(self) -> float | None:
        return None


class LookupOperation(Operation):
    """Closest-peers lookups for several targets at once (FIND_NODE)."""

    __slots__ = ("_deadline", "_dirty", "_single", "_waits", "lookups", "skip_backed_off",
                 "targets")

    def __init__(
        self,
        node: DHTNode,
        op_id: int,
        targets: list[int],
        now: float,
        *,
        internal: bool = False,
        seeds: tuple[Contact, ...] = (),
    ):
        super().__init__(op_id, internal)
        self._deadline: float | None = None
        # Lookups to advance at the next step: those that got an answer or a failure since
        # (None: all of them). A lookup past its own deadline is advanced too; the others
        # cannot have anything new to send, so one answer does not rescan every lookup.
        self._dirty: set[int] | None = None
        self._waits: list[float | None] = []  # per lookup: when it must be advanced anyway
        self._single: Request | None = None  # see _single_request
        self.targets: list[int] = []
        self.lookups: list[ClosestPeersLookup] = []
        self.skip_backed_off: list[bool] = []
        self._start_lookups(node, targets, now, seeds)

    def _start_lookups(
        self, node: DHTNode, targets: list[int], now: float, seeds: tuple[Contact, ...] = ()
    ) -> None:
        self.targets = targets
        self.lookups = []
        self.skip_backed_off = []
        self._dirty = None
        self._waits = [None] * len(targets)
        self._single = None
        hedged = isinstance(self, GetOperation)
        for target in targets:
            lookup, skip = node.new_lookup(target, now, seeds, hedged=hedged)
            self.lookups.append(lookup)
            self.skip_backed_off.append(skip)

    def deadline(self) -> float | None:
        return self._deadline

    def _request(self, node: DHTNode, indices: list[int]) -> Request:
        return FindNode(tuple(self.targets[i] for i in indices), node.addrs, node.serves)

    def _single_request(self, node: DHTNode) -> Request:
        """The request of an operation of one lookup: the same for every peer it asks, so
        built once (again if the node's addresses change); requests are immutable."""
        request = self._single
        if request is None or request.addrs is not node.addrs or request.serves != node.serves:
            request = self._single = self._request(node, [0])
        return request

    def step(self, node: DHTNode, now: float) -> None:
        if self.done:
            return
        lookups = self.lookups
        if len(lookups) == 1:
            self._advance_one(node, now)
            if lookups[0].finished:
                self._lookups_finished(node, now)
            return
        self._advance(node, now)
        if all(lookup.finished for lookup in lookups):
            self._lookups_finished(node, now)

    def _touch(self, indices: Sequence[int]) -> None:
        if self._dirty is not None:
            self._dirty.update(indices)

    def _advance(self, node: DHTNode, now: float) -> None:
        batches: dict[int, tuple[Contact, list[int]]] = {}
        health = node.health
        lookups = self.lookups
        waits = self._waits
        dirty = self._dirty
        if dirty is None:
            indices: Iterable[int] = range(len(lookups))
        else:
            # self._deadline is the earliest of `waits`: none is due before it
            soonest = self._deadline
            if soonest is not None and soonest <= now:
                due = [i for i, w in enumerate(waits) if w is not None and w <= now]
                indices = sorted(dirty.union(due))
            else:
                indices = sorted(dirty)
        self._dirty = set()

        def backed_off(node_id: int) -> bool:  # failed recently: ask others (sec. 4.1)
            return health.is_backed_off(node_id, now)

        for i in indices:
            lookup = lookups[i]
            if lookup.finished:
                waits[i] = None
                continue
            contacts, after = lookup.next_batch(
                now, backed_off if self.skip_backed_off[i] else None)
            waits[i] = after.deadline if isinstance(after, Waiting) else None
            for contact in contacts:
                batch = batches.get(contact.node_id)
                if batch is None:
                    batches[contact.node_id] = (contact, [i])
                else:
                    batch[1].append(i)
        armed = [w for w in waits if w is not None]
        self._deadline = min(armed) if armed else None
        for contact, indices in batches.values():
            for start in range(0, len(indices), MAX_BATCH):
                chunk = indices[start:start + MAX_BATCH]
                node.send_for(self, contact, self._request(node, chunk), now, ("find", chunk))

    def _advance_one(self, node: DHTNode, now: float) -> None:
        """`_advance` for an operation of a single lookup (most are): the same steps, without
        the bookkeeping of batches shared by several lookups."""
        lookup = self.lookups[0]
        waits = self._waits
        dirty = self._dirty
        if dirty is None:
            self._dirty = set()
        else:
            if not dirty:
                wait = waits[0]
                if wait is None or wait > now:  # no answer and no deadline since: nothing new
                    self._deadline = wait
                    return
            dirty.clear()
        if lookup.finished:
            waits[0] = self._deadline = None
            return
        skip = None
        if self.skip_backed_off[0]:
            health = node.health

            def skip(node_id: int) -> bool:  # failed recently: ask others (sec. 4.1)
                return health.is_backed_off(node_id, now)

        contacts, after = lookup.next_batch(now, skip)
        waits[0] = self._deadline = after.deadline if type(after) is Waiting else None
        if contacts:
            request = self._single_request(node)
            for contact in contacts:
                node.send_for(self, contact, request, now, _SINGLE_TAG)

    def on_response(self, node: DHTNode, pending: Pending, response: object, now: float) -> None:
        kind, indices = pending.tag
        if kind != "find" or not isinstance(response, FindNodeResponse):
            return
        peer = pending.contact.node_id
        self._touch(indices)
        for peers, i in zip(response.peers, indices):
            self.lookups[i].on_success(peer, peers, now)

    def on_failure(self, node: DHTNode, pending: Pending, now: float) -> None:
        kind, indices = pending.tag
        if kind != "find":
            return
        self._touch(indices)
        for i in indices:
            self.lookups[i].on_failure(pending.contact.node_id, now)

    def _hops(self) -> int:
        hops = 0
        for lookup in self.lookups:
            for contact in lookup.closest_answered():
                depth = lookup.depth(contact.node_id)
                if depth is not None and depth + 1 > hops:
                    hops = depth + 1
        return hops

    def _lookups_finished(self, node: DHTNode, now: float) -> None:
        self.done = True
        self.result = FindResult(
            {t: lk.closest_answered() for t, lk in zip(self.targets, self.lookups)},
            LookupStats(self.requests, self._hops()),
        )


class GetOperation(LookupOperation):
    """FIND_VALUE lookups: each stops once `value_quorum` nodes returned valid records."""

    __slots__ = ("found", "holders", "hops_found", "keys", "values_seen")

    def __init__(self, node: DHTNode, op_id: int, keys: list[bytes], now: float):
        self.keys = keys
        self.found: list[RecordStore | None] = [None] * len(keys)
        self.values_seen = [0] * len(keys)
        self.holders: list[set[int]] = [set() for _ in keys]
        self.hops_found: list[int | None] = [None] * len(keys)
        super().__init__(node, op_id, [key_id_of(k) for k in keys], now)
        quorum = node.config.value_quorum
        for i, key in enumerate(keys):
            local = node.records.get(key, now)
            if local:
                self._merge(node, i, local, now)
                self.holders[i].add(node.node_id)
                self.hops_found[i] = 0
                if self.values_seen[i] >= quorum:
                    self.lookups[i].finish()

    def _request(self, node: DHTNode, indices: list[int]) -> Request:
        return FindValue(tuple(self.keys[i] for i in indices), node.addrs, node.serves,
                         node.config.value_quorum > 1)

    def _merge(self, node: DHTNode, i: int, records: list[Record], now: float) -> None:
        acc = self.found[i]
        if acc is None:
            acc = self.found[i] = RecordStore(node.config.limits)
        for record in records:
            acc.store(record, now)
        self.values_seen[i] += 1

    def on_response(self, node: DHTNode, pending: Pending, response: object, now: float) -> None:
        kind, indices = pending.tag
        if kind != "find" or not isinstance(response, FindValueResponse):
            return
        self._touch(indices)
        peer = pending.contact
        for item, i in zip(response.results, indices):
            lookup = self.lookups[i]
            if lookup.finished:
                continue
            valid: list[Record] = []
            try:
                for record in item.records:
                    if record.expiration > now:  # expired in flight: not an offence
                        valid.append(
                            check_record(
                                record, now, node.config.limits, node.verifier, check_ttl=False
                            )
                        )
            except RecordError as e:
                # (one line per key of a batch, up to 64 keys of 4 KiB each per answer: a
                # lying peer is asked again by every lookup)
                node.peer_log.log_at(now, logging.WARNING, "dropped answers",
                                     "dropping answer from %s for key %r: %s", peer.peer,
                                     self.keys[i][:64], e)
                lookup.on_failure(peer.node_id, now)
                continue
            lookup.on_success(peer.node_id, item.peers, now)
            if valid:
                self._merge(node, i, valid, now)
                self.holders[i].add(peer.node_id)
                depth = lookup.depth(peer.node_id)
                hops = 1 if depth is None else depth + 1
                if self.hops_found[i] is None or hops < self.hops_found[i]:
                    self.hops_found[i] = hops
                if self.values_seen[i] >= node.config.value_quorum:
                    lookup.finish()

    def _lookups_finished(self, node: DHTNode, now: float) -> None:
        self.done = True
        records: dict[bytes, list[Record]] = {}
        hops = 0
        for i, key in enumerate(self.keys):
            acc = self.found[i]
            found = acc.get(key, now) if acc is not None else []
            records[key] = found
            lookup = self.lookups[i]
            if found:
                hops = max(hops, self.hops_found[i] or 0)
                if node.config.cache_on_path:
                    self._cache(node, lookup, i, found, now)
            else:
                answered = [lookup.depth(c.node_id) for c in lookup.closest_answered()]
                hops = max([hops] + [d + 1 for d in answered if d is not None])
        self.result = GetResult(records, LookupStats(self.requests, hops))

    def _cache(
        self, node: DHTNode, lookup: ClosestPeersLookup, i: int, found: list[Record], now: float
    ) -> None:
        """Kademlia 2.3: store the value at the closest node seen that did not return it."""
        others = lookup.answered_without(self.holders[i])
        if others:
            node.start_direct_store(others[0], found, now)


class StoreOperation(LookupOperation):
    """FIND_NODE for every key, then STORE on the `num_replicas` closest (and locally if we
    are among them), batching all records bound for the same peer."""

    __slots__ = ("by_key", "key_index", "outstanding", "phase", "records", "replicas")

    def __init__(
        self, node: DHTNode, op_id: int, records: list[Record], now: float, internal: bool
    ):
        self.records = records
        self.key_index: dict[bytes, int] = {}
        self.by_key: dict[bytes, list[int]] = {}
        for j, record in enumerate(records):
            self.key_index.setdefault(record.key, len(self.key_index))
            self.by_key.setdefault(record.key, []).append(j)
        self.replicas = [0] * len(records)
        self.outstanding = 0
        self.phase = "find"
        targets = [key_id_of(key) for key in self.key_index]
        super().__init__(node, op_id, targets, now, internal=internal)

    def step(self, node: DHTNode, now: float) -> None:
        if self.phase == "find":
            super().step(node, now)
        elif self.outstanding == 0:
            self.done = True

    def _lookups_finished(self, node: DHTNode, now: float) -> None:
        self.phase = "store"
        k = node.config.num_replicas
        per_peer: dict[int, tuple[Contact, list[int]]] = {}
        for key, i in self.key_index.items():
            target = self.targets[i]
            chosen: list[Contact | None] = list(self.lookups[i].closest_answered(k))
            if node.serves:
                chosen.append(None)  # ourselves
                chosen.sort(key=lambda c: (node.node_id if c is None else c.node_id) ^ target)
                chosen = chosen[:k]
            indices = self.by_key[key]
            for contact in chosen:
                if contact is None:
                    for j in indices:
                        if node.store_local(self.records[j], now):
                            self.replicas[j] += 1
                    continue
                entry = per_peer.get(contact.node_id)
                if entry is None:
                    per_peer[contact.node_id] = (contact, list(indices))
                else:
                    entry[1].extend(indices)
        for contact, indices in per_peer.values():
            for chunk in _store_chunks(self.records, indices):
                request = Store(tuple(self.records[j] for j in chunk), node.addrs, node.serves)
                self.outstanding += 1
                node.send_for(self, contact, request, now, ("store", chunk), soft=False)
        self.result = StoreResult(self.replicas, LookupStats(0, self._hops()))
        if self.outstanding == 0:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        assert isinstance(self.result, StoreResult)
        self.result = StoreResult(
            self.replicas, LookupStats(self.requests, self.result.stats.hops)
        )

    def on_response(self, node: DHTNode, pending: Pending, response: object, now: float) -> None:
        kind, indices = pending.tag
        if kind == "find":
            super().on_response(node, pending, response, now)
            return
        if isinstance(response, StoreResponse):
            for ok, j in zip(response.stored, indices):
                if ok:
                    self.replicas[j] += 1
        self._store_settled()

    def on_failure(self, node: DHTNode, pending: Pending, now: float) -> None:
        if pending.tag[0] == "find":
            super().on_failure(node, pending, now)
        else:
            self._store_settled()

    def _store_settled(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0:
            self._finish()


def _store_chunks(records: list[Record], indices: list[int]) -> list[list[int]]:
    """Split record indices into STORE requests under the count and byte limits."""
    chunks: list[list[int]] = []
    current: list[int] = []
    size = 0
    for j in indices:
        record_size = records[j].size()
        if current and (len(current) >= MAX_STORE_BATCH or size + record_size > _STORE_BATCH_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(j)
        size += record_size
    if current:
        chunks.append(current)
    return chunks


class DirectStoreOperation(Operation):
    """STORE records on one known node, no lookup (path caching)."""

    __slots__ = ()

    def __init__(self, node: DHTNode, op_id: int, contact: Contact, records: list[Record],
                 now: float):
        super().__init__(op_id, internal=True)
        indices = list(range(len(records)))
        chunks = _store_chunks(records, indices)
        if not chunks:
            self.done = True
            return
        chunk = chunks[0]  # a cached copy is best effort: one request at most
        request = Store(tuple(records[j] for j in chunk), node.addrs, node.serves)
        node.send_for(self, contact, request, now, ("store", chunk), soft=False)

    def on_response(self, node: DHTNode, pending: Pending, response: object, now: float) -> None:
        self.done = True

    def on_failure(self, node: DHTNode, pending: Pending, now: float) -> None:
        self.done = True


class PingOperation(Operation):
    """Ping the least recently seen contact of a full bucket (Kademlia 2.2)."""

    __slots__ = ("contact",)

    def __init__(self, node: DHTNode, op_id: int, contact: Contact, now: float):
        super().__init__(op_id, internal=True)
        self.contact = contact
        node.send_for(self, contact, node.ping_request(), now, _PING_TAG, soft=False)

    def on_response(self, node: DHTNode, pending: Pending, response: object, now: float) -> None:
        node.table.on_ping_result(self.contact.node_id, True, now)
        self.done = True

    def on_failure(self, node: DHTNode, pending: Pending, now: float) -> None:
        node.table.on_ping_result(self.contact.node_id, False, now)
        self.done = True


class BootstrapOperation(LookupOperation):
    """Join (Kademlia 2.3): look ourselves up through the given peers, then refresh every
    bucket farther away than our closest neighbour (serving nodes only: a client just needs
    a few contacts to start its lookups from).

    With the traffic rule (`DHTConfig.traffic_refreshes_buckets`) the buckets below our k-th
    closest contact are left out: the self-lookup has just asked every node they hold, so a
    lookup there would find nobody new. The farther buckets are refreshed even when an
    answer of the self-lookup came from them: one path answer does not fill a bucket, and
    the refresh is what populates it (and announces us there)."""

    __slots__ = ("phase", "seed_ids", "total_hops", "total_requests")

    def __init__(self, node: DHTNode, op_id: int, seeds: tuple[Contact, ...], now: float):
        self.phase = "self"
        self.seed_ids = {c.node_id for c in seeds}
        super().__init__(node, op_id, [node.node_id], now, seeds=seeds)

    def _lookups_finished(self, node: DHTNode, now: float) -> None:
        if self.phase == "self" and node.serves:  # a client only needs a few contacts
            self.phase = "refresh"
            indices = node.table.refresh_indices()
            if node.config.traffic_refreshes_buckets:
                floor = node.table.neighbourhood_floor()
                indices = range(max(indices.start, floor), indices.stop) if indices else indices
            targets = [node.table.random_id_in_bucket(i, node.random_bits) for i in indices]
            self._start_lookups(node, targets, now)
            self.step(node, now)
            return
        self.done = True
        reached = not self.seed_ids or len(node.table) > 0
        self.result = BootstrapResult(len(node.table), reached, LookupStats(self.requests, 0))
