"""The one error type of the Noise layer.

Every failure the Noise objects can meet (a forged or truncated message, a bad public key,
nonce exhaustion, a call out of turn) raises `NoiseError`, so a driver needs one `except`
to drop a connection, whatever the peer sent.
"""


class NoiseError(Exception):
    """A Noise handshake or transport operation failed; the session must be abandoned."""
