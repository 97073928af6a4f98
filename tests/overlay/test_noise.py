"""Noise_XX_25519_ChaChaPoly_SHA256: cacophony vector replay, nonce rules, tampering, misuse."""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.noise import (
    MAX_PLAINTEXT_LEN,
    PROTOCOL_NAME,
    CipherState,
    HandshakeState,
    KeyPair,
    NoiseError,
    TransportState,
)
from overlay.noise.symmetricstate import hkdf

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "cacophony.txt"


def seeded_rng(seed: int):
    return random.Random(seed).randbytes


def handshake_pair(seed: int = 1, prologue: bytes = b"test") -> tuple[TransportState, ...]:
    rng = seeded_rng(seed)
    init = HandshakeState(True, prologue, KeyPair.generate(rng), rng)
    resp = HandshakeState(False, prologue, KeyPair.generate(rng), rng)
    assert resp.read_message(init.write_message(b"")) == b""
    assert init.read_message(resp.write_message(b"two")) == b"two"
    assert resp.read_message(init.write_message(b"three")) == b"three"
    assert init.handshake_hash == resp.handshake_hash
    return init.into_transport(), resp.into_transport()


@pytest.fixture(scope="module")
def xx_vector() -> dict:
    if not VECTORS.is_file():
        pytest.skip(f"cacophony vectors not found at {VECTORS} (shared/ must sit beside the repo)")
    vectors = json.loads(VECTORS.read_text())["vectors"]
    (vector,) = [v for v in vectors if v["protocol_name"] == PROTOCOL_NAME]
    return vector


def test_cacophony_xx_vector_byte_for_byte(xx_vector: dict) -> None:
    skip = ("protocol_name", "messages")
    v = {k: bytes.fromhex(x) for k, x in xx_vector.items() if k not in skip}

    def no_rng(n: int) -> bytes:
        raise AssertionError("the vector fixes every key; no randomness may be drawn")

    init = HandshakeState(
        True, v["init_prologue"], KeyPair.from_private_bytes(v["init_static"]), no_rng,
        ephemeral=KeyPair.from_private_bytes(v["init_ephemeral"]),
    )
    resp = HandshakeState(
        False, v["resp_prologue"], KeyPair.from_private_bytes(v["resp_static"]), no_rng,
        ephemeral=KeyPair.from_private_bytes(v["resp_ephemeral"]),
    )
    messages = [
        (bytes.fromhex(m["payload"]), bytes.fromhex(m["ciphertext"])) for m in xx_vector["messages"]
    ]
    assert len(messages) == 6
    for i, (payload, ciphertext) in enumerate(messages[:3]):
        sender, receiver = (init, resp) if i % 2 == 0 else (resp, init)
        assert sender.write_message(payload) == ciphertext, f"handshake message {i}"
        assert receiver.read_message(ciphertext) == payload
    assert init.is_complete and resp.is_complete
    assert init.handshake_hash == resp.handshake_hash == v["handshake_hash"]
    assert init.remote_static == KeyPair.from_private_bytes(v["resp_static"]).public
    assert resp.remote_static == KeyPair.from_private_bytes(v["init_static"]).public
    ends = {True: init.into_transport(), False: resp.into_transport()}
    for i, (payload, ciphertext) in enumerate(messages[3:], start=3):
        sender, receiver = ends[i % 2 == 0], ends[i % 2 != 0]
        assert sender.encrypt(payload) == ciphertext, f"transport message {i}"
        assert receiver.decrypt(ciphertext) == payload
    assert ends[True].handshake_hash == v["handshake_hash"]
    assert (ends[True].send_nonce, ends[True].recv_nonce) == (1, 2)  # sent 4; got 3, 5


