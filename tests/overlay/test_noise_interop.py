"""Our Noise XX against the independent `noiseprotocol` package, in memory, both roles."""

from __future__ import annotations

import random
import warnings

import pytest

from overlay.noise import PROTOCOL_NAME, HandshakeState, KeyPair, NoiseError

noise_connection = pytest.importorskip("noise.connection")

PROLOGUE = b"interop prologue"


def their_side(initiator: bool, static_private: bytes):
    conn = noise_connection.NoiseConnection.from_name(PROTOCOL_NAME.encode())
    conn.set_prologue(PROLOGUE)
    conn.set_keypair_from_private_bytes(noise_connection.Keypair.STATIC, static_private)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn.start_handshake()
    return conn


def public_of(private: bytes) -> bytes:
    return KeyPair.from_private_bytes(private).public


@pytest.mark.parametrize("we_initiate", [True, False])
def test_full_session_against_noiseprotocol(we_initiate: bool) -> None:
    rng = random.Random(42 if we_initiate else 43).randbytes
    our_static, their_static = rng(32), rng(32)
    ours = HandshakeState(we_initiate, PROLOGUE, KeyPair.from_private_bytes(our_static), rng)
    theirs = their_side(not we_initiate, their_static)

    payloads = [b"", b"second", b"third payload"]
    for i, payload in enumerate(payloads):
        if (i % 2 == 0) == we_initiate:
            assert bytes(theirs.read_message(ours.write_message(payload))) == payload
        else:
            assert ours.read_message(bytes(theirs.write_message(payload))) == payload
    assert ours.is_complete and theirs.handshake_finished
    assert ours.handshake_hash == theirs.get_handshake_hash()
    assert ours.remote_static == public_of(their_static)

    transport = ours.into_transport()
    for size in (0, 17, 4096, 65519):
        data = rng(size)
        assert theirs.decrypt(transport.encrypt(data)) == data
        assert transport.decrypt(theirs.encrypt(data)) == data
    assert transport.send_nonce == transport.recv_nonce == 4


def test_noiseprotocol_with_another_prologue_is_rejected() -> None:
    rng = random.Random(44).randbytes
    ours = HandshakeState(True, b"another prologue", KeyPair.generate(rng), rng)
    theirs = their_side(False, rng(32))
    theirs.read_message(ours.write_message(b""))
    with pytest.raises(NoiseError, match="decryption failed"):
        ours.read_message(bytes(theirs.write_message(b"")))
