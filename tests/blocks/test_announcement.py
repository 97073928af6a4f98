"""The announcement record: round trips, strict validation of untrusted input, the swarm view."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.announcement import (
    ANNOUNCE_EXPIRATION,
    ANNOUNCE_PERIOD,
    MAX_ADAPTERS,
    MAX_ADDRS,
    MAX_NEXT_PINGS,
    AnnouncementError,
    ServedSpan,
    ServerInfo,
    ServerState,
    SwarmView,
    block_keys,
)
from blocks.protocol import DEFAULT_MAX_BACKWARD_TOKENS, DEFAULT_MAX_REQUEST_TOKENS
from overlay.identity import PeerId


def pid(i: int) -> str:
    return str(PeerId.from_public_key(i.to_bytes(2, "big") + bytes(30)))


def full_info() -> ServerInfo:
    return ServerInfo(
        state=ServerState.ONLINE,
        start=3,
        end=11,
        throughput=123.5,
        inference_rps=410.0,
        forward_rps=9000.0,
        network_rps=2500.0,
        cache_tokens_left=65536,
        dtype="bfloat16",
        quant="int8",
        adapters=("org/lora-a", "org/lora-b"),
        addrs=(f"/ip4/10.0.0.5/tcp/4001/p2p/{pid(1)}", "/dns/example.org/tcp/443"),
        version=1,
        next_pings={pid(2): 0.012, pid(3): math.inf},
        public_name="lab GPU 3",
        max_request_tokens=4096,
        max_backward_tokens=1024,
    )


def test_round_trip_through_msgpack_keeps_every_field():
    info = full_info()
    raw = info.to_bytes()
    back = ServerInfo.from_bytes(raw)
    assert back == info
    assert back.next_pings[pid(3)] == math.inf
    assert back.length == 8
    # Short keys: the record stays small in the DHT.
    assert len(raw) < 400


def test_minimal_record_gets_defaults():
    info = ServerInfo.from_wire({"st": 1, "sp": [0, 2], "tp": 5})
    assert info.state is ServerState.JOINING
    assert (info.start, info.end, info.throughput) == (0, 2, 5.0)
    assert info.inference_rps is None and info.cache_tokens_left is None
    assert info.adapters == () and info.addrs == () and info.next_pings == {}
    assert ServerInfo.from_wire(info.to_wire()) == info


def test_a_record_without_a_request_limit_means_the_default():
    """Servers from before the limit was announced all took DEFAULT_MAX_REQUEST_TOKENS."""
    info = ServerInfo.from_wire({"st": 2, "sp": [0, 2], "tp": 5})
    assert info.max_request_tokens == DEFAULT_MAX_REQUEST_TOKENS == 16384
    assert full_info().to_wire()["mt"] == 4096
    assert ServerInfo.from_wire({**full_info().to_wire(), "mt": 1}).max_request_tokens == 1


def test_a_record_without_a_backward_limit_means_the_default():
    """Servers from before the backward limit was announced all took 8192 tokens per
    backward; the field is independent of the request limit."""
    info = ServerInfo.from_wire({"st": 2, "sp": [0, 2], "tp": 5, "mt": 64})
    assert info.max_backward_tokens == DEFAULT_MAX_BACKWARD_TOKENS == 8192
    assert info.max_request_tokens == 64
    wire = full_info().to_wire()
    assert (wire["mt"], wire["mb"]) == (4096, 1024)
    assert ServerInfo.from_wire({**wire, "mb": 1}).max_backward_tokens == 1
    assert ServerInfo.from_wire({**wire, "mb": 1 << 40}).max_backward_tokens == 1 << 40
    without = {key: value for key, value in wire.items() if key != "mb"}
    assert ServerInfo.from_wire(without).max_backward_tokens == 8192
    with pytest.raises(AnnouncementError, match="max_backward_tokens"):
        ServerInfo(ServerState.ONLINE, 0, 2, 1.0, max_backward_tokens=0)


def test_unknown_keys_from_newer_servers_are_ignored():
    wire = {**full_info().to_wire(), "zz": [1, 2, 3]}
    assert ServerInfo.from_wire(wire) == full_info()


def test_expiration_is_twice_the_announce_period():
    assert ANNOUNCE_EXPIRATION == 2 * ANNOUNCE_PERIOD


def test_block_keys():
    assert block_keys("llama-7b.v1", 2, 5) == ["llama-7b.v1.2", "llama-7b.v1.3", "llama-7b.v1.4"]
    assert block_keys("m", 4, 4) == []
    with pytest.raises(ValueError):
        block_keys("", 0, 1)
    with pytest.raises(ValueError):
        block_keys("m", 3, 2)


def _with(**changes) -> dict:
    wire = full_info().to_wire()
    for key, value in changes.items():
        if value is _DROP:
            del wire[key]
        else:
            wire[key] = value
    return wire


_DROP = object()

MALFORMED = [
    ("not a map", [1, 2]),
    ("missing state", _with(st=_DROP)),
    ("missing span", _with(sp=_DROP)),
    ("missing throughput", _with(tp=_DROP)),
    ("unknown state", _with(st=7)),
    ("bool state", _with(st=True)),
    ("string state", _with(st="online")),
    ("empty span", _with(sp=[4, 4])),
    ("reversed span", _with(sp=[5, 4])),
    ("negative start", _with(sp=[-1, 4])),
    ("float start", _with(sp=[1.0, 4])),
    ("span of three", _with(sp=[1, 2, 3])),
    ("span not a list", _with(sp="1:4")),
    ("huge end", _with(sp=[0, 10**9])),
    ("NaN throughput", _with(tp=math.nan)),
    ("infinite throughput", _with(tp=math.inf)),
    ("negative throughput", _with(tp=-1.0)),
    ("absurd throughput", _with(tp=1e30)),
    ("bool throughput", _with(tp=True)),
    ("string throughput", _with(tp="fast")),
    ("NaN inference rps", _with(ir=math.nan)),
    ("negative cache", _with(ct=-5)),
    ("float cache", _with(ct=5.0)),
    ("version zero", _with(v=0)),
    ("request limit zero", _with(mt=0)),
    ("negative request limit", _with(mt=-64)),
    ("float request limit", _with(mt=64.0)),
    ("bool request limit", _with(mt=True)),
    ("absurd request limit", _with(mt=1 << 60)),
    ("backward limit zero", _with(mb=0)),
    ("negative backward limit", _with(mb=-8)),
    ("float backward limit", _with(mb=64.0)),
    ("bool backward limit", _with(mb=True)),
    ("text backward limit", _with(mb="8192")),
    ("absurd backward limit", _with(mb=(1 << 40) + 1)),
    ("dtype not text", _with(dt=16)),
    ("empty dtype", _with(dt="")),
    ("control chars", _with(pn="a\nb")),
    ("too many addrs", _with(ma=[f"/ip4/10.0.0.{i}/tcp/1" for i in range(MAX_ADDRS + 1)])),
    ("bad addr", _with(ma=["/ip4/999.0.0.1/tcp/1"])),
    ("addr not text", _with(ma=[b"/ip4/1.2.3.4/tcp/1"])),
    ("too many adapters", _with(ad=[f"a{i}" for i in range(MAX_ADAPTERS + 1)])),
    ("adapters not a list", _with(ad="lora")),
    ("too many pings", _with(np={pid(i): 0.1 for i in range(MAX_NEXT_PINGS + 1)})),
    ("ping key not a peer id", _with(np={"server-7": 0.1})),
    ("ping key not text", _with(np={7: 0.1})),
    ("NaN ping", _with(np={pid(2): math.nan})),
    ("negative ping", _with(np={pid(2): -0.1})),
    ("ping not a number", _with(np={pid(2): "1ms"})),
    ("pings not a map", _with(np=[pid(2), 0.1])),
    ("non-text key", {1: 2, "st": 2, "sp": [0, 1], "tp": 1.0}),
    ("too many keys", {**{f"k{i}": i for i in range(40)}, "st": 2, "sp": [0, 1], "tp": 1.0}),
]


@pytest.mark.parametrize("wire", [w for _, w in MALFORMED], ids=[n for n, _ in MALFORMED])
def test_malformed_announcements_raise_a_typed_error(wire):
    with pytest.raises(AnnouncementError):
        ServerInfo.from_wire(wire)


@pytest.mark.parametrize(
    "raw", [b"", b"\xc1", b"\x92\x01", msgpack.packb([1, 2]) + b"x", b"\xff" * (70 * 1024)]
)
def test_garbage_bytes_raise_a_typed_error(raw):
    with pytest.raises(AnnouncementError):
        ServerInfo.from_bytes(raw)


def test_constructor_checks_invariants_too():
    with pytest.raises(AnnouncementError):
        ServerInfo(ServerState.ONLINE, 4, 4, 1.0)
    with pytest.raises(AnnouncementError):
        ServerInfo(ServerState.ONLINE, 0, 4, math.nan)
    info = ServerInfo(2, 0, 4, 1.0, adapters=["x"], next_pings={pid(1): 0.1})
    assert info.state is ServerState.ONLINE and info.adapters == ("x",)
    hash(info)  # usable as a dict key despite the pings map


# -- fuzz: anything from the network gives a ServerInfo or an AnnouncementError, nothing else --

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_scalars, inner, max_size=5),
    max_leaves=20,
)
_KEYS = ["st", "sp", "tp", "ir", "fr", "nr", "ct", "dt", "q", "ad", "ma", "v", "np", "pn", "mt",
         "mb"]


@settings(max_examples=300, deadline=None)
@given(_values)
def test_fuzz_arbitrary_objects(obj):
    try:
        ServerInfo.from_wire(obj)
    except AnnouncementError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_KEYS), _values)
def test_fuzz_one_field_of_a_valid_record(key, value):
    wire = full_info().to_wire()
    wire[key] = value
    try:
        info = ServerInfo.from_wire(wire)
    except AnnouncementError:
        return
    # Whatever got through is a record that survives its own round trip.
    assert ServerInfo.from_bytes(info.to_bytes()) == info


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_bytes(raw):
    try:
        ServerInfo.from_bytes(raw)
    except AnnouncementError:
        pass


# -- the swarm view ---------------------------------------------------------------------------


def online(start: int, end: int, throughput: float = 1.0, **kw) -> ServerInfo:
    return ServerInfo(ServerState.ONLINE, start, end, throughput, **kw)


def test_view_from_dht_records_accepts_bytes_maps_and_infos():
    a, b, c = pid(10), pid(11), pid(12)
    info_a, info_b = online(0, 3, 5.0), online(2, 4, 7.0)
    info_c = ServerInfo(ServerState.JOINING, 0, 4, 1.0)
    records = {
        0: {a: info_a.to_bytes(), c: info_c},
        1: {a: info_a.to_wire(), c: info_c},
        2: {a: info_a, b: info_b.to_bytes(), c: info_c},
        3: {b: info_b, c: info_c},
    }
    view, rejected = SwarmView.from_block_records(4, records)
    assert rejected == []
    assert view.servers == {a: info_a, b: info_b, c: info_c}
    # Ordered by (start, peer id): deterministic whatever order the DHT answered in.
    assert [(s.peer_id, s.start, s.end) for s in view.covering(2)] == [
        *sorted([(a, 0, 3), (c, 0, 4)]),
        (b, 2, 4),
    ]
    assert view.block_servers(3) == {b: info_b, c: info_c}
    assert view.coverage() == [1, 1, 2, 1]
    assert view.coverage(frozenset(ServerState)) == [2, 2, 3, 2]


def test_view_rejects_bad_records_without_failing():
    a, b, c, d = pid(20), pid(21), pid(22), pid(23)
    records = {
        0: {a: online(0, 2).to_bytes(), b: b"\x00garbage"},
        1: {a: online(0, 2).to_bytes(), c: online(5, 6).to_wire()},  # c: wrong block
        2: {d: online(2, 9).to_wire()},  # beyond the model's 4 blocks
        9: {a: online(0, 2).to_wire()},  # block outside the model
    }
    view, rejected = SwarmView.from_block_records(4, records)
    assert set(view.servers) == {a}
    assert sorted((r.block, r.peer_id) for r in rejected) == [(-1, a), (0, b), (1, c), (2, d)]
    assert all(r.reason for r in rejected)


def test_a_missing_record_splits_a_server_into_two_spans():
    a = pid(30)
    info = online(0, 5)
    records = {block: {a: info} for block in (0, 1, 3, 4)}
    view, _ = SwarmView.from_block_records(5, records)
    assert [(s.start, s.end) for s in view.spans] == [(0, 2), (3, 5)]
    assert view.coverage() == [1, 1, 0, 1, 1]


def test_primary_info_of_a_moving_server_is_its_live_span():
    a = pid(40)
    old = ServerInfo(ServerState.OFFLINE, 0, 2, 3.0)
    new = ServerInfo(ServerState.JOINING, 2, 4, 3.0)
    view, _ = SwarmView.from_block_records(4, {0: {a: old}, 1: {a: old}, 2: {a: new},
                                               3: {a: new}})
    assert view.servers[a] == new
    assert len(view.spans) == 2


def test_view_rejects_spans_outside_the_model():
    with pytest.raises(ValueError):
        SwarmView(4, [ServedSpan(pid(1), 2, 5, online(2, 5))])
    with pytest.raises(ValueError):
        SwarmView(0, [])


def test_records_repeated_under_many_blocks_are_judged_once_each_place():
    a, b = pid(50), pid(51)
    good, bad = online(0, 3, 2.0).to_bytes(), b"\x81\xa2st\x09"
    view, rejected = SwarmView.from_block_records(3, {k: {a: good, b: bad} for k in range(3)})
    assert [(s.peer_id, s.start, s.end) for s in view.spans] == [(a, 0, 3)]
    assert sorted(r.block for r in rejected) == [0, 1, 2]
    assert all(r.peer_id == b for r in rejected)
