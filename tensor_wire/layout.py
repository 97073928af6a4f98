"""The byte layout of tensor_wire format v1: headers, name/code tables, limits.

This module is the single source of truth for what the bytes mean (FORMAT.md describes the same
thing in prose). It must not import torch, numpy or bitsandbytes: the simulator and `sizes` use
it to compute message sizes without loading any tensor library.
"""

from __future__ import annotations

import struct
from typing import Final

from tensor_wire.errors import WireError

FORMAT_VERSION: Final = 1

RECORD_MAGIC: Final = b"TW"
MESSAGE_MAGIC: Final = b"TM"

# A tensor record: magic, version, dtype code, compression code, rank, flags, payload length;
# then `rank` little-endian u64 dims; then the payload. 16 + 8 * rank bytes keep the payload
# 8-byte aligned relative to the record start, so a receiver can view it in place.
RECORD_HEAD: Final = struct.Struct("<2sBBBBHQ")
DIM: Final = struct.Struct("<Q")
SHAPES: Final = tuple(struct.Struct(f"<{rank}Q") for rank in range(9))

# A message: magic, version, flags, tensor count, meta length, reserved, total length; then the
# msgpack meta map, zero padding to 8, then the records, each zero-padded to a multiple of 8.
MESSAGE_HEAD: Final = struct.Struct("<2sBBIIIQ")

# int8_blockwise payload head: log2(block size), code id, reserved u16.
BLOCKWISE_HEAD: Final = struct.Struct("<BBH")
# lz4 payload head: log2(block size), 3 reserved bytes; then per block a u32 word (below).
LZ4_HEAD: Final = struct.Struct("<B3x")
LZ4_WORD: Final = struct.Struct("<I")
LZ4_RAW_FLAG: Final = 1 << 31  # set in a block's word: the block is stored uncompressed

ALIGN: Final = 8
MAX_RANK: Final = 8
# Dims (zeros ignored) must multiply to less than this, so that no stride can overflow int64.
MAX_ELEMENTS: Final = 1 << 62

# Block size of int8_blockwise written by this encoder: 64 values per float32 absmax keeps the
# size at 1 + 4/64 = 1.0625 bytes per value (26.6% of float32, under the 27% budget) while giving
# the smallest error of the sizes bitsandbytes supports on every backend (64..4096); small
# blocks also confine an outlier feature's damage to its own 64 neighbours (see FORMAT.md).
BLOCKWISE_LOG2: Final = 6
BLOCKWISE_LOG2_RANGE: Final = range(6, 13)  # 64 .. 4096, the sizes bitsandbytes accepts
CODE_EXPLICIT: Final = 0  # the 256 float32 code values follow the payload head
CODE_DYNAMIC_SIGNED: Final = 1  # the standard signed dynamic map (tensor_wire.dynamic_code)
CODE_BYTES: Final = 256 * 4

# lz4 raw block size written by this encoder (1 MiB measured fastest of 64 KiB .. 16 MiB).
LZ4_LOG2: Final = 20
LZ4_LOG2_RANGE: Final = range(10, 25)
# An LZ4 block cannot expand more than 255-fold: every extra length byte adds at most 255
# output bytes (LZ4 block format description, "Token" and "Match length"). A block declaring
# more than 256 output bytes per stored byte is rejected before any buffer is allocated.
LZ4_MAX_RATIO: Final = 256

# name -> (code, itemsize, is floating point). Codes are the wire values; 0 is never valid.
DTYPES: Final[dict[str, tuple[int, int, bool]]] = {
    "float32": (1, 4, True),
    "float16": (2, 2, True),
    "bfloat16": (3, 2, True),
    "float64": (4, 8, True),
    "int8": (5, 1, False),
    "int16": (6, 2, False),
    "int32": (7, 4, False),
    "int64": (8, 8, False),
    "uint8": (9, 1, False),
    "bool": (10, 1, False),
}
DTYPE_BY_CODE: Final = {code: name for name, (code, _, _) in DTYPES.items()}

COMPRESSIONS: Final[dict[str, int]] = {
    "none": 0,
    "float16": 1,
    "bfloat16": 2,
    "int8_blockwise": 3,
    "lz4": 4,
}
COMPRESSION_BY_CODE: Final = {code: name for name, code in COMPRESSIONS.items()}


def effective_compression(dtype: str, compression: str) -> str:
    """The compression actually written for `dtype` when `compression` is asked for.

    Lossy float codecs only make sense where they shrink a floating tensor: float16/bfloat16
    apply to float32 and float64, int8_blockwise to every floating dtype; anything else travels
    as `none` (a documented pass-through, so one compression can be asked for a whole message
    that also carries integer ids or masks). Unknown names raise WireError.
    """
    if compression not in COMPRESSIONS:
        raise WireError(f"unknown compression {compression!r}; known: {sorted(COMPRESSIONS)}")
    if dtype not in DTYPES:
        raise WireError(f"unsupported dtype {dtype!r}; supported: {sorted(DTYPES)}")
    _, itemsize, floating = DTYPES[dtype]
    if compression in ("float16", "bfloat16") and (not floating or itemsize <= 2):
        return "none"
    if compression == "int8_blockwise" and not floating:
        return "none"
    return compression


def is_canonical(dtype: str, compression: str) -> bool:
    """Whether a record with this dtype/compression pair could have come from our encoder."""
    return effective_compression(dtype, compression) == compression


def padding(length: int) -> int:
    """Zero bytes that follow `length` bytes to reach the next multiple of ALIGN."""
    return -length % ALIGN
