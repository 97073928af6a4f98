"""The stream multiplexer that runs inside an encrypted connection (sans-IO; see PROTOCOL.md)."""

from overlay.mux.connection import MuxConfig, MuxConnection, MuxError
from overlay.mux.events import (
    ConnectionTerminated,
    DataReceived,
    LastMessage,
    OneShotStream,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "LastMessage",
    "MuxConfig",
    "MuxConnection",
    "MuxError",
    "OneShotStream",
    "PongReceived",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
]
