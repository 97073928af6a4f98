"""The block-server RPCs (documented in docs/block_protocol.md): names, requests, error codes.

Pure: validates the metadata maps of untrusted requests and builds typed requests from them.
No torch and no asyncio here, so the simulator and the client's pure rules can use it. Tensors
travel as tensor_wire messages whose metadata maps are checked by the functions below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1

METHOD_INFO = "blocks.info"
METHOD_FORWARD = "blocks.forward"
METHOD_INFERENCE = "blocks.inference"

# Error codes (RemoteError.code) of the block RPCs, beyond the transport's own.
UNKNOWN_MODEL = "unknown_model"
BAD_RANGE = "bad_range"
BAD_INPUT = "bad_input"
CACHE_FULL = "cache_full"
SESSION_CLOSED = "session_closed"
TOO_LONG = "too_long"
OVERLOADED = "overloaded"

COMPRESSIONS = ("none", "float16", "bfloat16", "int8_blockwise", "lz4")
MAX_BATCH = 1024
MAX_LENGTH = 1 << 20


class RequestError(ValueError):
    """A request the server must refuse; `code` is sent to the caller with the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BlockRange:
    model_id: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SessionRequest:
    blocks: BlockRange
    batch_size: int
    max_length: int
    wait_timeout: float  # seconds the caller will wait for free attention cache
    compression: str  # of the server's answers


@dataclass(frozen=True, slots=True)
class StepRequest:
    position: int  # the position this step starts at; lower than the session's: roll back
    step_id: int


def _int(meta: dict, key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(BAD_INPUT, f"{key!r} must be an integer in [{low}, {high}]")
    return value


def _compression(meta: dict) -> str:
    value = meta.get("compression", "none")
    if value not in COMPRESSIONS:
        raise RequestError(BAD_INPUT, f"unknown compression {value!r}; known: {COMPRESSIONS}")
    return value


def parse_range(meta: Any, model_id: str, served: tuple[int, int]) -> BlockRange:
    """The block range a request asks for, which must lie inside the span this server holds."""
    if not isinstance(meta, dict):
        raise RequestError(BAD_INPUT, "request metadata must be a map")
    asked = meta.get("model")
    if asked != model_id:
        raise RequestError(UNKNOWN_MODEL, f"this server serves {model_id!r}, not {asked!r}")
    start = _int(meta, "start", 0, 1 << 20)
    end = _int(meta, "end", 0, 1 << 20)
    if not served[0] <= start < end <= served[1]:
        raise RequestError(
            BAD_RANGE, f"blocks [{start}, {end}) are not inside the served span "
                       f"[{served[0]}, {served[1]})"
        )
    return BlockRange(model_id, start, end)


def parse_session_request(meta: Any, model_id: str, served: tuple[int, int],
                          max_length: int) -> SessionRequest:
    blocks = parse_range(meta, model_id, served)
    batch = _int(meta, "batch_size", 1, MAX_BATCH)
    length = _int(meta, "max_length", 1, MAX_LENGTH)
    if length > max_length:
        raise RequestError(TOO_LONG, f"max_length {length} exceeds this server's {max_length}")
    wait = meta.get("wait_timeout", 0.0)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 3600:
        raise RequestError(BAD_INPUT, "'wait_timeout' must be a number of seconds in [0, 3600]")
    return SessionRequest(blocks, batch, length, float(wait), _compression(meta))


def parse_step_request(meta: Any) -> StepRequest:
    if not isinstance(meta, dict):
        raise RequestError(BAD_INPUT, "step metadata must be a map")
    return StepRequest(_int(meta, "position", 0, MAX_LENGTH), _int(meta, "step", 0, 1 << 62))


def response_compression(meta: Any) -> str:
    return _compression(meta) if isinstance(meta, dict) else "none"
