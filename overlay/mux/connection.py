"""The multiplexer's state machine: many message-oriented streams over one byte stream.

Rules of this module (sans-IO, like h11 and aioquic):
1. No I/O, no clock, no asyncio: bytes come in through `receive_data`, bytes to write come out
   of `data_to_send`, and what happened comes out of `next_event`.
2. A peer can cost us at most: its frames are bounded by MAX_FRAME_PAYLOAD, its streams by
   `max_streams`, the unread bytes of each stream by the flow-control window, each message
   by `max_message_size`, the fragments of its unfinished messages (credit comes back for
   them, so windows do not bound them) by `max_partial_bytes` and, across the connections of
   a host, by a shared PartialBudget (overlay/mux/budget.py), and the answers it solicits
   (PING acks, refusals of streams over the limit, resets) and does not read by
   MAX_QUEUED_CONTROL.
   A violation of the protocol ends the connection (GO_AWAY), never anything else; an
   oversized message, a fragment over the budget of unfinished messages or a stream over the
   limit resets only that stream.
3. Fairness: `data_to_send` takes one frame per ready stream in turn, so a large transfer cannot
   starve small requests on the same connection.
The frame format is documented in overlay/PROTOCOL.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from overlay.mux.budget import PartialBudget
from overlay.mux.events import (
    ConnectionTerminated,
    DataReceived,
    LastMessage,
    OneShotStream,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from overlay.mux.frames import (
    ACK,
    ALLOWED_FLAGS,
    DATA,
    END,
    FIN,
    GO_AWAY,
    HEADER,
    HEADER_SIZE,
    PING,
    RESET,
    SYN,
    WINDOW_UPDATE,
    GoAwayCode,
)

# A frame and the Noise record it travels in: 65535 bytes of ciphertext minus the 16-byte tag.
MAX_RECORD_PLAINTEXT = 65535 - 16
MAX_FRAME_PAYLOAD = MAX_RECORD_PLAINTEXT - HEADER_SIZE
# Every stream starts with this much credit in each direction (protocol version 1); a receiver
# may grant more with WINDOW_UPDATE.
INITIAL_WINDOW = 1 << 20
MAX_WINDOW = (1 << 31) - 1
MAX_RESET_REASON = 1024
# Control frames waiting to be written. A peer that sends PINGs (or SYNs over the stream
# limit) and never reads what they answer would otherwise grow the queue without bound, some
# 60 bytes of memory per 10-byte frame it sends; an honest peer reads them and keeps a handful
# queued at most. Beyond the bound, soliciting more is a protocol error.
MAX_QUEUED_CONTROL = 4096
PROTOCOL_ERROR = int(GoAwayCode.PROTOCOL_ERROR)
_END_FIN = END | FIN
_WHOLE_STREAM = SYN | END | FIN
_HAS_PAYLOAD = (DATA, RESET)
_DATA_FLAGS = ALLOWED_FLAGS[DATA]


class MuxError(Exception):
    """A local misuse of the multiplexer (a stream that is closed, the stream limit reached)."""


@dataclass(frozen=True, slots=True)
class MuxConfig:
    max_streams: int = 1024  # streams the peer may have open at once
    max_message_size: int = 256 << 20
    # Credit is returned in WINDOW_UPDATE batches of this fraction of the window: fewer frames
    # than acknowledging every read, while the sender never stalls on a full window.
    window_update_fraction: int = 4
    # A stream whose application keeps reading has its receive window doubled at each
    # WINDOW_UPDATE up to this size, so that a bulk transfer between two busy processes
    # never waits a round trip per window (1 MiB is under a millisecond of data on loopback).
    # Credit only grows as the application consumes, so a reader that stops reading holds at
    # most its current window.
    max_stream_window: int = 4 << 20
    # The sum over a connection's streams of what their windows grew beyond INITIAL_WINDOW:
    # bounds what one peer can make us buffer (max_streams x 1 MiB + this).
    max_window_growth: int = 64 << 20
    # Fragments of unfinished messages this side holds for the peer, summed over streams. A
    # fragment that would take the sum beyond it resets its stream (`too_large`) instead of
    # waiting for credit: withheld credit would deadlock streams that each hold part of the
    # budget and each wait for more to finish. Four of the largest messages: an honest peer
    # sends a handful of large requests at once (training chunks, pushes of long prompts).
    max_partial_bytes: int = 1 << 30


class _Stream:
    __slots__ = (
        "charged",
        "fin_queued",
        "fin_received",
        "fin_sent",
        "message_bytes",
        "queue",
        "queued_bytes",
        "recv_credit",
        "recv_window",
        "remote",
        "send_window",
        "stream_id",
        "syn_pending",
        "unacked",
    )

    def __init__(self, stream_id: int, local: bool):
        self.stream_id = stream_id
        self.send_window = INITIAL_WINDOW
        self.recv_credit = INITIAL_WINDOW
        self.recv_window = INITIAL_WINDOW
        self.unacked = 0
        self.queue: deque[list] = deque()  # [buffer, bytes already sent, end_of_message, fin]
        self.queued_bytes = 0
        self.syn_pending = local
        self.remote = not local  # the peer opened it: what we send on it answers the peer
        self.fin_queued = False
        self.fin_sent = False
        self.fin_received = False
        self.message_bytes = 0
        # What the unfinished message counts against the budgets: its fragments so far, or
        # more when the driver reserved a buffer for all of it (`reserve`).
        self.charged = 0


class MuxConnection:
    """One side of a multiplexed connection. `initiator` is the side that dialed."""

    def __init__(self, initiator: bool, config: MuxConfig | None = None,
                 budget: PartialBudget | None = None,
                 unsent_budget: PartialBudget | None = None,
                 stream_budget: PartialBudget | None = None):
        """`budget` (unfinished messages received), `unsent_budget` (bytes queued by `send`
        and not yet framed) and `stream_budget` (streams the peer opened): shared with the
        host's other connections (overlay/mux/budget.py). The multiplexer only counts what it
        queues; the driver decides what to do about a peer that does not read
        (`unsent_bytes`). A SYN beyond the stream budget is refused like one over
        max_streams: a host otherwise held up to max_streams x its connections (a million
        streams at the defaults, some 5 KiB and a task each)."""
        self.config = config or MuxConfig()
        self._budget = budget
        self._unsent_budget = unsent_budget
        self._stream_budget = stream_budget
        self._unsent = 0  # bytes given to `send` on streams the peer opened, not yet framed
        self._partial = 0  # bytes of unfinished messages held, over this connection's streams
        self._spares = 0  # bytes of spare buffers its streams keep (`keep_spare`)
        self._initiator = initiator
        self._own_parity = 1 if initiator else 0  # of the ids of the streams we open
        # Read on every frame: plain attributes, not config lookups.
        self._max_streams = self.config.max_streams
        self._max_message_size = self.config.max_message_size
        self._streams: dict[int, _Stream] = {}
        self._next_local_id = 1 if initiator else 2
        self._last_remote_id = 0
        self._remote_open = 0
        self._local_open = 0
        self._ready: deque[int] = deque()  # streams with data (or a FIN) they may send now
        self._control: deque[bytes] = deque()
        # What happened, oldest first: `next_event` pops it; a driver may also pop straight
        # from this deque (one method call less per event on the hot path).
        self.events: deque = deque()
        self._inbuf = bytearray()
        # Bytes the frame pending in _inbuf needs in all: input is only parsed again once
        # they are there, so a frame trickling in a byte per record costs linear time (the
        # whole pending frame was re-copied for every byte: about 10 us a byte, 0.7 s of
        # CPU for one frame of 64 KiB that cost its sender 1.2 MB of records).
        self._inbuf_need = 0
        self._closed = False  # no more input is processed
        self._going_away = False  # no new streams
        self._window_growth = 0  # sum of (recv_window - INITIAL_WINDOW) over open streams

    # ------------------------------------------------------------------ inspection
    @property
    def is_closed(self) -> bool:
        return self._closed

    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def queued_bytes(self, stream_id: int) -> int:
        """Bytes accepted by `send` for this stream that are not yet in `data_to_send` output."""
        stream = self._streams.get(stream_id)
        return stream.queued_bytes if stream is not None else 0

    @property
    def partial_bytes(self) -> int:
        """Bytes of the peer's unfinished messages this side holds (max_partial_bytes)."""
        return self._partial

    @property
    def unsent_bytes(self) -> int:
        """Bytes given to `send` on streams the peer opened (our answers to it) that are not
        yet in `data_to_send` output. What we send on our own streams (requests, uploads)
        does not count: the peer did not ask for it."""
        return self._unsent

    def release_budget(self) -> None:
        """The driver dropped this connection: what it held leaves the shared budgets, and
        this connection counts against them no more."""
        if self._budget is not None and self._partial:
            self._budget.give(self._partial, self._partial)
        self._partial = 0
        if self._budget is not None:
            self._budget.spares -= self._spares
        self._unqueued(self._unsent)
        if self._stream_budget is not None and self._remote_open:
            self._stream_budget.give(self._remote_open, self._remote_open)
        self._budget = self._unsent_budget = self._stream_budget = None
        for stream in self._streams.values():
            stream.charged = stream.queued_bytes = 0

    def has_data_to_send(self) -> bool:
        return bool(self._control or self._ready)

    def next_event(self):
        return self.events.popleft() if self.events else None

    # ------------------------------------------------------------------ local actions
    def open_stream(self) -> int:
        if self._closed or self._going_away:
            raise MuxError("connection is closing")
        if self._local_open >= self.config.max_streams:
            raise MuxError(f"too many open streams ({self.config.max_streams})")
        stream_id = self._next_local_id
        if stream_id > 0xFFFFFFFF:
            raise MuxError("stream ids exhausted on this connection")
        self._next_local_id += 2
        self._streams[stream_id] = _Stream(stream_id, local=True)
        self._local_open += 1
        return stream_id

    def send(self, stream_id: int, data: bytes | memoryview, *, end: bool = True,
             fin: bool = False) -> None:
        """Queue `data` on a stream; `end` closes the message, `fin` the sending half."""
        stream = self._streams.get(stream_id)
        if stream is None or self._closed:
            raise MuxError(f"stream {stream_id} is not open")
        if stream.fin_queued:
            raise MuxError(f"stream {stream_id} was already closed for sending")
        view = memoryview(data).cast("B")
        was_idle = not stream.queue
        stream.queue.append([view, 0, end, fin])
        stream.queued_bytes += len(view)
        if stream.remote:
            if self._unsent_budget is not None:
                self._unsent_budget.take(self._unsent, len(view))
            self._unsent += len(view)
        stream.fin_queued = fin
        if was_idle and (stream.send_window > 0 or len(view) == 0):
            self._ready.append(stream_id)

    def frame_message(self, stream_id: int, parts, out: bytearray, *, fin: bool) -> bool:
        """Append one whole message (`parts`: buffers of bytes, whose len() is their size:
        bytes, bytearray, memoryviews of format "B"; as ONE DATA frame) to `out` when
        it may go now: the stream is open for sending with nothing queued ahead of it, and
        the message fits the stream's send window and, with what `out` holds already, one
        record. Returns False, writing nothing, otherwise: then the caller `send`s it. The
        small-message path of the driver: no queue entry, and the payload is copied once,
        into `out` (which the driver seals as one record)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.queue or stream.fin_queued or self._closed:
            return False
        size = sum(map(len, parts))
        if size > stream.send_window or len(out) + HEADER_SIZE + size > MAX_RECORD_PLAINTEXT:
            return False
        flags = _END_FIN if fin else END
        if stream.syn_pending:
            flags |= SYN
            stream.syn_pending = False
        out += HEADER.pack(DATA, flags, stream_id, size)
        for part in parts:
            out += part
        stream.send_window -= size
        if fin:
            stream.fin_queued = stream.fin_sent = True
            if stream.fin_received:
                self._remove(stream)
        return True

    def end_stream(self, stream_id: int) -> None:
        """Half-close: a FIN with no data."""
        self.send(stream_id, b"", end=False, fin=True)

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """The driver took `nbytes` of this stream's data: return that credit to the sender."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.fin_received or self._closed:
            return
        stream.unacked += nbytes
        if stream.unacked >= stream.recv_window // self.config.window_update_fraction:
            self._grant(stream)

    def reset_stream(self, stream_id: int, reason: str = "") -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._remove(stream)
        if not self._closed:
            payload = reason.encode("utf-8", "replace")[:MAX_RESET_REASON]
            # Bounded as the answers a peer solicits are: a peer that sends requests a host
            # refuses (an unknown method, say) and reads nothing queued RESETs without end.
            self._solicited(HEADER.pack(RESET, 0, stream_id, len(payload)) + payload)

    def ping(self, opaque: int) -> None:
        self._control.append(HEADER.pack(PING, 0, 0, opaque & 0xFFFFFFFF))

    def close(self, code: int = GoAwayCode.NORMAL) -> None:
        """Queue GO_AWAY and refuse new streams. Open streams do not finish: the peer ends
        the connection at once when it reads GO_AWAY (PROTOCOL.md, 3), so call this only
        after the answers this side waits for."""
        if not self._going_away and not self._closed:
            self._going_away = True
            self._control.append(HEADER.pack(GO_AWAY, 0, 0, int(code)))

    # ------------------------------------------------------------------ output
    def data_to_send(self, max_bytes: int = MAX_RECORD_PLAINTEXT) -> bytes:
        """Up to `max_bytes` of frames (see `frames_into`), as bytes; b"" when nothing may be
        sent now. (The driver uses `frames_into`; this is for tests and simple drivers.)"""
        parts = []
        chunk = memoryview(bytearray(min(max_bytes, 1 << 20)))
        while max_bytes > HEADER_SIZE:
            size = self.frames_into(chunk[:max_bytes])
            if not size:
                break
            parts.append(bytes(chunk[:size]))
            max_bytes -= size
        return b"".join(parts)

    def frames_into(self, out: memoryview) -> int:
        """Write up to len(out) bytes of frames into `out`; returns the bytes written (0 when
        nothing may be sent now). Control frames go first, then one data frame per ready
        stream in turn. Each payload is copied once, from the buffer given to `send` straight
        to `out` (the driver encrypts from there), with no intermediate bytes object."""
        budget = len(out)
        pos = 0
        control = self._control
        while control and len(control[0]) <= budget - pos:
            frame = control.popleft()
            end = pos + len(frame)
            out[pos:end] = frame
            pos = end
        ready = self._ready
        streams = self._streams
        pack_into = HEADER.pack_into
        answered = 0  # payload bytes sent on streams the peer opened
        while ready and budget - pos > HEADER_SIZE:
            stream = streams.get(ready.popleft())
            if stream is None or not stream.queue:
                continue
            item = stream.queue[0]
            view, offset, end, fin = item
            left = len(view) - offset
            size = min(left, stream.send_window, MAX_FRAME_PAYLOAD, budget - pos - HEADER_SIZE)
            last = size == left
            flags = 0
            if stream.syn_pending:
                flags = SYN
                stream.syn_pending = False
            if last:
                stream.queue.popleft()
                if end:
                    flags |= END
                if fin:
                    flags |= FIN
            else:
                item[1] = offset + size
            pack_into(out, pos, DATA, flags, stream.stream_id, size)
            pos += HEADER_SIZE
            if size:
                out[pos:pos + size] = view[offset:offset + size]
                pos += size
                if stream.remote:
                    answered += size
            stream.send_window -= size
            stream.queued_bytes -= size
            if last and fin:
                stream.fin_sent = True
                if stream.fin_received:
                    self._remove(stream)
                continue
            if stream.queue and (stream.send_window > 0 or _empty(stream.queue[0])):
                ready.append(stream.stream_id)
        self._unqueued(answered)
        return pos

    def _unqueued(self, size: int) -> None:
        if size:
            if self._unsent_budget is not None:
                self._unsent_budget.give(self._unsent, size)
            self._unsent -= size

    # ------------------------------------------------------------------ input
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            return
        if not self._inbuf and type(data) is bytes and len(data) >= HEADER_SIZE:
            # The common case of small messages: the record holds exactly one DATA frame.
            frame_type, flags, stream_id, length = HEADER.unpack_from(data)
            if (frame_type == DATA and length == len(data) - HEADER_SIZE
                    and length <= MAX_FRAME_PAYLOAD and not flags & ~_DATA_FLAGS):
                self._on_data(flags, stream_id, memoryview(data)[HEADER_SIZE:])
                return
        if self._inbuf:
            self._inbuf += data
            if len(self._inbuf) < self._inbuf_need:
                return
            buf = bytes(self._inbuf)
            self._inbuf.clear()
        else:
            buf = data if isinstance(data, bytes) else bytes(data)
        view = memoryview(buf)
        total = len(view)
        pos = 0
        while total - pos >= HEADER_SIZE and not self._closed:
            frame_type, flags, stream_id, length = HEADER.unpack_from(view, pos)
            allowed = ALLOWED_FLAGS.get(frame_type)
            if allowed is None:
                return self._protocol_error(f"unknown frame type {frame_type}")
            if flags & ~allowed:
                return self._protocol_error(f"flags {flags:#x} not allowed on type {frame_type}")
            if frame_type in _HAS_PAYLOAD:
                if length > MAX_FRAME_PAYLOAD:
                    return self._protocol_error(f"frame payload of {length} bytes exceeds limit")
                if frame_type == RESET and length > MAX_RESET_REASON:
                    return self._protocol_error(f"reset reason of {length} bytes exceeds "
                                                f"{MAX_RESET_REASON}")
                if total - pos < HEADER_SIZE + length:
                    break
                payload = view[pos + HEADER_SIZE: pos + HEADER_SIZE + length]
                pos += HEADER_SIZE + length
            else:
                payload = None
                pos += HEADER_SIZE
            if frame_type == DATA:
                self._on_data(flags, stream_id, payload)
            elif frame_type == WINDOW_UPDATE:
                self._on_window_update(stream_id, length)
            elif frame_type == PING:
                self._on_ping(flags, length)
            elif frame_type == GO_AWAY:
                self._closed = True
                reason = f"peer closed the connection (code {length})"
                self.events.append(ConnectionTerminated(reason, True, length))
            else:
                self._on_reset(stream_id, payload)
        if pos < total and not self._closed:
            self._inbuf += view[pos:]
            # Only a frame with a payload stops the loop once its header is in.
            self._inbuf_need = HEADER_SIZE + length if total - pos >= HEADER_SIZE else HEADER_SIZE

    @property
    def frame_pending(self) -> bool:
        """Input ended inside a frame: the next bytes received continue it."""
        return bool(self._inbuf)

    def receive_data_frame(self, flags: int, stream_id: int, payload: memoryview) -> None:
        """One whole DATA frame whose header the driver has parsed (with no frame pending):
        the same checks and events as that frame through `receive_data`, but the events hold
        `payload` itself, so it must stay as it is until they are handled. The driver's path
        for bulk data decrypted straight into the message it belongs to."""
        if self._closed:
            return
        if self._inbuf:
            raise MuxError("a whole frame given while a frame is pending")
        if flags & ~_DATA_FLAGS:
            return self._protocol_error(f"flags {flags:#x} not allowed on type {DATA}")
        if len(payload) > MAX_FRAME_PAYLOAD:
            return self._protocol_error(f"frame payload of {len(payload)} bytes exceeds limit")
        self._on_data(flags, stream_id, payload)

    def _on_data(self, flags: int, stream_id: int, payload: memoryview) -> None:
        stream = self._streams.get(stream_id)
        if flags & SYN:
            if stream_id == 0 or (stream_id & 1) == self._own_parity:
                return self._protocol_error(f"peer opened stream {stream_id} with our parity")
            if stream_id <= self._last_remote_id:
                return self._protocol_error(f"peer reused stream id {stream_id}")
            self._last_remote_id = stream_id
            streams = self._stream_budget
            if self._going_away or self._remote_open >= self._max_streams or (
                    streams is not None and not streams.try_take(self._remote_open, 1)):
                # Refuse this stream only: the connection and its other streams go on.
                self._solicited(self._reset_frame(stream_id, "stream limit reached"))
                return
            stream = self._streams[stream_id] = _Stream(stream_id, False)
            self._remote_open += 1
            size = len(payload)
            if flags & _WHOLE_STREAM == _WHOLE_STREAM and size <= self._max_message_size:
                # Opened, one whole message, half-closed: one event for all three.
                stream.recv_credit -= size
                stream.fin_received = True
                self.events.append(_new_event(OneShotStream, (stream_id, payload)))
                return
            self.events.append(StreamOpened(stream_id))
        elif stream is None:
            if self._is_known_id(stream_id):
                return  # a stream we already closed or reset: frames still in flight
            return self._protocol_error(f"data for unknown stream {stream_id}")
        elif stream.fin_received:
            return self._protocol_error(f"data after FIN on stream {stream_id}")
        size = len(payload)
        if size > stream.recv_credit:
            return self._protocol_error(f"stream {stream_id} exceeded its flow-control window")
        stream.recv_credit -= size
        held = stream.message_bytes  # the fragments before this one, held until END
        if held + size > self._max_message_size:
            return self._refuse_message(stream, f"message larger than {self._max_message_size}"
                                                " bytes")
        if flags & END:
            stream.message_bytes = 0
            if stream.charged:
                self._release(stream)
            if flags & FIN:  # the last message and the end of the stream: one event
                stream.fin_received = True
                self.events.append(_new_event(LastMessage, (stream_id, payload)))
                if stream.fin_sent:
                    self._remove(stream)
                return
            self.events.append(_new_event(DataReceived, (stream_id, payload, True)))
        elif size:
            total = held + size
            extra = total - stream.charged
            if extra > 0:
                refusal = self._hold(stream, extra)
                if refusal is not None:
                    return self._refuse_message(stream, refusal)
            stream.message_bytes = total
            self.events.append(_new_event(DataReceived, (stream_id, payload, False)))
        if flags & FIN:
            stream.fin_received = True
            self.events.append(StreamEnded(stream_id))
            if stream.fin_sent:
                self._remove(stream)

    def _refuse_message(self, stream: _Stream, reason: str) -> None:
        """Reset a stream whose message we will not hold, and tell the driver."""
        self.reset_stream(stream.stream_id, reason)
        self.events.append(StreamReset(stream.stream_id, reason, local=True))

    def reserve(self, stream_id: int, nbytes: int) -> bool:
        """The driver means to hold `nbytes` for the message arriving on this stream (a
        buffer sized ahead of its fragments): they count against the budgets as fragments
        would, until its END. False, with nothing counted, when the budgets do not admit
        them (then the driver holds only the fragments as they come)."""
        stream = self._streams.get(stream_id)
        if stream is None or self._closed:
            return False
        extra = nbytes - stream.charged
        return extra <= 0 or self._hold(stream, extra) is None

    def keep_spare(self, nbytes: int) -> bool:
        """Whether the driver may keep a spare buffer of `nbytes` for later messages (a
        stream's, overlay/streams.py): only in what the unfinished messages leave of both
        budgets (overlay/mux/budget.py), so spares never make a message refused. Uncounted,
        2 x 16 MiB per stream let a peer pin 32 GiB with 1,024 streams."""
        if self._closed or self._partial + self._spares + nbytes > self.config.max_partial_bytes:
            return False
        budget = self._budget
        if budget is not None:
            if budget.held + budget.spares + nbytes > budget.limit:
                return False
            budget.spares += nbytes
        self._spares += nbytes
        return True

    def drop_spare(self, nbytes: int) -> None:
        """The driver no longer keeps a spare buffer of `nbytes` (`keep_spare`)."""
        self._spares -= nbytes
        if self._budget is not None:
            self._budget.spares -= nbytes

    def _hold(self, stream: _Stream, extra: int) -> str | None:
        """Count `extra` (> 0) more bytes of `stream`'s unfinished message against the
        budgets; or, counting nothing, say why they do not admit them. The one place of this
        bookkeeping, for fragments (`_on_data`) and reservations (`reserve`); callers check
        `extra > 0` first, so that a fragment within what its stream reserved costs no call."""
        if self._partial + extra > self.config.max_partial_bytes:
            return (f"too_large: unfinished messages on this connection take at most "
                    f"{self.config.max_partial_bytes} bytes")
        budget = self._budget
        if budget is not None and not budget.try_take(self._partial, extra):
            return (f"busy: the node holds {budget.limit} bytes of unfinished messages; "
                    "send again later")
        self._partial += extra
        stream.charged += extra
        return None

    def _release(self, stream: _Stream) -> None:
        """`stream`'s unfinished message counts against the budgets no more (its END came,
        or the stream is gone); callers check `stream.charged` first."""
        if self._budget is not None:
            self._budget.give(self._partial, stream.charged)
        self._partial -= stream.charged
        stream.charged = 0

    def _on_window_update(self, stream_id: int, credit: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        was_blocked = stream.send_window <= 0
        stream.send_window += credit
        if stream.send_window > MAX_WINDOW:
            return self._protocol_error(f"window of stream {stream_id} overflowed")
        if was_blocked and stream.queue and stream.send_window > 0:
            self._ready.append(stream_id)

    def _on_ping(self, flags: int, opaque: int) -> None:
        if flags & ACK:
            self.events.append(PongReceived(opaque))
        else:
            self._solicited(HEADER.pack(PING, ACK, 0, opaque))

    def _on_reset(self, stream_id: int, payload: memoryview) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        self._remove(stream)
        reason = bytes(payload).decode("utf-8", "replace") or "reset by peer"
        self.events.append(StreamReset(stream_id, reason))

    # ------------------------------------------------------------------ helpers
    def _solicited(self, frame: bytes) -> None:
        """Queue a control frame the peer's input asks for, within MAX_QUEUED_CONTROL."""
        if len(self._control) >= MAX_QUEUED_CONTROL:
            unsent = len(self._control)
            return self._protocol_error(f"peer does not read its answers ({unsent} control "
                                        "frames unsent)")
        self._control.append(frame)

    def _grant(self, stream: _Stream) -> None:
        credit, stream.unacked = stream.unacked, 0
        window = stream.recv_window
        if window < self.config.max_stream_window:
            grow = min(window, self.config.max_stream_window - window,
                       self.config.max_window_growth - self._window_growth)
            if grow > 0:
                stream.recv_window = window + grow
                self._window_growth += grow
                credit += grow
        stream.recv_credit += credit
        self._control.append(HEADER.pack(WINDOW_UPDATE, 0, stream.stream_id, credit))

    def _is_known_id(self, stream_id: int) -> bool:
        ours = (stream_id & 1) == self._own_parity
        return stream_id < self._next_local_id if ours else stream_id <= self._last_remote_id

    def _remove(self, stream: _Stream) -> None:
        if self._streams.pop(stream.stream_id, None) is None:
            return
        self._window_growth -= stream.recv_window - INITIAL_WINDOW
        if stream.queued_bytes:
            if stream.remote:
                self._unqueued(stream.queued_bytes)
            stream.queued_bytes = 0
        if stream.charged:
            self._release(stream)
        if (stream.stream_id & 1) == self._own_parity:
            self._local_open -= 1
        else:
            if self._stream_budget is not None:
                self._stream_budget.give(self._remote_open, 1)
            self._remote_open -= 1

    @staticmethod
    def _reset_frame(stream_id: int, reason: str) -> bytes:
        payload = reason.encode()
        return HEADER.pack(RESET, 0, stream_id, len(payload)) + payload

    def _protocol_error(self, reason: str) -> None:
        self._closed = True
        self._control.append(HEADER.pack(GO_AWAY, 0, 0, PROTOCOL_ERROR))
        self.events.append(ConnectionTerminated(reason, by_peer=False,
                                                 code=PROTOCOL_ERROR))


# Builds an event tuple without the Python-level __new__ of NamedTuple (one frame less per
# event on the hot path): _new_event(Cls, (fields...)) == Cls(*fields).
_new_event = tuple.__new__


def _empty(item: list) -> bool:
    """A queued item with nothing left to send (a FIN-only frame) goes out whatever the window."""
    return len(item[0]) == item[1]
