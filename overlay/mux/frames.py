"""Frame layout of the multiplexer, version 1 (overlay/PROTOCOL.md, "Frames").

Every frame starts with a 10-byte header: type (u8), flags (u8), stream id (u32 big-endian),
length (u32 big-endian). For DATA and RESET frames `length` counts the payload bytes that
follow; for WINDOW_UPDATE it is the credit granted, for PING the opaque value, for GO_AWAY the
error code; those three carry no payload. This module only encodes and decodes; it holds no state.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

HEADER = struct.Struct(">BBII")
HEADER_SIZE = HEADER.size
MUX_VERSION = 1


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3
    RESET = 4


class Flag(IntFlag):
    NONE = 0
    SYN = 0x01  # DATA: first frame of a stream, opens it
    FIN = 0x02  # DATA: the sender will send nothing more on this stream
    END = 0x04  # DATA: last frame of a message
    ACK = 0x08  # PING: an answer


# Plain ints: `~` on an IntFlag would only complement the defined bits.
ALLOWED_FLAGS: dict[int, int] = {
    FrameType.DATA: int(Flag.SYN | Flag.FIN | Flag.END),
    FrameType.WINDOW_UPDATE: 0,
    FrameType.PING: int(Flag.ACK),
    FrameType.GO_AWAY: 0,
    FrameType.RESET: 0,
}
_HAS_PAYLOAD = (FrameType.DATA, FrameType.RESET)


class GoAwayCode(IntEnum):
    NORMAL = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


# The same flags as plain ints, for the hot path (IntFlag arithmetic costs microseconds).
SYN, FIN, END, ACK = int(Flag.SYN), int(Flag.FIN), int(Flag.END), int(Flag.ACK)
DATA, WINDOW_UPDATE, PING, GO_AWAY, RESET = (int(t) for t in FrameType)


def has_payload(frame_type: int) -> bool:
    return frame_type in _HAS_PAYLOAD


def pack_header(frame_type: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(frame_type, flags, stream_id, length)
