"""The caller's half of a unary RPC on a connection: one request out, one answer back.

A `Stream` (overlay/streams.py) is a general message queue with flow-control bookkeeping and
a waiter per message; a unary call needs none of that, and it runs on every DHT request. The
connection hands the answer of a `PendingCall` straight to a future. Same wire behaviour as a
stream: the request is one message with FIN, the answer one message (overlay/PROTOCOL.md, 4).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from overlay.streams import ConnectionLost

if TYPE_CHECKING:
    from overlay.connection import Connection


class PendingCall:
    """Receives the one answer message of a unary call into `future` (bytes; None when the
    peer half-closed without answering), or the error that ended the call."""

    __slots__ = ("_conn", "_held", "_max_answer", "_parts", "future", "stream_id")

    def __init__(self, conn: Connection, stream_id: int, future: asyncio.Future,
                 max_answer: int | None = None):
        self._conn = conn
        self.stream_id = stream_id
        self.future = future
        self._parts: list | None = None
        # The caller's bound on the answer (None: the connection's message limit). A DHT
        # answer is at most 1 MiB, but was held up to that limit (256 MiB) before its
        # decoder refused it: a peer asked anything could make its caller allocate that.
        self._max_answer = max_answer
        self._held = 0

    def _too_large(self, data) -> ConnectionLost | None:
        """The error ending the call once the answer passes `max_answer` (None: not yet);
        called only for a call that has one."""
        limit = self._max_answer
        self._held += len(data)
        if self._held <= limit:
            return None
        self._parts = None
        return ConnectionLost(f"the answer exceeds the {limit} bytes this call takes")

    # Called by the connection, like the same methods of Stream.
    def _on_data(self, data, end: bool) -> None:
        if self._max_answer is not None:  # (no call on the common, unbounded path)
            error = self._too_large(data)
            if error is not None:
                self.fail(str(error), error)
                return
        parts = self._parts
        if end and parts is None:
            answer = bytes(data)
        else:
            if parts is None:
                parts = self._parts = []
            parts.append(data)
            if not end:
                # We hold the fragments ourselves (bounded by the message size limit): give
                # the credit back at once, so a large answer flows.
                self._conn.acknowledge(self.stream_id, len(data))
                return
            answer = b"".join(parts)
            self._parts = None
        future = self.future
        if not future.done():
            future.set_result(answer)
        # The answer came without FIN (ours send it in the answer's last frame): nothing more
        # is wanted on this stream, and waiting for a FIN a hostile peer never sends kept it
        # open for good, until the connection's 1,024 streams were all taken.
        self._conn.reset_stream(self.stream_id, "answered: nothing more is read")

    def _on_last(self, data) -> None:
        """The answer's last fragment and the end of the stream (mux LastMessage)."""
        if self._max_answer is not None:
            error = self._too_large(data)
            if error is not None:  # (the stream has ended both ways: nothing to reset)
                self._on_error(error)
                self._conn.release_stream(self.stream_id)
                return
        parts = self._parts
        if parts is None:
            answer = data  # a view of the record's plaintext (immutable bytes): no copy here
        else:
            parts.append(data)
            answer = b"".join(parts)
            self._parts = None
        future = self.future
        if not future.done():
            future.set_result(answer)
        self._conn.release_stream(self.stream_id)

    def _on_end(self) -> None:
        future = self.future
        if not future.done():
            future.set_result(None)
        self._conn.release_stream(self.stream_id)

    def _on_error(self, error: BaseException) -> None:
        future = self.future
        if not future.done():
            future.set_exception(error)

    def fail(self, reason: str, error: BaseException) -> None:
        """Give up on the call (deadline or cancellation): reset the stream, fail the future."""
        self._conn.reset_stream(self.stream_id, reason)
        self._on_error(error)
