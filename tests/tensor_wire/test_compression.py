"""Compression quality: documented error bounds and sizes, the code table, both quantizers."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch

import tensor_wire as tw
from tensor_wire import blockwise
from tensor_wire.dynamic_code import dynamic_code, dynamic_code_bytes
from tensor_wire.layout import RECORD_HEAD
from tests.tensor_wire.helpers import QUANT_STEP, block_absmax

CODE_SHA256 = "035c4114538df2a03bbcb4d8a39b9325d26d84a00cf6cf29018d1a6608ab14c4"  # FORMAT.md
needs_bnb = pytest.mark.skipif(
    blockwise.bitsandbytes_functional() is None, reason="bitsandbytes is not installed"
)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def normal() -> torch.Tensor:
    return torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("compression", "max_error", "max_ratio"),
    [
        ("float16", 1e-3, 0.502),
        ("bfloat16", 4e-3, 0.502),
        ("int8_blockwise", 2e-2, 0.27),  # the budget includes the record head
        ("lz4", 0.0, 1.002),
        ("none", 0.0, 1.002),
    ],
)
@pytest.mark.parametrize("shape", [(1, 1, 8192), (1 << 20,)])
def test_documented_error_bounds_and_sizes(normal, compression, max_error, max_ratio, shape):
    tensor = normal[: torch.Size(shape).numel()].view(shape)
    data = tw.serialize(tensor, compression)
    assert len(data) <= max_ratio * tensor.numel() * 4
    assert relative_l2(tw.deserialize(data), tensor) <= max_error


def test_dynamic_code_is_pinned_and_matches_bitsandbytes():
    code = dynamic_code()
    assert len(code) == 256 and list(code) == sorted(set(code))
    assert code[-1] == 1.0 and 0.0 in code
    assert hashlib.sha256(dynamic_code_bytes()).hexdigest() == CODE_SHA256
    functional = blockwise.bitsandbytes_functional()
    if functional is not None:
        reference = functional.create_dynamic_map(signed=True)
        assert torch.allclose(torch.tensor(code), reference, rtol=1e-6, atol=1e-9)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_bitsandbytes_and_torch_quantizers_agree(normal, dtype):
    x = (normal[:10_007] * 3).to(dtype)  # a partial last block
    q_bnb, absmax_bnb = blockwise.quantize(x, 6, use_bnb=True)
    q_torch, absmax_torch = blockwise.quantize(x, 6, use_bnb=False)
    assert torch.equal(absmax_bnb, absmax_torch)
    # Indices may differ only where a value sits on a midpoint up to rounding.
    assert (q_bnb != q_torch).float().mean().item() < 0.01
    code = blockwise.code_table(torch.device("cpu"))
    for q in (q_bnb, q_torch):
        decoded = [blockwise.dequantize(q, absmax_bnb, code, 6, dtype, use_bnb=flag)
                   for flag in (True, False)]
        assert torch.allclose(decoded[0].double(), decoded[1].double(), rtol=2**-7, atol=0)
        error = (decoded[0].double() - x.double()).abs()
        slack = 0.0 if dtype in (torch.float32, torch.float64) else 2**-8
        assert bool((error <= block_absmax(x.double()) * (QUANT_STEP + slack)).all())


def test_torch_fallback_round_trip_on_its_own(normal):
    x = normal[:5000]
    q, absmax = blockwise.quantize(x, 6, use_bnb=False)
    code = blockwise.code_table(torch.device("cpu"))
    y = blockwise.dequantize(q, absmax, code, 6, torch.float32, use_bnb=False)
    assert relative_l2(y, x) < 2e-2
    assert bool(((y - x).abs() <= block_absmax(x) * QUANT_STEP).all())


def test_zero_blocks_decode_to_zero():
    x = torch.zeros(200)
    x[150] = 3.0
    y = tw.deserialize(tw.serialize(x, "int8_blockwise"))
    assert torch.equal(y[:128], torch.zeros(128)) and y[150].item() == 3.0


def test_explicit_code_table_is_honoured():
    """A peer may ship its own table (code id 0): decode with it, not with the standard one."""
    x = torch.tensor([1.0, -0.5, 0.25, 0.0])
    data = bytearray(tw.serialize(x, "int8_blockwise"))
    start = RECORD_HEAD.size + 8
    linear = struct.pack("<256f", *[(i - 128) / 128 for i in range(256)])
    payload = bytes(data[start:])
    payload = payload[:1] + b"\x00" + payload[2:4] + linear + payload[4:]
    head = bytearray(data[:start])
    struct.pack_into("<Q", head, 8, len(payload))
    decoded = tw.deserialize(bytes(head) + payload)
    q = torch.frombuffer(bytearray(data[-4:]), dtype=torch.uint8).float()
    assert torch.allclose(decoded, (q - 128) / 128 * 1.0)


def test_lz4_shrinks_sparse_activations():
    x = torch.relu(torch.randn(1 << 16))
    x[torch.rand(1 << 16) < 0.9] = 0
    data = tw.serialize(x, "lz4")
    assert len(data) < 0.4 * x.numel() * 4
    assert torch.equal(tw.deserialize(data), x)
