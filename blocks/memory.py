"""How many blocks fit on a device: weights + attention cache + autograd reserve (pure).

``--num-blocks auto`` asks this, before loading anything, with a block's footprint read off the
model's meta skeleton (blocks/footprint.py) and the device's free memory. The rule is Petals'
(``Server._choose_num_blocks``): the blocks that fit in what is left after a reserve for the
intermediate tensors of backward passes, each block counting its weights and the attention cache
of its share of the server's cache budget. Unlike Petals we count free memory, not total, so a
GPU shared with other processes is not oversubscribed.

No torch, no I/O: numbers in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024**3
# Petals: "2 GiB for BLOOM, proportional for other models" (BLOOM-176B's hidden size 14336).
AUTOGRAD_RESERVE_BYTES = 2 * GIB
AUTOGRAD_RESERVE_HIDDEN = 14336
# LLM.int8(): one int8 per weight plus one float32 scale per output row.
INT8_SCALE_BYTES = 4
# QLoRA: 4 bits per weight; double quantization stores one 8-bit absmax per 64 weights and one
# float32 constant per 256 absmax values: 8/64 + 32/(64 * 256) bits per weight.
NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)


class MemoryEstimateError(ValueError):
    """Not even one block fits."""


@dataclass(frozen=True, slots=True)
class BlockFootprint:
    """One decoder block: parameter counts and cache bytes per token of one sequence."""

    linear_weights: int  # elements of nn.Linear weight matrices (what --quant compresses)
    linear_rows: int  # their output rows (int8 keeps one scale per row)
    other_params: int  # norms, biases, fused expert tensors...: kept in the span's dtype
    cache_bytes_per_token: int  # keys + values of one token, in the span's dtype


def weight_bytes(block: BlockFootprint, dtype_bytes: int, quant: str = "none") -> int:
    """Bytes of one block's weights on the device."""
    if quant == "none":
        linear = block.linear_weights * dtype_bytes
    elif quant == "int8":
        linear = block.linear_weights + block.linear_rows * INT8_SCALE_BYTES
    elif quant == "nf4":
        linear = math.ceil(block.linear_weights * NF4_BITS_PER_WEIGHT / 8)
    else:
        raise ValueError(f"unknown quantization {quant!r}")
    return linear + block.other_params * dtype_bytes


def autograd_reserve(hidden_size: int) -> int:
    return AUTOGRAD_RESERVE_BYTES * hidden_size // AUTOGRAD_RESERVE_HIDDEN


@dataclass(frozen=True, slots=True)
class FitEstimate:
    num_blocks: int
    weight_bytes_per_block: int
    cache_bytes_per_block: int
    reserve_bytes: int
    free_bytes: int


def blocks_that_fit(
    free_bytes: int,
    block: BlockFootprint,
    *,
    hidden_size: int,
    dtype_bytes: int,
    quant: str = "none",
    cache_tokens: int,
    total_blocks: int,
    other_bytes: int = 0,
) -> FitEstimate:
    """The most blocks (at most ``total_blocks``) that fit in ``free_bytes``, each with
    ``cache_tokens`` tokens of attention cache, after the autograd reserve and ``other_bytes``
    (e.g. a CUDA context or the client's head on the same device)."""
    per_block_weights = weight_bytes(block, dtype_bytes, quant)
    per_block_cache = block.cache_bytes_per_token * cache_tokens
    reserve = autograd_reserve(hidden_size)
    usable = free_bytes - reserve - other_bytes
    count = min(total_blocks, max(0, usable // (per_block_weights + per_block_cache)))
    if count < 1:
        raise MemoryEstimateError(
            f"not even one block fits: {free_bytes / GIB:.2f} GiB free, one block needs "
            f"{(per_block_weights + per_block_cache) / GIB:.2f} GiB ({per_block_weights / GIB:.2f}"
            f" weights + {per_block_cache / GIB:.2f} cache for {cache_tokens} tokens) after a "
            f"{reserve / GIB:.2f} GiB reserve; try --quant, fewer --cache-tokens, or --blocks"
        )
    return FitEstimate(int(count), per_block_weights, per_block_cache, reserve, free_bytes)
