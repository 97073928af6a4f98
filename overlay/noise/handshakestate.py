"""HandshakeState (Noise spec revision 34, section 5.3) for Noise_XX_25519_ChaChaPoly_SHA256.

A token interpreter over the pattern table in `patterns.py`. Finishing the handshake does not
hand out keys by itself: `into_transport()` consumes this object and returns the
TransportState, so a half-finished handshake can never encrypt traffic (as in snow). Any error
poisons the object: a failed handshake cannot be continued. No I/O; randomness only through
the injected `rng`.
"""

from __future__ import annotations

from collections.abc import Callable

from overlay.noise.cipherstate import TAGLEN
from overlay.noise.dh import DHLEN, KeyPair
from overlay.noise.errors import NoiseError
from overlay.noise.patterns import XX, Token
from overlay.noise.symmetricstate import SymmetricState
from overlay.noise.transportstate import TransportState

PATTERN = XX
PROTOCOL_NAME = f"Noise_{PATTERN.name}_25519_ChaChaPoly_SHA256"  # spec section 8
MAX_MESSAGE_LEN = 65535  # spec section 3: every Noise message fits in 65535 bytes.


class HandshakeState:
    """One side of an XX handshake; call write_message/read_message alternately (spec 5.3)."""

    def __init__(
        self,
        initiator: bool,
        prologue: bytes,
        static: KeyPair,
        rng: Callable[[int], bytes],
        *,
        ephemeral: KeyPair | None = None,
    ):
        """Initialize(): `ephemeral` is fixed only by tests replaying vectors."""
        self._initiator = initiator
        self._s = static
        self._e = ephemeral
        self._rs: bytes | None = None
        self._re: bytes | None = None
        self._rng = rng
        self._symmetric: SymmetricState | None = SymmetricState(PROTOCOL_NAME.encode("ascii"))
        self._symmetric.mix_hash(prologue)
        self._hash = self._symmetric.get_handshake_hash()
        self._index = 0  # next message pattern to process
        self._failure: str | None = None
        self._consumed = False

    @property
    def initiator(self) -> bool:
        return self._initiator

    @property
    def is_complete(self) -> bool:
        return self._index == len(PATTERN.messages)

    @property
    def is_my_turn(self) -> bool:
        """True when the next step is write_message (initiators write the even messages)."""
        return not self.is_complete and (self._index % 2 == 0) == self._initiator

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key, once a message carrying it has been read."""
        return self._rs

    @property
    def handshake_hash(self) -> bytes:
        """h after the last processed message; final once complete (spec 11.2)."""
        return self._hash

    def write_message(self, payload: bytes) -> bytes:
        """WriteMessage(payload): the next handshake message, to be sent as is."""
        sym = self._step(writing=True)
        try:
            out = bytearray()
            for token in PATTERN.messages[self._index]:
                if token is Token.E:
                    if self._e is None:
                        self._e = KeyPair.generate(self._rng)
                    out += self._e.public
                    sym.mix_hash(self._e.public)
                elif token is Token.S:
                    out += sym.encrypt_and_hash(self._s.public)
                else:
                    sym.mix_key(self._dh(token))
            out += sym.encrypt_and_hash(payload)
            if len(out) > MAX_MESSAGE_LEN:
                raise NoiseError(f"handshake message of {len(out)} bytes exceeds {MAX_MESSAGE_LEN}")
        except NoiseError as e:
            self._failure = str(e)
            raise
        self._advance(sym)
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """ReadMessage(message): the decrypted payload; NoiseError on any invalid message."""
        sym = self._step(writing=False)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise NoiseError(f"handshake message of {len(message)} bytes exceeds limit")
            view = memoryview(message)
            for token in PATTERN.messages[self._index]:
                if token is Token.E:
                    view, self._re = _take(view, DHLEN, "ephemeral key")
                    sym.mix_hash(self._re)
                elif token is Token.S:
                    size = DHLEN + TAGLEN if sym.cipher_state.has_key() else DHLEN
                    view, encrypted = _take(view, size, "static key")
                    self._rs = sym.decrypt_and_hash(encrypted)
                else:
                    sym.mix_key(self._dh(token))
            payload = sym.decrypt_and_hash(bytes(view))
        except NoiseError as e:
            self._failure = str(e)
            raise
        self._advance(sym)
        return payload

    def into_transport(self) -> TransportState:
        """Split() (spec 5.2): consume the finished handshake, return the transport keys."""
        if self._consumed:
            raise NoiseError("handshake state already turned into a transport state")
        if self._failure is not None:
            raise NoiseError(f"handshake failed earlier: {self._failure}")
        if not self.is_complete or self._symmetric is None:
            raise NoiseError("handshake not complete: no transport keys yet")
        initiator_to_responder, responder_to_initiator = self._symmetric.split()
        self._consumed = True
        self._symmetric = None
        self._e = None
        if self._initiator:
            send, recv = initiator_to_responder, responder_to_initiator
        else:
            send, recv = responder_to_initiator, initiator_to_responder
        return TransportState(send, recv, handshake_hash=self._hash, remote_static=self._rs)

    def _step(self, *, writing: bool) -> SymmetricState:
        """Check that this call is allowed now; return the symmetric state to work on."""
        if self._consumed:
            raise NoiseError("handshake state was consumed by into_transport()")
        if self._failure is not None:
            raise NoiseError(f"handshake failed earlier: {self._failure}")
        if self.is_complete:
            raise NoiseError("handshake complete: call into_transport()")
        if self.is_my_turn != writing:
            expected = "write_message" if self.is_my_turn else "read_message"
            raise NoiseError(f"out of turn: {expected}() is due")
        assert self._symmetric is not None
        return self._symmetric

    def _advance(self, sym: SymmetricState) -> None:
        self._index += 1
        self._hash = sym.get_handshake_hash()

    def _dh(self, token: Token) -> bytes:
        """The DH output for ee / es / se / ss from this side's point of view (spec 5.3)."""
        if token is Token.SS:
            local, remote = self._s, self._rs
        elif token is Token.EE:
            local, remote = self._e, self._re
        elif (token is Token.ES) == self._initiator:
            local, remote = self._e, self._rs  # initiator's es / responder's se
        else:
            local, remote = self._s, self._re  # initiator's se / responder's es
        if local is None or remote is None:
            raise NoiseError(f"token {token.value} needs a key this side does not have")
        return local.dh(remote)


def _take(view: memoryview, size: int, what: str) -> tuple[memoryview, bytes]:
    if len(view) < size:
        raise NoiseError(f"handshake message too short for the {what}")
    return view[size:], bytes(view[:size])
