"""SymmetricState (Noise spec revision 34, section 5.2) with SHA-256 (section 12.5).

Holds the chaining key `ck` and the handshake hash `h`, and the CipherState keyed from `ck`.
Pure computation: no I/O, no randomness.
"""

from __future__ import annotations

import hashlib
import hmac

from overlay.noise.cipherstate import CipherState

HASHLEN = 32  # spec 12.5: SHA-256 output length.


def _hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hkdf(chaining_key: bytes, input_key_material: bytes, num_outputs: int) -> tuple[bytes, ...]:
    """HKDF(chaining_key, input_key_material, num_outputs) as defined in spec section 4.3.

    This is RFC 5869 HKDF with `chaining_key` as salt and an empty info, built from HMAC-SHA256.
    """
    if num_outputs not in (2, 3):
        raise ValueError("Noise HKDF yields 2 or 3 outputs")
    temp_key = hmac.digest(chaining_key, input_key_material, "sha256")
    output1 = hmac.digest(temp_key, b"\x01", "sha256")
    output2 = hmac.digest(temp_key, output1 + b"\x02", "sha256")
    if num_outputs == 2:
        return output1, output2
    return output1, output2, hmac.digest(temp_key, output2 + b"\x03", "sha256")


class SymmetricState:
    """Mixes handshake inputs into `ck` and `h` and keys the handshake cipher (spec 5.2)."""

    __slots__ = ("_cipher", "_ck", "_h")

    def __init__(self, protocol_name: bytes):
        """InitializeSymmetric(protocol_name)."""
        if len(protocol_name) <= HASHLEN:
            self._h = protocol_name.ljust(HASHLEN, b"\x00")
        else:
            self._h = _hash(protocol_name)
        self._ck = self._h
        self._cipher = CipherState()

    @property
    def cipher_state(self) -> CipherState:
        return self._cipher

    def mix_key(self, input_key_material: bytes) -> None:
        """MixKey: ck, temp_k = HKDF(ck, ikm, 2); InitializeKey(temp_k)."""
        self._ck, temp_k = hkdf(self._ck, input_key_material, 2)
        self._cipher.initialize_key(temp_k)  # HASHLEN == 32: no truncation needed.

    def mix_hash(self, data: bytes) -> None:
        """MixHash: h = HASH(h || data)."""
        self._h = _hash(self._h + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        """MixKeyAndHash: for pre-shared keys (spec 9); XX does not use it."""
        self._ck, temp_h, temp_k = hkdf(self._ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self._cipher.initialize_key(temp_k)

    def get_handshake_hash(self) -> bytes:
        """GetHandshakeHash: h, a channel binding for both parties (spec 11.2)."""
        return self._h

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        """EncryptAndHash: ciphertext = EncryptWithAd(h, plaintext); MixHash(ciphertext)."""
        ciphertext = self._cipher.encrypt_with_ad(self._h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        """DecryptAndHash: plaintext = DecryptWithAd(h, ciphertext); MixHash(ciphertext)."""
        plaintext = self._cipher.decrypt_with_ad(self._h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """Split: two CipherStates, initiator-to-responder first (spec 5.2)."""
        temp_k1, temp_k2 = hkdf(self._ck, b"", 2)
        return CipherState(temp_k1), CipherState(temp_k2)
