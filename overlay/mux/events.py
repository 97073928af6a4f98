"""What the multiplexer reports to its driver: small immutable records.

NamedTuples rather than frozen dataclasses: they are as immutable, and several are built per
request on the hot path, where a frozen dataclass costs three times as much to construct.
"""

from __future__ import annotations

from typing import NamedTuple


class StreamOpened(NamedTuple):
    """The peer opened a stream; its first data follows as DataReceived."""

    stream_id: int


class DataReceived(NamedTuple):
    """A fragment of a message. `end` marks the last fragment of that message.

    The driver must call `MuxConnection.acknowledge(stream_id, len(data))` once it has taken the
    bytes off the multiplexer's hands; that is what returns flow-control credit to the sender.
    """

    stream_id: int
    data: bytes | memoryview
    end: bool


class OneShotStream(NamedTuple):
    """The peer opened a stream, sent one whole message on it and half-closed it, all in one
    frame (what a small unary request is). Stands for StreamOpened, DataReceived(end=True)
    and StreamEnded, in one event; no credit needs returning (nothing more will come)."""

    stream_id: int
    data: bytes | memoryview


class LastMessage(NamedTuple):
    """The last fragment of a message, and the peer half-closed the stream in the same frame
    (what a small unary answer is). Stands for DataReceived(end=True) and StreamEnded."""

    stream_id: int
    data: bytes | memoryview


class StreamEnded(NamedTuple):
    """The peer half-closed the stream: no more data will come from it."""

    stream_id: int


class StreamReset(NamedTuple):
    """The stream was aborted, by the peer or by us (`local`), with a reason."""

    stream_id: int
    reason: str
    local: bool = False


class PongReceived(NamedTuple):
    opaque: int


class ConnectionTerminated(NamedTuple):
    """The connection is over: a GO_AWAY from the peer, or a protocol error on our side."""

    reason: str
    by_peer: bool
    code: int = 0
