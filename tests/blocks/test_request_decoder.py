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


async def test_requests_waiting_to_be_served_are_bounded_per_peer_and_in_all():
    """Rule 4: a finished request holds its bytes until answered; a peer over its share gets
    `overloaded` at once (before: every one waited, 256 MiB each, 1024 per connection)."""
    decoder = RequestDecoder(request_limits(64, 1 << 16), max_large=1,
                             max_waiting_bytes_per_peer=3 << 20, max_waiting_bytes=5 << 20)
    payload = tensor_wire.encode_message([torch.zeros(256, 1024)], {"k": 1})  # 1 + 1 MiB
    size = len(payload) + (1 << 20)
    release = asyncio.Event()

    async def serve(peer):
        async with decoder.request(payload, peer=peer):
            await release.wait()  # as if queued for the worker thread

    first = asyncio.ensure_future(serve("a"))
    await asyncio.sleep(0)
    assert decoder.waiting_bytes("a") == decoder.waiting_bytes() == size
    with pytest.raises(RemoteError) as refused:  # a's second would pass its 3 MiB
        await serve("a")
    assert refused.value.code == "overloaded" and "wait here already" in str(refused.value)
    others = [asyncio.ensure_future(serve("b"))]
    await asyncio.sleep(0)
    assert decoder.waiting_bytes() == 2 * size and decoder.waiting_bytes("b") == size
    with pytest.raises(RemoteError, match="as many waiting requests"):
        await serve("c")  # over the 5 MiB total, and more than a third of it
    release.set()
    await asyncio.gather(first, *others)
    assert decoder.waiting_bytes() == 0 and not decoder._waiting_by_peer
    assert decoder._waiting.holders == 0


async def test_one_request_of_any_size_is_taken_from_a_peer_holding_none():
    decoder = RequestDecoder(request_limits(64, 1 << 16), max_waiting_bytes_per_peer=1,
                             max_waiting_bytes=64 << 20)
    payload = tensor_wire.encode_message([torch.zeros(1000)], {"k": 1})
    assert await _hold(decoder, payload) == 1000  # far over 1 byte: still served
    with pytest.raises(RemoteError, match="bad_input"):  # malformed: counted as its bytes
        async with decoder.request(b"garbage"):
            pass
    assert decoder.waiting_bytes() == 0
