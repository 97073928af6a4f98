"""One tensor as one self-describing record: `serialize` and `deserialize`.

A record is a fixed 16-byte header (struct, not msgpack: parsing it costs well under a
microsecond), the shape, and the payload (FORMAT.md). `decode_record` is the one place that
parses untrusted record headers; messages reuse it. No I/O here.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tensor_wire.codecs import DECODERS, DTYPE_NAMES, TORCH_DTYPES, Buffer, encode_payload
from tensor_wire.errors import WireError
from tensor_wire.layout import (
    COMPRESSION_BY_CODE,
    COMPRESSIONS,
    DTYPE_BY_CODE,
    DTYPES,
    FORMAT_VERSION,
    MAX_ELEMENTS,
    MAX_RANK,
    RECORD_HEAD,
    RECORD_MAGIC,
    SHAPES,
    effective_compression,
    is_canonical,
)
from tensor_wire.limits import DEFAULT_LIMITS, Limits

Device = torch.device | str | int | None


def as_view(data: Any) -> memoryview:
    """A flat byte view of any contiguous bytes-like object, or WireError."""
    try:
        view = memoryview(data)
        if not view.c_contiguous:
            raise ValueError("the buffer is not contiguous")
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
    except (TypeError, ValueError) as error:
        raise WireError(f"expected a contiguous bytes-like object: {error}") from None
    return view


def as_device(device: Device) -> torch.device | None:
    return None if device is None else torch.device(device)


def _plans() -> dict[tuple[torch.dtype, str], tuple[str, int, int]]:
    """(dtype, requested compression) -> (codec written, dtype code, codec code)."""
    plans = {}
    for name, torch_dtype in TORCH_DTYPES.items():
        for requested in COMPRESSIONS:
            codec = effective_compression(name, requested)
            plans[torch_dtype, requested] = (codec, DTYPES[name][0], COMPRESSIONS[codec])
    return plans


_PLANS = _plans()


def _encode_error(tensor: Any, compression: Any) -> WireError:
    """Why `tensor` cannot be encoded (the slow path of record_parts)."""
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
        return WireError(f"expected a dense torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() > MAX_RANK:
        return WireError(f"rank {tensor.dim()} exceeds the maximum {MAX_RANK}")
    if tensor.dtype not in DTYPE_NAMES:
        return WireError(f"unsupported dtype {tensor.dtype}; supported: {sorted(DTYPES)}")
    return WireError(f"unknown compression {compression!r}; known: {sorted(COMPRESSIONS)}")


def record_parts(tensor: torch.Tensor, compression: str = "none") -> list[Buffer]:
    """Buffers whose concatenation is the record of `tensor`; the payload may alias it."""
    try:
        plan = _PLANS.get((tensor.dtype, compression))
    except (AttributeError, TypeError):  # not a tensor, or an unhashable compression
        plan = None
    if plan is None or tensor.dim() > MAX_RANK or tensor.layout != torch.strided:
        raise _encode_error(tensor, compression)
    codec, dtype_code, codec_code = plan
    if tensor.requires_grad:
        tensor = tensor.detach()
    payload = encode_payload(tensor, codec)
    length = len(payload[0]) if len(payload) == 1 else sum(len(part) for part in payload)
    rank = tensor.dim()
    head = RECORD_HEAD.pack(RECORD_MAGIC, FORMAT_VERSION, dtype_code, codec_code, rank, 0, length)
    return [head + SHAPES[rank].pack(*tensor.shape), *payload]


def serialize(tensor: torch.Tensor, compression: str = "none") -> bytes:
    """Encode one tensor (any device, any strides) as one record; the tensor is not modified."""
    return b"".join(record_parts(tensor, compression))


# (dtype code, compression code) -> names, for exactly the pairs our encoder can write.
_PAIRS = {
    (DTYPES[dtype][0], code): (dtype, codec)
    for dtype in DTYPES
    for codec, code in COMPRESSIONS.items()
    if is_canonical(dtype, codec)
}


def _head_error(magic: bytes, version: int, dtype_code: int, codec_code: int, rank: int,
                flags: int) -> WireError:
    """The precise complaint about a record head that failed the fast combined check."""
    if magic != RECORD_MAGIC:
        return WireError(f"not a tensor record (magic {bytes(magic)!r})")
    if version != FORMAT_VERSION:
        return WireError(f"unsupported tensor_wire format version {version}")
    if dtype_code not in DTYPE_BY_CODE:
        return WireError(f"unknown dtype code {dtype_code}")
    if codec_code not in COMPRESSION_BY_CODE:
        return WireError(f"unknown compression code {codec_code}")
    if rank > MAX_RANK:
        return WireError(f"rank {rank} exceeds the maximum {MAX_RANK}")
    if flags:
        return WireError(f"unknown record flags {flags:#x}")
    dtype, codec = DTYPE_BY_CODE[dtype_code], COMPRESSION_BY_CODE[codec_code]
    return WireError(f"compression {codec} does not apply to {dtype}")


def decode_record(
    data: memoryview, offset: int, device: torch.device | None, budget: int
) -> tuple[torch.Tensor, int]:
    """The tensor whose record starts at data[offset], and the offset just past its payload.

    `budget` is how many bytes the decoded tensor may occupy (Limits.max_decoded_bytes, less
    what earlier records of the same message took).
    """
    pair, shape, numel, start, length = _read_head(data, offset)
    if numel * DTYPES[pair[0]][1] > budget:
        raise WireError(f"tensor of shape {shape} exceeds the decoded-size limit of {budget} bytes")
    flat = DECODERS[pair[1]](data, start, length, pair[0], numel, device)
    rank = len(shape)
    if rank != 1:
        flat = flat.view(*shape) if rank else flat.view(())
    return flat, start + length


def record_extent(data: memoryview, offset: int) -> tuple[int, int]:
    """Bytes the record at data[offset] decodes to, and the offset just past its payload,
    from its head alone (nothing is decompressed)."""
    pair, _, numel, start, length = _read_head(data, offset)
    return numel * DTYPES[pair[0]][1], start + length


def _read_head(data: memoryview, offset: int
               ) -> tuple[tuple[str, str], tuple[int, ...], int, int, int]:
    """A record head, checked: ((dtype, codec), shape, numel, payload start, payload length)."""
    if len(data) - offset < RECORD_HEAD.size:
        raise WireError(f"truncated: {len(data) - offset} bytes, a record head needs 16")
    head = RECORD_HEAD.unpack_from(data, offset)
    magic, version, dtype_code, codec_code, rank, flags, length = head
    pair = _PAIRS.get((dtype_code, codec_code))
    if magic != RECORD_MAGIC or version != FORMAT_VERSION or pair is None or rank > MAX_RANK \
            or flags:
        raise _head_error(*head[:6])
    start = offset + RECORD_HEAD.size + 8 * rank
    if start > len(data) or length > len(data) - start:
        raise WireError(f"truncated: record declares {length} payload bytes past its head")
    shape = SHAPES[rank].unpack_from(data, offset + RECORD_HEAD.size)
    numel = math.prod(shape)
    # A non-empty shape is bounded by the payload (each decoder checks); an empty one is not.
    if numel == 0 and math.prod(max(dim, 1) for dim in shape) >= MAX_ELEMENTS:
        raise WireError(f"shape {shape} is too large")
    return pair, shape, numel, start, length


def deserialize(data: Buffer, device: Device = None, limits: Limits = DEFAULT_LIMITS
                ) -> torch.Tensor:
    """Decode one record, exactly filling `data`, onto `device` (default: CPU).

    With codec `none` on the CPU, writable input (bytearray, writable memoryview) is viewed in
    place: the tensor shares its memory (and the buffer cannot be resized while it lives).
    Read-only input (bytes) is copied once.
    """
    view = as_view(data)
    tensor, end = decode_record(view, 0, as_device(device), limits.max_decoded_bytes)
    if end != len(view):
        raise WireError(f"{len(view) - end} trailing bytes after the record")
    return tensor
