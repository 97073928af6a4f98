"""CUDA paths: GPU tensors are compressed on the GPU and moved once; receivers pick the device.

Skipped where no CUDA device is present (CI); run on a GPU host before trusting those paths.
"""

from __future__ import annotations

import pytest
import torch

import tensor_wire as tw
from tensor_wire import blockwise
from tests.tensor_wire.helpers import COMPRESSION_NAMES, DTYPE_NAMES, check_decoded, make_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("compression", COMPRESSION_NAMES)
def test_cuda_tensors_serialize_like_cpu_tensors(dtype, compression):
    cpu = make_tensor((3, 70, 5), dtype, seed=3)
    gpu = cpu.cuda().transpose(0, 2)  # non-contiguous on the device
    data = tw.serialize(gpu, compression)
    if compression != "int8_blockwise":  # GPU and CPU kernels may round ties differently
        assert data == tw.serialize(cpu.transpose(0, 2), compression)
    decoded = tw.deserialize(data)
    check_decoded(cpu.transpose(0, 2), decoded, compression)
    on_gpu = tw.deserialize(data, device="cuda")
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == decoded.dtype
    assert torch.allclose(on_gpu.cpu().double(), decoded.double(), rtol=2**-7, atol=1e-6)


def test_messages_and_chunks_land_on_the_requested_device():
    tensors = [torch.randn(4, 1000, device="cuda"), torch.arange(9, device="cuda")]
    chunks = list(tw.iter_chunks(tensors, {"s": 1}, ["int8_blockwise", "lz4"], max_chunk=999))
    assembler = tw.ChunkAssembler(device="cuda")
    for chunk in chunks:
        message = assembler.feed(chunk)
    assert message is not None and message.meta == {"s": 1}
    assert all(tensor.device.type == "cuda" for tensor in message.tensors)
    assert torch.equal(message.tensors[1], tensors[1])
    check_decoded(tensors[0], message.tensors[0].cpu(), "int8_blockwise")


@pytest.mark.skipif(blockwise.bitsandbytes_functional() is None, reason="no bitsandbytes")
def test_bitsandbytes_on_cuda_matches_the_torch_fallback():
    x = torch.randn(100_003, device="cuda")
    q_bnb, absmax = blockwise.quantize(x, 6, use_bnb=True)
    q_torch, absmax_torch = blockwise.quantize(x, 6, use_bnb=False)
    assert q_bnb.device.type == "cuda" and torch.equal(absmax, absmax_torch)
    assert (q_bnb != q_torch).float().mean().item() < 0.01
    code = blockwise.code_table(x.device)
    a = blockwise.dequantize(q_bnb, absmax, code, 6, torch.float32, use_bnb=True)
    b = blockwise.dequantize(q_bnb, absmax, code, 6, torch.float32, use_bnb=False)
    assert torch.allclose(a, b, rtol=1e-6, atol=0)
