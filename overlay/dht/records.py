"""Stored DHT records: validation, owner signatures, expiry and per-node limits.

A key holds either one plain value or a dictionary of subkeys, every entry with its own
absolute expiration (hivemind/Petals style). Rules, checked by every node on every write:
1. An entry with a later expiration replaces one with an earlier or equal expiration, never
   the reverse; expired entries vanish.
2. A subkey that is a peer id in text form ("12D3KooW...") is owned by that peer: the record
   must carry the peer's Ed25519 signature over `signing_bytes(key, subkey, value,
   expiration)`, whose public key is inside the peer id. Forged, mismatched or missing
   signatures are refused. Getters verify again what they receive.
3. Owned (signed) entries cannot be wiped by unsigned writes: a plain value never replaces a
   dictionary holding live owned entries, while an owned entry replaces a plain value
   whatever its expiration. Otherwise plain <-> dictionary follows rule 1 on the
   dictionary's latest expiration.
4. Limits: key, subkey and value sizes, subkeys per key, expiration at most `max_ttl` ahead,
   total bytes per node, bytes per storing peer (`max_bytes_per_peer`: a peer's records
   beyond it are refused, whatever room is left). When full, entries expiring sooner than
   the new one are evicted; a full dictionary makes room for an owned entry by dropping its
   soonest-expiring unowned entry.
5. Values must be valid msgpack (the API stores msgpack-encodable objects).

Records are immutable once stored, so they are verified when stored, not when served.

Pure: no I/O, no clock (`now` comes in). Signature checks are deterministic computation.
"""

from __future__ import annotations

import enum
import heapq
import math
from dataclasses import dataclass
from hashlib import sha256
from itertools import count

import msgpack

from overlay.dht.config import StoreLimits
from overlay.identity import IdentityError, PeerId

# Domain separation: a record signature can never be replayed as any other signed message.
SIGNATURE_DOMAIN = "overlay-node/dht-record/1"
OWNED_SUBKEY_PREFIX = "12D3KooW"  # every Ed25519 peer id in text form starts with this
SIGNATURE_BYTES = 64
# Bookkeeping bytes charged per record on top of its payload (objects, dict slots, heap).
RECORD_OVERHEAD = 200


@dataclass(frozen=True, slots=True)
class Record:
    """One entry: the raw key, its subkey (None for a plain value), msgpack bytes, expiry."""

    key: bytes
    subkey: str | None
    value: bytes
    expiration: float
    signature: bytes | None = None

    def size(self) -> int:
        return (
            len(self.key)
            + (len(self.subkey) if self.subkey else 0)
            + len(self.value)
            + (SIGNATURE_BYTES if self.signature else 0)
            + RECORD_OVERHEAD
        )


def signing_bytes(key: bytes, subkey: str, value: bytes, expiration: float) -> bytes:
    """Canonical bytes an owner signs: msgpack of a fixed-shape array, float64 expiration."""
    return msgpack.packb(
        [SIGNATURE_DOMAIN, key, subkey, value, float(expiration)], use_bin_type=True
    )


def owner_of(subkey: str | None) -> PeerId | None:
    """The peer that owns `subkey`, or None for an unowned subkey.

    Raises RecordError for a subkey that looks like a peer id but is not a valid one, so
    nobody can squat on near-copies of peer ids.
    """
    if subkey is None or not subkey.startswith(OWNED_SUBKEY_PREFIX):
        return None
    try:
        return PeerId.from_string(subkey)
    except IdentityError:
        raise RecordError("subkey looks like a peer id but is not a valid one") from None


class RecordError(ValueError):
    """A record that must not be stored or returned; the message says why."""


class SignatureError(RecordError):
    """An owned record whose signature is missing or does not verify."""


