"""Peer identity: Ed25519 keys and libp2p-compatible peer ids (overlay/PROTOCOL.md 1.3-1.4).

A peer id is the identity multihash of the protobuf-encoded public key
(`PublicKey{Type=Ed25519, Data=key}`), exactly as libp2p derives it for Ed25519 keys, so its
base58btc form starts with `12D3KooW`. The key is embedded in the id, so anyone holding a
peer id can verify that peer's signatures without a lookup.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from overlay.base58 import Base58Error, b58decode, b58encode

# protobuf: field 1 (Type, varint) = 1 (Ed25519); field 2 (Data, bytes) of length 32.
_PROTOBUF_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
# multihash: code 0x00 (identity), length 36 (the protobuf above).
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 0x24])
PEER_ID_PREFIX = _IDENTITY_MULTIHASH_PREFIX + _PROTOBUF_ED25519_PREFIX
PEER_ID_LENGTH = len(PEER_ID_PREFIX) + 32

_IDENTITY_FILE_MAGIC = b"overlay-node-ed25519-v1\n"
# Ours: read at most this much (a file is the magic line and 64 hex digits).
_MAX_IDENTITY_FILE_BYTES = 4096
# base58 of a 38-byte id costs ~50 us; logs and DHT records print the same few ids again and again.
_TEXT_CACHE: dict[bytes, str] = {}
_TEXT_CACHE_SIZE = 4096


class IdentityError(ValueError):
    """Raised for a malformed peer id or an unreadable identity file."""


@dataclass(frozen=True, slots=True, order=True)
class PeerId:
    """A peer id in binary form (identity multihash of the protobuf public key)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != PEER_ID_LENGTH or not self.raw.startswith(PEER_ID_PREFIX):
            raise IdentityError("not an Ed25519 peer id (expected identity multihash of 36 bytes)")

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerId:
        if len(public_key) != 32:
            raise IdentityError(f"Ed25519 public key must be 32 bytes, got {len(public_key)}")
        return cls(PEER_ID_PREFIX + bytes(public_key))

    @classmethod
    def from_string(cls, text: str) -> PeerId:
        try:
            return cls(b58decode(text))
        except (Base58Error, IdentityError) as e:
            raise IdentityError(f"invalid peer id {text!r}: {e}") from None

    @property
    def public_key(self) -> bytes:
        return self.raw[len(PEER_ID_PREFIX):]

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` is this peer's Ed25519 signature over `data`."""
        if len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def __str__(self) -> str:
        text = _TEXT_CACHE.get(self.raw)
        if text is None:
            if len(_TEXT_CACHE) >= _TEXT_CACHE_SIZE:
                _TEXT_CACHE.clear()
            text = _TEXT_CACHE[self.raw] = b58encode(self.raw)
        return text

    def __repr__(self) -> str:
        return f"PeerId({self})"

    def short(self) -> str:
        """The last characters of the text form, for logs."""
        return "..." + str(self)[-6:]


class Identity:
    """An Ed25519 key pair: who this node is on the overlay."""

    __slots__ = ("_private", "peer_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey):
        self._private = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError(f"Ed25519 seed must be 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def save(self, path: str | Path) -> None:
        """Write the key to `path` with mode 0600 (created atomically, never world-readable).

        Raises IdentityError naming `path` when it cannot be written (read-only or virtual
        file system, a regular file where a directory should be, no permission)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, _IDENTITY_FILE_MAGIC + self.seed().hex().encode() + b"\n")
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except FileExistsError as e:  # only mkdir raises it: a file where a directory goes
            raise IdentityError(
                f"cannot write identity file {path}: {e.filename} is not a directory"
            ) from None
        except OSError as e:
            where = f" ({e.filename})" if e.filename and str(e.filename) != str(path) else ""
            raise IdentityError(
                f"cannot write identity file {path}: {e.strerror or e}{where}"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        path = Path(path)
        try:
            # Non-blocking, and only a regular file: opening a FIFO (or a device) blocked the
            # command for good, its signal handlers included, until another process wrote.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise IdentityError(f"cannot read identity file {path}: {e.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise IdentityError(f"{path} is not a regular file, so not an identity file")
            data = os.read(fd, _MAX_IDENTITY_FILE_BYTES)
        except OSError as e:
            raise IdentityError(f"cannot read identity file {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        if not data.startswith(_IDENTITY_FILE_MAGIC):
            raise IdentityError(f"{path} is not an overlay-node identity file")
        try:
            seed = bytes.fromhex(data[len(_IDENTITY_FILE_MAGIC):].strip().decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise IdentityError(f"{path}: corrupt identity file") from None
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise IdentityError(
                f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}"
            )
        return cls.from_seed(seed)

    @classmethod
    def load_or_create(cls, path: str | Path | None) -> Identity:
        """Load `path`, creating it first when missing; a fresh key when `path` is None."""
        if path is None:
            return cls.generate()
        try:
            exists = Path(path).exists()
        except OSError as e:  # e.g. no permission to search its directory
            raise IdentityError(f"cannot read identity file {path}: {e.strerror}") from None
        if exists:
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity
