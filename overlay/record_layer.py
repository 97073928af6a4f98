"""Noise transport records on the socket: a 2-byte big-endian length, then the ciphertext.

Sans-IO. Receiving: `RecordReader` owns the receive buffer; the driver lets the socket write
straight into `get_buffer()` (asyncio's BufferedProtocol) and reports `buffer_updated(n)`, which
returns the plaintexts of the records completed so far (`feed(data)` does both for bytes that
were read elsewhere). Sending: `RecordWriter.seal_from` encrypts what a frame source writes
into framed records, in a buffer it reuses once the driver says the previous one has left
(`release`); `seal_records` does the same for a list of plaintexts. Each record
carries at most MAX_RECORD_PLAINTEXT bytes (a Noise message is at most 65535 bytes, 16 of which
are the authentication tag).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Protocol

from overlay.mux.connection import MAX_RECORD_PLAINTEXT

TAG_SIZE = 16
LENGTH_SIZE = 2
MAX_RECORD = LENGTH_SIZE + MAX_RECORD_PLAINTEXT + TAG_SIZE  # 65537 bytes on the wire
# The writer fills records up to this plaintext size, not the maximum (65519): the largest
# size whose remainder modulo 128 is under 64. Measured 2026-12-02 (cryptography 50.0.2, its
# OpenSSL's AVX-512 ChaCha20-Poly1305, AMD EPYC of family 26; docs/benchmarks.md, "Transport",
# "Record size"): sealing or opening a record whose length modulo 128 is 64 to 127 costs 30%
# more per byte (0.30 against 0.23 s/GiB), and 65519 is such a length. Elsewhere the cost is
# 48 bytes of 65519 (0.07% more records).
SEALED_RECORD_PLAINTEXT = 65471
# The receive buffer is small and grows to the large size once a read fills it: bulk
# transfers then take one system call per ~1 MiB. A reader holds a small buffer only while
# a record is incomplete: once a read leaves nothing pending the buffer goes back to a few
# spares shared by all readers (`_SPARES`), so an idle connection holds none (a DHT node
# keeps about a hundred mostly idle connections: 16 KiB each was most of its memory).
SMALL_RECEIVE_BUFFER = 16 << 10
LARGE_RECEIVE_BUFFER = 1 << 20
MIN_READ = 2048  # get_buffer makes room when less than this is left
_MAX_SPARES = 8
# Drained small buffers (with their views). list.append / list.pop are atomic, so readers
# of different threads never get the same one.
_SPARES: list[memoryview] = []
_LENGTH = struct.Struct(">H")


class RecordError(Exception):
    """A record that fails authentication or is malformed: the connection must end."""


class Cipher(Protocol):
    """What the record layer needs of a Noise TransportState."""

    def encrypt_into(self, plaintext: bytes | memoryview, out: memoryview) -> int: ...

    def seal_record_into(self, plaintext: bytes | memoryview, out: memoryview) -> None:
        """encrypt_into for an `out` of exactly len(plaintext) + TAG_SIZE bytes."""

    def open_record(self, ciphertext: bytes | memoryview) -> bytes:
        """decrypt, for a ciphertext of at most 65535 bytes."""

    def open_record_into(self, ciphertext: bytes | memoryview, out: memoryview) -> None:
        """open_record into `out` of exactly len(ciphertext) - TAG_SIZE bytes."""


def seal_records(cipher: Cipher, plaintexts: Sequence[bytes]) -> bytearray:
    """Encrypt each plaintext (at most MAX_RECORD_PLAINTEXT bytes) into one framed record."""
    out = bytearray(sum(len(p) for p in plaintexts) + len(plaintexts) * (LENGTH_SIZE + TAG_SIZE))
    end = _seal_into(cipher, plaintexts, memoryview(out), 0)
    assert end == len(out)
    return out


def _seal_into(cipher: Cipher, plaintexts, view: memoryview, pos: int) -> int:
    pack_into = _LENGTH.pack_into
    encrypt_into = cipher.encrypt_into
    for plaintext in plaintexts:
        size = len(plaintext) + TAG_SIZE
        pack_into(view, pos, size)
        pos += LENGTH_SIZE
        encrypt_into(plaintext, view[pos:pos + size])
        pos += size
    return pos


class RecordWriter:
    """Seals the frames a source writes into records, in a send buffer it reuses.

    The source (the multiplexer's `frames_into`) writes one record's plaintext at a time into
    a scratch buffer; each is encrypted from there straight into its place in the send buffer,
    behind its length prefix: no per-record bytes objects, no join. A send buffer handed to
    the transport must not change until the transport has written it, so it is reused only
    after the driver calls `release()` (when the transport's write buffer is empty);
    otherwise a fresh one is taken. Reuse matters: a fresh large buffer costs a zero-fill and,
    above glibc's mmap threshold, a page fault per page.
    """

    __slots__ = ("_cipher", "_encrypt_into", "_idle_flushes", "_in_flight", "_plain", "_spare")

    # A spare send buffer unused for this many small flushes is given back (idle connections
    # should not hold a bulk-sized buffer each).
    SPARE_IDLE_LIMIT = 64

    def __init__(self, cipher: Cipher, scratch: memoryview | None = None):
        """`scratch`: MAX_RECORD_PLAINTEXT bytes where plaintexts are assembled; the driver may
        share one between all the writers of a thread (each record is sealed at once)."""
        self._cipher = cipher
        self._encrypt_into = cipher.seal_record_into
        plain = memoryview(bytearray(MAX_RECORD_PLAINTEXT)) if scratch is None else scratch
        self._plain = plain[:SEALED_RECORD_PLAINTEXT]
        self._spare: bytearray | None = None  # free for reuse
        self._in_flight: bytearray | None = None  # the last large buffer handed out
        self._idle_flushes = 0

    def release(self) -> None:
        """Everything sealed so far has been written: its buffer may be reused."""
        if self._in_flight is not None:
            self._spare, self._in_flight = self._in_flight, None

    def seal_from(self, fill: Callable[[memoryview], int], more: Callable[[], bool],
                  max_bytes: int) -> bytearray | memoryview | None:
        """Records of what `fill` writes (called until it writes nothing or about `max_bytes`
        are sealed); `more()` tells whether the source has anything left after a record.
        None when the source had nothing to send."""
        plain = self._plain
        size = fill(plain)
        if not size:
            return None
        if not more():  # one record, the common case of small messages: an exact buffer
            out = bytearray(size + LENGTH_SIZE + TAG_SIZE)
            self._seal_one(plain[:size], memoryview(out), 0)
            self._idle_flushes += 1
            if self._idle_flushes > self.SPARE_IDLE_LIMIT:
                self._spare = None
            return out
        self._idle_flushes = 0
        buf = self._spare
        if buf is not None and len(buf) >= max_bytes + MAX_RECORD:
            self._spare = None
        else:
            buf = bytearray(max_bytes + MAX_RECORD)
        self._in_flight = buf
        view = memoryview(buf)
        limit = len(buf) - MAX_RECORD
        pack_into = _LENGTH.pack_into
        seal = self._encrypt_into
        pos = 0
        while True:  # (_seal_one, inline: this loop runs once per bulk record)
            sealed = size + TAG_SIZE
            pack_into(view, pos, sealed)
            pos += LENGTH_SIZE
            seal(plain[:size], view[pos:pos + sealed])
            pos += sealed
            if pos > limit:
                break
            size = fill(plain)
            if not size:
                break
        return view[:pos]

    def seal(self, plaintext: bytes | bytearray) -> bytearray:
        """One record of `plaintext` (at most MAX_RECORD_PLAINTEXT bytes), in a fresh buffer:
        the path of small messages, which the driver frames itself."""
        size = len(plaintext) + TAG_SIZE
        out = bytearray(size + LENGTH_SIZE)
        _LENGTH.pack_into(out, 0, size)
        self._encrypt_into(plaintext, memoryview(out)[LENGTH_SIZE:])
        return out

    def _seal_one(self, plaintext: memoryview, view: memoryview, pos: int) -> int:
        size = len(plaintext) + TAG_SIZE
        _LENGTH.pack_into(view, pos, size)
        pos += LENGTH_SIZE
        self._encrypt_into(plaintext, view[pos:pos + size])
        return pos + size


class RecordReader:
    """Reassembles framed records from a byte stream and decrypts them in order.

    The socket writes into the reader's own buffer (`get_buffer`), so received bytes are
    decrypted where they landed: no copy into intermediate bytes objects, and a record split
    across two reads is moved only when the buffer is nearly full.
    """

    __slots__ = ("_buf", "_cipher", "_end", "_last_read", "_small_reads", "_start", "_view")

    # The large buffer goes back after this many consecutive small reads that left nothing
    # pending (the bulk transfer is over).
    SHRINK_AFTER = 16

    def __init__(self, cipher: Cipher):
        self._cipher = cipher
        self._buf: bytearray | None = None  # taken at the first read (get_buffer)
        self._view = memoryview(b"")
        self._start = 0  # first byte not yet consumed
        self._end = 0  # end of the received bytes
        self._small_reads = 0
        self._last_read = 0

    @property
    def buffered(self) -> int:
        """Received bytes of records not yet complete."""
        return self._end - self._start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next read may write (at least MIN_READ bytes)."""
        if self._buf is None:
            try:
                self._view = _SPARES.pop()
            except IndexError:
                self._view = memoryview(bytearray(SMALL_RECEIVE_BUFFER))
            self._buf = self._view.obj  # type: ignore[assignment]
        elif len(self._buf) - self._end < MIN_READ:
            self._make_room()
        return self._view[self._end:]

    def _drop_buffer(self) -> None:
        """Nothing pending: let the buffer go (a small one to the spares)."""
        if len(self._view) == SMALL_RECEIVE_BUFFER and len(_SPARES) < _MAX_SPARES:
            _SPARES.append(self._view)
        self._buf = None
        self._view = memoryview(b"")

    def _make_room(self) -> None:
        pending = self._end - self._start
        if len(self._buf) < LARGE_RECEIVE_BUFFER and not self._fits_small(pending):
            # The small buffer cannot hold the record coming in: a large record, or bulk
            # traffic (records of the maximum size). Grow.
            buf = bytearray(LARGE_RECEIVE_BUFFER)
            buf[:pending] = self._view[self._start:self._end]
            self._buf, self._view = buf, memoryview(buf)
        elif pending:
            # Move the start of the pending record (less than one record) to the front.
            chunk = self._view[self._start:self._end]
            if self._start < pending:  # overlapping: copy through bytes
                chunk = bytes(chunk)
            self._view[:pending] = chunk
        self._start, self._end = 0, pending

    def _fits_small(self, pending: int) -> bool:
        """The record being received fits in the small buffer with a read's room to spare
        (then a burst of small records is no reason to take a large buffer, which an idle
        connection would keep)."""
        if pending < LENGTH_SIZE:
            return True
        (length,) = _LENGTH.unpack_from(self._view, self._start)
        return LENGTH_SIZE + length + MIN_READ <= SMALL_RECEIVE_BUFFER

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        """`nbytes` were written at `get_buffer()`: the plaintexts of the records completed.
        (The same as `received` then `next_record` until None, in one call: the path of
        small messages, where a call per record counts.)"""
        end = self._end + nbytes
        if end > len(self._buf):
            raise ValueError("buffer_updated beyond the buffer it was given")
        self._end = end
        view = self._view
        pos = self._start
        decrypt = self._cipher.open_record
        unpack_from = _LENGTH.unpack_from
        out = []
        while end - pos >= LENGTH_SIZE:
            (length,) = unpack_from(view, pos)
            if length < TAG_SIZE:
                raise RecordError(f"record of {length} bytes is shorter than its tag")
            stop = pos + LENGTH_SIZE + length
            if stop > end:
                break
            try:
                out.append(decrypt(view[pos + LENGTH_SIZE:stop]))
            except Exception as e:  # the cipher's own authentication failure type
                raise RecordError(f"record failed authentication: {type(e).__name__}") from None
            pos = stop
        if pos == end:  # (as _drained, inline)
            pos = self._end = 0
            if len(self._buf) > SMALL_RECEIVE_BUFFER:
                self._small_reads = self._small_reads + 1 if nbytes < MAX_RECORD else 0
                if self._small_reads >= self.SHRINK_AFTER:
                    self._drop_buffer()
                    self._small_reads = 0
            else:
                self._drop_buffer()
        self._start = pos
        return out

    def received(self, nbytes: int) -> None:
        """`nbytes` were written at `get_buffer()`; `next_record` then returns their records."""
        end = self._end + nbytes
        if end > len(self._buf):
            raise ValueError("buffer_updated beyond the buffer it was given")
        self._end = end
        self._last_read = nbytes

    def next_record(self, place: Callable[[int], memoryview | None] | None = None,
                    ) -> bytes | memoryview | None:
        """The plaintext of the next complete record received, or None when there is none.

        `place(n)`, when given, may return a writable view of exactly n bytes (the record's
        plaintext size) where the record is decrypted instead of into a fresh bytes object:
        then that view is returned (the driver decrypts bulk data straight into the message
        it belongs to; overlay/connection.py). Records are decrypted one call at a time, so the
        driver can handle each before choosing where the next one goes."""
        pos = self._start
        end = self._end
        if end - pos >= LENGTH_SIZE:
            view = self._view
            (length,) = _LENGTH.unpack_from(view, pos)
            if length < TAG_SIZE:
                raise RecordError(f"record of {length} bytes is shorter than its tag")
            stop = pos + LENGTH_SIZE + length
            if stop <= end:
                target = None if place is None else place(length - TAG_SIZE)
                try:
                    if target is None:
                        plaintext = self._cipher.open_record(view[pos + LENGTH_SIZE:stop])
                    else:
                        self._cipher.open_record_into(view[pos + LENGTH_SIZE:stop], target)
                        plaintext = target
                except Exception as e:  # the cipher's own authentication failure type
                    raise RecordError(
                        f"record failed authentication: {type(e).__name__}") from None
                self._start = stop
                if stop == end:
                    self._drained()
                return plaintext
        return None

    def _drained(self) -> None:
        """Every received byte is consumed: reuse the buffer from its start, or let it go."""
        self._start = self._end = 0
        if len(self._buf) > SMALL_RECEIVE_BUFFER:
            self._small_reads = self._small_reads + 1 if self._last_read < MAX_RECORD else 0
            if self._small_reads >= self.SHRINK_AFTER:
                self._drop_buffer()
                self._small_reads = 0
        else:
            self._drop_buffer()

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Plaintexts of the records completed by `data` (bytes read by someone else)."""
        data = memoryview(data).cast("B")
        out: list[bytes] = []
        pos = 0
        while pos < len(data):
            room = self.get_buffer()
            take = min(len(room), len(data) - pos)
            room[:take] = data[pos:pos + take]
            pos += take
            out += self.buffer_updated(take)
        return out


__all__ = [
    "MAX_RECORD_PLAINTEXT",
    "SEALED_RECORD_PLAINTEXT",
    "Cipher",
    "RecordError",
    "RecordReader",
    "RecordWriter",
    "seal_records",
]
