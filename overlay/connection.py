"""The asyncio driver of one encrypted, multiplexed connection (the I/O half of the sans-IO split).

It owns a socket transport and three pure state machines, in order: `SecureHandshake` until the
Noise handshake completes, then `RecordReader` (records -> plaintext) and `MuxConnection`
(plaintext -> stream events). After every input it drains what the state machines want to send.
Any protocol violation closes this connection only, with the reason logged.

It is a BufferedProtocol: the socket reads straight into the record reader's buffer, and the
multiplexer writes frames straight into the buffer the records are sealed from (RecordWriter),
so a payload is copied once on the sending side besides the encryption itself. On the
receiving side, bulk records are decrypted straight into the buffer of the message they belong
to (`_records_in_place`; Stream.recv_buffer hands it over): no copy besides the decryption;
other records are decrypted into bytes, and their payloads copied once into their message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from overlay import timeline
from overlay.admission import address_group
from overlay.identity import PeerId
from overlay.link_delay import DelayedTransport
from overlay.log_limit import LogLimiter
from overlay.mux import (
    ConnectionTerminated,
    DataReceived,
    LastMessage,
    MuxConfig,
    MuxConnection,
    MuxError,
    OneShotStream,
    PongReceived,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from overlay.mux.budget import PartialBudget
from overlay.mux.frames import DATA, HEADER, HEADER_SIZE, SYN
from overlay.record_layer import MAX_RECORD_PLAINTEXT, RecordError, RecordReader, RecordWriter
from overlay.rpc_codec import parse_reset_reason
from overlay.secure_handshake import (
    MAX_MESSAGE,
    HandshakeError,
    PeerProofError,
    SecureHandshake,
)
from overlay.streams import SEND_HIGH_WATER, ConnectionLost, Stream
from overlay.unary import PendingCall

if TYPE_CHECKING:
    from overlay.identity import Identity
    from overlay.noise.dh import KeyPair

log = logging.getLogger(__name__)

# Stop pulling frames from the multiplexer once this much is written and unsent: beyond it a
# large transfer would only add latency to the small requests queued behind it.
WRITE_HIGH_WATER = 512 << 10
WRITE_LOW_WATER = 128 << 10
# Records sealed per write: large enough that a bulk transfer costs few system calls, small
# enough that a small request queued behind it waits little.
WRITE_BATCH = 1 << 20
HANDSHAKE_READ = 4096
# The longest handshake message 2 a dialer accepts: ours is about 200 bytes, and 8 KiB leave
# room for payload fields later versions add. A server that does not speak the overlay
# (HTTP, an echo, a banner) answers text, whose first two bytes read as a length of 8,224
# or more: the dialer waited for that many bytes until its timeout instead of failing.
MAX_HANDSHAKE_ANSWER = 8192
_SHOWN_BYTES = 32  # of what a peer sent before failing the handshake, in the reason
# A message split into parts is joined into one buffer when it must be queued and is at most
# this size (one frame instead of one per part); larger parts are never copied to be joined.
JOIN_LIMIT = 16 << 10
_per_thread = threading.local()


def _plaintext_scratch() -> memoryview:
    """One record's worth of plaintext scratch, shared by the connections of a thread (a
    record is sealed as soon as it is written there), so idle connections hold none."""
    scratch = getattr(_per_thread, "scratch", None)
    if scratch is None:
        scratch = _per_thread.scratch = memoryview(bytearray(MAX_RECORD_PLAINTEXT))
    return scratch


class Connection(asyncio.BufferedProtocol):
    """One TCP connection to a peer. Created by the Host; applications use streams."""

    link_delay = 0.0  # TEST-ONLY one-way delay of every write (overlay/link_delay.py)

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        expected_peer: PeerId | None,
        mux_config: MuxConfig,
        partial_budget: PartialBudget | None = None,
        unsent_budget: PartialBudget | None = None,
        stream_budget: PartialBudget | None = None,
        handshake_timeout: float,
        on_ready: Callable[[Connection], None],
        on_stream: Callable[[Stream], None],
        on_closed: Callable[[Connection], None],
        on_request: Callable[[Connection, int, memoryview], None],
        admit: Callable[[Connection], str | None] | None = None,
        static: tuple[KeyPair, bytes] | None = None,
        abort_log: LogLimiter | None = None,
    ):
        """`on_request(conn, stream_id, data)` receives streams that arrive whole in one
        frame (opened, one message, half-closed: a small unary request) without a Stream
        object; it must answer or reset that stream id (or make it a Stream,
        `stream_from_whole`, and hand that to `on_stream`: the host's streaming calls).
        `admit(conn)`, called once the socket is connected (its address known), returns why
        the connection is refused, or None to go on. `static`: the Noise static key pair and
        its signed identity payload, shared by the host's handshakes (SecureHandshake).
        `abort_log`: rate-limits the line `abort` logs (a peer can abort connections at will);
        without it every abort is logged."""
        self.loop = asyncio.get_running_loop()
        self.initiator = initiator
        self.remote_peer: PeerId | None = None
        self.remote_address: tuple | None = None
        self.ready: asyncio.Future = self.loop.create_future()
        self.closed = False
        self._identity = identity
        self._expected_peer = expected_peer
        self._mux_config = mux_config
        self._partial_budget = partial_budget
        self._unsent_budget = unsent_budget
        self._stream_budget = stream_budget
        self._handshake_timeout = handshake_timeout
        self._on_ready = on_ready
        self._on_stream = on_stream
        self._on_closed = on_closed
        self._on_request = on_request
        self._admit = admit
        self._static = static
        self._abort_log = abort_log
        self.address_group: str | None = None  # overlay/admission.py
        # Streams the peer opened whose request header has not arrived (the host keeps it):
        # a connection with only those is unused (overlay/admission.py, rule 2).
        self.headerless: set[int] = set()
        # Small messages are framed straight into this plaintext (mux.frame_message); while
        # received records are processed (`_corked`) their answers accumulate here and leave
        # as one record and one write, when the processing is over.
        self._out = bytearray()
        self._corked = False
        self._transport: asyncio.Transport | None = None
        self._handshake: SecureHandshake | None = None
        self._writer: RecordWriter | None = None
        self._reader: RecordReader | None = None
        self._handshake_buffer: bytearray | None = None
        self._handshake_head = b""  # the first bytes the peer sent in the handshake
        self._handshake_read = 0  # and how many it sent
        self._flush_scheduled = False
        self._mux: MuxConnection | None = None
        self._streams: dict[int, Stream] = {}
        self._paused = False
        self._drain_waiters: set[Stream] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._pings: dict[int, asyncio.Future] = {}
        self._next_ping = 1
        self._close_reason = "closed"
        self._reading_paused = False
        # The stream whose message is being assembled in place (Stream._place): the record
        # after one of its fragments is decrypted straight into that message's buffer.
        self._assembling: Stream | None = None

    # ------------------------------------------------------------------ asyncio callbacks
    def pause_reading(self) -> None:
        """Stop reading from the socket for good (Host.freeze), now or as soon as it exists."""
        self._reading_paused = True
        if self._transport is not None and not self.closed:
            self._transport.pause_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.link_delay:
            transport = DelayedTransport(transport, self.link_delay)  # type: ignore[arg-type]
        self._transport = transport  # type: ignore[assignment]
        self.remote_address = transport.get_extra_info("peername")
        self.address_group = address_group(self.remote_address)
        refused = None if self._admit is None else self._admit(self)
        if refused is not None:
            self._on_closed = None
            self.abort(f"refused: {refused}")
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self._reading_paused:
            transport.pause_reading()
        self._timer = self.loop.call_later(self._handshake_timeout, self._handshake_timed_out)
        try:
            static, payload = self._static or (None, None)
            self._handshake = SecureHandshake(
                self._identity,
                initiator=self.initiator,
                rng=os.urandom,
                expected_peer=self._expected_peer,
                static=static,
                payload=payload,
                max_message=MAX_HANDSHAKE_ANSWER if self.initiator else MAX_MESSAGE,
            )
        except Exception as e:  # pragma: no cover - construction does not fail on valid input
            self.abort(f"handshake setup failed: {e}")
            return
        self._write_handshake()

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        reader = self._reader
        if reader is not None:
            return reader.get_buffer(sizehint)
        if self._handshake_buffer is None:
            self._handshake_buffer = bytearray(HANDSHAKE_READ)
        return self._handshake_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if timeline.ENABLED:
            timeline.mark("read")
        if self.closed:
            return
        reader = self._reader
        if reader is None:
            self._handshake_data(bytes(self._handshake_buffer[:nbytes]))
            return
        if self._assembling is None:  # the common case: records decrypted as they come
            try:
                plaintexts = reader.buffer_updated(nbytes)
            except RecordError as e:
                self.abort(str(e))
                return
            self._records_received(plaintexts)
        else:
            self._records_in_place(reader, nbytes)

    def _records_in_place(self, reader: RecordReader, nbytes: int) -> None:
        """A stream assembles a message in place: records are decrypted one at a time, each
        where `_place` guesses it belongs, and handled before the next one."""
        reader.received(nbytes)
        next_record = reader.next_record
        place = self._place
        receive = self._mux.receive_data
        self._corked = True
        try:
            while True:
                try:
                    plaintext = next_record(place)
                except RecordError as e:
                    self.abort(str(e))
                    return
                if plaintext is None:
                    break
                if type(plaintext) is memoryview:
                    self._placed_record(plaintext)
                else:
                    receive(plaintext)
                self._process_events()
                if self.closed:
                    return
        finally:
            self._corked = False
        self._flush()

    def _place(self, size: int) -> memoryview | None:
        """RecordReader's `place`: while a stream assembles a message in place, the next
        record (of `size` plaintext bytes) is decrypted into that message's buffer, on the
        guess that it is one DATA frame of that message (_placed_record checks it)."""
        stream = self._assembling
        if stream is None or size <= HEADER_SIZE or self._mux.frame_pending:
            return None
        return stream._place(size)

    def _placed_record(self, plaintext: memoryview) -> None:
        """A record decrypted in place: if it is the assembling stream's next DATA frame, its
        payload is already where it belongs; otherwise it is an ordinary record (copied out)."""
        stream = self._assembling
        try:
            frame_type, flags, stream_id, length = HEADER.unpack_from(plaintext)
            if (frame_type == DATA and stream_id == stream.stream_id and not flags & SYN
                    and length == len(plaintext) - HEADER_SIZE):
                payload = stream._placed = plaintext[HEADER_SIZE:]
                self._mux.receive_data_frame(flags, stream_id, payload)
                return
            data = bytes(plaintext)
        finally:
            stream._unplace()
        self._mux.receive_data(data)

    def assembling(self, stream: Stream) -> None:
        """`stream` assembles a message in place (see _place)."""
        self._assembling = stream

    def not_assembling(self, stream: Stream) -> None:
        if self._assembling is stream:
            self._assembling = None

    def _records_received(self, plaintexts: list[bytes]) -> None:
        receive = self._mux.receive_data
        self._corked = True
        try:
            for plaintext in plaintexts:
                receive(plaintext)
            self._process_events()
        finally:
            self._corked = False
        self._flush()

    def eof_received(self) -> bool:
        if self._reader is None:
            self.abort(f"peer closed the connection: {self.handshake_account()}")
        else:
            self.abort("peer closed the connection")
        return False

    def handshake_account(self) -> str:
        """What the peer sent of the handshake, for a reason that says why it failed: a
        server that does not speak the overlay is told apart from one that is slow."""
        if not self._handshake_read:
            return "the peer did not complete the overlay's handshake (it sent nothing)"
        more = "..." if self._handshake_read > len(self._handshake_head) else ""
        return (f"the peer did not complete the overlay's handshake (it sent "
                f"{self._handshake_read} bytes: {self._handshake_head!r}{more})")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self._close_reason = f"connection lost: {exc}" if exc else "connection closed by peer"
        self._finish()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._flush()

    # ------------------------------------------------------------------ handshake
    def _handshake_data(self, data: bytes) -> None:
        handshake = self._handshake
        if handshake is None:
            return
        if len(self._handshake_head) < _SHOWN_BYTES:
            self._handshake_head += data[:_SHOWN_BYTES - len(self._handshake_head)]
        self._handshake_read += len(data)
        try:
            handshake.receive_data(data)
        except PeerProofError as e:  # it spoke the overlay: its bytes would say nothing
            self.abort(f"handshake failed: {e}")
            return
        except HandshakeError as e:
            self.abort(f"handshake failed: {self.handshake_account()} ({e})")
            return
        self._write_handshake()
        if handshake.is_complete:
            self._start_session(handshake.result())

    def _write_handshake(self) -> None:
        out = self._handshake.data_to_send()
        if out and self._transport is not None:
            self._transport.write(out)

    def _start_session(self, session) -> None:
        self._handshake = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.remote_peer = session.remote_peer
        self._handshake_buffer = None
        self._writer = RecordWriter(session.transport, _plaintext_scratch())
        self._reader = RecordReader(session.transport)
        self._mux = MuxConnection(self.initiator, self._mux_config, self._partial_budget,
                                  self._unsent_budget, self._stream_budget)
        self._on_ready(self)
        if self.closed:
            return
        if not self.ready.done():
            self.ready.set_result(self)
        if session.leftover:
            try:
                plaintexts = self._reader.feed(session.leftover)
            except RecordError as e:
                self.abort(str(e))
                return
            self._records_received(plaintexts)

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._reader is None:
            self.abort("handshake timed out")

    # ------------------------------------------------------------------ streams
    def open_stream(self) -> Stream:
        if self.closed or self._mux is None:
            raise ConnectionLost(f"connection to {self.remote_peer} is closed")
        try:
            stream_id = self._mux.open_stream()
        except MuxError as e:
            raise ConnectionLost(str(e)) from None
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    def stream_from_whole(self, stream_id: int, data) -> Stream:
        """The Stream of a stream that arrived whole (OneShotStream): its one message waits
        to be read, and it is ended."""
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        stream._on_data(data, True)
        stream._on_end()
        return stream

    def start_call(self, parts, future: asyncio.Future,
                   max_answer: int | None = None) -> PendingCall:
        """Open a stream and send one request message (`parts`) with FIN; the answer goes to
        `future` (overlay/unary.py), failed once it passes `max_answer` bytes."""
        if self.closed or self._mux is None:
            raise ConnectionLost(f"connection to {self.remote_peer} is closed")
        try:
            stream_id = self._mux.open_stream()
        except MuxError as e:
            raise ConnectionLost(str(e)) from None
        call = PendingCall(self, stream_id, future, max_answer)
        self._streams[stream_id] = call
        try:
            self.mux_send_parts(stream_id, parts, True)
        except MuxError as e:
            self._streams.pop(stream_id, None)
            raise ConnectionLost(str(e)) from None
        return call

    def mux_send_parts(self, stream_id: int, parts, fin: bool, flush: bool = True) -> None:
        """One message from `parts` (buffers whose len() is their size: streams.byte_views).
        A message that fits one frame, on a
        stream with nothing queued, is framed at once into the outgoing plaintext; otherwise
        it is queued in the multiplexer, every part but the last as a fragment (END unset).
        Raises MuxError when the stream is not open for sending."""
        if not (self._paused or self.closed) and self._mux.frame_message(
                stream_id, parts, self._out, fin=fin):
            if flush and not self._corked:
                self._write_out()
            return
        if len(parts) > 1 and sum(memoryview(p).nbytes for p in parts) <= JOIN_LIMIT:
            parts = (b"".join(parts),)
        send = self._mux.send
        last = len(parts) - 1
        for i, part in enumerate(parts):
            send(stream_id, part, end=i == last, fin=fin and i == last)
        if flush:
            self._flush()

    def answer(self, stream_id: int, parts) -> None:
        """Send the one answer message of a unary call and half-close; dropped quietly when
        the caller reset the stream meanwhile or the connection is gone."""
        if not self.closed:
            try:
                self.mux_send_parts(stream_id, parts, True)
            except MuxError:
                pass

    def _write_out(self) -> None:
        """Seal the framed plaintext into one record and write it."""
        out = self._out
        try:
            record = self._writer.seal(out)
            self._transport.write(record)
        except Exception as e:  # nonce exhaustion, or a transport already closing
            self.abort(f"cannot send: {e}")
        finally:
            out.clear()

    def end_stream(self, stream_id: int) -> None:
        if not self.closed:
            self._mux.end_stream(stream_id)
            self._flush()

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        if not self.closed:
            self._mux.acknowledge(stream_id, nbytes)
            if self._mux.has_data_to_send():
                self._flush()

    def backlogged(self, limit: int) -> bool:
        """More than `limit` bytes of our answers wait unsent (the peer is not reading), or more
        than this connection's share of the host's budget of them (overlay/mux/budget.py)."""
        unsent = self._mux._unsent  # (not the property: this runs for every request)
        if unsent <= 0:
            return False
        budget = self._unsent_budget
        return unsent > limit or (budget is not None and not budget.admits(unsent, 0))

    def reserve(self, stream_id: int, nbytes: int) -> bool:
        """May this stream hold a buffer of `nbytes` for the message arriving (mux.reserve)?"""
        return not self.closed and self._mux.reserve(stream_id, nbytes)

    def keep_spare(self, nbytes: int) -> bool:
        """May a stream keep a spare buffer of `nbytes` (mux.keep_spare)?"""
        return not self.closed and self._mux.keep_spare(nbytes)

    def drop_spare(self, nbytes: int) -> None:
        self._mux.drop_spare(nbytes)

    def reset_stream(self, stream_id: int, reason: str) -> None:
        self._streams.pop(stream_id, None)
        self.headerless.discard(stream_id)
        if not self.closed:
            self._mux.reset_stream(stream_id, reason)
            self._flush()

    def queued_bytes(self, stream_id: int) -> int:
        return 0 if self._mux is None else self._mux.queued_bytes(stream_id)

    def want_drain(self, stream: Stream) -> None:
        self._drain_waiters.add(stream)

    def release_stream(self, stream_id: int) -> None:
        """Forget a stream whose both halves are finished."""
        self._streams.pop(stream_id, None)
        self.headerless.discard(stream_id)

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    @property
    def idle(self) -> bool:
        """No stream open in either direction: closing it interrupts nothing."""
        return not self._streams and (self._mux is None or not self._mux.stream_ids())

    @property
    def inbound_handshaking(self) -> bool:
        """A connection the peer dialed that has not finished its handshake."""
        return not (self.initiator or self.ready.done())

    @property
    def unused(self) -> bool:
        """Closing it interrupts no request: no stream open, or only streams the peer
        opened that have not brought their request header (`headerless`)."""
        headerless = self.headerless
        if not headerless:
            return self.idle
        mux = self._mux
        return headerless.issuperset(self._streams) and (
            mux is None or headerless.issuperset(mux._streams))

    async def ping(self, timeout: float = 10.0) -> float:
        """Round-trip time of a multiplexer PING, in seconds."""
        if self.closed or self._mux is None:
            raise ConnectionLost("connection is closed")
        opaque = self._next_ping
        self._next_ping = (self._next_ping + 1) & 0xFFFFFFFF
        future = self.loop.create_future()
        self._pings[opaque] = future
        start = time.perf_counter()  # loop.time() is only millisecond-accurate under uvloop
        self._mux.ping(opaque)
        self._flush()
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            self._pings.pop(opaque, None)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ plumbing
    def _process_events(self) -> None:
        mux = self._mux
        streams = self._streams
        events = mux.events
        while events:
            event = events.popleft()
            kind = type(event)
            if kind is OneShotStream:
                self._on_request(self, event.stream_id, event.data)
                if self.closed:
                    return
            elif kind is DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data, event.end)
                else:  # nobody will read it: give the credit back at once
                    mux.acknowledge(event.stream_id, len(event.data))
            elif kind is LastMessage:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_last(event.data)
            elif kind is StreamOpened:
                stream = Stream(self, event.stream_id)
                streams[event.stream_id] = stream
                self._on_stream(stream)
            elif kind is StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_end()
            elif kind is StreamReset:
                self.headerless.discard(event.stream_id)
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._on_error(parse_reset_reason(event.reason))
            elif kind is PongReceived:
                future = self._pings.get(event.opaque)
                if future is not None and not future.done():
                    future.set_result(None)
            elif kind is ConnectionTerminated:
                if event.by_peer:
                    self._close_reason = event.reason
                    self.close()
                else:
                    self.abort(f"protocol error: {event.reason}")
                return

    def _flush(self) -> None:
        mux = self._mux
        transport = self._transport
        if mux is None or transport is None:
            return
        if self._out:  # framed before anything the multiplexer holds now: write it first
            self._write_out()
            if self.closed:
                return
        if self._paused:
            return
        if not (mux.has_data_to_send() or self._drain_waiters):
            return  # the common case after receiving an answer: nothing to do
        if mux.has_data_to_send():
            writer = self._writer
            if not transport.get_write_buffer_size():
                writer.release()  # the transport holds none of our buffers any more
            try:
                out = writer.seal_from(mux.frames_into, mux.has_data_to_send, WRITE_BATCH)
                if out is not None:
                    transport.write(out)
            except Exception as e:  # nonce exhaustion, or a transport already closing
                self.abort(f"cannot send: {e}")
                return
        if self._drain_waiters:
            queued = mux.queued_bytes
            waiting = [s for s in self._drain_waiters if queued(s.stream_id) <= SEND_HIGH_WATER]
            for stream in waiting:
                self._drain_waiters.discard(stream)
                stream._wake_sender()
        if mux.has_data_to_send() and not self._paused and not self._flush_scheduled:
            # More frames than one write batch: continue after other callbacks had their turn.
            self._flush_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        if not self.closed:
            self._flush()

    def close(self) -> None:
        """Graceful: send GO_AWAY and what is queued, then close the socket."""
        if self.closed:
            return
        if self._mux is not None and self._transport is not None and not self._mux.is_closed:
            self._mux.close()
            self._flush()
        self.closed = True
        if self._transport is not None:
            self._transport.close()
        self._finish()

    def abort(self, reason: str, level: int = logging.INFO) -> None:
        """Drop the connection at once (bad input or a fatal error), logging why (at `level`:
        lower where the caller reports the failure itself)."""
        if self.closed:
            return
        peer = self.remote_peer or self._expected_peer
        if self._abort_log is None or level < logging.INFO:
            log.log(level, "closing connection to %s (%s): %s",
                    peer or "unknown peer", self.remote_address, reason)
        else:  # one kind per reason ("handshake failed", "protocol error", ...)
            self._abort_log.log(level, f"closing connections ({reason.split(':', 1)[0]})",
                                "closing connection to %s (%s): %s",
                                peer or "unknown peer", self.remote_address, reason)
        self._close_reason = reason
        if self._mux is not None and self._transport is not None:
            self._flush()  # a GO_AWAY the multiplexer queued, if any
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed = True
        if self._mux is not None:
            self._mux.release_budget()  # (this connection's unfinished messages are dropped)
        error = ConnectionLost(f"connection to {self.remote_peer or 'peer'} lost: "
                               f"{self._close_reason}")
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # mark retrieved: a failed dial is reported by its caller
        streams, self._streams = self._streams, {}
        self.headerless.clear()
        for stream in streams.values():
            stream._on_error(error)
        for future in self._pings.values():
            if not future.done():
                future.set_exception(error)
        self._pings.clear()
        if self._on_closed is not None:
            callback, self._on_closed = self._on_closed, None
            callback(self)
