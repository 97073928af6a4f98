"""The overlay handshake (overlay/PROTOCOL.md 1.1-1.5), two state machines wired in memory."""

from __future__ import annotations

import random
from collections.abc import Callable

import msgpack
import pytest

from overlay.identity import Identity
from overlay.noise import HandshakeState, KeyPair
from overlay.secure_handshake import (
    PROLOGUE,
    STATIC_KEY_SIGNATURE_PREFIX,
    HandshakeError,
    SecureHandshake,
    verify_identity_payload,
)


def rng_for(seed: int):
    return random.Random(seed).randbytes


def identity(n: int) -> Identity:
    return Identity.from_seed(bytes([n]) * 32)


class WrongBytesSigner(Identity):
    """A real key that signs something other than the static key: its payload must fail."""

    __slots__ = ()

    def sign(self, data: bytes) -> bytes:
        return super().sign(b"not the static key")


def pump(a: SecureHandshake, b: SecureHandshake, chunk: int | None = None) -> None:
    """Move bytes both ways until both sides are quiet; `chunk` splits every write."""
    while True:
        moved = False
        for src, dst in ((a, b), (b, a)):
            data = src.data_to_send()
            if data:
                moved = True
                step = chunk or len(data)
                for i in range(0, len(data), step):
                    dst.receive_data(data[i : i + step])
        if not moved:
            return


