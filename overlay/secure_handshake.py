"""The overlay's secure-channel handshake: Noise XX plus signed identities (sans-IO).

Implements overlay/PROTOCOL.md section 1, items 1-5, as a byte-in, byte-out state machine in the
manner of h11: `receive_data()` buffers and advances, `data_to_send()` hands over the framed
bytes to write, `result()` gives the TransportState and the authenticated PeerId. It may not
do I/O, read a clock or draw randomness except through the injected `rng`.

Rules enforced here:
1. Every handshake message is framed as a 2-byte big-endian length plus that many bytes; a
   length of 0 or above `max_message` fails at once, before any byte of it is buffered.
2. The dialer (initiator) sends message 1 at construction; its payload must be empty.
3. Messages 2 and 3 carry the msgpack map {"v": 1, "key": Ed25519 key, "sig": signature over
   b"noise-libp2p-static-key:" + the sender's X25519 static key}; extra keys are ignored.
4. Neither side may send anything the protocol does not expect before the handshake is over;
   bytes after message 3 are transport records and are handed back as `leftover`.
5. Any failure is a HandshakeError with a readable reason, and the object stays failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from overlay.identity import Identity, PeerId
from overlay.noise import HandshakeState, KeyPair, NoiseError, TransportState

PROLOGUE = b"overlay-node/1"
PAYLOAD_VERSION = 1
STATIC_KEY_SIGNATURE_PREFIX = b"noise-libp2p-static-key:"  # as in the libp2p Noise spec
LENGTH_PREFIX_SIZE = 2
MAX_MESSAGE = 65535  # largest length a 2-byte prefix can express; also the Noise limit
_ED25519_KEY_LEN = 32
_ED25519_SIG_LEN = 64


class HandshakeError(Exception):
    """The peer broke the handshake protocol or failed authentication; drop the connection."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PeerProofError(HandshakeError):
    """The peer completed the Noise part, but its identity payload failed: malformed, a bad
    signature, or another peer than the one dialed (it does speak the overlay)."""


@dataclass(frozen=True, slots=True)
class SecureSession:
    """The outcome of a handshake: keys, the authenticated peer, and early transport bytes."""

    transport: TransportState
    remote_peer: PeerId
    leftover: bytes


def encode_identity_payload(identity: Identity, static_public: bytes) -> bytes:
    """The payload of messages 2 and 3: our identity key, binding our Noise static key."""
    signature = identity.sign(STATIC_KEY_SIGNATURE_PREFIX + static_public)
    return msgpack.packb(
        {"v": PAYLOAD_VERSION, "key": identity.public_key, "sig": signature}, use_bin_type=True
    )


def verify_identity_payload(payload: bytes, remote_static: bytes) -> PeerId:
    """The peer id proven by `payload` for the Noise-authenticated `remote_static` key."""
    try:
        fields = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except msgpack.ExtraData:
        raise PeerProofError("identity payload has bytes after its msgpack object") from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise PeerProofError(f"identity payload is not valid msgpack: {e}") from None
    if not isinstance(fields, dict):
        raise PeerProofError(f"identity payload is a {type(fields).__name__}, not a map")
    version = fields.get("v")
    if type(version) is not int:
        raise PeerProofError("identity payload: 'v' is missing or not an integer")
    if version != PAYLOAD_VERSION:
        raise PeerProofError(f"identity payload version {version} is not supported")
    key = _bytes_field(fields, "key", _ED25519_KEY_LEN)
    signature = _bytes_field(fields, "sig", _ED25519_SIG_LEN)
    peer = PeerId.from_public_key(key)
    if not peer.verify(signature, STATIC_KEY_SIGNATURE_PREFIX + remote_static):
        raise PeerProofError(f"bad signature: {peer} did not sign this connection's static key")
    return peer


def _bytes_field(fields: dict, name: str, size: int) -> bytes:
    value = fields.get(name)
    if type(value) is not bytes or len(value) != size:
        raise PeerProofError(f"identity payload: {name!r} must be {size} raw bytes")
    return value