class BadSignatureBudget:
    """How many failing signature checks each storing peer still gets (a token bucket).

    An Ed25519 check costs the node about 50 to 150 us, and a STORE of 256 records with
    well-formed but wrong signatures, 35 KB on the wire, cost 45 ms of the event loop: a
    peer sending 1 MB/s of them took more than a core. Honest peers send no bad signatures
    (records relayed by others were verified by their getter), so only failures are
    counted: a sender gets `burst` of them, then one per `interval` seconds; while it has
    none, its owned records are refused unchecked. Valid records cost their sender a
    signature each, about what they cost us to check. At most `max_peers` senders are
    tracked (least recently failing forgotten first).
    """

    __slots__ = ("_burst", "_interval", "_max_peers", "_peers")

    def __init__(self, burst: int, interval: float, max_peers: int):
        self._burst = burst
        self._interval = interval
        self._max_peers = max_peers
        self._peers: dict[object, tuple[float, float]] = {}  # peer -> (tokens, at), LRU order

    def _tokens(self, peer: object, now: float) -> float:
        state = self._peers.get(peer)
        if state is None:
            return float(self._burst)
        tokens, at = state
        return min(float(self._burst), tokens + max(0.0, now - at) / self._interval)

    def may_check(self, peer: object, now: float) -> bool:
        """Whether an owned record from `peer` is worth checking now."""
        return self._tokens(peer, now) >= 1.0

    def failed(self, peer: object, now: float) -> None:
        """A signature from `peer` failed to verify."""
        tokens = max(0.0, self._tokens(peer, now) - 1.0)
        self._peers.pop(peer, None)
        if len(self._peers) >= self._max_peers:
            del self._peers[next(iter(self._peers))]
        self._peers[peer] = (tokens, now)


class SignatureVerifier:
    """Ed25519 checks of owned records, memoised: five replicas of one record verify once."""

    __slots__ = ("_capacity", "_verified")

    def __init__(self, capacity: int = 4096):
        self._capacity = capacity
        self._verified: dict[bytes, None] = {}  # digest of (message, signature), LRU order

    def verify(self, owner: PeerId, record: Record) -> bool:
        if record.signature is None or len(record.signature) != SIGNATURE_BYTES:
            return False
        assert record.subkey is not None
        message = signing_bytes(record.key, record.subkey, record.value, record.expiration)
        digest = sha256(owner.raw + message + record.signature).digest()
        if digest in self._verified:
            return True
        if not owner.verify(record.signature, message):
            return False
        if len(self._verified) >= self._capacity:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = None
        return True


def sign_record(
    key: bytes, subkey: str, value: bytes, expiration: float, sign
) -> Record:
    """A record for an owned subkey, signed with `sign(bytes) -> signature` (Identity.sign)."""
    signature = sign(signing_bytes(key, subkey, value, expiration))
    return Record(key, subkey, value, float(expiration), signature)


def check_record(
    record: Record,
    now: float,
    limits: StoreLimits,
    verifier: SignatureVerifier,
    *,
    check_ttl: bool = True,
) -> Record:
    """Validate `record` (rules 2, 4 and 5); returns it without a meaningless signature.

    `check_ttl` is False for records received from a get: other nodes' clocks may differ.
    """
    key, subkey, value, expiration = record.key, record.subkey, record.value, record.expiration
    if not 0 < len(key) <= limits.max_key_bytes:
        raise RecordError(f"key of {len(key)} bytes (limit {limits.max_key_bytes})")
    if subkey is not None and not 0 < len(subkey) <= limits.max_subkey_chars:
        raise RecordError(f"subkey of {len(subkey)} characters (limit {limits.max_subkey_chars})")
    if len(value) > limits.max_value_bytes:
        raise RecordError(f"value of {len(value)} bytes (limit {limits.max_value_bytes})")
    if not math.isfinite(expiration) or expiration <= now:
        raise RecordError("record already expired")
    if check_ttl and expiration > now + limits.max_ttl:
        raise RecordError(f"expiration more than {limits.max_ttl:.0f} s ahead")
    try:
        msgpack.unpackb(value, raw=False, strict_map_key=False)
    except Exception:  # any decoding failure means "not msgpack"
        raise RecordError("value is not valid msgpack") from None
    owner = owner_of(subkey)
    if owner is None:
        if record.signature is not None:
            record = Record(key, subkey, value, expiration)
        return record
    if not verifier.verify(owner, record):
        raise SignatureError(f"bad or missing signature of the subkey's owner {owner.short()}")
    return record


