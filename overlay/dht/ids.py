"""256-bit identifiers of the DHT and the XOR metric (Kademlia paper, section 2.1).

Node ids are SHA-256 of the peer id bytes and key ids SHA-256 of the key bytes, so both live
in one uniformly filled space and nobody picks where a key lands. Ids are plain Python ints:
XOR and comparison on them are single C operations, and an int is far leaner than an object,
which matters when the simulator runs 100,000 routing tables.

Pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

from functools import lru_cache
from hashlib import sha256

ID_BITS = 256
ID_BYTES = ID_BITS // 8
MAX_ID = (1 << ID_BITS) - 1


def hash_to_id(data: bytes) -> int:
    """The id of arbitrary bytes: SHA-256 read as a big-endian integer."""
    return int.from_bytes(sha256(data).digest(), "big")


@lru_cache(maxsize=4096)
def node_id_of(peer_id_raw: bytes) -> int:
    """The DHT position of a peer: SHA-256 of its binary peer id.

    Memoised (a pure function): every answer lists up to k peers, mostly the same ones.
    """
    return int.from_bytes(sha256(peer_id_raw).digest(), "big")


def key_id_of(key: bytes) -> int:
    """The DHT position of a key: SHA-256 of the raw key bytes."""
    return hash_to_id(key)


def distance(a: int, b: int) -> int:
    """XOR distance (section 2.1): symmetric, unidirectional, zero only for equal ids."""
    return a ^ b


def bucket_index(self_id: int, other_id: int) -> int:
    """Index i of the k-bucket holding `other_id`: 2**i <= distance < 2**(i+1) (section 2.2).

    Returns -1 for the node itself (distance 0), which belongs to no bucket.
    """
    return (self_id ^ other_id).bit_length() - 1


def id_to_bytes(value: int) -> bytes:
    return value.to_bytes(ID_BYTES, "big")


def id_from_bytes(data: bytes) -> int:
    if len(data) != ID_BYTES:
        raise ValueError(f"an id is {ID_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")