class SecureHandshake:
    """One side of the overlay handshake; feed it socket bytes, write what it returns."""

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        rng: Callable[[int], bytes],
        expected_peer: PeerId | None = None,
        static: KeyPair | None = None,
        payload: bytes | None = None,
        max_message: int = MAX_MESSAGE,
    ):
        """`static` and `payload` (its `encode_identity_payload`): what a host reuses for
        all its handshakes, the static key being per process; made afresh when
        not given. Making them is two thirds of what a responder spends before anything is
        authenticated (an X25519 key and an Ed25519 signature, some 300 us)."""
        if not 1 <= max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message must be within 1..{MAX_MESSAGE}")
        if static is None:
            static, payload = KeyPair.generate(rng), None
        self._initiator = initiator
        self._expected_peer = expected_peer
        self._max_message = max_message
        self._payload = payload or encode_identity_payload(identity, static.public)
        self._noise = HandshakeState(initiator, PROLOGUE, static, rng)
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._messages_read = 0
        self._remote_peer: PeerId | None = None
        self._session: SecureSession | None = None
        self._failure: str | None = None
        if initiator:
            self._write(b"")

    @property
    def is_complete(self) -> bool:
        return self._session is not None

    @property
    def failure(self) -> str | None:
        """The reason the handshake failed, or None."""
        return self._failure

    def data_to_send(self) -> bytes:
        """Framed handshake bytes to write to the socket now (b"" when there are none)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the socket and advance as far as they allow."""
        if self._failure is not None:
            raise HandshakeError(f"handshake already failed: {self._failure}")
        if self._session is not None:
            raise HandshakeError("handshake already complete: feed the record layer instead")
        self._inbox += data
        try:
            while self._session is None:
                message = self._next_message()
                if message is None:
                    return
                self._on_message(message)
        except HandshakeError as e:
            self._failure = e.reason
            self._inbox.clear()
            self._outbox.clear()
            raise

    def result(self) -> SecureSession:
        if self._session is None:
            raise RuntimeError("the handshake is not complete")
        return self._session

    def _next_message(self) -> bytes | None:
        """Cut one framed message off the inbox, or None while it is incomplete (rule 1)."""
        if len(self._inbox) < LENGTH_PREFIX_SIZE:
            return None
        length = int.from_bytes(self._inbox[:LENGTH_PREFIX_SIZE], "big")
        if length == 0:
            raise HandshakeError("zero-length handshake message")
        if length > self._max_message:
            raise HandshakeError(f"handshake message of {length} bytes exceeds {self._max_message}")
        end = LENGTH_PREFIX_SIZE + length
        if len(self._inbox) < end:
            return None
        message = bytes(self._inbox[LENGTH_PREFIX_SIZE:end])
        del self._inbox[:end]
        return message

    def _on_message(self, message: bytes) -> None:
        self._messages_read += 1
        # The Noise message number: the initiator reads 2, the responder reads 1 then 3.
        step = 2 * self._messages_read if self._initiator else 2 * self._messages_read - 1
        try:
            payload = self._noise.read_message(message)
        except NoiseError as e:
            raise HandshakeError(f"invalid handshake message {step}: {e}") from None
        if step == 1:
            if payload:
                raise HandshakeError("handshake message 1 must carry an empty payload")
            self._refuse_early_data(after=1)
            self._write(self._payload)
            return
        remote_static = self._noise.remote_static
        assert remote_static is not None  # read in message 2 or 3, which Noise authenticated
        peer = verify_identity_payload(payload, remote_static)
        if self._expected_peer is not None and peer != self._expected_peer:
            raise PeerProofError(f"expected peer {self._expected_peer}, but {peer} answered")
        if step == 2:
            self._refuse_early_data(after=2)
            self._write(self._payload)
        self._remote_peer = peer
        self._finish()

    def _refuse_early_data(self, after: int) -> None:
        """Rule 4: the peer must wait for our next message before sending anything."""
        if self._inbox:
            unexpected = len(self._inbox)
            raise HandshakeError(f"peer sent {unexpected} unexpected bytes after message {after}")

    def _write(self, payload: bytes) -> None:
        try:
            message = self._noise.write_message(payload)
        except NoiseError as e:
            raise HandshakeError(f"cannot write handshake message: {e}") from None
        self._outbox += len(message).to_bytes(LENGTH_PREFIX_SIZE, "big") + message

    def _finish(self) -> None:
        assert self._remote_peer is not None
        self._session = SecureSession(
            transport=self._noise.into_transport(),
            remote_peer=self._remote_peer,
            leftover=bytes(self._inbox),
        )
        self._inbox.clear()