def frame(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + message


def unframe(data: bytes) -> bytes:
    assert int.from_bytes(data[:2], "big") == len(data) - 2
    return data[2:]


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_handshake_completes_and_both_sides_agree(chunk: int | None) -> None:
    alice, bob = identity(1), identity(2)
    dialer = SecureHandshake(alice, initiator=True, rng=rng_for(1), expected_peer=bob.peer_id)
    listener = SecureHandshake(bob, initiator=False, rng=rng_for(2))
    pump(dialer, listener, chunk)
    assert dialer.is_complete and listener.is_complete
    ours, theirs = dialer.result(), listener.result()
    assert ours.remote_peer == bob.peer_id
    assert theirs.remote_peer == alice.peer_id
    assert ours.transport.handshake_hash == theirs.transport.handshake_hash
    assert ours.leftover == theirs.leftover == b""
    assert theirs.transport.decrypt(ours.transport.encrypt(b"ping")) == b"ping"
    assert ours.transport.decrypt(theirs.transport.encrypt(b"pong")) == b"pong"


def test_transport_bytes_in_the_same_read_as_message_3_are_leftover() -> None:
    dialer = SecureHandshake(identity(1), initiator=True, rng=rng_for(3))
    listener = SecureHandshake(identity(2), initiator=False, rng=rng_for(4))
    listener.receive_data(dialer.data_to_send())
    dialer.receive_data(listener.data_to_send())
    record = dialer.result().transport.encrypt(b"early request")
    listener.receive_data(dialer.data_to_send() + frame(record) + b"\x00")
    session = listener.result()
    assert session.leftover == frame(record) + b"\x00"
    assert session.transport.decrypt(unframe(session.leftover[:-1])) == b"early request"


def test_initiator_sends_message_1_at_once_and_message_1_is_32_bytes() -> None:
    dialer = SecureHandshake(identity(1), initiator=True, rng=rng_for(5))
    first = dialer.data_to_send()
    assert len(first) == 2 + 32 and first[:2] == b"\x00\x20"
    assert dialer.data_to_send() == b""
    assert SecureHandshake(identity(2), initiator=False, rng=rng_for(6)).data_to_send() == b""


def test_expected_peer_mismatch_fails_and_initiator_reveals_nothing() -> None:
    dialer = SecureHandshake(
        identity(1), initiator=True, rng=rng_for(7), expected_peer=identity(3).peer_id
    )
    listener = SecureHandshake(identity(2), initiator=False, rng=rng_for(8))
    listener.receive_data(dialer.data_to_send())
    with pytest.raises(HandshakeError, match="expected peer") as info:
        dialer.receive_data(listener.data_to_send())
    assert str(identity(2).peer_id) in info.value.reason
    assert dialer.data_to_send() == b""  # message 3 (our identity) was never produced
    assert not dialer.is_complete and dialer.failure == info.value.reason
    with pytest.raises(HandshakeError, match="already failed"):
        dialer.receive_data(b"more")
    with pytest.raises(RuntimeError):
        dialer.result()


@pytest.mark.parametrize("bad_side", ["responder", "initiator"])
def test_bad_signature_is_rejected(bad_side: str) -> None:
    good, bad = identity(1), WrongBytesSigner.from_seed(bytes([9]) * 32)
    dialer = SecureHandshake(bad if bad_side == "initiator" else good, initiator=True,
                             rng=rng_for(9))
    listener = SecureHandshake(bad if bad_side == "responder" else good, initiator=False,
                               rng=rng_for(10))
    victim = dialer if bad_side == "responder" else listener
    with pytest.raises(HandshakeError, match="bad signature"):
        pump(dialer, listener)
    assert victim.failure is not None and not victim.is_complete


class CraftedResponder:
    """A responder built from the Noise pieces that sends a payload of our choosing."""

    def __init__(self, payload_for: Callable[[bytes], bytes]):
        self.rng = rng_for(11)
        self.static = KeyPair.generate(self.rng)
        self.noise = HandshakeState(False, PROLOGUE, self.static, self.rng)
        self.payload_for = payload_for

    def answer(self, message1_framed: bytes) -> bytes:
        self.noise.read_message(unframe(message1_framed))
        return frame(self.noise.write_message(self.payload_for(self.static.public)))


def signed_fields(static_public: bytes, signer: Identity | None = None) -> dict:
    signer = signer or identity(4)
    return {
        "v": 1,
        "key": signer.public_key,
        "sig": signer.sign(STATIC_KEY_SIGNATURE_PREFIX + static_public),
    }


def crafted(mutate: Callable) -> Callable[[bytes], bytes]:
    def payload_for(static_public: bytes) -> bytes:
        result = mutate(signed_fields(static_public))
        return result if isinstance(result, bytes) else msgpack.packb(result)

    return payload_for


def without(name: str):
    return lambda f: {k: v for k, v in f.items() if k != name}


BAD_PAYLOADS = [
    ("missing sig", without("sig"), "'sig' must be"),
    ("missing key", without("key"), "'key' must be"),
    ("missing v", without("v"), "'v' is missing"),
    ("v=2", lambda f: {**f, "v": 2}, "version 2"),
    ("v as string", lambda f: {**f, "v": "1"}, "'v' is missing or not an integer"),
    ("v as bool", lambda f: {**f, "v": True}, "not an integer"),
    ("key as str", lambda f: {**f, "key": "k" * 32}, "'key' must be"),
    ("short sig", lambda f: {**f, "sig": f["sig"][:63]}, "'sig' must be"),
    ("sig of another key", lambda f: {**f, "key": identity(5).public_key}, "bad signature"),
    ("not a map", lambda f: [f["v"], f["key"], f["sig"]], "not a map"),
    ("random bytes", lambda f: random.Random(1).randbytes(90), "msgpack|not a map"),
    ("empty", lambda f: b"", "not valid msgpack"),
    ("trailing bytes", lambda f: msgpack.packb(f) + b"\x00", "bytes after its msgpack"),
    ("int map key", lambda f: {**f, 7: 1}, "not valid msgpack"),
]


@pytest.mark.parametrize(("mutate", "reason"), [row[1:] for row in BAD_PAYLOADS],
                         ids=[row[0] for row in BAD_PAYLOADS])
def test_malformed_identity_payload_is_rejected(mutate, reason: str) -> None:
    dialer = SecureHandshake(identity(1), initiator=True, rng=rng_for(12))
    responder = CraftedResponder(crafted(mutate))
    with pytest.raises(HandshakeError, match=reason):
        dialer.receive_data(responder.answer(dialer.data_to_send()))
    assert dialer.data_to_send() == b""


def test_extra_payload_keys_are_tolerated() -> None:
    dialer = SecureHandshake(identity(1), initiator=True, rng=rng_for(13))
    responder = CraftedResponder(crafted(lambda f: {**f, "future": [1, 2], "addrs": b"x"}))
    dialer.receive_data(responder.answer(dialer.data_to_send()))
    assert dialer.result().remote_peer == identity(4).peer_id
    message3 = unframe(dialer.data_to_send())
    assert verify_identity_payload(
        responder.noise.read_message(message3), responder.noise.remote_static
    ) == identity(1).peer_id


def test_payload_signed_for_another_static_key_is_rejected() -> None:
    other_static = KeyPair.generate(rng_for(14)).public
    dialer = SecureHandshake(identity(1), initiator=True, rng=rng_for(15))
    responder = CraftedResponder(lambda _: msgpack.packb(signed_fields(other_static)))
    with pytest.raises(HandshakeError, match="bad signature"):
        dialer.receive_data(responder.answer(dialer.data_to_send()))


def listener_after_message_1() -> tuple[SecureHandshake, SecureHandshake]:
    dialer = SecureHandshake(identity(1), initiator=True, rng=rng_for(16))
    listener = SecureHandshake(identity(2), initiator=False, rng=rng_for(17))
    listener.receive_data(dialer.data_to_send())
    return dialer, listener


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"\x00\x00", "zero-length"),
        (b"\xff\xff" + bytes(10), "exceeds 1000"),
        (frame(bytes(31)), "too short for the ephemeral"),
        (frame(bytes(32)), "invalid remote X25519 public key"),  # low-order point
        (frame(KeyPair.generate(rng_for(18)).public + b"!"), "empty payload"),
        (frame(KeyPair.generate(rng_for(18)).public) + b"\x00", "unexpected bytes"),
    ],
)
def test_garbage_first_message_is_rejected(stream: bytes, reason: str) -> None:
    listener = SecureHandshake(identity(2), initiator=False, rng=rng_for(19), max_message=1000)
    with pytest.raises(HandshakeError, match=reason):
        listener.receive_data(stream)
    assert listener.data_to_send() == b""


