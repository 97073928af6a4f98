"""Streaming: a message as chunks of bounded size, and their reassembly with bounded memory.

Chunks are plain consecutive slices of the message bytes (FORMAT.md, "Streaming"), so a chunk
needs no header of its own and the transport's framing delimits them. `iter_chunks` slices the
encoded parts lazily: chunks that fall inside a tensor's payload are memoryviews of the tensor
itself (no copy); only chunks that straddle parts are joined.

`ChunkAssembler` is sans-IO: the caller feeds it what arrived and gets the message back when
the declared length is complete. It validates the message head (first 24 bytes) before it
reserves any buffer, refuses declarations above `Limits.max_message_bytes`, and never
accepts a byte past the declared total. The buffer is reserved with torch.empty, whose pages
the kernel only commits as chunks are written, so resident memory follows the bytes received.
The decoded tensors are views of that buffer (codec none), so no further copy is made.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from tensor_wire.codecs import Buffer
from tensor_wire.errors import WireError
from tensor_wire.layout import MESSAGE_HEAD
from tensor_wire.limits import DEFAULT_LIMITS, Limits
from tensor_wire.message import Message, check_head, decode_message, message_parts
from tensor_wire.record import Device, as_view

# 1 MiB: large enough that per-chunk costs (a transport message, a Python call) are noise next
# to the copy, small enough to interleave with other streams on one connection.
DEFAULT_MAX_CHUNK = 1 << 20


def split(parts: Iterable[Buffer], max_chunk: int) -> Iterator[Buffer]:
    """Regroup consecutive buffers into chunks of exactly max_chunk bytes (the last: fewer)."""
    if max_chunk <= 0:
        raise WireError(f"max_chunk must be positive, got {max_chunk}")
    pending: list[memoryview] = []
    size = 0
    for part in parts:
        view = memoryview(part)
        while len(view):
            piece = view[: max_chunk - size]
            view = view[len(piece) :]
            pending.append(piece)
            size += len(piece)
            if size == max_chunk:
                yield pending[0] if len(pending) == 1 else b"".join(pending)
                pending, size = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else b"".join(pending)


def iter_chunks(
    tensors: Sequence[torch.Tensor],
    meta: Mapping[str, Any] | None = None,
    compression: str | Sequence[str] = "none",
    max_chunk: int = DEFAULT_MAX_CHUNK,
) -> Iterator[Buffer]:
    """Chunks (bytes-like, at most max_chunk bytes) whose concatenation is encode_message(...).

    Chunks may alias the tensors: send each before changing the tensors in place.
    """
    if max_chunk <= 0:
        raise WireError(f"max_chunk must be positive, got {max_chunk}")
    return split(message_parts(tensors, meta, compression), max_chunk)


class ChunkAssembler:
    """Rebuilds one message from its chunks, in order; `feed` returns it once complete."""

    def __init__(self, device: Device = None, limits: Limits = DEFAULT_LIMITS):
        self._device = device
        self._limits = limits
        self._head = bytearray()
        self._buffer: memoryview | None = None
        self._total: int | None = None
        self._received = 0
        self._closed = False

    @property
    def expected(self) -> int | None:
        """Total bytes the message declared (None until its head has arrived)."""
        return self._total

    @property
    def received(self) -> int:
        return self._received

    @property
    def done(self) -> bool:
        """True once the message was returned or a WireError was raised."""
        return self._closed

    def feed(self, chunk: Buffer) -> Message | None:
        """Take the next chunk; returns the decoded message when the last byte arrives."""
        if self._closed:
            raise WireError("this assembler has already finished its message")
        try:
            return self._feed(as_view(chunk))
        except WireError:
            self._close()
            raise

    def _feed(self, view: memoryview) -> Message | None:
        if self._buffer is None:
            needed = MESSAGE_HEAD.size - len(self._head)
            self._head += view[:needed]
            view = view[needed:]
            if len(self._head) < MESSAGE_HEAD.size:
                return None
            _, _, total = check_head(self._head, self._limits.max_message_bytes)
            storage = torch.empty(total, dtype=torch.uint8)  # pages commit on first write
            self._buffer = memoryview(storage.numpy())
            self._buffer[: MESSAGE_HEAD.size] = self._head
            self._total, self._received = total, MESSAGE_HEAD.size
        assert self._total is not None
        if len(view) > self._total - self._received:
            raise WireError(f"chunks exceed the declared {self._total} bytes")
        self._buffer[self._received : self._received + len(view)] = view
        self._received += len(view)
        if self._received < self._total:
            return None
        buffer = self._buffer
        self._close()
        return decode_message(buffer, self._device, self._limits)

    def _close(self) -> None:
        self._closed = True
        self._buffer = None
        self._head = bytearray()
