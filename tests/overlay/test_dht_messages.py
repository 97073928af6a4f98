"""DHT message codec: round trips, and hostile bytes only ever raise MessageError."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.dht.contact import Contact
from overlay.dht.messages import (
    MAX_BATCH,
    MAX_MESSAGE_BYTES,
    FindNode,
    FindNodeResponse,
    FindValue,
    FindValueResponse,
    FoundValue,
    MessageError,
    Ping,
    PingResponse,
    Store,
    StoreResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    request_size,
    response_size,
)
from overlay.dht.records import Record
from overlay.identity import Identity, PeerId

peer_ids = st.binary(min_size=32, max_size=32).map(PeerId.from_public_key)
addrs = st.lists(st.text(min_size=1, max_size=40), max_size=3).map(tuple)
contacts = st.builds(Contact, peer_ids, addrs)
expirations = st.floats(allow_nan=False, allow_infinity=False, width=64)
subkeys = st.none() | st.text(min_size=1, max_size=20)
sigs = st.none() | st.binary(min_size=64, max_size=64)
records = st.builds(Record, st.binary(min_size=1, max_size=40), subkeys,
                    st.binary(max_size=60), expirations, sigs)
ids = st.integers(0, 2**256 - 1)

requests = st.one_of(
    st.builds(Ping, addrs, st.booleans()),
    st.builds(FindNode, st.lists(ids, min_size=1, max_size=5).map(tuple), addrs, st.booleans()),
    st.builds(FindValue, st.lists(st.binary(max_size=30), min_size=1, max_size=5).map(tuple),
              addrs, st.booleans(), st.booleans()),
    st.builds(Store, st.lists(records, min_size=1, max_size=5).map(tuple), addrs, st.booleans()),
)


def response_for(request, data):
    if isinstance(request, Ping):
        return PingResponse()
    if isinstance(request, FindNode):
        return FindNodeResponse(tuple(
            tuple(data.draw(st.lists(contacts, max_size=4))) for _ in request.targets))
    if isinstance(request, FindValue):
        out = []
        for key in request.keys:
            recs = data.draw(st.lists(records, max_size=3))
            recs = tuple(Record(key, r.subkey, r.value, r.expiration, r.signature) for r in recs)
            out.append(FoundValue(recs, tuple(data.draw(st.lists(contacts, max_size=3)))))
        return FindValueResponse(tuple(out))
    return StoreResponse(tuple(data.draw(st.booleans()) for _ in request.records))


# Sizes across every msgpack header width: strings past 31 and 255 bytes (and non-ASCII),
# binaries past 255, lists past 15 entries.
wide_text = st.text(min_size=1, max_size=300)
wide_addrs = st.lists(wide_text, max_size=3).map(tuple)
wide_contacts = st.builds(Contact, peer_ids, wide_addrs)
wide_records = st.builds(Record, st.binary(min_size=1, max_size=300), st.none() | wide_text,
                         st.binary(max_size=70_000), expirations, sigs)
wide_requests = st.one_of(
    st.builds(Ping, wide_addrs, st.booleans()),
    st.builds(FindNode, st.lists(ids, min_size=1, max_size=20).map(tuple), wide_addrs,
              st.booleans()),
    st.builds(FindValue, st.lists(st.binary(max_size=300), min_size=1, max_size=20).map(tuple),
              wide_addrs, st.booleans(), st.booleans()),
    st.builds(Store, st.lists(wide_records, min_size=1, max_size=3).map(tuple), wide_addrs,
              st.booleans()),
)


@settings(max_examples=150, deadline=None)
@given(request=wide_requests, data=st.data())
def test_sizes_equal_the_encoded_length(request, data):
    assert request_size(request) == len(encode_request(request))
    if isinstance(request, FindNode):
        response = FindNodeResponse(tuple(
            tuple(data.draw(st.lists(wide_contacts, max_size=20))) for _ in request.targets))
    elif isinstance(request, FindValue):
        response = FindValueResponse(tuple(
            FoundValue(tuple(data.draw(st.lists(wide_records, max_size=2))),
                       tuple(data.draw(st.lists(wide_contacts, max_size=17))))
            for _ in request.keys))
    elif isinstance(request, Store):
        response = StoreResponse(tuple(data.draw(st.lists(st.booleans(), max_size=20))))
    else:
        response = PingResponse()
    assert response_size(response) == len(encode_response(response))
    assert response_size(response) == len(encode_response(response))  # cached sizes too


def same_contacts(a, b):
    return [(c.peer, c.addrs, c.node_id) for c in a] == [(c.peer, c.addrs, c.node_id) for c in b]


@settings(max_examples=100, deadline=None)
@given(request=requests, data=st.data())
def test_round_trip(request, data):
    decoded = decode_request(encode_request(request))
    if isinstance(request, Store):
        assert decoded.records == tuple(
            Record(r.key, r.subkey, r.value, float(r.expiration), r.signature)
            for r in request.records
        )
    else:
        assert decoded == request
    response = response_for(request, data)
    back = decode_response(encode_response(response), request)
    if isinstance(response, FindNodeResponse):
        assert all(same_contacts(a, b) for a, b in zip(back.peers, response.peers))
    elif isinstance(response, FindValueResponse):
        for a, b in zip(back.results, response.results):
            assert a.records == b.records and same_contacts(a.peers, b.peers)
    else:
        assert back == response


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_message_error(data):
    for decode in (decode_request, lambda d: decode_response(d, FindValue((b"k",)))):
        try:
            decode(data)
        except MessageError:
            pass


@settings(max_examples=200, deadline=None)
@given(request=requests, data=st.data())
def test_mutated_messages_raise_only_message_error(request, data):
    response = response_for(request, data)
    for encoded, decode in (
        (encode_request(request), decode_request),
        (encode_response(response), lambda d: decode_response(d, request)),
    ):
        blob = bytearray(encoded)
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            pos = data.draw(st.integers(0, max(0, len(blob) - 1)))
            if op == "flip" and blob:
                blob[pos] ^= data.draw(st.integers(1, 255))
            elif op == "cut":
                del blob[pos:]
            else:
                blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        try:
            decode(bytes(blob))
        except MessageError:
            pass


def body(**fields):
    base = {"v": 1, "op": "find_node", "addrs": [], "srv": True, "ids": [b"\0" * 32]}
    base.update(fields)
    return msgpack.packb(base, use_bin_type=True)


@pytest.mark.parametrize("data, reason", [
    (body(v=2), "version"),
    (body(v=1.0), "version"),  # the version is the integer 1: not a float, not true
    (body(v=True), "version"),
    (body(op="explode"), "unknown"),
    (body(srv="yes"), "srv"),
    (body(ids=[]), "without targets"),
    (body(ids=[b"\0" * 31]), "32 bytes"),
    (body(ids=[b"\0" * 32] * (MAX_BATCH + 1)), "limit"),
    (body(addrs=["x" * 300]), "address"),
    (body(addrs=["a"] * 9), "addresses"),
    (body(op="find_value", keys=[b"k"], near=1), "'near' must be a boolean"),
    (msgpack.packb([1, 2]), "not a map"),
    (msgpack.packb({"v": 1, "op": "ping", "addrs": [], "srv": True,
                    "x": msgpack.ExtType(5, b"")}), "extension"),
    (b"\x00" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
])
def test_specific_rejections(data, reason):
    with pytest.raises(MessageError, match=reason):
        decode_request(data)


def test_response_must_match_request():
    request = FindNode((1, 2))
    with pytest.raises(MessageError, match="number of targets"):
        decode_response(encode_response(FindNodeResponse(((),))), request)
    with pytest.raises(MessageError, match="expected a find_node"):
        decode_response(encode_response(PingResponse()), request)
    store = Store((Record(b"k", None, b"\x01", 5.0),))
    with pytest.raises(MessageError, match="one boolean per record"):
        decode_response(msgpack.packb({"v": 1, "op": "store", "ok": [1]}), store)
    bad_peer = msgpack.packb({"v": 1, "op": "find_node", "peers": [[[b"\x01" * 38, []]], []]})
    with pytest.raises(MessageError, match="peer id"):
        decode_response(bad_peer, request)
    # an address that is a list or a map: a TypeError (hashing it) escaped the decoder
    raw = bytes(Identity.generate().peer_id.raw)
    for address in ([1], {"a": 1}):
        bad_addrs = msgpack.packb({"v": 1, "op": "find_node",
                                   "peers": [[[raw, [address]]], []]})
        with pytest.raises(MessageError, match="an address must be"):
            decode_response(bad_addrs, request)
