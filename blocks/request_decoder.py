"""Decoding a block server's requests without letting a peer take its memory or its loop.

A tensor_wire message may decode to far more than it occupies (lz4 up to 256x), so the size
limit of the transport alone does not bound what one request makes the server allocate: a
16 MiB lz4 message of zeros is 4 GiB of float32. Three rules bound it:

1. Each message may decode to at most what the largest legal request needs
   (`request_limits`): a backward's hidden states, output gradients and deep prompts, each of
   at most `max(max_request_tokens, max_backward_tokens)` vectors, in float32, plus an int64
   mask. Anything larger is refused before any buffer is allocated.
2. A message whose records declare more than `INLINE_DECODE_BYTES` (read off their heads,
   nothing decompressed: `tensor_wire.decoded_size`) is decoded on a thread, so the event loop
   keeps answering pings, the DHT and other sessions' steps meanwhile. A decode step (a few
   KiB) stays inline.
3. Such large requests hold one of `MAX_LARGE_REQUESTS` slots from before decoding until
   they are answered: the rest wait in the transport, as bytes, so requests queued for the
   single worker thread never hold more than that many decoded tensors at once.
4. A request that has arrived whole holds its bytes (the message, plus what it declares it
   decodes to) until it is answered, while it waits for a slot or for the worker thread:
   at most `max_waiting_bytes_per_peer` per peer (a peer holding none may always send one
   request, however large) and `max_waiting_bytes` over all peers, shared fairly as the
   transport's budgets are (overlay/mux/budget.py). Beyond, the request is refused with
   `overloaded` (the client tries another server). Without this rule a peer could make a
   server hold a 256 MiB message on each of its streams, 1024 of them per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import tensor_wire
from blocks import protocol
from overlay.host import RemoteError
from overlay.mux.budget import PartialBudget
from tensor_wire.limits import Limits

INLINE_DECODE_BYTES = 4 << 20  # a few ms of decoding at ~1 GB/s
MAX_LARGE_REQUESTS = 4  # decoded large requests alive at once (one computing, the rest queued)
FLOAT32_BYTES = 4
MASK_BYTES = 8  # int64, as transformers takes masks
# Ours (rule 4): a client's concurrent chunks of one large pass (8192 tokens of a 8192-wide
# model in float32: 256 MiB a chunk, counted twice) fit several at once.
MAX_WAITING_BYTES_PER_PEER = 2 << 30
MAX_WAITING_BYTES = 8 << 30


def request_limits(hidden_size: int, max_tokens: int) -> Limits:
    """What one legal request may decode to (rule 1 above)."""
    return Limits(max_decoded_bytes=max_tokens * (3 * hidden_size * FLOAT32_BYTES + MASK_BYTES))


def decode(payload: Any, limits: Limits) -> tensor_wire.Message:
    """Decode now; a malformed or oversized message is the caller's `bad_input`."""
    try:
        return tensor_wire.decode_message(payload, limits=limits)
    except tensor_wire.WireError as e:
        raise RemoteError(protocol.BAD_INPUT, f"malformed tensor message: {e}") from None


def decoded_size(payload: Any) -> int | None:
    """What the message's tensors decode to (`tensor_wire.decoded_size`: its record heads
    parsed once per request and passed on), or None when it is malformed."""
    try:
        return tensor_wire.decoded_size(payload)
    except tensor_wire.WireError:
        return None


def is_large(payload: Any, size: int | None = -1) -> bool:
    """Whether the message's tensors would take more than INLINE_DECODE_BYTES (a malformed one
    is not: decoding it fails at once); `size`: its `decoded_size` if known."""
    if size == -1:
        size = decoded_size(payload)
    return size is not None and size > INLINE_DECODE_BYTES


async def decode_off_loop(payload: Any, limits: Limits,
                          size: int | None = -1) -> tensor_wire.Message:
    """`decode`, on a thread when the message is large (rule 2; no slot: for callers whose
    messages are bounded in number otherwise); `size` as `is_large`'s."""
    if not is_large(payload, size):
        return decode(payload, limits)
    return await asyncio.to_thread(decode, payload, limits)


class RequestDecoder:
    """Rules 2 and 3 for one server: `async with decoder.request(payload) as message:`, or on a
    hot path `decoder.small(payload)` first and `decoder.large(payload)` only if that is None
    (no context manager for the common small message)."""

    def __init__(self, limits: Limits, max_large: int = MAX_LARGE_REQUESTS,
                 max_waiting_bytes_per_peer: int = MAX_WAITING_BYTES_PER_PEER,
                 max_waiting_bytes: int = MAX_WAITING_BYTES):
        self.limits = limits
        self._large = asyncio.Semaphore(max_large)
        self.max_waiting_bytes_per_peer = max_waiting_bytes_per_peer
        self._waiting = PartialBudget(max_waiting_bytes)  # rule 4
        self._waiting_by_peer: dict[object, int] = {}

    def waiting_bytes(self, peer: object = None) -> int:
        """Bytes held by requests not yet answered: of `peer`, or of all peers (None)."""
        return self._waiting.held if peer is None else self._waiting_by_peer.get(peer, 0)

    @contextlib.contextmanager
    def held(self, payload: Any, peer: object, limits: Limits | None = None):
        """Rule 4: count the request's bytes while it is served, or refuse it now. (What it
        declares beyond `limits` is not counted: decoding refuses it at once, `bad_input`.)
        Yields the message's `decoded_size`, for `small` and `decode_off_loop`."""
        limits = self.limits if limits is None else limits
        decoded = decoded_size(payload)
        size = len(payload)
        if decoded is not None:
            size += min(decoded, limits.max_decoded_bytes)
        held = self._waiting_by_peer.get(peer, 0)
        if held and held + size > self.max_waiting_bytes_per_peer:
            raise RemoteError(protocol.OVERLOADED, f"{held} bytes of your requests wait here "
                                                   f"already: send more once they are answered")
        if not self._waiting.try_take(held, size):
            raise RemoteError(protocol.OVERLOADED, "this server holds as many waiting "
                                                   "requests as it takes: try another")
        self._waiting_by_peer[peer] = held + size
        try:
            yield decoded
        finally:
            held = self._waiting_by_peer.pop(peer)
            self._waiting.give(held, size)
            if held > size:
                self._waiting_by_peer[peer] = held - size

    def small(self, payload: Any, limits: Limits | None = None,
              size: int | None = -1) -> tensor_wire.Message | None:
        """The message decoded now, or None when it is large (`size` as `is_large`'s)."""
        if is_large(payload, size):
            return None
        return decode(payload, self.limits if limits is None else limits)

    @contextlib.asynccontextmanager
    async def large(self, payload: Any, limits: Limits | None = None
                    ) -> AsyncIterator[tensor_wire.Message]:
        """Decoded on a thread, holding a slot until the block exits."""
        async with self._large:
            yield await asyncio.to_thread(decode, payload,
                                          self.limits if limits is None else limits)

    @contextlib.asynccontextmanager
    async def request(self, payload: Any, limits: Limits | None = None, peer: object = None
                      ) -> AsyncIterator[tensor_wire.Message]:
        """The request of `peer` decoded, its bytes counted until the block exits (rule 4:
        `overloaded` when there is no room for them)."""
        with self.held(payload, peer, limits) as size:
            message = self.small(payload, limits, size)
            if message is not None:
                yield message
                return
            async with self.large(payload, limits) as message:
                yield message


__all__ = ["RequestDecoder", "decode", "decode_off_loop", "request_limits"]
