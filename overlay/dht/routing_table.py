"""The routing table: k-buckets with replacement caches (Kademlia paper, sections 2.2 and 4.1).

Bucket i holds up to k contacts at XOR distance [2**i, 2**(i+1)) from this node, least
recently seen first, each with the time it was last seen. A new contact for a full bucket
never pushes anyone out by itself: the table parks it in the bucket's replacement cache.
Only when the least recently seen contact is *questionable* (not seen for
`questionable_after` seconds, BEP 5's 15 minutes) and no ping is pending for the bucket does
the table ask the caller to ping it (`PingLeastRecent`); `on_ping_result` then keeps the old
one (alive: long-lived nodes are the likeliest to stay up, section 2.2) or evicts it for the
most recent replacement (dead). So a bucket pings at most once per pending replacement and
never a contact heard from recently (section 4.1 delays probing "until it has useful
messages to send"; pinging on every newcomer makes each PING introduce the pinger to another
full bucket, a cascade). A contact that failed `stale_after_failures` requests in a row is
stale (section 4.1) and is replaced as soon as a replacement is waiting; with no replacement
it is only flagged, so a node whose own link went down does not empty its table.

Bucket refresh (Kademlia 2.3): a bucket not refreshed for `bucket_refresh_interval` is due
for a lookup of a random id in its range. What refreshes it is the config's choice: by
default (`traffic_refreshes_buckets`, BEP 5's "last changed" property) a lookup into it, an
answer from any node in its range, or a contact added to or replaced in it; with the paper's
letter only a lookup into it. Answers are frequent, so they only move the bucket's clock:
the cached next refresh time is a lower bound, made exact again by `refresh_due`.

Only nodes that serve DHT requests may be added; the caller checks that, since it knows the
request flags.

Pure: no I/O, no clock (time comes in as `now`), no randomness.
"""

from __future__ import annotations

import enum
from bisect import insort
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from overlay.dht.config import DHTConfig
from overlay.dht.contact import Contact
from overlay.dht.ids import ID_BITS


class AddOutcome(enum.Enum):
    ADDED = "added"
    UPDATED = "updated"
    IGNORED = "ignored"  # our own id
    CACHED = "cached"  # full bucket, a ping is already pending: parked as a replacement


@dataclass(frozen=True, slots=True)
class PingLeastRecent:
    """Full bucket: ping `contact` (the least recently seen); `new` waits as a replacement."""

    contact: Contact
    new: Contact


class _Bucket:
    __slots__ = ("contacts", "failures", "pending_ping", "replacements", "seen")

    def __init__(self) -> None:
        # node_id -> Contact in order of last sighting: first = least recently seen.
        self.contacts: dict[int, Contact] = {}
        self.seen: dict[int, float] = {}  # node_id -> time of the last sighting (same keys)
        # node_id -> (Contact, time seen), most recently seen last
        self.replacements: dict[int, tuple[Contact, float]] = {}
        self.failures: dict[int, int] = {}  # sparse: contacts with failures in a row
        self.pending_ping: int | None = None


