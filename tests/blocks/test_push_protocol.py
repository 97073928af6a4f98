"""The push extension's wire rules (blocks/push_protocol.py) and a step's padding and reorder
fields (blocks/protocol.py): what a server accepts from the client or from another server,
and what it refuses, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks.protocol import BAD_INPUT, MAX_BATCH, Reorder, RequestError, parse_step_request
from blocks.push_protocol import (
    MAX_CHAIN,
    MAX_HOP_ADDRS,
    MAX_REASON,
    PushHop,
    chain_to_wire,
    failure_notice,
    parse_chain,
    parse_push_request,
    push_meta,
    wants_push,
)
from overlay.identity import Identity

PEERS = [str(Identity.from_seed(bytes([i]) * 32).peer_id) for i in range(1, 4)]
TOKEN = bytes(range(16))
ADDR = "/ip4/127.0.0.1/tcp/4001"


def hop(i: int = 0, step: int = 7, addrs=(), token: bytes = TOKEN) -> PushHop:
    return PushHop(PEERS[i], token, step, tuple(addrs))


def test_a_chain_round_trips_and_each_hop_passes_the_rest_on():
    chain = (hop(0, 3, [ADDR]), hop(1, 9, token=bytes(16)), hop(2, 0, token=b"\xff" * 16))
    assert parse_chain(chain_to_wire(chain)) == chain
    meta = push_meta(chain[0], 12, chain[1:])
    request = parse_push_request(meta)
    assert (request.token, request.step_id, request.position) == (TOKEN, 3, 12)
    assert request.chain == chain[1:]
    # what the receiver runs is a client-style step that pushes on to the next hop
    assert request.step_meta() == {"position": 12, "step": 3, "next": chain_to_wire(chain[1:])}
    last = parse_push_request(push_meta(chain[2], 12, ()))
    assert last.chain == () and "next" not in last.step_meta()
    # a step's padding mask travels with it to every span of the chain
    padded = parse_push_request(push_meta(chain[0], 12, chain[1:], bytes([0, 1, 1])))
    assert padded.mask == bytes([0, 1, 1]) and padded.step_meta()["mask"] == bytes([0, 1, 1])
    # each hop's own reorder (beam search) reaches that hop's session
    beams = (PushHop(PEERS[0], TOKEN, 3, (), Reorder(2, (1, 1, 0))), hop(1, 9, token=bytes(16)))
    assert parse_chain(chain_to_wire(beams)) == beams
    pushed = parse_push_request(push_meta(beams[0], 12, beams[1:]))
    assert pushed.reorder == Reorder(2, (1, 1, 0))
    assert pushed.step_meta()["reorder"] == [2, [1, 1, 0]]
    assert "reorder" not in parse_push_request(push_meta(beams[1], 12, ())).step_meta()


def test_push_is_asked_for_with_a_positive_version():
    assert wants_push({"push": 1}) and wants_push({"push": 2})
    for meta in ({}, {"push": 0}, {"push": True}, {"push": "1"}, None, [1]):
        assert not wants_push(meta)


def _bad(entry_changes: dict) -> dict:
    return {**hop(0, 1, [ADDR]).to_wire(), **entry_changes}


@pytest.mark.parametrize("chain", [
    "not a list",
    [7],
    [_bad({"peer": "server-2"})],
    [_bad({"peer": PEERS[0].lower()})],
    [_bad({"peer": 5})],
    [_bad({"token": b"short"})],
    [_bad({"token": "x" * 16})],
    [_bad({"step": -1})],
    [_bad({"step": True})],
    [_bad({"step": 1 << 63})],
    [_bad({"addrs": ["not an address"]})],
    [_bad({"addrs": [ADDR] * (MAX_HOP_ADDRS + 1)})],
    [_bad({"addrs": ADDR})],
    [hop().to_wire()] * (MAX_CHAIN + 1),
    [hop(0).to_wire(), hop(1).to_wire()],  # one session twice (both hops have TOKEN)
])
def test_malformed_chains_are_refused(chain):
    with pytest.raises(RequestError) as caught:
        parse_chain(chain)
    assert caught.value.code == BAD_INPUT


@pytest.mark.parametrize("meta", [
    None, [], {"step": 1, "position": 0},
    {"token": TOKEN, "step": 1},
    {"token": TOKEN, "step": 1, "position": -1},
    {"token": TOKEN, "step": 1, "position": 1 << 40},
    {"token": TOKEN, "step": "1", "position": 0},
    {"token": TOKEN, "step": 1, "position": 0, "next": {"peer": PEERS[0]}},
    {"token": TOKEN, "step": 1, "position": 0, "mask": [0, 1]},
    {"token": TOKEN, "step": 1, "position": 0, "mask": b""},
    {"token": TOKEN, "step": 1, "position": 0, "reorder": [0, [0]]},
    {"token": TOKEN, "step": 1, "position": 0, "reorder": [1, [-1]]},
    {"token": TOKEN, "step": 1, "position": 0, "reorder": [1, []]},
    {"token": TOKEN, "step": 1, "position": 0, "reorder": [1, (0,)]},
    {"token": TOKEN, "step": 1, "position": 0, "reorder": {"v": 1}},
])
def test_malformed_pushes_are_refused(meta):
    with pytest.raises(RequestError):
        parse_push_request(meta)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                    | st.binary(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12))
def test_garbage_never_gets_past_the_parser_unchecked(value):
    for parse in (parse_chain, parse_push_request):
        try:
            parsed = parse(value)
        except RequestError:
            continue
        if parse is parse_chain:
            assert all(isinstance(h, PushHop) and len(h.token) == 16 for h in parsed)


def test_failure_notices_are_short():
    notice = failure_notice(4, "x" * 10_000)
    assert notice["step"] == 4 and len(notice["push_failed"]) == MAX_REASON


_ANY = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                    | st.binary(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(mask=_ANY, reorder=_ANY | st.tuples(st.integers(), st.lists(st.integers(), max_size=5)))
def test_step_extensions_are_parsed_or_refused_cleanly(mask, reorder):
    """A step's padding mask and reorder, whatever a peer sends: parsed into their types or
    refused with bad_input, never another error."""
    for meta in ({"position": 0, "step": 1, "mask": mask},
                 {"position": 0, "step": 1, "reorder": list(reorder)
                  if isinstance(reorder, tuple) else reorder}):
        try:
            step = parse_step_request(meta)
        except RequestError as e:
            assert e.code == BAD_INPUT
            continue
        assert step.mask is None or (isinstance(step.mask, bytes) and step.mask)
        assert step.reorder is None or (step.reorder.version > 0 and all(
            0 <= i < MAX_BATCH for i in step.reorder.ids))
