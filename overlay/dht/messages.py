"""DHT messages (PING, FIND_NODE, FIND_VALUE, STORE) and their strict msgpack codec.

Every message is one msgpack map carried as the payload of an RPC named "dht". Requests:

    {"v": 1, "op": "ping" | "find_node" | "find_value" | "store",
     "addrs": [multiaddr str, ...],   # where the sender listens (required; may be empty)
     "srv": bool,                     # the sender serves DHT requests (required)
     "ids":  [32-byte id, ...],       # find_node: targets (batched)
     "keys": [key bytes, ...],        # find_value: raw keys (batched)
     "near": true,                    # find_value, optional: closer peers also with records
     "recs": [[key, subkey|nil, value, expiration float, signature|nil], ...]}  # store

Responses repeat "v" and "op" and carry, in request order:

    find_node:  "peers": [[[peer id bytes, [addr, ...]], ...], ...]       one list per id
    find_value: "found": [[[[subkey|nil, value, expiration, sig|nil], ...],  records
                           [[peer id bytes, [addr, ...]], ...]], ...]       closer peers
                (a node holding records for a key lists no closer peers for it unless the
                request has "near": true, which a reader merging several replicas sends)
    store:      "ok":    [bool, ...]                                         one per record

Field types: keys, values and signatures are msgpack bin, subkeys and addresses str.
"Peer id bytes" are the 38-byte binary peer id (`00 24 08 01 12 20` + Ed25519 key), an id
is SHA-256 of a key's bytes or of those peer id bytes; a value is itself the msgpack
encoding of the stored object (a value that is not valid msgpack is refused); an
expiration is absolute Unix seconds (float; an integer is accepted), a signature 64 bytes.
Limits of the codec (a message beyond them is answered `bad_request`): message 1 MiB;
at most 64 ids or keys, 256 records, 8 addresses of at most 256 characters, 64 peers per
list; keys at most 4096 bytes, subkeys 1024 characters, values 256 KiB; maps at most 32
entries; no msgpack extension types. A record refused by the store's own rules (bad
signature, past or too distant expiration, smaller store limits: `records`) is `false` in
"ok", with no reason on the wire.

Decoding trusts nothing: sizes are bounded before and while parsing, every field is
type-checked, and any defect raises `MessageError` (never another exception). Unknown map
keys are ignored so later versions can add fields. Semantic checks (signatures, store
limits) belong to `records`.

Pure: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from operator import attrgetter
from typing import Any

import msgpack

from overlay.dht.contact import Contact
from overlay.dht.ids import ID_BYTES
from overlay.dht.records import Record
from overlay.identity import PEER_ID_LENGTH, IdentityError, PeerId

PROTOCOL_VERSION = 1
RPC_METHOD = "dht"

# Wire limits: generous bounds on what any message may contain. Nodes apply their own,
# usually smaller, store limits on top.
# 1 MiB also bounds the transient memory of decoding a hostile message (msgpack builds one
# object per byte at worst).
MAX_MESSAGE_BYTES = 1024 * 1024
MAX_BATCH = 64  # ids / keys in one find request
MAX_STORE_BATCH = 256  # records in one store request
MAX_PEERS_PER_LIST = 64
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_KEY_BYTES = 4096
MAX_SUBKEY_CHARS = 1024
MAX_VALUE_BYTES = 256 * 1024
MAX_RECORDS_PER_VALUE = 4096
_MAX_MAP_ITEMS = 32


class MessageError(ValueError):
    """A DHT message that is malformed, oversized or not what was asked for."""


@dataclass(frozen=True, slots=True)
class Ping:
    addrs: tuple[str, ...] = ()
    serves: bool = True


@dataclass(frozen=True, slots=True)
class FindNode:
    targets: tuple[int, ...]
    addrs: tuple[str, ...] = ()
    serves: bool = True


@dataclass(frozen=True, slots=True)
class FindValue:
    keys: tuple[bytes, ...]
    addrs: tuple[str, ...] = ()
    serves: bool = True
    near: bool = False  # closer peers wanted even from nodes that hold the value


@dataclass(frozen=True, slots=True)
class Store:
    records: tuple[Record, ...]
    addrs: tuple[str, ...] = ()
    serves: bool = True


Request = Ping | FindNode | FindValue | Store


@dataclass(frozen=True, slots=True)
class PingResponse:
    pass


@dataclass(frozen=True, slots=True)
class FindNodeResponse:
    peers: tuple[tuple[Contact, ...], ...]  # one tuple per requested target


@dataclass(frozen=True, slots=True)
class FoundValue:
    records: tuple[Record, ...]  # empty when the node holds nothing for the key
    peers: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class FindValueResponse:
    results: tuple[FoundValue, ...]  # one per requested key


@dataclass(frozen=True, slots=True)
class StoreResponse:
    stored: tuple[bool, ...]  # one per record


Response = PingResponse | FindNodeResponse | FindValueResponse | StoreResponse

_OP_NAMES: dict[type, str] = {
    Ping: "ping",
    FindNode: "find_node",
    FindValue: "find_value",
    Store: "store",
    PingResponse: "ping",
    FindNodeResponse: "find_node",
    FindValueResponse: "find_value",
    StoreResponse: "store",
}


# -- encoding ----------------------------------------------------------------------------


def _peer_list(peers: tuple[Contact, ...]) -> list:
    return [[c.peer.raw, list(c.addrs)] for c in peers]


def encode_request(request: Request) -> bytes:
    body: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "op": _OP_NAMES[type(request)],
        "addrs": list(request.addrs),
        "srv": request.serves,
    }
    if isinstance(request, FindNode):
        body["ids"] = [t.to_bytes(ID_BYTES, "big") for t in request.targets]
    elif isinstance(request, FindValue):
        body["keys"] = list(request.keys)
        if request.near:
            body["near"] = True
    elif isinstance(request, Store):
        body["recs"] = [
            [r.key, r.subkey, r.value, float(r.expiration), r.signature] for r in request.records
        ]
    return msgpack.packb(body, use_bin_type=True)


def encode_response(response: Response) -> bytes:
    body: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": _OP_NAMES[type(response)]}
    if isinstance(response, FindNodeResponse):
        body["peers"] = [_peer_list(peers) for peers in response.peers]
    elif isinstance(response, FindValueResponse):
        body["found"] = [
            [
                [[r.subkey, r.value, float(r.expiration), r.signature] for r in item.records],
                _peer_list(item.peers),
            ]
            for item in response.results
        ]
    elif isinstance(response, StoreResponse):
        body["ok"] = list(response.stored)
    return msgpack.packb(body, use_bin_type=True)


# -- encoded sizes without encoding -------------------------------------------------------
# The simulator charges every message its exact size; building the msgpack bytes only to
# take their length was a tenth of its CPU. These mirror the encoders above byte for byte
# (msgpack spec: fix/8/16/32 headers; Python floats as float64), and a property test holds
# them to len(encode_*(...)).


def _str_size(text: str) -> int:
    n = len(text) if text.isascii() else len(text.encode())
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def _bin_size(n: int) -> int:
    return n + (2 if n < 256 else 3 if n < 65536 else 5)


def _array_header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def _addrs_size(addrs: tuple[str, ...]) -> int:
    return _array_header(len(addrs)) + sum(map(_str_size, addrs))


# Every request carries its sender's addresses, the same tuple each time.
_request_addrs_size = lru_cache(maxsize=4096)(_addrs_size)


def _contact_size(contact: Contact) -> int:
    size = contact.wire_size
    if size is None:  # [peer id bytes, [addr, ...]], cached on the (immutable) contact
        size = contact.wire_size = 1 + _bin_size(len(contact.peer.raw)) + _addrs_size(
            contact.addrs)
    return size


contact_size = _contact_size  # (public: what one contact adds to a peer list's encoding)
_cached_size = attrgetter("wire_size")


def _peer_list_size(peers: tuple[Contact, ...]) -> int:
    try:
        total = sum(map(_cached_size, peers))  # C-level when every size is cached
    except TypeError:  # some size not computed yet (None)
        total = sum(map(_contact_size, peers))
    return _array_header(len(peers)) + total


def _optional_size(value: str | bytes | None) -> int:
    if value is None:
        return 1
    return _str_size(value) if isinstance(value, str) else _bin_size(len(value))


# The map header (1 byte), "v": 1 (2 + 1), "op" (3) and its name; every other key name is
# a fixstr (1 + len bytes), counted where it is written.
_HEADER = 1 + 2 + 1 + 3
_OP_SIZES = {kind: _HEADER + _str_size(name) for kind, name in _OP_NAMES.items()}


def request_size(request: Request) -> int:
    """len(encode_request(request)), computed without encoding."""
    addrs = request.addrs
    size = _OP_SIZES[type(request)] + 6 + 4 + 1 + (  # "addrs", "srv" and its value
        _request_addrs_size(addrs) if type(addrs) is tuple else _addrs_size(addrs))
    if isinstance(request, FindNode):
        size += 4 + _array_header(len(request.targets)) + _bin_size(ID_BYTES) * len(
            request.targets)
    elif isinstance(request, FindValue):
        size += 5 + _array_header(len(request.keys)) + sum(_bin_size(len(k))
                                                          for k in request.keys)
        if request.near:
            size += 6  # "near" (a 5-byte fixstr) and true
    elif isinstance(request, Store):
        size += 5 + _array_header(len(request.records))
        for r in request.records:
            size += (1 + _bin_size(len(r.key)) + _optional_size(r.subkey)
                     + _bin_size(len(r.value)) + 9 + _optional_size(r.signature))
    return size


def response_size(response: Response) -> int:
    """len(encode_response(response)), computed without encoding."""
    size = _OP_SIZES[type(response)]
    if isinstance(response, FindNodeResponse):
        size += 6 + _array_header(len(response.peers)) + sum(map(_peer_list_size,
                                                                 response.peers))
    elif isinstance(response, FindValueResponse):
        size += 6 + _array_header(len(response.results))
        for item in response.results:
            size += 1 + _array_header(len(item.records)) + _peer_list_size(item.peers)
            for r in item.records:
                size += (1 + _optional_size(r.subkey) + _bin_size(len(r.value)) + 9
                         + _optional_size(r.signature))
    elif isinstance(response, StoreResponse):
        size += 3 + _array_header(len(response.stored)) + len(response.stored)
    return size


# -- decoding ----------------------------------------------------------------------------


def _reject_ext(code: int, data: bytes) -> Any:
    raise MessageError(f"msgpack extension type {code} is not allowed")


def _unpack(data: bytes) -> dict:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError("message must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_str_len=MAX_SUBKEY_CHARS * 4,
            max_bin_len=MAX_VALUE_BYTES,
            max_array_len=MAX_RECORDS_PER_VALUE,
            max_map_len=_MAX_MAP_ITEMS,
            max_ext_len=0,
            ext_hook=_reject_ext,
        )
    except MessageError:
        raise
    except Exception as e:  # msgpack raises many types for bad input: all mean "malformed"
        raise MessageError(f"not a valid msgpack message: {type(e).__name__}") from None
    if not isinstance(body, dict):
        raise MessageError("message is not a map")
    version = body.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not 1.0, not true
        raise MessageError(f"unsupported DHT protocol version {body.get('v')!r}")
    return body


def _list(body: dict, name: str, limit: int) -> list:
    value = body.get(name)
    if not isinstance(value, list):
        raise MessageError(f"field {name!r} must be a list")
    if len(value) > limit:
        raise MessageError(f"field {name!r} has {len(value)} items (limit {limit})")
    return value


def _bytes(value: Any, what: str, limit: int, exact: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise MessageError(f"{what} must be bytes")
    if exact is not None and len(value) != exact:
        raise MessageError(f"{what} must be {exact} bytes, got {len(value)}")
    if len(value) > limit:
        raise MessageError(f"{what} of {len(value)} bytes (limit {limit})")
    return value


def _addrs(value: Any) -> tuple[str, ...]:
    if type(value) is not list or len(value) > MAX_ADDRS:
        raise MessageError(f"addresses must be a list of at most {MAX_ADDRS}")
    for addr in value:
        if type(addr) is not str or not 0 < len(addr) <= MAX_ADDR_CHARS:
            raise MessageError("an address must be a non-empty string of bounded length")
    return tuple(value)


def _expiration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageError("expiration must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise MessageError("expiration must be finite")
    return value


def _subkey(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SUBKEY_CHARS:
        raise MessageError("subkey must be nil or a non-empty string of bounded length")
    return value


def _signature(value: Any) -> bytes | None:
    if value is None:
        return None
    return _bytes(value, "signature", 64, exact=64)


# Memo of decoded contacts (immutable values): answers list the same peers over and over,
# and building one costs a peer-id check and a SHA-256. Only validated entries get in.
_CONTACT_CACHE_SIZE = 4096
_contacts: dict[tuple, Contact] = {}


def _peers(value: Any) -> tuple[Contact, ...]:
    if type(value) is not list or len(value) > MAX_PEERS_PER_LIST:
        raise MessageError(f"a peer list must be a list of at most {MAX_PEERS_PER_LIST}")
    out = []
    for item in value:
        if type(item) is not list or len(item) != 2:
            raise MessageError("a peer must be [peer id, addresses]")
        raw, addrs = item
        if type(raw) is not bytes or len(raw) != PEER_ID_LENGTH:
            raise MessageError("a peer id must be bytes of the Ed25519 peer id length")
        if type(addrs) is not list:
            raise MessageError("addresses must be a list")
        cache_key = (raw, *addrs)
        try:  # (only str entries pass _addrs: no other value equals a cached key's)
            contact = _contacts.get(cache_key)
        except TypeError:  # an address that is a list or a map: unhashable
            raise MessageError("an address must be a non-empty string of bounded length") from None
        if contact is None:
            try:
                peer = PeerId(raw)
            except IdentityError as e:
                raise MessageError(f"bad peer id: {e}") from None
            contact = Contact(peer, _addrs(addrs))
            if len(_contacts) >= _CONTACT_CACHE_SIZE:
                del _contacts[next(iter(_contacts))]
            _contacts[cache_key] = contact
        out.append(contact)
    return tuple(out)


def _sender(body: dict) -> tuple[tuple[str, ...], bool]:
    serves = body.get("srv")
    if not isinstance(serves, bool):
        raise MessageError("field 'srv' must be a boolean")
    return _addrs(body.get("addrs")), serves


def decode_request(data: bytes) -> Request:
    """Parse an incoming request; raises MessageError for anything malformed."""
    body = _unpack(data)
    op = body.get("op")
    addrs, serves = _sender(body)
    if op == "ping":
        return Ping(addrs, serves)
    if op == "find_node":
        ids = _list(body, "ids", MAX_BATCH)
        if not ids:
            raise MessageError("find_node without targets")
        targets = tuple(
            int.from_bytes(_bytes(i, "target id", ID_BYTES, exact=ID_BYTES), "big") for i in ids
        )
        return FindNode(targets, addrs, serves)
    if op == "find_value":
        keys = _list(body, "keys", MAX_BATCH)
        if not keys:
            raise MessageError("find_value without keys")
        near = body.get("near", False)
        if not isinstance(near, bool):
            raise MessageError("field 'near' must be a boolean")
        return FindValue(tuple(_bytes(k, "key", MAX_KEY_BYTES) for k in keys), addrs, serves,
                         near)
    if op == "store":
        recs = _list(body, "recs", MAX_STORE_BATCH)
        if not recs:
            raise MessageError("store without records")
        records = []
        for item in recs:
            if not isinstance(item, list) or len(item) != 5:
                raise MessageError("a record must be [key, subkey, value, expiration, sig]")
            records.append(
                Record(
                    _bytes(item[0], "key", MAX_KEY_BYTES),
                    _subkey(item[1]),
                    _bytes(item[2], "value", MAX_VALUE_BYTES),
                    _expiration(item[3]),
                    _signature(item[4]),
                )
            )
        return Store(tuple(records), addrs, serves)
    raise MessageError(f"unknown DHT operation {op!r}")


def decode_response(data: bytes, request: Request) -> Response:
    """Parse the answer to `request`; it must match the request's kind and batch size."""
    body = _unpack(data)
    expected = _OP_NAMES[type(request)]
    if body.get("op") != expected:
        raise MessageError(f"expected a {expected} response, got {body.get('op')!r}")
    if isinstance(request, Ping):
        return PingResponse()
    if isinstance(request, FindNode):
        lists = _list(body, "peers", MAX_BATCH)
        if len(lists) != len(request.targets):
            raise MessageError("find_node response does not match the number of targets")
        return FindNodeResponse(tuple(_peers(p) for p in lists))
    if isinstance(request, FindValue):
        found = _list(body, "found", MAX_BATCH)
        if len(found) != len(request.keys):
            raise MessageError("find_value response does not match the number of keys")
        results = []
        for key, item in zip(request.keys, found):
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], list):
                raise MessageError("a find_value result must be [records, peers]")
            records = []
            for rec in item[0]:
                if not isinstance(rec, list) or len(rec) != 4:
                    raise MessageError("a returned record must be [subkey, value, exp, sig]")
                records.append(
                    Record(
                        key,
                        _subkey(rec[0]),
                        _bytes(rec[1], "value", MAX_VALUE_BYTES),
                        _expiration(rec[2]),
                        _signature(rec[3]),
                    )
                )
            results.append(FoundValue(tuple(records), _peers(item[1])))
        return FindValueResponse(tuple(results))
    ok = _list(body, "ok", MAX_STORE_BATCH)
    if len(ok) != len(request.records) or not all(isinstance(x, bool) for x in ok):
        raise MessageError("store response must hold one boolean per record")
    return StoreResponse(tuple(ok))
