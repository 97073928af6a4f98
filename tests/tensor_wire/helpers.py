"""Shared strategies and checks for the tensor_wire tests."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from tensor_wire.codecs import TORCH_DTYPES
from tensor_wire.layout import COMPRESSIONS, DTYPES, effective_compression

DTYPE_NAMES = sorted(DTYPES)
COMPRESSION_NAMES = sorted(COMPRESSIONS)
# Half the widest gap between neighbouring values of the dynamic code (0.00703), plus 1% for
# bitsandbytes, which scales by a rounded reciprocal of absmax and so can miss a midpoint.
QUANT_STEP = 0.0071


@st.composite
def shapes(draw: st.DrawFn, max_rank: int = 4, max_numel: int = 3000) -> tuple[int, ...]:
    """Shapes of rank 0..max_rank, empty ones included, with a bounded element count."""
    rank = draw(st.integers(0, max_rank))
    dims = []
    for _ in range(rank):
        budget = max(1, max_numel // max(1, math.prod(dims)))
        dims.append(draw(st.integers(0, min(budget, 300))))
    return tuple(dims)


def make_tensor(shape: tuple[int, ...], dtype: str, seed: int) -> torch.Tensor:
    """Deterministic test data of any supported dtype: normal floats, full-range integers."""
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = TORCH_DTYPES[dtype]
    if dtype == "bool":
        return torch.rand(shape, generator=generator) < 0.5
    if torch_dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(torch_dtype)
    info = torch.iinfo(torch_dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, shape, generator=generator, dtype=torch_dtype)


def block_absmax(flat: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Per-element absmax of the element's block, for the int8_blockwise error bound."""
    n = flat.numel()
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(flat.abs(), (0, blocks * block - n))
    return padded.view(blocks, block).amax(dim=1).repeat_interleave(block)[:n]


def check_decoded(original: torch.Tensor, decoded: torch.Tensor, compression: str) -> None:
    """Assert that `decoded` is what `compression` promises for `original`."""
    dtype = str(original.dtype).removeprefix("torch.")
    codec = effective_compression(dtype, compression)
    assert decoded.shape == original.shape
    assert decoded.dtype == original.dtype
    assert decoded.device.type == "cpu"
    source = original.detach().cpu()
    if codec in ("none", "lz4"):
        assert torch.equal(decoded, source)
    elif codec in ("float16", "bfloat16"):  # exactly torch's own round trip, no more
        expected = source.to(getattr(torch, codec)).to(original.dtype)
        assert torch.equal(decoded, expected)
    else:
        flat, got = source.reshape(-1).double(), decoded.reshape(-1).double()
        absmax = block_absmax(flat)
        slack = 0.0 if original.dtype in (torch.float32, torch.float64) else 2**-8
        bound = absmax * (QUANT_STEP + slack) + 1e-30
        assert bool(((got - flat).abs() <= bound).all())
