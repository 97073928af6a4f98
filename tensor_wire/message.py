"""Several tensors plus a msgpack metadata map in one message: the form RPCs exchange.

The message head declares its total length, so a receiver of chunks knows (and bounds) the size
before it allocates; every record starts 8-byte aligned, so decoded tensors can view the message
buffer in place. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
import torch

from tensor_wire.codecs import Buffer
from tensor_wire.errors import WireError
from tensor_wire.layout import (
    FORMAT_VERSION,
    MESSAGE_HEAD,
    MESSAGE_MAGIC,
    RECORD_HEAD,
    padding,
)
from tensor_wire.limits import DEFAULT_LIMITS, Limits
from tensor_wire.record import (
    Device,
    as_device,
    as_view,
    decode_record,
    record_extent,
    record_parts,
)

_ZEROS = bytes(8)


class Message(NamedTuple):
    """A decoded message: its tensors in order, and its metadata map."""

    tensors: list[torch.Tensor]
    meta: dict[str, Any]


def pack_meta(meta: Mapping[str, Any] | None) -> bytes:
    if meta is not None and not isinstance(meta, Mapping):
        raise WireError(f"meta must be a mapping, got {type(meta).__name__}")
    try:
        return msgpack.packb(dict(meta or {}), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as error:
        raise WireError(f"meta cannot be encoded with msgpack: {error}") from None


def message_parts(
    tensors: Sequence[torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    compression: str | Sequence[str] = "none",
) -> list[Buffer]:
    """Buffers whose concatenation is the message; payloads may alias the tensors."""
    codecs = [compression] * len(tensors) if isinstance(compression, str) else list(compression)
    if len(codecs) != len(tensors):
        raise WireError(f"{len(codecs)} compressions given for {len(tensors)} tensors")
    packed_meta = pack_meta(meta)
    parts: list[Buffer] = [b"", packed_meta]
    total = MESSAGE_HEAD.size + len(packed_meta)
    for tensor, codec in zip(tensors, codecs):
        pad = padding(total)
        if pad:
            parts.append(_ZEROS[:pad])
        total += pad
        record = record_parts(tensor, codec)
        parts += record
        total += sum(len(part) for part in record)
    pad = padding(total)
    if pad:
        parts.append(_ZEROS[:pad])
    total += pad
    parts[0] = MESSAGE_HEAD.pack(
        MESSAGE_MAGIC, FORMAT_VERSION, 0, len(tensors), len(packed_meta), 0, total
    )
    return parts


def encode_message(
    tensors: Sequence[torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    compression: str | Sequence[str] = "none",
) -> bytes:
    """Encode tensors (one compression for all, or one per tensor) and a msgpack-able map."""
    return b"".join(message_parts(tensors, meta, compression))


def check_head(head: memoryview | bytes, max_total: int) -> tuple[int, int, int]:
    """Validate a message head; returns (tensor count, meta length, total length)."""
    if len(head) < MESSAGE_HEAD.size:
        raise WireError(f"truncated: {len(head)} bytes, a message head needs {MESSAGE_HEAD.size}")
    magic, version, flags, count, meta_len, reserved, total = MESSAGE_HEAD.unpack_from(head)
    if magic != MESSAGE_MAGIC:
        raise WireError(f"not a tensor_wire message (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        raise WireError(f"unsupported tensor_wire format version {version}")
    if flags or reserved:
        raise WireError("nonzero reserved fields in the message head")
    if total > max_total:
        raise WireError(f"message declares {total} bytes, the limit is {max_total}")
    body = total - MESSAGE_HEAD.size - meta_len
    if body < 0:
        raise WireError(f"message length {total} cannot hold its {meta_len}-byte meta map")
    if total % 8:
        raise WireError(f"message length {total} is not a multiple of 8")
    if count > body // RECORD_HEAD.size:
        raise WireError(f"{count} tensors cannot fit in {body} bytes")
    return count, meta_len, total


def _unpack_meta(data: memoryview) -> dict[str, Any]:
    try:
        meta = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several types for malformed input
        raise WireError(f"meta is not valid msgpack: {type(error).__name__} {error}") from None
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a map, got {type(meta).__name__}")
    return meta


def _skip_padding(data: memoryview, offset: int) -> int:
    end = offset + padding(offset)
    if end > len(data) or data[offset:end] != _ZEROS[: end - offset]:
        raise WireError("missing or nonzero padding between records")
    return end


def decoded_size(data: Buffer) -> int:
    """Bytes the tensors of a whole message decode to, read off its record heads alone
    (nothing is decompressed): for a receiver to decide where, and whether, to decode it.
    A malformed message raises WireError, as decoding it would."""
    view = as_view(data)
    count, meta_len, total = check_head(view, len(view))
    if total != len(view):
        raise WireError(f"message declares {total} bytes, {len(view)} were given")
    cursor = _skip_padding(view, MESSAGE_HEAD.size + meta_len)
    size = 0
    for _ in range(count):
        nbytes, end = record_extent(view, cursor)
        size += nbytes
        cursor = _skip_padding(view, end)
    return size


def decode_message(data: Buffer, device: Device = None, limits: Limits = DEFAULT_LIMITS
                   ) -> Message:
    """Decode a whole message. Tensors view writable input in place (codec none, CPU)."""
    view = as_view(data)
    count, meta_len, total = check_head(view, len(view))
    if total != len(view):
        raise WireError(f"message declares {total} bytes, {len(view)} were given")
    meta_end = MESSAGE_HEAD.size + meta_len
    meta = _unpack_meta(view[MESSAGE_HEAD.size : meta_end])
    target = as_device(device)
    cursor = _skip_padding(view, meta_end)
    tensors = []
    budget = limits.max_decoded_bytes
    for _ in range(count):
        tensor, end = decode_record(view, cursor, target, budget)
        budget -= tensor.numel() * tensor.element_size()
        tensors.append(tensor)
        cursor = _skip_padding(view, end)
    if cursor != total:
        raise WireError(f"{total - cursor} trailing bytes after the last record")
    return Message(tensors, meta)
