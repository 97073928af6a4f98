"""Configuration of the DHT core: every constant named once, with where it comes from.

"Kademlia" below is Maymounkov & Mazieres, "Kademlia: A Peer-to-peer Information System
Based on the XOR Metric", IPTPS 2002 (the full version with section 4); "RFC 6298" is
"Computing TCP's Retransmission Timer".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Kademlia 2.2: k-bucket capacity, "chosen such that any given k nodes are very unlikely to
# fail within an hour of each other". Also the number of closest peers a lookup returns.
K_BUCKET_SIZE = 20
# Kademlia 2.3: alpha, the number of FIND_NODE requests a lookup keeps in flight.
ALPHA = 3
# Kademlia 4.1: "When a contact fails to respond to 5 RPCs in a row, it is considered stale."
# A stale contact is replaced from the bucket's replacement cache when one is waiting; with
# an empty cache it is only flagged, so a node whose own link went down does not void its
# whole routing table.
STALE_AFTER_FAILURES = 5
# Kademlia 2.3: "each node refreshes any bucket to which it has not performed a node lookup
# in the past hour".
BUCKET_REFRESH_INTERVAL = 3600.0
# What keeps a bucket fresh. Kademlia 2.3: "buckets are generally kept fresh by the traffic
# of requests traveling through nodes"; BEP 5 makes it a rule: "Each bucket should maintain a
# 'last changed' property ... When a node in a bucket is pinged and it responds, or a node is
# added to a bucket, or a node in a bucket is replaced with another node, the bucket's last
# changed property should be updated. Buckets that have not been changed in 15 minutes
# should be 'refreshed'." With this rule (the default) a bucket needs no refresh lookup while
# answers come from its range (any answer to a request of ours: the traffic of our lookups
# passing through it, pings, stores) or contacts are added to or replaced in it; and the
# buckets below our k-th closest contact, which a lookup of our own id passes through
# together, are refreshed by that one lookup. Off, the paper's letter: only a lookup whose
# target falls into the bucket counts, and every bucket gets its own (research comparisons).
# The interval stays the paper's hour, not BEP 5's 15 minutes.
TRAFFIC_REFRESHES_BUCKETS = True
# Kademlia 2.5: key-value pairs are republished once an hour.
REPUBLISH_INTERVAL = 3600.0
# BEP 5 ("DHT Protocol", BitTorrent): a node is "good" if it answered or sent us a request
# within the last 15 minutes, "questionable" after that. A full bucket pings its least
# recently seen contact only when that contact is questionable; a newcomer is otherwise just
# kept as a replacement (Kademlia 4.1: probing is delayed "until it has useful messages to
# send"). Without this rule every newcomer to a full bucket costs a PING, and each PING
# introduces the pinger to another full bucket: a cascade.
QUESTIONABLE_AFTER = 15 * 60.0
# RFC 6298 2.1: the timeout before any round trip has been measured is 1 second.
RFC6298_INITIAL_RTO = 1.0
# Number of nodes a value is written to. Kademlia writes to the k closest; hivemind and Petals
# write to 5. Five independent replicas already make loss unlikely (with a quarter of the
# nodes dying at once, all five are gone with probability about 0.25**5 ~ 0.1%), the owner
# republishes before expiry, and every replica costs a STORE round trip and storage on a
# peer, so writing to all 20 would quadruple the announcement traffic of every block server.
NUM_REPLICAS = 5


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """What one node accepts to store: bounds memory whatever the network sends it."""

    max_key_bytes: int = 1024
    max_subkey_chars: int = 256
    max_value_bytes: int = 64 * 1024
    max_subkeys_per_key: int = 1024
    # Accounted bytes (key + subkey + value + signature + a fixed overhead) of all records.
    max_total_bytes: int = 64 * 1024 * 1024
    # What the records stored by one peer (the sender of the STORE) may take of that: one
    # peer cannot fill the store, evicting or refusing everyone else's records. (A block
    # server's announcements are some 1 KiB per block.)
    max_bytes_per_peer: int = 4 * 1024 * 1024
    # Expirations further ahead are refused: no record outlives its owner by more than a day
    # (Kademlia 2.5 has the original publisher republish every 24 hours).
    max_ttl: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class DHTConfig:
    """Tunables of a DHT node; the defaults are the papers' values cited above."""

    k: int = K_BUCKET_SIZE
    alpha: int = ALPHA
    num_replicas: int = NUM_REPLICAS
    # Value-bearing answers a get collects before it stops (FIND_VALUE stops early on a value).
    value_quorum: int = 1
    stale_after_failures: int = STALE_AFTER_FAILURES
    questionable_after: float = QUESTIONABLE_AFTER
    replacement_cache_size: int = K_BUCKET_SIZE
    bucket_refresh_interval: float = BUCKET_REFRESH_INTERVAL
    traffic_refreshes_buckets: bool = TRAFFIC_REFRESHES_BUCKETS
    republish_interval: float = REPUBLISH_INTERVAL
    # A republish is never scheduled sooner than this after the previous store.
    min_republish_interval: float = 30.0
    # Hard limit on one request: after it the request has failed (routing-table strike).
    request_timeout: float = 3.0
    # Adaptive "soft" timeout (RTO = SRTT + 4 RTTVAR, RFC 6298 2.2-2.3), clamped to this range:
    # after it a request stops occupying a lookup slot and the peer is backed off, though a
    # late answer is still used (Kademlia 2.3: "removed from consideration until and unless
    # they do respond"). RFC 6298's 1 s floor is meant for WAN TCP and far too slow here.
    min_soft_timeout: float = 0.025
    max_soft_timeout: float = 2.0
    initial_soft_timeout: float = RFC6298_INITIAL_RTO
    # Kademlia 4.1: unresponsive contacts are avoided "for an exponentially increasing backoff
    # interval"; the paper gives no numbers, these are ours.
    backoff_base: float = 0.5
    backoff_max: float = 300.0
    # Per-peer round-trip and failure records kept (least recently used forgotten first).
    max_tracked_peers: int = 1024
    # Closer peers accepted from one answer, and candidates one lookup keeps: a peer answering
    # with thousands of contacts costs no more than one answering with k.
    max_peers_per_response: int = K_BUCKET_SIZE
    # Contacts a lookup starts from. Only the k nearest still in consideration are asked;
    # the others stand by for when those fail, so k silent seeds cannot end a lookup empty.
    lookup_seeds: int = 2 * K_BUCKET_SIZE
    max_lookup_candidates: int = 8 * K_BUCKET_SIZE
    # Hedged gets (lookup.py rule 4): a FIND_VALUE lookup starts with one request and sends
    # alpha once that one fails, answers without the value, or is silent for this many
    # smoothed round trips (0 disables hedging: alpha requests from the start).
    value_hedge_rtts: float = 2.0
    min_value_hedge_delay: float = 0.001
    # Kademlia 2.3: after a successful get, store the value at the closest node seen that did
    # not return it, so a popular or recently read value survives the loss of its replicas.
    cache_on_path: bool = True
    limits: StoreLimits = field(default_factory=StoreLimits)
    # Failing signature checks a storing peer gets, then one per this many seconds; beyond,
    # its owned records are refused unchecked (records.BadSignatureBudget says why).
    bad_signature_burst: int = 4
    bad_signature_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.k < 1 or self.alpha < 1 or self.num_replicas < 1 or self.value_quorum < 1:
            raise ValueError("k, alpha, num_replicas and value_quorum must be positive")
        if not 0 < self.min_soft_timeout <= self.max_soft_timeout:
            raise ValueError("need 0 < min_soft_timeout <= max_soft_timeout")
        # A zero refresh interval would make a node refresh without end, a NaN one turn
        # refreshes off silently (every comparison with NaN is false).
        for name in ("bucket_refresh_interval", "republish_interval", "request_timeout",
                     "initial_soft_timeout", "questionable_after", "bad_signature_interval"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name in ("min_republish_interval", "backoff_base", "backoff_max", "value_hedge_rtts",
                     "min_value_hedge_delay"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
