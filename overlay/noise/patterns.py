"""Handshake patterns as data (Noise spec revision 34, sections 7.1 and 7.5).

A pattern is a list of message patterns, each a sequence of tokens; HandshakeState walks the
tokens. Only XX is used by the overlay (overlay/PROTOCOL.md 1.2), but the table form
keeps the engine the spec's token interpreter rather than three hand-written messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Token(enum.Enum):
    """The tokens of a message pattern (spec 7.1)."""

    E = "e"
    S = "s"
    EE = "ee"
    ES = "es"
    SE = "se"
    SS = "ss"


@dataclass(frozen=True, slots=True)
class HandshakePattern:
    """A handshake pattern without pre-messages; message i is sent by the initiator iff i even."""

    name: str
    messages: tuple[tuple[Token, ...], ...]


# Spec 7.5, interactive pattern XX:
#   -> e
#   <- e, ee, s, es
#   -> s, se
XX = HandshakePattern(
    name="XX",
    messages=(
        (Token.E,),
        (Token.E, Token.EE, Token.S, Token.ES),
        (Token.S, Token.SE),
    ),
)
