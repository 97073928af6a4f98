"""Encoded sizes of tensors and messages, computed from shapes alone.

The simulator charges the network for every message it models; it calls these functions and
never imports torch. They must agree byte for byte with what `serialize` and `encode_message`
write (the tests check that equality for every dtype and compression). The one data-dependent
codec is lz4: for it the functions return the worst case, which is exact when no block
compresses (random floats) and an upper bound otherwise.

Must not import torch, numpy or bitsandbytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack

from tensor_wire.errors import WireError
from tensor_wire.layout import (
    BLOCKWISE_HEAD,
    BLOCKWISE_LOG2,
    DTYPES,
    LZ4_HEAD,
    LZ4_LOG2,
    LZ4_WORD,
    MAX_RANK,
    MESSAGE_HEAD,
    RECORD_HEAD,
    effective_compression,
    padding,
)


class TensorSpec(NamedTuple):
    """What the size of one encoded tensor depends on."""

    shape: Sequence[int]
    dtype: str
    compression: str = "none"


def payload_size(numel: int, dtype: str, compression: str = "none") -> int:
    """Bytes of a record's payload; for lz4 the worst case (every block stored raw)."""
    codec = effective_compression(dtype, compression)
    itemsize = DTYPES[dtype][1]
    if codec == "none":
        return numel * itemsize
    if codec in ("float16", "bfloat16"):
        return numel * 2
    if codec == "int8_blockwise":
        blocks = -(-numel // (1 << BLOCKWISE_LOG2))
        return BLOCKWISE_HEAD.size + 4 * blocks + numel
    raw = numel * itemsize
    return LZ4_HEAD.size + raw + LZ4_WORD.size * -(-raw // (1 << LZ4_LOG2))


def tensor_size(shape: Sequence[int], dtype: str, compression: str = "none") -> int:
    """Length of `serialize(tensor, compression)` for a tensor of this shape and dtype."""
    if len(shape) > MAX_RANK:
        raise WireError(f"rank {len(shape)} exceeds the maximum {MAX_RANK}")
    if any(dim < 0 for dim in shape):
        raise WireError(f"negative dimension in shape {tuple(shape)}")
    return RECORD_HEAD.size + 8 * len(shape) + payload_size(math.prod(shape), dtype, compression)


def meta_size(meta: Mapping[str, Any] | None) -> int:
    """Bytes of the msgpack-encoded metadata map, as encode_message writes it."""
    return len(msgpack.packb(dict(meta or {}), use_bin_type=True))


def message_size(tensors: Iterable[TensorSpec], meta: Mapping[str, Any] | int | None = None) -> int:
    """Length of `encode_message(...)` for these tensors and a meta map (or its packed size)."""
    size_of_meta = meta if isinstance(meta, int) else meta_size(meta)
    total = MESSAGE_HEAD.size + size_of_meta
    total += padding(total)
    for spec in tensors:
        record = tensor_size(spec.shape, spec.dtype, spec.compression)
        total += record + padding(record)
    return total


def chunk_count(total: int, max_chunk: int) -> int:
    """How many chunks `iter_chunks` yields for a message of `total` bytes."""
    if max_chunk <= 0:
        raise WireError(f"max_chunk must be positive, got {max_chunk}")
    return max(1, -(-total // max_chunk))
