"""Noise_XX_25519_ChaChaPoly_SHA256 (Noise Protocol Framework, revision 34), sans-IO.

One module per object of the specification, as in the Rust crate snow: `cipherstate`,
`symmetricstate`, `handshakestate`, `transportstate`, plus `dh` (X25519) and `patterns`.
Nothing here does I/O, reads a clock or draws randomness except through an injected `rng`.
"""

from overlay.noise.cipherstate import CipherState
from overlay.noise.dh import DHLEN, KeyPair
from overlay.noise.errors import NoiseError
from overlay.noise.handshakestate import MAX_MESSAGE_LEN, PROTOCOL_NAME, HandshakeState
from overlay.noise.transportstate import MAX_PLAINTEXT_LEN, TransportState

__all__ = [
    "DHLEN",
    "MAX_MESSAGE_LEN",
    "MAX_PLAINTEXT_LEN",
    "PROTOCOL_NAME",
    "CipherState",
    "HandshakeState",
    "KeyPair",
    "NoiseError",
    "TransportState",
]
