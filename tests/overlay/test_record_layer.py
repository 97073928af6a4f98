"""The record layer: sealing (alone and from the multiplexer), and reading records split
anywhere across socket reads, through `feed` and through the reader's own buffer."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.identity import Identity
from overlay.mux import DataReceived, MuxConnection
from overlay.record_layer import (
    MAX_RECORD_PLAINTEXT,
    SEALED_RECORD_PLAINTEXT,
    SMALL_RECEIVE_BUFFER,
    RecordError,
    RecordReader,
    RecordWriter,
    seal_records,
)
from overlay.secure_handshake import SecureHandshake


def transports():
    a = SecureHandshake(Identity.generate(), initiator=True, rng=os.urandom)
    b = SecureHandshake(Identity.generate(), initiator=False, rng=os.urandom)
    for _ in range(3):
        b.receive_data(a.data_to_send()) if not b.is_complete else None
        a.receive_data(b.data_to_send()) if not a.is_complete else None
    return a.result().transport, b.result().transport


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 100, 4096, MAX_RECORD_PLAINTEXT]), min_size=1,
                      max_size=6),
       cuts=st.lists(st.integers(1, 70000), max_size=12))
def test_records_split_anywhere_come_back_in_order(sizes, cuts):
    sender, receiver = transports()
    plaintexts = [os.urandom(n) for n in sizes]
    wire = bytes(seal_records(sender, plaintexts))
    reader = RecordReader(receiver)
    got, pos = [], 0
    for cut in cuts:
        got += reader.feed(wire[pos:pos + cut])
        pos = min(len(wire), pos + cut)
    got += reader.feed(wire[pos:])
    assert got == plaintexts


def test_one_byte_at_a_time_and_forgery():
    sender, receiver = transports()
    wire = bytes(seal_records(sender, [b"hello", b"world" * 1000]))
    reader = RecordReader(receiver)
    got = []
    for i in range(len(wire)):
        got += reader.feed(wire[i:i + 1])
    assert got == [b"hello", b"world" * 1000]
    forged = bytearray(seal_records(sender, [b"x" * 50]))
    forged[10] ^= 1
    with pytest.raises(RecordError, match="authentication"):
        reader.feed(bytes(forged[:7]) + bytes(forged[7:]))
    with pytest.raises(RecordError, match="shorter than its tag"):
        RecordReader(receiver).feed(b"\x00\x05abcde")


def read_like_a_socket(reader: RecordReader, wire: bytes, sizes, pulls=()) -> list[bytes]:
    """Write `wire` into the reader's own buffer in reads of the given sizes (cycled), as the
    BufferedProtocol driver does. Reads whose index is in `pulls` (cycled) take the records
    one at a time (received + next_record), some of them into a place of their own, as the
    driver does while a message is assembled in place."""
    got, pos, i = [], 0, 0
    while pos < len(wire):
        room = reader.get_buffer()
        take = min(len(room), sizes[i % len(sizes)], len(wire) - pos)
        room[:take] = wire[pos:pos + take]
        pos += take
        if pulls and pulls[i % len(pulls)]:
            reader.received(take)
            place = (lambda n: memoryview(bytearray(n))) if i % 2 else None
            while (plaintext := reader.next_record(place)) is not None:
                got.append(bytes(plaintext))
        else:
            got += reader.buffer_updated(take)
        i += 1
    return got


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([0, 1, 100, 4096, 40000, MAX_RECORD_PLAINTEXT]),
                      min_size=1, max_size=40),
       reads=st.lists(st.integers(1, 3 << 20), min_size=1, max_size=8),
       pulls=st.lists(st.booleans(), max_size=5))
def test_reads_into_the_readers_buffer_give_the_same_records(sizes, reads, pulls):
    sender, receiver = transports()
    plaintexts = [os.urandom(n) for n in sizes]
    wire = bytes(seal_records(sender, plaintexts))
    assert read_like_a_socket(RecordReader(receiver), wire, reads, pulls) == plaintexts


def test_receive_buffer_grows_for_bulk_and_shrinks_when_idle():
    sender, receiver = transports()
    reader = RecordReader(receiver)
    assert len(reader.get_buffer()) == SMALL_RECEIVE_BUFFER
    bulk = [os.urandom(MAX_RECORD_PLAINTEXT) for _ in range(20)]
    assert read_like_a_socket(reader, bytes(seal_records(sender, bulk)), [1 << 20]) == bulk
    assert len(reader.get_buffer()) > SMALL_RECEIVE_BUFFER
    small = [b"ping %d" % i for i in range(RecordReader.SHRINK_AFTER)]
    for message in small:
        assert read_like_a_socket(reader, bytes(seal_records(sender, [message])), [99]) == [
            message]
    assert len(reader.get_buffer()) == SMALL_RECEIVE_BUFFER


def test_an_idle_reader_holds_no_buffer_and_readers_share_the_drained_ones():
    """A reader keeps a receive buffer only while a record is incomplete (a DHT node keeps
    ~100 mostly idle connections); the drained small buffers are reused by other readers,
    and readers interleaving reads that leave records half-received never mix bytes."""
    pairs = [transports() for _ in range(3)]
    readers = [RecordReader(receiver) for _, receiver in pairs]
    assert all(r._buf is None for r in readers)
    rng = __import__("random").Random(5)
    messages = [[os.urandom(rng.choice([5, 300, 5000, 20000])) for _ in range(30)]
                for _ in pairs]
    wires = [bytes(seal_records(sender, m)) for (sender, _), m in zip(pairs, messages)]
    positions, got = [0, 0, 0], [[], [], []]
    while any(p < len(w) for p, w in zip(positions, wires)):
        i = rng.randrange(3)
        if positions[i] >= len(wires[i]):
            continue
        room = readers[i].get_buffer()
        take = min(len(room), rng.choice([1, 17, 700, 5000, 70000]), len(wires[i]) - positions[i])
        room[:take] = wires[i][positions[i]:positions[i] + take]
        positions[i] += take
        got[i] += readers[i].buffer_updated(take)
    assert got == messages
    for reader in readers:
        assert reader.buffered == 0
        if reader._buf is not None:  # a large buffer from the 20000-byte records: kept
            assert len(reader._buf) > SMALL_RECEIVE_BUFFER  # until SHRINK_AFTER small reads
    sender, receiver = pairs[0]
    reader = RecordReader(receiver)
    assert reader.feed(bytes(seal_records(sender, [b"ping"]))) == [b"ping"]
    assert reader._buf is None


def test_a_burst_of_small_records_does_not_take_a_large_buffer():
    """Reads of many small records that fill the small buffer only move the pending record
    to the front; a record too large for it takes the large buffer."""
    sender, receiver = transports()
    reader = RecordReader(receiver)
    small = [os.urandom(1500) for _ in range(40)]
    assert read_like_a_socket(reader, bytes(seal_records(sender, small)), [1 << 20]) == small
    assert reader._buf is None  # drained; it never grew
    big = [os.urandom(30000)]
    wire = bytes(seal_records(sender, big))
    assert read_like_a_socket(reader, wire[:-1], [1 << 20]) == []
    assert len(reader._buf) > SMALL_RECEIVE_BUFFER
    assert reader.feed(wire[-1:]) == big


def test_forged_record_in_the_readers_buffer_is_an_error():
    sender, receiver = transports()
    wire = bytearray(seal_records(sender, [b"a" * 1000, b"b" * 1000]))
    wire[1500] ^= 0x40
    reader = RecordReader(receiver)
    with pytest.raises(RecordError, match="authentication"):
        read_like_a_socket(reader, bytes(wire), [700])


def mux_pair():
    return MuxConnection(True), MuxConnection(False)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 300_000), min_size=1, max_size=6),
       batch=st.sampled_from([1, 5000, 70_000, 256 << 10]),
       reads=st.lists(st.integers(1, 2 << 20), min_size=1, max_size=6))
def test_frames_sealed_by_the_writer_decode_identically_whatever_the_splits(lengths, batch,
                                                                             reads):
    """Mux frames -> RecordWriter records -> reads of any size -> RecordReader -> mux: the
    messages come out as they went in, for any write batch and any read boundaries."""
    sender, receiver = transports()
    a, b = mux_pair()
    streams = [a.open_stream() for _ in range(2)]
    sent = {sid: [] for sid in streams}
    for i, n in enumerate(lengths):
        sid = streams[i % 2]
        message = os.urandom(n)
        sent[sid].append(message)
        a.send(sid, message)
    writer = RecordWriter(sender)
    wire = bytearray()
    while (out := writer.seal_from(a.frames_into, a.has_data_to_send, batch)) is not None:
        wire += out
        if len(wire) % 3:  # sometimes the transport still holds the buffer
            writer.release()
    plaintexts = read_like_a_socket(RecordReader(receiver), bytes(wire), reads)
    # the writer fills records up to its chosen size, never to the wire's maximum
    assert all(len(p) <= SEALED_RECORD_PLAINTEXT < MAX_RECORD_PLAINTEXT for p in plaintexts)
    got = {sid: [] for sid in streams}
    partial = {sid: b"" for sid in streams}
    for plaintext in plaintexts:
        b.receive_data(plaintext)
        while (event := b.next_event()) is not None:
            if isinstance(event, DataReceived):
                partial[event.stream_id] += bytes(event.data)
                if event.end:
                    got[event.stream_id].append(partial[event.stream_id])
                    partial[event.stream_id] = b""
    assert got == sent


def test_a_buffer_still_held_by_the_transport_is_never_reused():
    sender, receiver = transports()
    a, _ = mux_pair()
    sid = a.open_stream()
    writer = RecordWriter(sender)
    a.send(sid, b"1" * 200_000)
    first = writer.seal_from(a.frames_into, a.has_data_to_send, 100_000)
    snapshot = bytes(first)
    a.send(sid, b"2" * 200_000)
    second = writer.seal_from(a.frames_into, a.has_data_to_send, 100_000)  # no release()
    assert bytes(first) == snapshot and second.obj is not first.obj
    second_bytes = bytes(second)
    writer.release()
    third = writer.seal_from(a.frames_into, a.has_data_to_send, 100_000)
    assert third.obj is second.obj  # released: reused
    reader = RecordReader(receiver)
    plaintexts = reader.feed(snapshot) + reader.feed(second_bytes) + reader.feed(third)
    assert sum(len(p) for p in plaintexts) > 300_000
