"""An initiator from the independent `noiseprotocol` package, with the identity payload built by
hand here (msgpack + Ed25519 from `cryptography`), against our responder SecureHandshake."""

from __future__ import annotations

import random
import warnings

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from overlay.identity import Identity, PeerId
from overlay.secure_handshake import HandshakeError, SecureHandshake

noise_connection = pytest.importorskip("noise.connection")


def their_initiator(static_private: bytes):
    conn = noise_connection.NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
    conn.set_prologue(b"overlay-node/1")
    conn.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, static_private)
    conn.set_as_initiator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn.start_handshake()
    return conn


def framed(message: bytes) -> bytes:
    return len(message).to_bytes(2, "big") + bytes(message)


def unframed(data: bytes) -> bytes:
    assert int.from_bytes(data[:2], "big") == len(data) - 2
    return data[2:]


def run_against_our_responder(sign_correctly: bool):
    rng = random.Random(50).randbytes
    ed_key = Ed25519PrivateKey.from_private_bytes(rng(32))
    ed_public = ed_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    theirs = their_initiator(rng(32))
    server = Identity.from_seed(rng(32))
    ours = SecureHandshake(server, initiator=False, rng=rng)

    ours.receive_data(framed(theirs.write_message(b"")))
    payload2 = bytes(theirs.read_message(unframed(ours.data_to_send())))
    # Check our responder's identity proof by hand, independently of overlay.identity.
    fields = msgpack.unpackb(payload2)
    assert fields["v"] == 1 and fields["key"] == server.public_key
    our_static = theirs.noise_protocol.handshake_state.rs.public_bytes
    Ed25519PublicKey.from_public_bytes(fields["key"]).verify(
        fields["sig"], b"noise-libp2p-static-key:" + our_static
    )

    their_static = theirs.noise_protocol.keypairs["s"].public_bytes
    signed = their_static if sign_correctly else bytes(32)
    payload3 = msgpack.packb({
        "v": 1,
        "key": ed_public,
        "sig": ed_key.sign(b"noise-libp2p-static-key:" + signed),
        "extra": "ignored by design",
    })
    ours.receive_data(framed(theirs.write_message(payload3)))
    return ours, theirs, ed_public


def test_noiseprotocol_initiator_completes_against_our_responder() -> None:
    ours, theirs, ed_public = run_against_our_responder(sign_correctly=True)
    session = ours.result()
    assert session.remote_peer == PeerId.from_public_key(ed_public)
    assert str(session.remote_peer).startswith("12D3KooW")
    assert session.transport.handshake_hash == theirs.get_handshake_hash()
    assert session.transport.decrypt(theirs.encrypt(b"hello from noiseprotocol")) == (
        b"hello from noiseprotocol"
    )
    assert theirs.decrypt(session.transport.encrypt(b"hello back")) == b"hello back"


def test_noiseprotocol_initiator_with_bad_signature_is_rejected() -> None:
    with pytest.raises(HandshakeError, match="bad signature"):
        run_against_our_responder(sign_correctly=False)
