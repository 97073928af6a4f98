"""Streams as the asyncio application sees them: whole messages in, whole messages out.

A `Stream` belongs to one `Connection` (overlay/connection.py). Received fragments are joined
into messages; credit goes back to the sender only as the application reads, so a slow reader
holds at most one flow-control window plus the message being received (bounded by the
connection's max_message_size).

Bulk data is not joined: a message that starts on a stream whose previous message had several
fragments gets a buffer of that size at its first fragment, and the connection decrypts the
records that follow straight into it (`_place`). `recv_buffer()` hands that buffer over as is
(`recv()` copies it into bytes). Such buffers are at most PREALLOCATE_LIMIT bytes, and count
against the connection's budget of unfinished messages as soon as they are taken (a peer
that sent one large message on each stream, then one byte of the next, made us allocate the
whole of each next one while that budget counted one byte: `Connection.reserve`); a stream
holds the one of the message arriving and keeps the last two it handed over, to reuse one
once the application has released its message (dropped when messages of another kind come,
and when the stream ends; kept only within the room the connection's and host's budgets of
unfinished messages leave, `Connection.keep_spare`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from overlay.mux import MuxError
from overlay.mux.frames import HEADER_SIZE

if TYPE_CHECKING:
    from overlay.connection import Connection

# A sender waits once this much of its data is queued and not yet written to the socket.
SEND_HIGH_WATER = 1 << 20
# A message buffer sized from the previous message is taken only up to this size; larger
# messages are joined from their fragments (what a peer can make us allocate before sending
# is bounded by this, per stream, and only after it sent a message of that size).
PREALLOCATE_LIMIT = 16 << 20


def byte_views(parts) -> tuple:
    """`parts` as buffers whose len() is their size in bytes (what Connection.mux_send_parts
    takes): bytes as they are, anything else as a flat memoryview of bytes (no copy)."""
    return tuple(p if type(p) is bytes else memoryview(p).cast("B") for p in parts)


def _released(buf) -> bool:
    """No view of `buf` is alive (no memoryview, no tensor or array made from one): nobody
    can read it any more. CPython refuses to resize a bytearray while a buffer of it is
    exported; shrinking by one byte and growing back never reallocates."""
    try:
        buf.pop()
    except BufferError:
        return False
    buf.append(0)
    return True


class _FirstMessageBound:
    """State of Stream.bound_first_message: the head seen so far, then the limit; `then`:
    the limit of every message after this one (Stream.bound_messages), None: no bound after
    this message."""

    __slots__ = ("decide", "head", "head_bytes", "limit", "reason", "then")

    def __init__(self, decide: Callable[[bytes], tuple[int, str] | None] | None,
                 head_bytes: int):
        self.decide = decide
        self.head_bytes = head_bytes
        self.head = b""
        self.limit: int | None = None
        self.reason = ""
        self.then: tuple[int, str] | None = None


class ConnectionLost(ConnectionError):
    """The peer vanished, could not be reached, or the connection was closed."""


class StreamClosed(Exception):
    """Send on a stream that is closed for sending, or was reset."""


class Stream:
    """One multiplexed stream: `send` and `recv` whole messages; `close` half-closes."""

    __slots__ = (
        "_acked_partial",
        "_asm",
        "_bound",
        "_conn",
        "_ended",
        "_error",
        "_filled",
        "_gone_waiters",
        "_last_size",
        "_messages",
        "_partial",
        "_partial_size",
        "_placed",
        "_recv_waiter",
        "_saved",
        "_saved_at",
        "_send_closed",
        "_send_waiter",
        "_spare",
        "stream_id",
    )

    def __init__(self, conn: Connection, stream_id: int):
        self._conn = conn
        self.stream_id = stream_id
        # (message, bytes not yet acked); a message is bytes, a view of its own buffer
        # (assembled in place) or a list of fragments (joined by whichever recv takes it)
        self._messages: deque[tuple] = deque()
        self._partial: list = []
        # The message being assembled in place: HEADER_SIZE bytes of headroom (where the frame
        # header of a record decrypted in place lands), then the message's bytes.
        self._asm: memoryview | None = None
        self._filled = 0  # message bytes in _asm
        self._last_size = 0  # size of the previous message of several fragments
        self._placed: memoryview | None = None  # payload of the record decrypted in place
        self._saved = b""  # the bytes under that record's header, and where
        self._saved_at = 0
        # The buffers of the last two messages assembled in place: one is reused for a new
        # message if the application has let go of its message by then (no view alive).
        self._spare: list[bytearray] = []
        self._partial_size = 0
        self._acked_partial = 0
        self._ended = False
        self._error: BaseException | None = None
        self._recv_waiter: asyncio.Future | None = None
        self._send_waiter: asyncio.Future | None = None
        self._send_closed = False
        self._gone_waiters: list[asyncio.Future] | None = None
        self._bound: _FirstMessageBound | None = None

    @property
    def peer(self):
        return self._conn.remote_peer

    @property
    def connection(self) -> Connection:
        return self._conn

    # ------------------------------------------------------------------ receiving
    async def recv(self) -> bytes | None:
        """The next message, or None once the peer has half-closed the stream."""
        message = await self._next_message()
        if message is None or type(message) is bytes:
            return message
        return b"".join(message) if type(message) is list else bytes(message)

    async def recv_buffer(self) -> memoryview | None:
        """The next message as a writable memoryview of bytes that the caller owns, or None
        once the peer has half-closed the stream. Bulk messages are handed over in the buffer
        they were decrypted into (no join, no copy); others are copied into one. `release()`
        the view when done with it: its buffer may then serve a later message of about the
        same size (instead of a fresh, zero-filled one)."""
        message = await self._next_message()
        if message is None or type(message) is memoryview:
            return message
        return memoryview(bytearray().join(message) if type(message) is list
                          else bytearray(message))

    async def _next_message(self):
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

    def bound_first_message(self, decide: Callable[[bytes], tuple[int | None, str] | None],
                            head_bytes: int) -> None:
        """Call `decide(head)` with the first bytes of the first message as they arrive
        (`head_bytes` at most) until it answers (limit, reason); the stream is then reset with
        `reason` as soon as that message exceeds `limit` bytes, before the rest of it is
        read (the host's per-method request limit). A limit of None: no bound, and the
        message's later fragments are not looked at. Set before any data came."""
        self._bound = _FirstMessageBound(decide, head_bytes)

    def bound_messages(self, limit: int, reason: str,
                       first: tuple[int, str] | None = None) -> None:
        """Reset the stream with `reason` as soon as a message from now on exceeds `limit`
        bytes, before the rest of it is read (a protocol whose messages have a documented
        size). Set between messages, once any first-message bound is over. `first`: the
        (limit, reason) of the message now arriving or next to arrive, unless one is already
        in but unread (a small request before bulk messages, set before the request is read:
        the bulk data the peer sends right behind it is judged by its own limit, whether the
        request was in already or not)."""
        bound = self._bound = _FirstMessageBound(None, 0)
        bound.limit, bound.reason = bound.then = (limit, reason)
        if first is not None and not self._messages:
            bound.limit, bound.reason = first

    def _over_bound(self, data, end: bool) -> bool:
        """Whether `data` takes the first message over its bound: the stream is then reset."""
        bound = self._bound
        if bound.limit is None:
            if len(bound.head) < bound.head_bytes:
                bound.head += bytes(data[:bound.head_bytes - len(bound.head)])
            decided = bound.decide(bound.head)
            if decided is None:
                if end:
                    self._bound = None
                return False
            limit, bound.reason = decided
            if limit is None:  # no bound, nor one after it (`then` is None with a `decide`)
                self._bound = None
                return False
            bound.limit = limit
        if self._partial_size + len(data) > bound.limit:
            self._bound = None
            self.reset(bound.reason)
            return True
        if end:
            if bound.then is None:
                self._bound = None
            else:
                bound.limit, bound.reason = bound.then
        return False

    def _on_data(self, data, end: bool) -> None:
        if self._bound is not None and self._over_bound(data, end):
            return
        size = len(data)
        asm = self._asm
        if asm is not None:
            filled = self._filled
            if data is self._placed:  # the connection decrypted it where it belongs
                self._placed = None
                self._filled = filled + size
            elif filled + size <= len(asm) - HEADER_SIZE:
                start = HEADER_SIZE + filled
                asm[start:start + size] = data
                self._filled = filled + size
            else:  # larger than the buffer: the rest is joined from fragments
                self._partial = [asm[HEADER_SIZE:HEADER_SIZE + filled], data]
                self._drop_assembly()
        elif (not end and not self._partial and size < self._last_size <= PREALLOCATE_LIMIT
              and self._error is None and self._conn.reserve(self.stream_id, self._last_size)):
            # Likely a message as large as the previous one: assemble it in place.
            need = HEADER_SIZE + self._last_size
            for buf in self._spare:
                if need <= len(buf) < 2 * need and _released(buf):
                    self._spare.remove(buf)
                    self._conn.drop_spare(len(buf))
                    break
            else:
                buf = bytearray(need)
            asm = self._asm = memoryview(buf)
            asm[HEADER_SIZE:HEADER_SIZE + size] = data
            self._filled = size
            self._conn.assembling(self)
        else:
            self._partial.append(data)
        self._partial_size += size
        if not end:
            if not self._messages:
                self._conn.acknowledge(self.stream_id, size)
                self._acked_partial += size
            return
        if asm is not None and self._asm is not None:
            filled = self._filled
            message = asm[HEADER_SIZE:HEADER_SIZE + filled]
            if 2 * filled < len(asm):  # much smaller than its buffer: do not pin the rest
                message = memoryview(bytearray(message))
            spare = self._spare
            if len(spare) == 2:
                self._conn.drop_spare(len(spare.pop(0)))
            if self._conn.keep_spare(len(asm.obj)):
                spare.append(asm.obj)
            self._drop_assembly()
        else:
            if self._spare:  # (messages of other sizes now)
                self._drop_spares()
            parts = self._partial
            message = bytes(parts[0]) if len(parts) == 1 else parts
            self._partial = []
        if type(message) is not bytes:
            self._last_size = self._partial_size
        self._messages.append((message, self._partial_size - self._acked_partial))
        self._partial_size = self._acked_partial = 0
        self._wake_reader()

    def _drop_assembly(self) -> None:
        self._asm = self._placed = None
        self._filled = 0
        self._conn.not_assembling(self)

    def _place(self, size: int) -> memoryview | None:
        """Where the connection may decrypt a record of `size` plaintext bytes that should be
        this message's next frame: its header lands on the HEADER_SIZE bytes before the
        message's end (saved here, put back by `_unplace`), its payload right after them.
        None when it would not fit."""
        asm = self._asm
        filled = self._filled
        if asm is None or filled + size > len(asm):
            return None
        self._saved = bytes(asm[filled:filled + HEADER_SIZE])
        self._saved_at = filled
        return asm[filled:filled + size]

    def _unplace(self) -> None:
        """Put back the bytes the last placed record's header covered."""
        asm = self._asm
        if asm is not None:
            at = self._saved_at
            asm[at:at + HEADER_SIZE] = self._saved

    def _on_last(self, data) -> None:
        """The last fragment of a message, and the end of the stream (mux LastMessage)."""
        self._on_data(data, True)
        self._on_end()

    def _on_end(self) -> None:
        self._ended = True
        if self._spare:
            self._drop_spares()
        self._wake_reader()
        self._wake_gone()
        self._maybe_release()

    def _drop_spares(self) -> None:
        for buf in self._spare:
            self._conn.drop_spare(len(buf))
        self._spare = []

    def _maybe_release(self) -> None:
        if self._ended and self._send_closed and not self._messages:
            self._conn.release_stream(self.stream_id)

    def _on_error(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._asm is not None:
            self._drop_assembly()
        # The message being received can never complete: drop its fragments now. The error
        # is raised in a frame of this stream, so its traceback makes a reference cycle that
        # only the cyclic GC breaks; until then a peer that cut off large messages kept them.
        self._partial = []
        self._partial_size = self._acked_partial = 0
        if self._spare:
            self._drop_spares()
        self._send_closed = True
        self._wake_reader()
        self._wake_sender()
        self._wake_gone()

    async def wait_peer_gone(self) -> None:
        """Return once the peer will send nothing more: it half-closed the stream, reset it,
        or the connection was lost. For a handler that waits on something else meanwhile (a
        server queueing a request for resources) and must not keep waiting for a caller
        that has left."""
        if self._ended or self._error is not None:
            return
        waiter = self._conn.loop.create_future()
        if self._gone_waiters is None:
            self._gone_waiters = []
        self._gone_waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._gone_waiters is not None and waiter in self._gone_waiters:
                self._gone_waiters.remove(waiter)

    def _wake_gone(self) -> None:
        waiters, self._gone_waiters = self._gone_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

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
        self.close_nowait()

    def close_nowait(self) -> None:
        """`close` from synchronous code (or cleanup that a second cancellation must not
        interrupt): the end of the stream is queued at once."""
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