def test_oversized_length_fails_before_the_body_arrives() -> None:
    listener = SecureHandshake(identity(2), initiator=False, rng=rng_for(20), max_message=100)
    with pytest.raises(HandshakeError, match="101 bytes exceeds 100"):
        listener.receive_data(b"\x00\x65")


def test_incomplete_frames_wait_for_more_data() -> None:
    listener = SecureHandshake(identity(2), initiator=False, rng=rng_for(21))
    listener.receive_data(b"\x00")
    listener.receive_data(b"\x20" + bytes(5))
    assert listener.data_to_send() == b"" and listener.failure is None


def test_garbage_message_3_is_rejected() -> None:
    dialer, listener = listener_after_message_1()
    dialer.receive_data(listener.data_to_send())
    message3 = bytearray(dialer.data_to_send())
    message3[10] ^= 1
    with pytest.raises(HandshakeError, match="invalid handshake message 3"):
        listener.receive_data(bytes(message3))


def test_responder_data_before_message_3_is_rejected() -> None:
    dialer, listener = listener_after_message_1()
    with pytest.raises(HandshakeError, match="unexpected bytes after message 2"):
        dialer.receive_data(listener.data_to_send() + b"\x00\x01x")


def test_data_after_completion_goes_to_the_record_layer_not_here() -> None:
    dialer, listener = listener_after_message_1()
    dialer.receive_data(listener.data_to_send())
    with pytest.raises(HandshakeError, match="already complete"):
        dialer.receive_data(b"\x00\x01x")


def test_invalid_max_message_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        SecureHandshake(identity(1), initiator=True, rng=rng_for(22), max_message=65536)


def test_one_static_key_and_payload_serve_many_handshakes():
    """A host made and signed a fresh static key for every connection: two thirds of what a
    responder spent on an unauthenticated message 1. Reused, each handshake still works."""
    from overlay.secure_handshake import encode_identity_payload

    server_id = identity(7)
    static = KeyPair.generate(rng_for(70))
    payload = encode_identity_payload(server_id, static.public)
    for n in range(3):
        client = SecureHandshake(identity(10 + n), initiator=True, rng=rng_for(n),
                                 expected_peer=server_id.peer_id)
        server = SecureHandshake(server_id, initiator=False, rng=rng_for(100 + n),
                                 static=static, payload=payload)
        pump(client, server)
        assert client.result().remote_peer == server_id.peer_id
        assert client.result().transport.remote_static == static.public
        assert server.result().remote_peer == identity(10 + n).peer_id