class StoreOutcome(enum.Enum):
    STORED = "stored"
    OUTDATED = "outdated"  # an entry with a later or equal expiration is already there
    PROTECTED = "protected"  # rule 3: would wipe owned entries
    FULL = "full"
    OVER_QUOTA = "over_quota"  # the storing peer's records would exceed max_bytes_per_peer


class RecordStore:
    """The records one node holds for the network."""

    __slots__ = ("_by_storer", "_bytes", "_data", "_heap", "_live", "_seq", "_storers",
                 "limits")

    def __init__(self, limits: StoreLimits):
        self.limits = limits
        # key -> the plain Record, or a dict subkey -> Record
        self._data: dict[bytes, Record | dict[str, Record]] = {}
        self._bytes = 0
        self._live = 0
        # (expiration, seq, key, subkey), stale entries skipped when popped
        self._heap: list[tuple[float, int, bytes, str | None]] = []
        self._seq = count()
        # Who stored each record (None: this node itself) and the bytes of each storer.
        self._storers: dict[tuple[bytes, str | None], object] = {}
        self._by_storer: dict[object, int] = {}

    def __len__(self) -> int:
        return self._live

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def keys(self) -> list[bytes]:
        return list(self._data)

    # -- reading -------------------------------------------------------------------------

    def get(self, key: bytes, now: float) -> list[Record]:
        """Live records of `key`: [] when absent, [plain] or the dictionary's entries."""
        entry = self._data.get(key)
        if entry is None:
            return []
        if isinstance(entry, Record):
            if entry.expiration > now:
                return [entry]
            self._drop(key, None)
            return []
        live = [r for r in entry.values() if r.expiration > now]
        if len(live) != len(entry):
            for record in list(entry.values()):
                if record.expiration <= now:
                    self._drop(key, record.subkey)
        return live

    def _current(self, key: bytes, subkey: str | None) -> Record | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if isinstance(entry, Record):
            return entry if subkey is None else None
        return None if subkey is None else entry.get(subkey)

    # -- writing -------------------------------------------------------------------------

    def stored_by(self, storer: object) -> int:
        """Accounted bytes of the records `storer` stored here."""
        return self._by_storer.get(storer, 0)

    def store(self, record: Record, now: float, storer: object = None) -> StoreOutcome:
        """Apply rules 1, 3 and 4 to an already validated record (see `check_record`).
        `storer` is the peer that asks (its records count against max_bytes_per_peer);
        None for this node's own records, which no quota bounds."""
        self.purge(now)
        key = record.key
        entry = self._data.get(key)
        owned = record.signature is not None
        if record.subkey is None:
            if isinstance(entry, Record):
                if record.expiration <= entry.expiration:
                    return StoreOutcome.OUTDATED
            elif entry is not None:
                if any(r.signature is not None for r in entry.values()):
                    return StoreOutcome.PROTECTED
                if record.expiration <= max(r.expiration for r in entry.values()):
                    return StoreOutcome.OUTDATED
            if not self._within_quota(record, entry, storer):
                return StoreOutcome.OVER_QUOTA
            if not self._make_room(record, entry, now):
                return StoreOutcome.FULL
            if entry is not None:
                self._drop_key(key)
            self._add(record, storer)
            return StoreOutcome.STORED
        if isinstance(entry, Record):
            if not owned and record.expiration <= entry.expiration:
                return StoreOutcome.OUTDATED
            if not self._within_quota(record, entry, storer):
                return StoreOutcome.OVER_QUOTA
            if not self._make_room(record, entry, now):
                return StoreOutcome.FULL
            self._drop_key(key)
            self._add(record, storer)
            return StoreOutcome.STORED
        old = None if entry is None else entry.get(record.subkey)
        if old is not None and record.expiration <= old.expiration:
            return StoreOutcome.OUTDATED
        if not self._within_quota(record, old, storer):
            return StoreOutcome.OVER_QUOTA
        if entry is not None and old is None and len(entry) >= self.limits.max_subkeys_per_key:
            unowned = [r for r in entry.values() if r.signature is None]
            if not owned or not unowned:
                return StoreOutcome.FULL
            self._drop(key, min(unowned, key=lambda r: r.expiration).subkey)
        if not self._make_room(record, old, now):
            return StoreOutcome.FULL
        if old is not None:
            self._drop(key, record.subkey)
        self._add(record, storer)
        return StoreOutcome.STORED

    def _within_quota(self, record: Record, replaced, storer: object) -> bool:
        """Whether `storer`'s records still fit max_bytes_per_peer once `record` replaces
        `replaced` (a Record, a key's dictionary, or None): only what `storer` itself
        stored is freed for it."""
        if storer is None:
            return True
        if isinstance(replaced, dict):
            replaced = list(replaced.values())
        elif replaced is not None:
            replaced = [replaced]
        freed = sum(r.size() for r in replaced or ()
                    if self._storers.get((r.key, r.subkey)) == storer)
        used = self._by_storer.get(storer, 0) - freed + record.size()
        return used <= self.limits.max_bytes_per_peer

    def _add(self, record: Record, storer: object = None) -> None:
        if record.subkey is None:
            self._data[record.key] = record
        else:
            entry = self._data.get(record.key)
            if entry is None:
                entry = self._data[record.key] = {}
            assert isinstance(entry, dict)
            entry[record.subkey] = record
        self._bytes += record.size()
        self._live += 1
        if storer is not None:
            self._storers[(record.key, record.subkey)] = storer
            self._by_storer[storer] = self._by_storer.get(storer, 0) + record.size()
        heapq.heappush(
            self._heap, (record.expiration, next(self._seq), record.key, record.subkey)
        )
        if len(self._heap) > 2 * self._live + 64:  # drop the stale heap entries
            self._heap = [e for e in self._heap if self._is_current(e)]
            heapq.heapify(self._heap)

    def _drop(self, key: bytes, subkey: str | None) -> None:
        entry = self._data.get(key)
        if entry is None:
            return
        if isinstance(entry, Record):
            if subkey is not None:
                return
            del self._data[key]
            record = entry
        else:
            record = entry.pop(subkey, None)  # type: ignore[arg-type]
            if record is None:
                return
            if not entry:
                del self._data[key]
        self._bytes -= record.size()
        self._live -= 1
        storer = self._storers.pop((key, subkey), None)
        if storer is not None:
            left = self._by_storer[storer] - record.size()
            if left:
                self._by_storer[storer] = left
            else:
                del self._by_storer[storer]

    def _drop_key(self, key: bytes) -> None:
        entry = self._data.get(key)
        if isinstance(entry, Record):
            self._drop(key, None)
        elif entry is not None:
            for subkey in list(entry):
                self._drop(key, subkey)

    def _is_current(self, item: tuple[float, int, bytes, str | None]) -> bool:
        current = self._current(item[2], item[3])
        return current is not None and current.expiration == item[0]

    def purge(self, now: float) -> int:
        """Drop every expired record; returns how many went."""
        heap = self._heap
        dropped = 0
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if self._is_current(item):
                self._drop(item[2], item[3])
                dropped += 1
        return dropped

    def _make_room(self, record: Record, replaced, now: float) -> bool:
        """Evict soonest-expiring records until `record` fits (rule 4)."""
        if isinstance(replaced, dict):
            freed = sum(r.size() for r in replaced.values())
        else:
            freed = 0 if replaced is None else replaced.size()
        limit = self.limits.max_total_bytes
        heap = self._heap
        skipped = []  # entries of the key being written: never evicted for it
        fits = True
        while self._bytes - freed + record.size() > limit:
            while heap and not self._is_current(heap[0]):
                heapq.heappop(heap)
            if not heap or heap[0][0] >= record.expiration:
                fits = False
                break
            item = heapq.heappop(heap)
            if item[2] == record.key:
                skipped.append(item)
                continue
            self._drop(item[2], item[3])
        for item in skipped:
            heapq.heappush(heap, item)
        return fits
