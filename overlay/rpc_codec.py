"""RPC on multiplexed streams (overlay/PROTOCOL.md, "RPC"): headers and error codes, no I/O.

A call opens a stream. A unary call sends ONE message, the request header immediately followed
by the payload, and half-closes; the answer is ONE message, a status byte followed by the
answer's payload (or by the error). A streaming call's first message is the header alone; then
both sides exchange any messages. Failures of a stream travel as the stream's RESET reason,
`"<code>: <message>"`.

The request header is a fixed struct, which delimits itself (it carries the method's length),
rather than msgpack: it is parsed once per call on the hot path, and a struct is both faster and
stricter. Error details are msgpack (rare, and open to extension). One message per direction,
not a header message and a payload message, halves the frames of a call (the hot path of every
DHT request).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import msgpack

MAX_METHOD_LENGTH = 128
MAX_REQUEST_HEADER = 6 + MAX_METHOD_LENGTH  # bytes
MAX_ERROR_MESSAGE = 900

KIND_UNARY = 0
KIND_STREAM = 1


class RpcProtocolError(Exception):
    """A header that does not follow the RPC protocol."""


class RemoteError(Exception):
    """An error raised by the remote handler (or by its host), with a machine-readable code.

    Handlers raise it themselves to send a specific code; any other exception is reported to the
    caller as code `internal` with no details of the server's internals.
    """

    def __init__(self, code: str, message: str = ""):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class RequestHeader(NamedTuple):
    """(Immutable; a NamedTuple rather than a frozen dataclass: one is built per call.)"""

    method: str
    kind: int
    timeout: float | None  # seconds the caller will wait, as sent; None for no limit


# kind (u8), method length (u8), timeout in milliseconds (u32, NO_TIMEOUT for none), method.
_REQUEST = struct.Struct(">BBI")
NO_TIMEOUT = 0xFFFFFFFF


# Headers already encoded or decoded, keyed by what determines them: a program calls few
# methods with few distinct timeouts, and this runs on every call. Bounded (cleared when full).
_CACHE_LIMIT = 4096
_encoded: dict[tuple[str, int, float | None], bytes] = {}
_decoded: dict[bytes, RequestHeader] = {}


def encode_request(method: str, kind: int, timeout: float | None) -> bytes:
    key = (method, kind, timeout)
    header = _encoded.get(key)
    if header is not None:
        return header
    name = method.encode()
    if not 0 < len(name) <= MAX_METHOD_LENGTH:
        raise ValueError(f"method name must be 1 to {MAX_METHOD_LENGTH} bytes: {method!r}")
    millis = NO_TIMEOUT if timeout is None else min(NO_TIMEOUT - 1, max(0, int(timeout * 1000)))
    header = _REQUEST.pack(kind, len(name), millis) + name
    if len(_encoded) >= _CACHE_LIMIT:
        _encoded.clear()
    _encoded[key] = header
    return header


def decode_request(data: bytes | memoryview) -> tuple[RequestHeader, int]:
    """The header at the start of `data`, and the offset where the payload begins."""
    if len(data) < _REQUEST.size:
        raise RpcProtocolError("request header is truncated")
    end = _REQUEST.size + data[1]
    raw = bytes(data[:end])
    header = _decoded.get(raw)
    if header is not None and (header.kind == KIND_UNARY or len(data) == end):
        return header, end
    header, end = _decode_request(data)
    if len(_decoded) >= _CACHE_LIMIT:
        _decoded.clear()
    _decoded[raw] = header
    return header, end


def peek_request(head: bytes) -> tuple[RequestHeader, int] | None:
    """The header of a request from its first bytes (`head`, of which any part may follow the
    header), and its length; None while more bytes are needed to know it. Raises
    RpcProtocolError for a header that cannot become valid. (The host bounds a request by its
    method before reading the rest of it.)"""
    size = _REQUEST.size
    if len(head) < size or (len(head) < size + head[1] and 0 < head[1] <= MAX_METHOD_LENGTH):
        return None
    return decode_request(head[:size + head[1]])


def _decode_request(data: bytes | memoryview) -> tuple[RequestHeader, int]:
    kind, length, millis = _REQUEST.unpack_from(data)
    if kind not in (KIND_UNARY, KIND_STREAM):
        raise RpcProtocolError(f"unknown request kind {kind}")
    end = _REQUEST.size + length
    if not 0 < length <= MAX_METHOD_LENGTH or len(data) < end:
        raise RpcProtocolError("request header has no valid method name")
    if kind == KIND_STREAM and len(data) != end:
        raise RpcProtocolError("a streaming request header carries no payload")
    try:
        method = bytes(data[_REQUEST.size:end]).decode()
    except UnicodeDecodeError:
        raise RpcProtocolError("method name is not UTF-8") from None
    return RequestHeader(method, kind, None if millis == NO_TIMEOUT else millis / 1000), end


STATUS_OK = b"\x00"
_STATUS_ERROR = b"\x01"


def encode_error(code: str, message: str) -> bytes:
    return _STATUS_ERROR + msgpack.packb({"code": code[:64], "msg": message[:MAX_ERROR_MESSAGE]})


def decode_answer(data: bytes | memoryview) -> bytes:
    """The payload of a unary answer; raises the RemoteError it carries instead."""
    if data[:1] == STATUS_OK:
        return bytes(data[1:])
    if data[:1] != _STATUS_ERROR:
        raise RpcProtocolError("malformed answer status")
    status = _unpack_map(data[1:], "error status")
    code, message = status.get("code"), status.get("msg", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise RpcProtocolError("malformed error status")
    raise RemoteError(code, message)


def reset_reason(code: str, message: str) -> str:
    return f"{code[:64]}: {message[:MAX_ERROR_MESSAGE]}"


def parse_reset_reason(reason: str) -> RemoteError:
    code, _, message = reason.partition(": ")
    return RemoteError(code or "reset", message)


def _unpack_map(data: bytes | memoryview, what: str) -> dict:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0,
                                max_array_len=16, max_map_len=16, max_str_len=4096)
    except Exception as e:
        raise RpcProtocolError(f"{what} is not valid msgpack: {type(e).__name__}") from None
    if not isinstance(value, dict):
        raise RpcProtocolError(f"{what} must be a map")
    return value
