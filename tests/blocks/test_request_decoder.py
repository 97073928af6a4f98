"""blocks/request_decoder.py: what one request may decode to, and where it is decoded."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import tensor_wire
from blocks import request_decoder
from blocks.request_decoder import INLINE_DECODE_BYTES, RequestDecoder, request_limits
from overlay.host import RemoteError


def _message(numel: int) -> bytes:
    return tensor_wire.encode_message([torch.zeros(numel)], {"k": 1}, "lz4")


def test_the_limit_is_the_largest_legal_request():
    limits = request_limits(hidden_size=64, max_tokens=100)
    # hidden states, output gradients and deep prompts of 100 vectors in float32, an int64 mask
    assert limits.max_decoded_bytes == 100 * (3 * 64 * 4 + 8)
    fits = tensor_wire.encode_message([torch.zeros(3, 100, 64)], None, "lz4")
    request_decoder.decode(fits, limits)
    with pytest.raises(RemoteError, match="decoded-size limit") as info:
        request_decoder.decode(tensor_wire.encode_message([torch.zeros(4, 100, 64)], None, "lz4"),
                               limits)
    assert info.value.code == "bad_input"
    with pytest.raises(RemoteError, match="malformed"):
        request_decoder.decode(b"not a message", limits)


async def test_small_messages_decode_inline_and_large_ones_on_a_thread_holding_a_slot():
    decoder = RequestDecoder(request_limits(1024, 1 << 16), max_large=1)
    small = _message(16)
    assert decoder.small(small) is not None
    large = _message(INLINE_DECODE_BYTES // 4 + 1)  # 4 MiB of zeros in a few KiB
    assert len(large) < 64 << 10 and decoder.small(large) is None
    threads: list[str] = []
    real_decode = request_decoder.decode

    def spy(payload, limits):
        threads.append(threading.current_thread().name)
        return real_decode(payload, limits)

    request_decoder.decode = spy
    try:
        async with decoder.request(large) as (tensors, _):
            assert tensors[0].numel() == INLINE_DECODE_BYTES // 4 + 1
            # a second large request waits for the slot; a small one does not
            second = asyncio.ensure_future(_hold(decoder, large))
            await asyncio.sleep(0.2)  # ample time for a thread to start decoding it
            assert not second.done() and len(threads) == 1
            async with decoder.request(small) as (tensors, _):
                assert tensors[0].numel() == 16
        assert await asyncio.wait_for(second, 10) == INLINE_DECODE_BYTES // 4 + 1
    finally:
        request_decoder.decode = real_decode
    main = threading.main_thread().name
    assert threads[0] != main and threads[1] == main and threads[2] != main


async def _hold(decoder: RequestDecoder, payload: bytes) -> int:
    async with decoder.request(payload) as (tensors, _):
        return tensors[0].numel()
