"""Tensors on the wire: one tensor, several tensors plus a msgpack map, or chunks of either.

    data = serialize(tensor, compression="float16");  tensor = deserialize(data, device="cuda")
    data = encode_message([hidden, ids], {"step": 3});  tensors, meta = decode_message(data)
    for chunk in iter_chunks([hidden], meta, max_chunk=1 << 20): send(chunk)
    assembler = ChunkAssembler();  message = assembler.feed(chunk)  # None until complete

Compressions: none, float16, bfloat16, int8_blockwise, lz4. Every malformed input raises
WireError; `Limits` caps what a peer can make a decoder allocate. The format is versioned and
described in FORMAT.md next to this file.

Importing this package does not import torch: the torch-backed names load on first use, so the
simulator can use `tensor_wire.sizes` (encoded sizes from shapes) without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from tensor_wire.errors import WireError

_LAZY = {
    "serialize": "tensor_wire.record",
    "deserialize": "tensor_wire.record",
    "encode_message": "tensor_wire.message",
    "decode_message": "tensor_wire.message",
    "decoded_size": "tensor_wire.message",
    "Message": "tensor_wire.message",
    "iter_chunks": "tensor_wire.chunks",
    "ChunkAssembler": "tensor_wire.chunks",
    "DEFAULT_MAX_CHUNK": "tensor_wire.chunks",
    "Limits": "tensor_wire.limits",
    "COMPRESSIONS": "tensor_wire.layout",
    "DTYPES": "tensor_wire.layout",
    "FORMAT_VERSION": "tensor_wire.layout",
    "TensorSpec": "tensor_wire.sizes",
    "tensor_size": "tensor_wire.sizes",
    "message_size": "tensor_wire.sizes",
}

__all__ = ["WireError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tensor_wire' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
