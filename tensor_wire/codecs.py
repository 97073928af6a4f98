"""Payload codecs: a tensor to the bytes of one record's payload, and back.

Encoders return a list of buffers (memoryviews of tensor memory where possible) that the
caller joins or streams, so the uncompressed path copies the tensor exactly once (into the
output) or never (chunk streaming). Decoders check every length against the bytes actually
present before they allocate anything; they view writable input in place and copy read-only
input (bytes) once, because a tensor must never alias an immutable Python object.

Layout of each payload: FORMAT.md. No I/O here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import lz4.block
import torch

from tensor_wire import blockwise
from tensor_wire.errors import WireError
from tensor_wire.layout import (
    BLOCKWISE_HEAD,
    BLOCKWISE_LOG2,
    BLOCKWISE_LOG2_RANGE,
    CODE_BYTES,
    CODE_DYNAMIC_SIGNED,
    CODE_EXPLICIT,
    LZ4_HEAD,
    LZ4_LOG2,
    LZ4_LOG2_RANGE,
    LZ4_MAX_RATIO,
    LZ4_RAW_FLAG,
    LZ4_WORD,
)

if sys.byteorder != "little":  # the format is little-endian and we view payloads in place
    raise ImportError("tensor_wire supports little-endian hosts only")

Buffer = bytes | bytearray | memoryview

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_CPU = torch.device("cpu")
_NUMPY_STAND_INS = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (the view keeps the tensor alive)."""
    if tensor.numel() == 0:
        return memoryview(b"")
    as_numpy = _NUMPY_STAND_INS.get(tensor.dtype)  # numpy lacks bfloat16; bool is cast too
    view = memoryview((tensor if as_numpy is None else tensor.view(as_numpy)).numpy())
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous and on the CPU, moving a CUDA tensor once (after any on-device compression)."""
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    return tensor if tensor.is_cpu else tensor.to(_CPU)


def encode_payload(tensor: torch.Tensor, codec: str) -> list[Buffer]:
    """Buffers whose concatenation is the payload of `tensor` under `codec` (already effective)."""
    if codec == "none":
        return [byte_view(_on_cpu(tensor))]
    if codec == "float16":
        return [byte_view(_on_cpu(tensor.to(torch.float16)))]
    if codec == "bfloat16":
        return [byte_view(_on_cpu(tensor.to(torch.bfloat16)))]
    if codec == "int8_blockwise":
        q, absmax = blockwise.quantize(tensor.contiguous(), BLOCKWISE_LOG2)
        head = BLOCKWISE_HEAD.pack(BLOCKWISE_LOG2, CODE_DYNAMIC_SIGNED, 0)
        return [head, byte_view(_on_cpu(absmax)), byte_view(_on_cpu(q))]
    if codec == "lz4":
        return _lz4_encode(byte_view(_on_cpu(tensor)))
    raise WireError(f"unknown compression {codec!r}")


def _lz4_encode(raw: memoryview) -> list[Buffer]:
    parts: list[Buffer] = [LZ4_HEAD.pack(LZ4_LOG2)]
    step = 1 << LZ4_LOG2
    for start in range(0, len(raw), step):
        block = raw[start : start + step]
        packed = lz4.block.compress(block, store_size=False)
        if len(packed) < len(block):
            parts += [LZ4_WORD.pack(len(packed)), packed]
        else:  # incompressible (most float data): store raw, at most 4 bytes of overhead
            parts += [LZ4_WORD.pack(len(block) | LZ4_RAW_FLAG), block]
    return parts


# ----------------------------------------------------------------------------- decoding

# (data, payload start, payload length, dtype name, numel, device) -> flat tensor
Decoder = Callable[[memoryview, int, int, str, int, "torch.device | None"], torch.Tensor]


def _view(data: memoryview, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` items of `dtype` at data[start:]; in place if writable, else one private copy."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    if data.readonly:
        size = count * dtype.itemsize
        return torch.frombuffer(bytearray(data[start : start + size]), dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=count, offset=start)


def _move(tensor: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    return tensor if device is None or device == _CPU else tensor.to(device)


def _check_bool(raw: torch.Tensor) -> None:
    """torch.bool must hold 0 or 1; any other byte would be undefined behaviour downstream."""
    if raw.numel() and bool(raw.gt(1).any()):
        raise WireError("bool tensor holds bytes other than 0 and 1")


def _decode_none(
    data: memoryview, start: int, length: int, dtype: str, numel: int, device: torch.device | None
) -> torch.Tensor:
    torch_dtype = TORCH_DTYPES[dtype]
    expected = numel * torch_dtype.itemsize
    if length != expected:
        raise WireError(f"payload of {length} bytes, shape and {dtype} need {expected}")
    if dtype == "bool":
        raw = _view(data, start, numel, torch.uint8)
        _check_bool(raw)
        return _move(raw.view(torch.bool), device)
    return _move(_view(data, start, numel, torch_dtype), device)


def _decode_half(wire_dtype: torch.dtype) -> Decoder:
    def decode(
        data: memoryview, start: int, length: int, dtype: str, numel: int,
        device: torch.device | None,
    ) -> torch.Tensor:
        if length != numel * 2:
            raise WireError(f"payload of {length} bytes, shape needs {numel * 2} as {wire_dtype}")
        return _move(_view(data, start, numel, wire_dtype), device).to(TORCH_DTYPES[dtype])

    return decode


def _decode_blockwise(
    data: memoryview, start: int, length: int, dtype: str, numel: int, device: torch.device | None
) -> torch.Tensor:
    if length < BLOCKWISE_HEAD.size:
        raise WireError("int8_blockwise payload shorter than its head")
    log2_block, code_id, reserved = BLOCKWISE_HEAD.unpack_from(data, start)
    if log2_block not in BLOCKWISE_LOG2_RANGE:
        raise WireError(f"int8_blockwise block size 2**{log2_block} not in 64..4096")
    if code_id not in (CODE_EXPLICIT, CODE_DYNAMIC_SIGNED):
        raise WireError(f"int8_blockwise: unknown code id {code_id}")
    if reserved:
        raise WireError("int8_blockwise: nonzero reserved bytes")
    blocks = -(-numel // (1 << log2_block))
    table_size = CODE_BYTES if code_id == CODE_EXPLICIT else 0
    expected = BLOCKWISE_HEAD.size + table_size + 4 * blocks + numel
    if length != expected:
        raise WireError(f"int8_blockwise payload of {length} bytes, shape needs {expected}")
    target = device if device is not None else _CPU
    cursor = start + BLOCKWISE_HEAD.size
    table = bytes(data[cursor : cursor + table_size]) if table_size else None
    code = blockwise.code_table(target, table)
    cursor += table_size
    absmax = _move(_view(data, cursor, blocks, torch.float32), device)
    q = _move(_view(data, cursor + 4 * blocks, numel, torch.uint8), device)
    return blockwise.dequantize(q, absmax, code, log2_block, TORCH_DTYPES[dtype])


def _decode_lz4(
    data: memoryview, start: int, length: int, dtype: str, numel: int, device: torch.device | None
) -> torch.Tensor:
    end = start + length
    if length < LZ4_HEAD.size:
        raise WireError("lz4 payload shorter than its head")
    (log2_block,) = LZ4_HEAD.unpack_from(data, start)
    if log2_block not in LZ4_LOG2_RANGE:
        raise WireError(f"lz4 block size 2**{log2_block} out of range")
    torch_dtype = TORCH_DTYPES[dtype]
    total = numel * torch_dtype.itemsize
    step = 1 << log2_block
    blocks: list[tuple[int, int, bool, int]] = []  # (offset, stored, is raw, raw size)
    cursor = start + LZ4_HEAD.size
    for block_start in range(0, total, step):  # check the whole table before allocating
        raw_size = min(step, total - block_start)
        if cursor + LZ4_WORD.size > end:
            raise WireError("lz4 payload truncated in its block table")
        (word,) = LZ4_WORD.unpack_from(data, cursor)
        stored, is_raw = word & ~LZ4_RAW_FLAG, bool(word & LZ4_RAW_FLAG)
        cursor += LZ4_WORD.size
        if cursor + stored > end:
            raise WireError("lz4 block runs past the payload")
        if is_raw and stored != raw_size:
            raise WireError(f"raw lz4 block of {stored} bytes, expected {raw_size}")
        if not is_raw and raw_size > LZ4_MAX_RATIO * stored:
            raise WireError(f"lz4 block of {stored} bytes cannot expand to {raw_size}")
        blocks.append((cursor, stored, is_raw, raw_size))
        cursor += stored
    if cursor != end:
        raise WireError(f"lz4 payload has {end - cursor} bytes past its last block")
    if len(blocks) == 1:  # the usual small tensor: no assembly buffer, no extra copy
        offset, stored, is_raw, raw_size = blocks[0]
        if is_raw:
            out = _view(data, offset, raw_size, torch.uint8)
        else:
            raw = _lz4_block(data, offset, stored, is_raw, raw_size, writable=True)
            out = torch.frombuffer(raw, dtype=torch.uint8)
    else:
        out = torch.empty(total, dtype=torch.uint8)
        if total:
            target = memoryview(out.numpy())
            written = 0
            for block in blocks:
                target[written : written + block[3]] = _lz4_block(data, *block)
                written += block[3]
    if dtype == "bool":
        _check_bool(out)
    return _move(out.view(torch_dtype), device)


def _lz4_block(
    data: memoryview, offset: int, stored: int, is_raw: bool, raw_size: int,
    writable: bool = False,
) -> Buffer:
    """The raw bytes of one block (a view of `data` for raw blocks)."""
    source = data[offset : offset + stored]
    if is_raw:
        return source
    try:
        raw = lz4.block.decompress(source, uncompressed_size=raw_size,
                                   return_bytearray=writable)
    except Exception as error:  # LZ4BlockError and friends: corrupt input
        raise WireError(f"lz4 block does not decompress: {error}") from None
    if len(raw) != raw_size:
        raise WireError(f"lz4 block decompressed to {len(raw)}, not {raw_size}")
    return raw


DECODERS: dict[str, Decoder] = {
    "none": _decode_none,
    "float16": _decode_half(torch.float16),
    "bfloat16": _decode_half(torch.bfloat16),
    "int8_blockwise": _decode_blockwise,
    "lz4": _decode_lz4,
}