def test_hkdf_matches_rfc5869_case_3() -> None:
    # RFC 5869 A.3 (SHA-256, empty salt and info): Noise's HKDF is T(1) || T(2) of it.
    okm = bytes.fromhex(
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    out1, out2 = hkdf(b"", b"\x0b" * 22, 2)
    assert (out1 + out2)[:42] == okm
    assert hkdf(b"", b"\x0b" * 22, 3)[:2] == (out1, out2)


def test_transport_both_directions_and_into_variants() -> None:
    a, b = handshake_pair()
    for size in (0, 1, 1000, MAX_PLAINTEXT_LEN):
        data = random.Random(size).randbytes(size)
        assert b.decrypt(a.encrypt(data)) == data
        assert a.decrypt(b.encrypt(data)) == data
    data = bytes(range(256)) * 40
    out = bytearray(len(data) + 16 + 7)  # a larger buffer is allowed
    n = a.encrypt_into(data, out)
    assert n == len(data) + 16
    plain = bytearray(len(data))
    assert b.decrypt_into(memoryview(out)[:n], plain) == len(data)
    assert plain == data
    with pytest.raises(NoiseError, match="buffer"):
        a.encrypt_into(data, bytearray(len(data)))
    # the failed call consumed no nonce: the peer still decrypts the next record
    assert b.decrypt(a.encrypt(b"next")) == b"next"


def test_oversized_records_are_refused() -> None:
    a, b = handshake_pair()
    with pytest.raises(NoiseError, match="exceeds"):
        a.encrypt(bytes(MAX_PLAINTEXT_LEN + 1))
    with pytest.raises(NoiseError, match="exceeds"):
        b.decrypt(bytes(65536))


@pytest.mark.parametrize("position", [0, 5, 20, -1])
def test_tampered_transport_message_is_rejected(position: int) -> None:
    a, b = handshake_pair()
    ciphertext = bytearray(a.encrypt(b"attack at dawn, bring snacks"))
    ciphertext[position] ^= 0x01
    with pytest.raises(NoiseError, match="decryption failed"):
        b.decrypt(bytes(ciphertext))
    assert b.recv_nonce == 0  # spec 5.1: a failed decryption does not advance n


def test_short_truncated_and_replayed_messages_are_rejected() -> None:
    a, b = handshake_pair()
    first = a.encrypt(b"hello")
    for bad in (b"", first[:15], first[:-1]):
        with pytest.raises(NoiseError):
            b.decrypt(bad)
    with pytest.raises(NoiseError):
        b.decrypt_into(first[:10], bytearray(0))
    assert b.decrypt(first) == b"hello"
    with pytest.raises(NoiseError):
        b.decrypt(first)  # replay: the nonce has moved on


def test_nonce_exhaustion_never_wraps() -> None:
    key = bytes(range(32))
    sender = CipherState(key)
    sender.set_nonce(2**64 - 1)
    with pytest.raises(NoiseError, match="nonce exhausted"):
        sender.encrypt_with_ad(None, b"x")
    sender.set_nonce(2**64 - 2)
    receiver = CipherState(key)
    receiver.set_nonce(2**64 - 2)
    last = sender.encrypt_with_ad(None, b"last one")
    assert receiver.decrypt_with_ad(None, last) == b"last one"
    for state in (sender, receiver):
        assert state.nonce == 2**64 - 1
    with pytest.raises(NoiseError, match="nonce exhausted"):
        sender.encrypt_with_ad(None, b"x")
    with pytest.raises(NoiseError, match="nonce exhausted"):
        sender.encrypt_with_ad_into(None, b"x", bytearray(17))
    with pytest.raises(NoiseError, match="nonce exhausted"):
        receiver.decrypt_with_ad(None, last)
    with pytest.raises(NoiseError):
        sender.set_nonce(2**64)


def test_rekey_changes_key_in_step_and_keeps_nonce() -> None:
    a, b = handshake_pair()
    before = a.encrypt(b"same")
    assert b.decrypt(before) == b"same"
    a.rekey_outbound()
    after = a.encrypt(b"same")
    with pytest.raises(NoiseError):
        CipherState(bytes(32)).decrypt_with_ad(None, after)
    b.rekey_inbound()
    assert b.decrypt(after) == b"same"
    assert a.send_nonce == b.recv_nonce == 2


def test_empty_cipherstate_passes_plaintext_through() -> None:
    state = CipherState()
    assert not state.has_key()
    assert state.encrypt_with_ad(b"ad", b"clear") == b"clear"
    assert state.nonce == 0
    with pytest.raises(NoiseError):
        state.rekey()


def test_handshake_cannot_encrypt_before_completion_and_is_consumed() -> None:
    rng = seeded_rng(7)
    init = HandshakeState(True, b"", KeyPair.generate(rng), rng)
    resp = HandshakeState(False, b"", KeyPair.generate(rng), rng)
    with pytest.raises(NoiseError, match="not complete"):
        init.into_transport()
    with pytest.raises(NoiseError, match="out of turn"):
        init.read_message(b"")
    with pytest.raises(NoiseError, match="out of turn"):
        resp.write_message(b"")
    resp.read_message(init.write_message(b""))
    init.read_message(resp.write_message(b""))
    resp.read_message(init.write_message(b""))
    with pytest.raises(NoiseError, match="into_transport"):
        init.write_message(b"")
    init.into_transport()
    calls = (init.into_transport, lambda: init.write_message(b""), lambda: init.read_message(b""))
    for call in calls:
        with pytest.raises(NoiseError, match="transport"):
            call()


def test_failed_read_poisons_the_handshake() -> None:
    rng = seeded_rng(3)
    init = HandshakeState(True, b"p", KeyPair.generate(rng), rng)
    resp = HandshakeState(False, b"p", KeyPair.generate(rng), rng)
    resp.read_message(init.write_message(b""))
    message2 = bytearray(resp.write_message(b"payload"))
    message2[40] ^= 0x80  # inside the encrypted static key
    with pytest.raises(NoiseError, match="decryption failed"):
        init.read_message(bytes(message2))
    with pytest.raises(NoiseError, match="failed earlier"):
        init.read_message(bytes(message2))
    with pytest.raises(NoiseError, match="failed earlier"):
        init.into_transport()


def test_prologue_mismatch_fails_the_handshake() -> None:
    rng = seeded_rng(4)
    init = HandshakeState(True, b"overlay-node/1", KeyPair.generate(rng), rng)
    resp = HandshakeState(False, b"overlay-node/2", KeyPair.generate(rng), rng)
    resp.read_message(init.write_message(b""))
    with pytest.raises(NoiseError):
        init.read_message(resp.write_message(b""))


def test_low_order_ephemeral_key_is_rejected() -> None:
    rng = seeded_rng(5)
    resp = HandshakeState(False, b"", KeyPair.generate(rng), rng)
    resp.read_message(bytes(32))  # an all-zero point: accepted as bytes, fails at DH
    with pytest.raises(NoiseError, match="invalid remote X25519"):
        resp.write_message(b"")


def test_oversized_handshake_payload_is_refused() -> None:
    rng = seeded_rng(6)
    init = HandshakeState(True, b"", KeyPair.generate(rng), rng)
    with pytest.raises(NoiseError, match="exceeds"):
        init.write_message(bytes(65535 - 31))


def test_rng_is_the_only_source_of_keys() -> None:
    def run() -> bytes:
        a, _ = handshake_pair(seed=11)
        return a.encrypt(b"deterministic") + a.handshake_hash

    assert run() == run()
    with pytest.raises(NoiseError, match="random source"):
        KeyPair.generate(lambda n: b"short")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_random_handshake_messages_only_raise_noise_error(msg1: bytes, msg3: bytes) -> None:
    rng = seeded_rng(8)
    resp = HandshakeState(False, b"", KeyPair.generate(rng), rng)
    try:
        resp.read_message(msg1)
        resp.write_message(b"")
        resp.read_message(msg3)
    except NoiseError:
        return
    raise AssertionError("a random third message cannot authenticate")


SANS_IO_MODULES = [
    *sorted((Path(__file__).resolve().parents[2] / "overlay" / "noise").glob("*.py")),
    Path(__file__).resolve().parents[2] / "overlay" / "secure_handshake.py",
]


@pytest.mark.parametrize("path", SANS_IO_MODULES, ids=lambda p: p.name)
def test_protocol_modules_stay_sans_io(path: Path) -> None:
    forbidden = {"os", "asyncio", "socket", "time", "random", "secrets", "selectors"}
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & forbidden, f"{path.name} imports {imported & forbidden}"
