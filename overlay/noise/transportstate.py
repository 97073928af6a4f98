"""TransportState: the two CipherStates left after Split() (Noise spec revision 34, 5.2/5.3).

Every byte the overlay sends after the handshake goes through `encrypt` / `decrypt`, so each is
one length check plus one CipherState call (zero-length AD, spec 5.2). Only HandshakeState
creates these. No I/O.
"""

from __future__ import annotations

from overlay.noise.cipherstate import TAGLEN, CipherState
from overlay.noise.errors import NoiseError

MAX_MESSAGE_LEN = 65535  # spec section 3: a transport message fits in 65535 bytes.
MAX_PLAINTEXT_LEN = MAX_MESSAGE_LEN - TAGLEN  # 65519 bytes of payload per record.


class TransportState:
    """Encrypts outgoing and decrypts incoming transport messages, each with its own nonce."""

    __slots__ = ("_recv", "_send", "handshake_hash", "open_record", "open_record_into",
                 "remote_static", "seal_record_into")

    def __init__(
        self,
        send: CipherState,
        recv: CipherState,
        *,
        handshake_hash: bytes,
        remote_static: bytes | None,
    ):
        if not (send.has_key() and recv.has_key()):
            raise NoiseError("a transport state needs two keyed cipher states")
        self._send = send
        self._recv = recv
        # The record layer's per-record calls, bound once: it bounds record sizes itself
        # (2-byte lengths), so they skip the length checks of encrypt_into / decrypt.
        self.seal_record_into = send.encrypt_record_into
        self.open_record = recv.decrypt_record
        self.open_record_into = recv.decrypt_record_into
        self.handshake_hash = handshake_hash
        self.remote_static = remote_static

    @property
    def send_nonce(self) -> int:
        return self._send.nonce

    @property
    def recv_nonce(self) -> int:
        return self._recv.nonce

    def encrypt(self, plaintext: bytes) -> bytes:
        """One transport message: ciphertext followed by the 16-byte tag."""
        if len(plaintext) > MAX_PLAINTEXT_LEN:
            raise NoiseError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT_LEN}")
        return self._send.encrypt_with_ad(None, plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """The plaintext of the next incoming message; NoiseError if forged or out of order."""
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise NoiseError(f"transport message of {len(ciphertext)} bytes exceeds limit")
        return self._recv.decrypt_with_ad(None, ciphertext)

    def encrypt_into(self, plaintext: bytes, out: bytearray) -> int:
        """encrypt() into `out` (at least len(plaintext)+16 bytes); returns the bytes written."""
        if len(plaintext) > MAX_PLAINTEXT_LEN:
            raise NoiseError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT_LEN}")
        return self._send.encrypt_with_ad_into(None, plaintext, out)

    def decrypt_into(self, ciphertext: bytes, out: bytearray) -> int:
        """decrypt() into `out` (at least len(ciphertext)-16 bytes); returns the bytes written."""
        if len(ciphertext) > MAX_MESSAGE_LEN:
            raise NoiseError(f"transport message of {len(ciphertext)} bytes exceeds limit")
        return self._recv.decrypt_with_ad_into(None, ciphertext, out)

    def rekey_outbound(self) -> None:
        """Rekey the sending key (spec 11.3); the peer must call rekey_inbound in step."""
        self._send.rekey()

    def rekey_inbound(self) -> None:
        self._recv.rekey()
