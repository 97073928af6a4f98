"""Identities and peer ids: the libp2p test vector, key files, and malformed input."""

from __future__ import annotations

import concurrent.futures
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay.base58 import Base58Error, b58decode, b58encode
from overlay.identity import Identity, IdentityError, PeerId

# libp2p peer-ids specification, "Test vectors" (../shared/vectors/libp2p-peer-id.md).
SEED = bytes.fromhex("7e0830617c4a7de83925dfb2694556b12936c477a0e1feb2e148ec9da60fee7d")
PUBLIC = bytes.fromhex("1ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
PROTOBUF = bytes.fromhex("080112201ed1e8fae2c4a144b8be8fd4b47bf3d3b34b871c3cacf6010f0e42d474fce27e")
PEER_ID = "12D3KooWBtg3aaRMjxwedh83aGiUkwSxDwUZkzuJcfaqUmo7R3pq"


def test_libp2p_peer_id_vector():
    identity = Identity.from_seed(SEED)
    assert identity.public_key == PUBLIC
    assert identity.peer_id.raw == bytes([0x00, 0x24]) + PROTOBUF
    assert str(identity.peer_id) == PEER_ID
    assert PeerId.from_string(PEER_ID) == identity.peer_id
    assert PeerId.from_string(PEER_ID).public_key == PUBLIC


def test_signatures_verify_with_the_peer_id_alone():
    identity = Identity.generate()
    sig = identity.sign(b"record")
    peer = PeerId.from_string(str(identity.peer_id))
    assert peer.verify(sig, b"record")
    assert not peer.verify(sig, b"other")
    assert not peer.verify(sig[:-1] + bytes([sig[-1] ^ 1]), b"record")
    assert not peer.verify(b"short", b"record")
    assert not Identity.generate().peer_id.verify(sig, b"record")


def test_save_load_round_trip_with_private_mode(tmp_path):
    identity = Identity.generate()
    path = tmp_path / "sub" / "id.key"
    identity.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert Identity.load(path).peer_id == identity.peer_id
    assert Identity.load_or_create(path).peer_id == identity.peer_id
    fresh = tmp_path / "fresh.key"
    created = Identity.load_or_create(fresh)
    assert Identity.load(fresh).peer_id == created.peer_id


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"hello", "not an overlay-node identity"),
     (b"overlay-node-ed25519-v1\nzz\n", "corrupt"),
     (b"overlay-node-ed25519-v1\nabcd\n", "32 bytes")],
)
def test_bad_identity_files(tmp_path, content, message):
    path = tmp_path / "bad.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=message):
        Identity.load(path)


def test_an_identity_path_that_is_no_regular_file_is_refused_at_once(tmp_path):
    """A FIFO: reading it blocked `id` and `join` for good (signals included) until another
    process wrote to it."""
    fifo = tmp_path / "id.fifo"
    os.mkfifo(fifo)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        loading = pool.submit(Identity.load, fifo)
        try:
            with pytest.raises(IdentityError, match="not a regular file"):
                loading.result(timeout=10)
        finally:
            if not loading.done():  # blocked in open(): a writer lets it go
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    with pytest.raises(IdentityError, match="not a regular file"):
        Identity.load_or_create(tmp_path)


def test_world_readable_identity_is_refused(tmp_path):
    path = tmp_path / "id.key"
    Identity.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path / "missing.key")


def test_unwritable_identity_path_is_an_identity_error(tmp_path):
    in_the_way = tmp_path / "file"
    in_the_way.write_text("")
    for path in (in_the_way / "x.key", in_the_way / "sub" / "x.key"):
        with pytest.raises(IdentityError, match=f"cannot write identity file {path}: "):
            Identity.load_or_create(path)


RSA_STYLE_ID = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize("text", ["", "0OIl", "12D3KooW", RSA_STYLE_ID,
                                  PEER_ID[:-1], PEER_ID + "1", "12D3KooW\u00e9"])
def test_malformed_peer_ids(text):
    with pytest.raises(IdentityError):
        PeerId.from_string(text)


@given(st.binary(max_size=64))
def test_base58_round_trip(data):
    assert b58decode(b58encode(data)) == data


@given(st.text(max_size=60))
def test_peer_id_parser_only_raises_identity_error(text):
    try:
        PeerId.from_string(text)
    except IdentityError:
        pass


def test_base58_rejects_bad_characters():
    with pytest.raises(Base58Error):
        b58decode("abc0")
