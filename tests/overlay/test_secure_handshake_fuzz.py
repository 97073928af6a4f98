"""Property tests: whatever bytes arrive, the handshake only raises HandshakeError or waits."""

from __future__ import annotations

import itertools
import random

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.secure_handshake import HandshakeError, SecureHandshake, verify_identity_payload

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def responder() -> SecureHandshake:
    """Deterministic: the same seed gives the same message 2, so a recorded stream replays."""
    return SecureHandshake(
        Identity.from_seed(bytes([2]) * 32), initiator=False, rng=random.Random(31).randbytes
    )


def record_valid_dialer_stream() -> tuple[bytes, int]:
    dialer = SecureHandshake(
        Identity.from_seed(bytes([1]) * 32), initiator=True, rng=random.Random(30).randbytes
    )
    listener = responder()
    first = dialer.data_to_send()
    listener.receive_data(first)
    dialer.receive_data(listener.data_to_send())
    return first + dialer.data_to_send(), len(first)


# A real dialer cannot send message 3 before it has read message 2, so the listener always
# sees a read boundary after message 1; feed() keeps that boundary.
VALID_STREAM, MESSAGE_1_END = record_valid_dialer_stream()


def feed(listener: SecureHandshake, stream: bytes, cuts: list[int]) -> str:
    """Feed `stream` in pieces; return 'complete', 'failed' or 'waiting'."""
    cuts = [*cuts, MESSAGE_1_END]
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    try:
        for start, end in itertools.pairwise(bounds):
            listener.receive_data(stream[start:end])
            if listener.is_complete:
                return "complete"
    except HandshakeError as e:
        assert e.reason and listener.failure == e.reason
        return "failed"
    return "waiting"


def test_recorded_stream_replays_to_completion() -> None:
    assert feed(responder(), VALID_STREAM, [3, 40]) == "complete"


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.none()),
)


def mutate(stream: bytes, ops: list) -> bytes:
    data = bytearray(stream)
    for kind, where, arg in ops:
        i = where % (len(data) + 1)
        if kind == "flip" and i < len(data):
            data[i] ^= arg
        elif kind == "insert":
            data[i:i] = arg
        elif kind == "delete":
            del data[i : i + arg]
        elif kind == "truncate":
            del data[i:]
    return bytes(data)


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=6))
def test_mutated_dialer_streams_fail_cleanly(ops: list, cuts: list[int]) -> None:
    stream = mutate(VALID_STREAM, ops)
    outcome = feed(responder(), stream, cuts)
    if stream != VALID_STREAM and not stream.startswith(VALID_STREAM):
        assert outcome in ("failed", "waiting")


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 10**6), max_size=6))
def test_random_streams_fail_cleanly(stream: bytes, cuts: list[int]) -> None:
    assert feed(responder(), stream, cuts) in ("failed", "waiting")


@FUZZ
@given(st.binary(max_size=200))
def test_random_streams_after_message_1_fail_cleanly_at_the_dialer(reply: bytes) -> None:
    dialer = SecureHandshake(Identity.from_seed(bytes([1]) * 32), initiator=True,
                             rng=random.Random(32).randbytes)
    assert feed(dialer, reply, []) in ("failed", "waiting")


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["v", "key", "sig", "x"]) | st.binary(max_size=3),
                      inner, max_size=5),
    max_leaves=12,
)


@FUZZ
@given(msgpack_values)
def test_identity_payload_decoder_only_raises_handshake_error(value: object) -> None:
    try:
        verify_identity_payload(msgpack.packb(value), bytes(32))
    except HandshakeError:
        return
    raise AssertionError("no random value carries a valid signature")


@FUZZ
@given(st.binary(max_size=200))
def test_identity_payload_decoder_on_raw_bytes(payload: bytes) -> None:
    try:
        verify_identity_payload(payload, bytes(32))
    except HandshakeError:
        return
    raise AssertionError("no random bytes carry a valid signature")