class RoutingTable:
    """The k-buckets of one node. Buckets are created on first use, so a table stays small."""

    __slots__ = (
        "_buckets",
        "_changed_at",
        "_config",
        "_created_at",
        "_indices",
        "_lowest",
        "_refresh_at",
        "_size",
        "_traffic",
        "self_id",
    )

    def __init__(self, self_id: int, config: DHTConfig, now: float = 0.0):
        self.self_id = self_id
        self._config = config
        self._buckets: dict[int, _Bucket] = {}
        self._indices: list[int] = []  # bucket indices created so far, ascending
        self._size = 0
        self._created_at = now
        # bucket index -> when it was last refreshed (looked up into; with the traffic rule
        # also answered from or changed); a bucket never refreshed counts from `now`
        self._changed_at: dict[int, float] = {}
        self._traffic = config.traffic_refreshes_buckets
        self._lowest: int | None = -1  # lowest populated bucket (None: empty; -1: unknown)
        self._refresh_at: float | None = None  # next_refresh_at(): exact or a lower bound
        self._invalidate()

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Contact]:
        for bucket in self._buckets.values():
            yield from bucket.contacts.values()

    def __contains__(self, node_id: int) -> bool:
        return self.get(node_id) is not None

    def get(self, node_id: int) -> Contact | None:
        bucket = self._buckets.get(self._index(node_id))
        return None if bucket is None else bucket.contacts.get(node_id)

    def bucket(self, index: int) -> list[Contact]:
        """Contacts of bucket `index`, least recently seen first."""
        bucket = self._buckets.get(index)
        return [] if bucket is None else list(bucket.contacts.values())

    def replacements(self, index: int) -> list[Contact]:
        bucket = self._buckets.get(index)
        return [] if bucket is None else [c for c, _ in bucket.replacements.values()]

    def last_seen(self, node_id: int) -> float | None:
        """When `node_id` last answered or asked us something (None: not in the table)."""
        bucket = self._buckets.get(self._index(node_id))
        return None if bucket is None else bucket.seen.get(node_id)

    def failures(self, node_id: int) -> int:
        bucket = self._buckets.get(self._index(node_id))
        return 0 if bucket is None else bucket.failures.get(node_id, 0)

    def _invalidate(self) -> None:
        """Forget the cached refresh data (recomputed on demand: updates are frequent)."""
        self._lowest = -1

    def _refresh_cache(self) -> None:
        populated = [i for i, b in self._buckets.items() if b.contacts]
        self._lowest = min(populated) if populated else None
        if self._lowest is None:
            self._refresh_at = None
        else:
            span = range(self._lowest, ID_BITS)
            last = min(self._changed_at.get(i, self._created_at) for i in span)
            self._refresh_at = last + self._config.bucket_refresh_interval

    def _index(self, node_id: int) -> int:
        return (self.self_id ^ node_id).bit_length() - 1

    # -- updates -------------------------------------------------------------------------

    def add_or_update(
        self, contact: Contact, now: float, *, may_ping: bool = True
    ) -> AddOutcome | PingLeastRecent:
        """Record that `contact` was just seen alive (it answered us or asked us something).

        With `may_ping=False` a newcomer to a full bucket is only cached, never the cause of
        a ping (the node uses it for PINGs it receives: see node.py)."""
        node_id = contact.node_id
        index = (self.self_id ^ node_id).bit_length() - 1
        if index < 0:
            return AddOutcome.IGNORED
        bucket = self._buckets.get(index)
        if bucket is None:
            bucket = self._buckets[index] = _Bucket()
            insort(self._indices, index)
        contacts = bucket.contacts
        if node_id in contacts:
            del contacts[node_id]  # re-inserted at the tail: most recently seen
            contacts[node_id] = contact
            bucket.seen[node_id] = now
            if bucket.failures:
                bucket.failures.pop(node_id, None)
            return AddOutcome.UPDATED
        if len(contacts) < self._config.k:
            self._insert(bucket, contact, now)
            if self._traffic:
                self._changed_at[index] = now  # BEP 5: "a node is added to a bucket"
            return AddOutcome.ADDED
        stale = self._stale_contact(bucket) if bucket.failures else None
        if stale is not None:
            self._remove_from(bucket, stale)
            self._insert(bucket, contact, now)
            if self._traffic:
                self._changed_at[index] = now  # BEP 5: a node "is replaced"
            return AddOutcome.ADDED
        self._cache_replacement(bucket, contact, now)
        if bucket.pending_ping is not None or not may_ping:
            return AddOutcome.CACHED
        least_recent = next(iter(contacts))
        if now - bucket.seen[least_recent] < self._config.questionable_after:
            return AddOutcome.CACHED  # heard from recently: no reason to doubt it (BEP 5)
        bucket.pending_ping = least_recent
        return PingLeastRecent(contacts[least_recent], contact)

    def _insert(self, bucket: _Bucket, contact: Contact, seen: float) -> None:
        node_id = contact.node_id
        bucket.contacts[node_id] = contact
        bucket.seen[node_id] = seen
        if bucket.replacements:
            bucket.replacements.pop(node_id, None)
        self._size += 1
        if len(bucket.contacts) == 1:
            self._invalidate()

    def on_ping_result(self, node_id: int, alive: bool, now: float) -> Contact | None:
        """Resolve a `PingLeastRecent`; returns the replacement promoted when it was dead."""
        index = self._index(node_id)
        bucket = self._buckets.get(index)
        if bucket is None:
            return None
        if bucket.pending_ping == node_id:
            bucket.pending_ping = None
        if node_id not in bucket.contacts:
            return None
        if alive:
            contact = bucket.contacts.pop(node_id)
            bucket.contacts[node_id] = contact
            bucket.seen[node_id] = now
            bucket.failures.pop(node_id, None)
            return None
        self._remove_from(bucket, node_id)
        return self._promote_replacement(bucket, index, now)

    def on_failure(self, node_id: int, now: float) -> Contact | None:
        """A request to `node_id` failed; returns the replacement promoted if it went stale."""
        index = self._index(node_id)
        bucket = self._buckets.get(index)
        if bucket is None:
            return None
        if node_id not in bucket.contacts:
            bucket.replacements.pop(node_id, None)
            return None
        failures = bucket.failures[node_id] = bucket.failures.get(node_id, 0) + 1
        if failures >= self._config.stale_after_failures and bucket.replacements:
            self._remove_from(bucket, node_id)
            return self._promote_replacement(bucket, index, now)
        return None

    def remove(self, node_id: int) -> bool:
        bucket = self._buckets.get(self._index(node_id))
        if bucket is None or node_id not in bucket.contacts:
            return False
        self._remove_from(bucket, node_id)
        return True

    def _stale_contact(self, bucket: _Bucket) -> int | None:
        limit = self._config.stale_after_failures
        for node_id, failures in bucket.failures.items():
            if failures >= limit:
                return node_id
        return None

    def _cache_replacement(self, bucket: _Bucket, contact: Contact, now: float) -> None:
        cache = bucket.replacements
        cache.pop(contact.node_id, None)
        cache[contact.node_id] = (contact, now)  # most recent last
        while len(cache) > self._config.replacement_cache_size:
            del cache[next(iter(cache))]

    def _remove_from(self, bucket: _Bucket, node_id: int) -> None:
        del bucket.contacts[node_id]
        del bucket.seen[node_id]
        bucket.failures.pop(node_id, None)
        if bucket.pending_ping == node_id:
            bucket.pending_ping = None
        self._size -= 1
        if not bucket.contacts:
            self._invalidate()

    def _promote_replacement(self, bucket: _Bucket, index: int, now: float) -> Contact | None:
        if not bucket.replacements:
            return None
        _, (contact, seen) = bucket.replacements.popitem()  # the most recently seen
        self._insert(bucket, contact, seen)
        if self._traffic:
            self._changed_at[index] = now  # BEP 5: a node "is replaced with another node"
        return contact

    # -- queries -------------------------------------------------------------------------

    def closest(
        self, target: int, n: int, exclude: Callable[[Contact], bool] | None = None
    ) -> list[Contact]:
        """The `n` known contacts closest to `target`, nearest first.

        Buckets are visited in order of distance to `target` (no full sort): with d = self ^
        target, every contact of bucket i agrees with d above bit i and differs from it at
        bit i, so buckets where d has a 1 come first (highest bit first), then the others
        (lowest bit first). Only the buckets needed to reach `n` contacts are merged and
        sorted, once, by node id with the C-level key `target.__xor__`.
        """
        if n <= 0 or not self._size:
            return []
        return self._merged_closest(target, n, None, exclude)

    def _merged_closest(
        self, target: int, n: int, skip: int | None,
        exclude: Callable[[Contact], bool] | None = None,
    ) -> list[Contact]:
        # Every contact of a bucket visited earlier is nearer than every contact of one
        # visited later, so the buckets needed can be merged and sorted once.
        if exclude is not None:
            return self._merged_closest_excluding(target, n, exclude)
        buckets = self._buckets
        source: dict[int, Contact] | None = None  # the one bucket needed, or a merge
        merged: dict[int, Contact] | None = None
        for i in self._visit_order(self.self_id ^ target, self._indices):
            contacts = buckets[i].contacts
            if not contacts:
                continue
            if source is None:
                source = contacts
            else:
                if merged is None:
                    source = merged = dict(source)
                merged.update(contacts)
            size = len(source)
            if size >= n and (skip is None or size > n or skip not in source):
                break
        if source is None:
            return []
        order = sorted(source, key=target.__xor__)
        if skip is not None and skip in source:
            order.remove(skip)
        return list(map(source.__getitem__, order[:n]))

    def _merged_closest_excluding(
        self, target: int, n: int, exclude: Callable[[Contact], bool]
    ) -> list[Contact]:
        buckets = self._buckets
        merged: dict[int, Contact] = {}
        for i in self._visit_order(self.self_id ^ target, self._indices):
            for x, c in buckets[i].contacts.items():
                if not exclude(c):
                    merged[x] = c
            if len(merged) >= n:
                break
        return [merged[x] for x in sorted(merged, key=target.__xor__)[:n]]

    @staticmethod
    def _visit_order(d: int, indices: list[int]) -> Iterator[int]:
        for i in reversed(indices):
            if (d >> i) & 1:
                yield i
        for i in indices:
            if not (d >> i) & 1:
                yield i

    def closest_except(self, target: int, n: int, node_id: int) -> list[Contact]:
        """`closest(target, n)` without the contact `node_id` (e.g. the one asking)."""
        if n <= 0 or not self._size:
            return []
        return self._merged_closest(target, n, node_id)

    # -- bucket refresh (section 2.3) ---------------------------------------------------

    def mark_lookup(self, target: int, now: float) -> None:
        """A lookup for `target` refreshes the bucket that `target` falls into."""
        self.mark_bucket(self._index(target), now)

    def mark_bucket(self, index: int, now: float) -> None:
        """Bucket `index` has just been refreshed (a lookup into it, or one through it)."""
        if index >= 0:
            self._changed_at[index] = now
            self._lowest = -1

    def mark_answered(self, node_id: int, now: float) -> None:
        """`node_id` answered a request of ours: with the traffic rule, its bucket is fresh
        (BEP 5: a node "pinged and it responds"; Kademlia 2.3: the traffic of lookups passing
        through keeps buckets fresh), whether or not the node is one of its contacts.

        Only the bucket's clock moves; `next_refresh_at` may then be early, never late."""
        if self._traffic:
            index = (self.self_id ^ node_id).bit_length() - 1
            if index >= 0:
                self._changed_at[index] = now

    def refresh_indices(self) -> range:
        """Buckets worth refreshing: from our closest neighbour's bucket outwards (sec. 2.3).

        Buckets below it cover ranges in which no node is known to exist; refreshing all 256
        would send hundreds of useless lookups.
        """
        if self._lowest == -1:
            self._refresh_cache()
        return range(0) if self._lowest is None else range(self._lowest, ID_BITS)

    def refresh_due(self, now: float) -> list[int]:
        """Bucket indices not refreshed in the last `bucket_refresh_interval` seconds.

        Also makes `next_refresh_at` exact again (answers may have moved it later)."""
        indices = self.refresh_indices()
        if not indices:
            return []
        interval = self._config.bucket_refresh_interval
        changed, created = self._changed_at, self._created_at
        due = []
        soonest = float("inf")
        for i in indices:
            at = changed.get(i, created) + interval
            if at <= now:
                due.append(i)
            if at < soonest:
                soonest = at
        self._refresh_at = soonest
        return due

    def next_refresh_at(self) -> float | None:
        """When a bucket next needs a refresh (None: nothing known). With the traffic rule
        it may be earlier than that; `refresh_due` then finds nothing due and corrects it."""
        if self._lowest == -1:
            self._refresh_cache()
        return self._refresh_at

    def neighbourhood_floor(self) -> int:
        """The bucket of our k-th closest contact (ID_BITS with fewer than k contacts).

        Every bucket below it holds, as far as we know, fewer than k contacts together with
        the others below it, so a lookup of our own id asks all of them: one lookup passes
        through, and refreshes, every one of them."""
        k = self._config.k
        if self._size < k:
            return ID_BITS
        kth = self._merged_closest(self.self_id, k, None)[-1]
        return (self.self_id ^ kth.node_id).bit_length() - 1

    def random_id_in_bucket(self, index: int, random_bits: Callable[[int], int]) -> int:
        """An id at distance [2**index, 2**(index+1)) from us: a refresh target for bucket i."""
        return self.self_id ^ ((1 << index) | (random_bits(index) if index else 0))

