"""tensor_wire.sizes: torch-free, and exactly the lengths the encoder writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensor_wire as tw
from tensor_wire import sizes
from tests.tensor_wire.helpers import COMPRESSION_NAMES, DTYPE_NAMES, make_tensor, shapes

ROOT = Path(__file__).resolve().parents[2]


def test_sizes_and_package_import_without_torch():
    code = (
        "import sys, tensor_wire, tensor_wire.sizes, tensor_wire.layout;"
        "from tensor_wire import WireError, tensor_size;"
        "assert tensor_size((1, 1, 8192), 'float32', 'int8_blockwise') == 8748;"
        "bad = [m for m in ('torch', 'numpy', 'bitsandbytes') if m in sys.modules];"
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@settings(max_examples=200, deadline=None)
@given(shape=shapes(), dtype=st.sampled_from(DTYPE_NAMES),
       compression=st.sampled_from(COMPRESSION_NAMES), seed=st.integers(0, 2**16))
def test_tensor_size_is_the_serialized_length(shape, dtype, compression, seed):
    tensor = make_tensor(shape, dtype, seed)
    length = len(tw.serialize(tensor, compression))
    expected = sizes.tensor_size(shape, dtype, compression)
    if compression == "lz4" and dtype not in ("float32", "float64"):
        assert length <= expected  # integers and bools may compress
    else:  # random floats never compress, so every lz4 block is stored raw: the bound is exact
        assert length == expected


@settings(max_examples=100, deadline=None)
@given(shape=shapes(), dtype=st.sampled_from(DTYPE_NAMES),
       compression=st.sampled_from(COMPRESSION_NAMES), seed=st.integers(0, 2**16))
def test_decoded_size_reads_the_heads_alone(shape, dtype, compression, seed):
    tensor = make_tensor(shape, dtype, seed)
    data = tw.encode_message([tensor, tensor.reshape(-1)[:1]], {"k": 1}, [compression, "none"])
    expected = sum(t.numel() * t.element_size() for t in tw.decode_message(data).tensors)
    assert tw.decoded_size(data) == expected
    zeros = tw.encode_message([torch.zeros(64, 1024)], None, "lz4")  # 256 KiB in ~1 KiB
    assert tw.decoded_size(zeros) == 64 * 1024 * 4 and len(zeros) < 4096


def test_lz4_size_is_an_upper_bound_that_compressible_data_beats():
    zeros = torch.zeros(1 << 18)
    assert len(tw.serialize(zeros, "lz4")) < sizes.tensor_size((1 << 18,), "float32", "lz4") // 50


def test_message_size_and_chunk_count():
    tensors = [torch.randn(3, 5), torch.arange(7), torch.randn(2, 2, dtype=torch.float64)]
    codecs = ["int8_blockwise", "float16", "bfloat16"]
    meta = {"session": "abc", "step": 12, "blocks": [3, 9]}
    data = tw.encode_message(tensors, meta, codecs)
    specs = [
        sizes.TensorSpec(tuple(t.shape), str(t.dtype)[6:], c) for t, c in zip(tensors, codecs)
    ]
    assert sizes.message_size(specs, meta) == len(data)
    assert sizes.message_size(specs, sizes.meta_size(meta)) == len(data)
    for max_chunk in (1, 7, 64, len(data) - 1, len(data), 10**6):
        chunks = list(tw.iter_chunks(tensors, meta, codecs, max_chunk=max_chunk))
        assert sizes.chunk_count(len(data), max_chunk) == len(chunks)


def test_sizes_reject_what_the_encoder_rejects():
    with pytest.raises(tw.WireError):
        sizes.tensor_size((1,) * 9, "float32")
    with pytest.raises(tw.WireError):
        sizes.tensor_size((2,), "complex64")
    with pytest.raises(tw.WireError):
        sizes.tensor_size((2,), "float32", "zstd")
    with pytest.raises(tw.WireError):
        sizes.tensor_size((-1,), "float32")
    with pytest.raises(tw.WireError):
        sizes.chunk_count(10, 0)


def test_known_sizes():
    """Figures quoted in FORMAT.md and used by the simulator."""
    activation = (1, 1, 8192)
    assert sizes.tensor_size(activation, "float32") == 40 + 32768
    assert sizes.tensor_size(activation, "float32", "float16") == 40 + 16384
    assert sizes.tensor_size(activation, "float32", "int8_blockwise") == 40 + 4 + 512 + 8192
    assert sizes.tensor_size(activation, "int64", "float16") == 40 + 65536  # pass-through
    assert sizes.tensor_size((), "float32") == 20
