"""CipherState (Noise spec revision 34, section 5.1) with ChaChaPoly (section 12.3).

A key `k` and a 64-bit nonce counter `n`. The counter never wraps: n = 2**64-1 is reserved
(spec 5.1), so once `n` reaches it every further encryption or decryption raises NoiseError.
This is also the transport hot path, so the AEAD object is built once per key and the nonce
is packed by a precompiled struct. May not do I/O or draw randomness.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from overlay.noise.errors import NoiseError

KEYLEN = 32  # spec 5: cipher keys are 32 bytes.
TAGLEN = 16  # spec 5: AEAD authentication tag.
MAX_NONCE = 2**64 - 1  # spec 5.1: reserved; reaching it means the key is exhausted.

# Spec 12.3: ChaChaPoly nonce = 32 bits of zeros followed by the little-endian 64-bit n.
_pack_nonce = struct.Struct("<4xQ").pack
_REKEY_NONCE = _pack_nonce(MAX_NONCE)
_REKEY_ZEROS = bytes(KEYLEN)
_DECRYPT_FAILED = "decryption failed: message forged, corrupted or out of order"


def _aead(key: bytes) -> ChaCha20Poly1305:
    if len(key) != KEYLEN:
        raise NoiseError(f"cipher key must be {KEYLEN} bytes, got {len(key)}")
    return ChaCha20Poly1305(bytes(key))


class CipherState:
    """Encrypts or decrypts with one key and a counting nonce (spec 5.1)."""

    __slots__ = ("_aead", "_n")

    def __init__(self, key: bytes | None = None):
        self._aead: ChaCha20Poly1305 | None = None
        self._n = 0
        self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        """InitializeKey(key): k = key (None = empty), n = 0."""
        self._aead = None if key is None else _aead(key)
        self._n = 0

    def has_key(self) -> bool:
        return self._aead is not None

    @property
    def nonce(self) -> int:
        """The next nonce to be used (n)."""
        return self._n

    def set_nonce(self, nonce: int) -> None:
        """SetNonce(nonce): for out-of-order transports and tests (spec 5.1)."""
        if not 0 <= nonce <= MAX_NONCE:
            raise NoiseError(f"nonce {nonce} outside 0..2**64-1")
        self._n = nonce

    def encrypt_with_ad(self, ad: bytes | None, plaintext: bytes) -> bytes:
        """EncryptWithAd: ENCRYPT(k, n++, ad, plaintext), or the plaintext while k is empty."""
        aead = self._aead
        if aead is None:
            return bytes(plaintext)
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this key may not encrypt again (spec 5.1)")
        ciphertext = aead.encrypt(_pack_nonce(n), plaintext, ad)
        self._n = n + 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes | None, ciphertext: bytes) -> bytes:
        """DecryptWithAd: DECRYPT(k, n++, ad, ciphertext); on failure n is not incremented."""
        aead = self._aead
        if aead is None:
            return bytes(ciphertext)
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this key may not decrypt again (spec 5.1)")
        try:
            plaintext = aead.decrypt(_pack_nonce(n), ciphertext, ad)
        except InvalidTag:
            raise NoiseError(_DECRYPT_FAILED) from None
        self._n = n + 1
        return plaintext

    def encrypt_with_ad_into(self, ad: bytes | None, plaintext: bytes, out: bytearray) -> int:
        """EncryptWithAd writing ciphertext+tag into `out[:len(plaintext)+16]`; returns that size.

        Saves allocating a fresh bytes object per record. Needs a key (there is no point
        copying plaintext through here during the first handshake message).
        """
        aead = self._aead
        if aead is None:
            raise NoiseError("encrypt_with_ad_into needs a key")
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this key may not encrypt again (spec 5.1)")
        size = len(plaintext) + TAGLEN
        if len(out) != size:
            if len(out) < size:
                raise NoiseError(f"output buffer holds {len(out)} bytes, need {size}")
            out = memoryview(out)[:size]
        aead.encrypt_into(_pack_nonce(n), plaintext, ad, out)
        self._n = n + 1
        return size

    def decrypt_with_ad_into(self, ad: bytes | None, ciphertext: bytes, out: bytearray) -> int:
        """DecryptWithAd writing plaintext into `out[:len(ciphertext)-16]`; returns that size."""
        aead = self._aead
        if aead is None:
            raise NoiseError("decrypt_with_ad_into needs a key")
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this key may not decrypt again (spec 5.1)")
        size = len(ciphertext) - TAGLEN
        if size < 0:
            raise NoiseError("decryption failed: message shorter than the authentication tag")
        if len(out) != size:
            if len(out) < size:
                raise NoiseError(f"output buffer holds {len(out)} bytes, need {size}")
            out = memoryview(out)[:size]
        try:
            aead.decrypt_into(_pack_nonce(n), ciphertext, ad, out)
        except InvalidTag:
            raise NoiseError(_DECRYPT_FAILED) from None
        self._n = n + 1
        return size

    def encrypt_record_into(self, plaintext: bytes | bytearray | memoryview,
                            out: memoryview) -> None:
        """EncryptWithAd with empty AD into `out` of exactly len(plaintext)+16 bytes: the
        record layer's path (it sizes its buffers itself; one Python call per record)."""
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this key may not encrypt again (spec 5.1)")
        self._aead.encrypt_into(_pack_nonce(n), plaintext, None, out)
        self._n = n + 1

    def decrypt_record(self, ciphertext: bytes | memoryview) -> bytes:
        """DecryptWithAd with empty AD (the record layer's path); NoiseError if forged."""
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this key may not decrypt again (spec 5.1)")
        try:
            plaintext = self._aead.decrypt(_pack_nonce(n), ciphertext, None)
        except InvalidTag:
            raise NoiseError(_DECRYPT_FAILED) from None
        self._n = n + 1
        return plaintext

    def decrypt_record_into(self, ciphertext: bytes | memoryview, out: memoryview) -> None:
        """decrypt_record into `out` of exactly len(ciphertext)-16 bytes (the record layer
        decrypts bulk data straight into the message it belongs to). On failure `out` may
        hold garbage and n is not incremented."""
        n = self._n
        if n >= MAX_NONCE:
            raise NoiseError("nonce exhausted: this key may not decrypt again (spec 5.1)")
        try:
            self._aead.decrypt_into(_pack_nonce(n), ciphertext, None, out)
        except InvalidTag:
            raise NoiseError(_DECRYPT_FAILED) from None
        self._n = n + 1

    def rekey(self) -> None:
        """Rekey(): k = REKEY(k) = first 32 bytes of ENCRYPT(k, 2**64-1, "", zeros) (spec 4.2).

        The nonce is left as it is (spec 11.3).
        """
        aead = self._aead
        if aead is None:
            raise NoiseError("cannot rekey a CipherState without a key")
        self._aead = _aead(aead.encrypt(_REKEY_NONCE, _REKEY_ZEROS, None)[:KEYLEN])
