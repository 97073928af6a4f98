"""Round trips for every dtype, shape and compression; messages and chunk streams."""

from __future__ import annotations

import warnings
from itertools import pairwise

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensor_wire as tw
from tensor_wire import sizes
from tests.tensor_wire.helpers import (
    COMPRESSION_NAMES,
    DTYPE_NAMES,
    check_decoded,
    make_tensor,
    shapes,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(
    shape=shapes(),
    dtype=st.sampled_from(DTYPE_NAMES),
    compression=st.sampled_from(COMPRESSION_NAMES),
    seed=st.integers(0, 2**32 - 1),
    transpose=st.booleans(),
    writable=st.booleans(),
)
def test_serialize_round_trip(shape, dtype, compression, seed, transpose, writable):
    tensor = make_tensor(shape, dtype, seed)
    if transpose and tensor.dim() >= 2:
        tensor = tensor.transpose(0, -1)  # non-contiguous input
    data = tw.serialize(tensor, compression)
    assert isinstance(data, bytes)
    exact = sizes.tensor_size(tuple(tensor.shape), dtype, compression)
    if compression == "lz4":
        assert len(data) <= exact
    else:
        assert len(data) == exact
    decoded = tw.deserialize(bytearray(data) if writable else data)
    check_decoded(tensor, decoded, compression)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("compression", COMPRESSION_NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1, 1, 257), (2, 3, 4, 5, 1, 1, 2, 1)])
def test_every_dtype_and_compression(dtype, compression, shape):
    tensor = make_tensor(shape, dtype, seed=7)
    check_decoded(tensor, tw.deserialize(tw.serialize(tensor, compression)), compression)


def test_requires_grad_and_views_are_serialized_without_changing_the_input():
    base = torch.randn(6, 8, requires_grad=True)
    view = base[1:5, ::2]
    before = base.detach().clone()
    decoded = tw.deserialize(tw.serialize(view))
    assert torch.equal(decoded, view.detach())
    assert not decoded.requires_grad
    assert torch.equal(base.detach(), before)


def test_writable_input_is_viewed_in_place_and_bytes_are_copied():
    tensor = torch.arange(16, dtype=torch.float32).view(4, 4)
    buffer = bytearray(tw.serialize(tensor))
    shared = tw.deserialize(buffer)
    buffer[-4:] = torch.tensor([-1.0]).numpy().tobytes()
    assert shared[3, 3].item() == -1.0  # same memory
    data = tw.serialize(tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor aliases read-only memory
        private = tw.deserialize(data)
    private += 1  # writable, and the bytes object is untouched
    assert tw.deserialize(data)[0, 0].item() == 0.0


def test_explicit_device_cpu():
    tensor = torch.randn(5, 3)
    assert torch.equal(tw.deserialize(tw.serialize(tensor), device="cpu"), tensor)
    message = tw.decode_message(tw.encode_message([tensor], {}), device=torch.device("cpu"))
    assert torch.equal(message.tensors[0], tensor)


@FAST
@given(
    specs=st.lists(
        st.tuples(shapes(max_rank=3, max_numel=500), st.sampled_from(DTYPE_NAMES),
                  st.sampled_from(COMPRESSION_NAMES)),
        max_size=5,
    ),
    meta=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=False)
            | st.text(max_size=20) | st.binary(max_size=20),
            lambda inner: st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=4), inner, max_size=4),
            max_leaves=10,
        ),
        max_size=5,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_message_round_trip(specs, meta, seed):
    tensors = [make_tensor(shape, dtype, seed + i) for i, (shape, dtype, _) in enumerate(specs)]
    compressions = [codec for _, _, codec in specs]
    data = tw.encode_message(tensors, meta, compressions)
    bound = sizes.message_size(
        [sizes.TensorSpec(shape, dtype, codec) for shape, dtype, codec in specs], meta
    )
    assert len(data) == bound if "lz4" not in compressions else len(data) <= bound
    decoded = tw.decode_message(data)
    assert decoded.meta == meta
    assert len(decoded.tensors) == len(tensors)
    for tensor, got, codec in zip(tensors, decoded.tensors, compressions):
        check_decoded(tensor, got, codec)


def test_one_compression_for_a_mixed_message_passes_integers_through():
    hidden, ids, mask = torch.randn(2, 3, 16), torch.arange(6).view(2, 3), torch.ones(2, 3) > 0
    data = tw.encode_message([hidden, ids, mask], {"step": 3}, compression="float16")
    tensors, meta = tw.decode_message(data)
    assert meta == {"step": 3}
    check_decoded(hidden, tensors[0], "float16")
    assert torch.equal(tensors[1], ids) and torch.equal(tensors[2], mask)


@FAST
@given(
    shape=shapes(max_rank=2, max_numel=4000),
    compression=st.sampled_from(COMPRESSION_NAMES),
    max_chunk=st.integers(1, 5000),
    cuts=st.lists(st.integers(0, 100_000), max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_chunks_reassemble_in_any_split(shape, compression, max_chunk, cuts, seed):
    tensor = make_tensor(shape, "float32", seed)
    head = tensor.reshape(-1)[:1]
    meta = {"id": seed}
    whole = tw.encode_message([tensor, head], meta, compression)
    chunks = list(tw.iter_chunks([tensor, head], meta, compression, max_chunk=max_chunk))
    assert all(0 < len(chunk) <= max_chunk for chunk in chunks)
    assert all(len(chunk) == max_chunk for chunk in chunks[:-1])
    assert len(chunks) == sizes.chunk_count(len(whole), max_chunk)
    assert b"".join(chunks) == whole
    # The receiver may see the same bytes split differently (a transport re-framing them).
    points = sorted({cut % (len(whole) + 1) for cut in cuts} | {0, len(whole)})
    assembler = tw.ChunkAssembler()
    results = [assembler.feed(whole[a:b]) for a, b in pairwise(points)]
    assert all(result is None for result in results[:-1])
    message = results[-1]
    assert message is not None and assembler.done
    assert assembler.received == assembler.expected == len(whole)
    assert message.meta == meta
    check_decoded(tensor, message.tensors[0], compression)
    check_decoded(head, message.tensors[1], compression)


def test_large_payload_chunks_alias_the_tensor():
    tensor = torch.randn(1 << 16)  # 256 KiB
    chunks = list(tw.iter_chunks([tensor], max_chunk=1 << 14))
    inner = [chunk for chunk in chunks if isinstance(chunk, memoryview)]
    assert len(inner) >= len(chunks) - 2  # all but the chunks that straddle headers
    tensor[-1] = 42.0  # the last chunk is a view of the tensor's memory, not a copy
    tail = torch.frombuffer(bytearray(chunks[-1][-4:]), dtype=torch.float32)
    assert tail.item() == 42.0


def test_assembler_output_is_writable_and_independent_of_chunks():
    tensor = torch.randn(3000)
    chunks = [bytes(chunk) for chunk in tw.iter_chunks([tensor], {}, max_chunk=1000)]
    assembler = tw.ChunkAssembler()
    for chunk in chunks:
        message = assembler.feed(chunk)
    assert message is not None
    message.tensors[0].mul_(2)  # no warning, no error: the assembler owns a writable buffer
    assert torch.equal(message.tensors[0], tensor * 2)
