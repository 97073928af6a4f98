"""X25519 key pairs: the DH functions of Noise spec section 12.1 (Curve25519, DHLEN = 32).

May not draw its own randomness: `KeyPair.generate` takes the injected random source, so a
handshake can be replayed with fixed keys (test vectors, the simulator).
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from overlay.noise.errors import NoiseError

DHLEN = 32  # Noise spec section 12.1: length of a Curve25519 public key and DH output.

_RAW = serialization.Encoding.Raw


class KeyPair:
    """An X25519 key pair; `public` holds the 32 raw public bytes sent on the wire."""

    __slots__ = ("_private", "public")

    def __init__(self, private_key: X25519PrivateKey):
        self._private = private_key
        self.public: bytes = private_key.public_key().public_bytes(
            _RAW, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls, rng: Callable[[int], bytes]) -> KeyPair:
        """GENERATE_KEYPAIR() (spec 4.1) from DHLEN bytes of the injected random source."""
        seed = rng(DHLEN)
        if len(seed) != DHLEN:
            raise NoiseError(f"random source returned {len(seed)} bytes, wanted {DHLEN}")
        return cls.from_private_bytes(seed)

    @classmethod
    def from_private_bytes(cls, private: bytes) -> KeyPair:
        if len(private) != DHLEN:
            raise NoiseError(f"X25519 private key must be {DHLEN} bytes, got {len(private)}")
        return cls(X25519PrivateKey.from_private_bytes(bytes(private)))

    def private_bytes(self) -> bytes:
        return self._private.private_bytes(
            _RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def dh(self, remote_public: bytes) -> bytes:
        """DH(key_pair, public_key) (spec 4.1).

        A low-order remote point gives an all-zero secret, which `cryptography` refuses; spec
        section 12.1 lets an implementation signal an error there, and we do (NoiseError).
        """
        if len(remote_public) != DHLEN:
            raise NoiseError(f"X25519 public key must be {DHLEN} bytes, got {len(remote_public)}")
        try:
            return self._private.exchange(X25519PublicKey.from_public_bytes(bytes(remote_public)))
        except ValueError as e:
            raise NoiseError(f"invalid remote X25519 public key: {e}") from None

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()})"
