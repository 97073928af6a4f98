"""RPC on multiplexed streams (overlay/PROTOCOL.md, "RPC"): headers and error codes, no I/O.

A call opens a stream whose first message is a request header. A unary call then sends one
payload message and half-closes; the answer is a status message and one payload message. A
streaming call exchanges any messages after the header; failures of a stream travel as the
stream's RESET reason, `"<code>: <message>"`.

The request header is a fixed struct rather than msgpack: it is parsed once per call on the
hot path, and a struct is both faster and stricter. Error details are msgpack (rare, and open
to extension).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack

MAX_METHOD_LENGTH = 128
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


@dataclass(frozen=True, slots=True)
class RequestHeader:
    method: str
    kind: int
    timeout: float | None  # seconds the caller will wait, as sent; None for no limit


# kind (u8), method length (u8), timeout in milliseconds (u32, NO_TIMEOUT for none), method.
_REQUEST = struct.Struct(">BBI")
NO_TIMEOUT = 0xFFFFFFFF


def encode_request(method: str, kind: int, timeout: float | None) -> bytes:
    name = method.encode()
    if not 0 < len(name) <= MAX_METHOD_LENGTH:
        raise ValueError(f"method name must be 1 to {MAX_METHOD_LENGTH} bytes: {method!r}")
    millis = NO_TIMEOUT if timeout is None else min(NO_TIMEOUT - 1, max(0, int(timeout * 1000)))
    return _REQUEST.pack(kind, len(name), millis) + name


def decode_request(data: bytes | memoryview) -> RequestHeader:
    if len(data) < _REQUEST.size:
        raise RpcProtocolError("request header is truncated")
    kind, length, millis = _REQUEST.unpack_from(data)
    if kind not in (KIND_UNARY, KIND_STREAM):
        raise RpcProtocolError(f"unknown request kind {kind}")
    if length == 0 or len(data) != _REQUEST.size + length:
        raise RpcProtocolError("request header has no valid method name")
    try:
        method = bytes(data[_REQUEST.size:]).decode()
    except UnicodeDecodeError:
        raise RpcProtocolError("method name is not UTF-8") from None
    return RequestHeader(method, kind, None if millis == NO_TIMEOUT else millis / 1000)


STATUS_OK = b"\x00"
_STATUS_ERROR = b"\x01"


def encode_error(code: str, message: str) -> bytes:
    return _STATUS_ERROR + msgpack.packb({"code": code[:64], "msg": message[:MAX_ERROR_MESSAGE]})


def decode_status(data: bytes | memoryview) -> RemoteError | None:
    """None for success, else the RemoteError the status describes."""
    if data == STATUS_OK:
        return None
    if data[:1] != _STATUS_ERROR:
        raise RpcProtocolError("malformed response status")
    status = _unpack_map(data[1:], "error status")
    code, message = status.get("code"), status.get("msg", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise RpcProtocolError("malformed error status")
    return RemoteError(code, message)


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
