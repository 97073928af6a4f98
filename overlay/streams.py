"""Streams as the asyncio application sees them: whole messages in, whole messages out.

A `Stream` belongs to one `Connection` (overlay/connection.py). Received fragments are joined
into messages; credit goes back to the sender only as the application reads, so a slow reader
holds at most one flow-control window plus the message being received (bounded by the
connection's max_message_size).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from overlay.mux import MuxError

if TYPE_CHECKING:
    from overlay.connection import Connection

# A sender waits once this much of its data is queued and not yet written to the socket.
SEND_HIGH_WATER = 1 << 20


def byte_views(parts) -> tuple:
    """`parts` as buffers whose len() is their size in bytes (what Connection.mux_send_parts
    takes): bytes as they are, anything else as a flat memoryview of bytes (no copy)."""
    return tuple(p if type(p) is bytes else memoryview(p).cast("B") for p in parts)


class ConnectionLost(ConnectionError):
    """The peer vanished, could not be reached, or the connection was closed."""


class StreamClosed(Exception):
    """Send on a stream that is closed for sending, or was reset."""


class Stream:
    """One multiplexed stream: `send` and `recv` whole messages; `close` half-closes."""

    __slots__ = (
        "_acked_partial",
        "_conn",
        "_ended",
        "_error",
        "_messages",
        "_partial",
        "_partial_size",
        "_recv_waiter",
        "_send_closed",
        "_send_waiter",
        "stream_id",
    )

    def __init__(self, conn: Connection, stream_id: int):
        self._conn = conn
        self.stream_id = stream_id
        self._messages: deque[tuple[bytes, int]] = deque()  # (message, bytes not yet acked)
        self._partial: list = []
        self._partial_size = 0
        self._acked_partial = 0
        self._ended = False
        self._error: BaseException | None = None
        self._recv_waiter: asyncio.Future | None = None
        self._send_waiter: asyncio.Future | None = None
        self._send_closed = False

    @property
    def peer(self):
        return self._conn.remote_peer

    @property
    def connection(self) -> Connection:
        return self._conn

    # ------------------------------------------------------------------ receiving
    async def recv(self) -> bytes | None:
        """The next message, or None once the peer has half-closed the stream."""
        while not self._messages:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._recv_waiter = self._conn.loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None
        message, unacked = self._messages.popleft()
        self._return_credit(unacked)
        self._maybe_release()
        return message

    def _return_credit(self, unacked: int) -> None:
        if self._messages or not self._partial_size:
            credit = unacked
        else:
            # The next message is in progress and nothing complete is waiting: let it flow.
            credit = unacked + self._partial_size - self._acked_partial
            self._acked_partial = self._partial_size
        if credit:
            self._conn.acknowledge(self.stream_id, credit)

    def _on_data(self, data, end: bool) -> None:
        size = len(data)
        self._partial.append(data)
        self._partial_size += size
        if not end:
            if not self._messages:
                self._conn.acknowledge(self.stream_id, size)
                self._acked_partial += size
            return
        parts = self._partial
        message = bytes(parts[0]) if len(parts) == 1 else b"".join(parts)
        self._messages.append((message, self._partial_size - self._acked_partial))
        self._partial = []
        self._partial_size = self._acked_partial = 0
        self._wake_reader()

    def _on_last(self, data) -> None:
        """The last fragment of a message, and the end of the stream (mux LastMessage)."""
        self._on_data(data, True)
        self._on_end()

    def _on_end(self) -> None:
        self._ended = True
        self._wake_reader()
        self._maybe_release()

    def _maybe_release(self) -> None:
        if self._ended and self._send_closed and not self._messages:
            self._conn.release_stream(self.stream_id)

    def _on_error(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._send_closed = True
        self._wake_reader()
        self._wake_sender()

    def _wake_reader(self) -> None:
        waiter = self._recv_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ sending
    async def send(self, data: bytes | memoryview, *, end_stream: bool = False) -> None:
        """Send one message. The buffer must not change until the call returns."""
        self.send_nowait(data, end_stream=end_stream)
        await self.drain()

    def send_nowait(self, data: bytes | memoryview, *, end_stream: bool = False,
                    flush: bool = True) -> None:
        """Queue one message without waiting. `flush=False` lets the next message share its
        record and its system call."""
        self.send_parts((data,), end_stream=end_stream, flush=flush)

    def send_parts(self, parts, *, end_stream: bool = False, flush: bool = True) -> None:
        """Queue one message made of several buffers, without joining them (no copy)."""
        if self._error is not None:
            raise StreamClosed(f"stream was reset: {self._error}")
        if self._send_closed:
            raise StreamClosed("stream is closed for sending")
        if len(parts) != 1 or type(parts[0]) is not bytes:
            parts = byte_views(parts)
        try:
            self._conn.mux_send_parts(self.stream_id, parts, end_stream, flush)
        except MuxError as e:
            raise StreamClosed(str(e)) from None
        if end_stream:
            self._send_closed = True
            self._maybe_release()

    async def drain(self) -> None:
        """Wait until the data queued on this stream falls under the high-water mark."""
        while self._conn.queued_bytes(self.stream_id) > SEND_HIGH_WATER:
            if self._error is not None:
                raise self._error
            self._send_waiter = self._conn.loop.create_future()
            self._conn.want_drain(self)
            try:
                await self._send_waiter
            finally:
                self._send_waiter = None

    def _wake_sender(self) -> None:
        waiter = self._send_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close(self) -> None:
        """Half-close: tell the peer we will send nothing more."""
        if not self._send_closed and self._error is None:
            self._send_closed = True
            self._conn.end_stream(self.stream_id)
            self._maybe_release()

    def expire(self, error: BaseException) -> None:
        """The caller's deadline passed: abort the stream and fail its waiters with `error`."""
        if self._error is None:
            self._conn.reset_stream(self.stream_id, "deadline_exceeded: the caller gave up")
            self._on_error(error)

    def reset(self, reason: str = "") -> None:
        """Abort the stream in both directions."""
        if self._error is None:
            self._conn.reset_stream(self.stream_id, reason)
            self._on_error(StreamClosed(f"stream reset locally: {reason}"))
