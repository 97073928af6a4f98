"""Bulk messages decrypted straight into their message's buffer (Stream.recv_buffer), over
real loopback connections: every size and order comes back intact through both receive calls,
a message the application still holds is never overwritten, interleaved bulk streams (where
the receiver's guess of the next record's stream is wrong) lose nothing; and the sans-IO
pieces of that path (RecordReader.next_record with a target, MuxConnection.receive_data_frame)
keep the checks of the ordinary path."""

from __future__ import annotations

import asyncio
import hashlib
import os
from ast import literal_eval

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overlay.host import Host, HostConfig
from overlay.mux import ConnectionTerminated, DataReceived, MuxConnection, MuxError
from overlay.mux.connection import INITIAL_WINDOW, MAX_FRAME_PAYLOAD
from overlay.mux.frames import DATA, END, FIN, HEADER, HEADER_SIZE, SYN
from overlay.record_layer import RecordError, RecordReader, seal_records
from tests.overlay.test_record_layer import transports

F = MAX_FRAME_PAYLOAD  # payload bytes of one full record
RECORD = MAX_FRAME_PAYLOAD + HEADER_SIZE  # plaintext bytes of one full record


def digest(data) -> bytes:
    return hashlib.sha256(data).digest()


async def _transfer(messages: list[bytes], *, hold: bool, streams: int = 1,
                    plain_recv=frozenset({0, 4, 5, 9, 12}), lockstep: bool = False):
    """Send `messages` on `streams` streams at once; the server answers, for each message, its
    digest, the id of its buffer object and that buffer's size. It takes the messages at
    indices in `plain_recv` with `recv()`, the others with `recv_buffer()` (all when `hold`).
    `lockstep`: the client waits for each answer before sending the next message."""
    server, client = Host(), Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    held = []

    async def sink(ctx, stream):
        i = 0
        while True:
            plain = i in plain_recv and not hold
            message = await (stream.recv() if plain else stream.recv_buffer())
            if message is None:
                break
            if type(message) is memoryview:
                assert not message.readonly and message.format == "B"
                answer = (digest(message), id(message.obj), len(message.obj))
            else:
                assert type(message) is bytes
                answer = (digest(message), 0, 0)
            if hold:
                held.append((message, answer[0]))
            elif type(message) is memoryview:
                message.release()  # done with it: its buffer may serve a later message
            await stream.send(repr(answer).encode())
            i += 1
        for message, first_digest in held:  # every held message still as it arrived
            assert digest(message) == first_digest
        await stream.send(b"done")

    server.add_stream_handler("sink", sink)
    try:
        async def one_stream():
            stream = await client.open_stream(addr, "sink")
            answers = []
            for message in messages:
                await stream.send(message)
                if lockstep:
                    answers.append(literal_eval((await stream.recv()).decode()))
            await stream.close()
            while (answer := await stream.recv()) != b"done":
                answers.append(literal_eval(answer.decode()))
            return answers

        return await asyncio.gather(*(one_stream() for _ in range(streams)))
    finally:
        await client.close()
        await server.close()


async def test_bulk_messages_of_every_size_come_back_whole_through_both_receive_calls():
    sizes = [3 * F + 5, 3 * F + 5, 3 * F + 5, 3 * F + 5, 2 * F, F // 2, 5 * F + 1, 5 * F + 1,
             5 * F + 1, 0, 1, F, F + 1, 2 * F + 1, 40 * F, 40 * F, 40 * F + 7, 3 * F]
    messages = [os.urandom(n) for n in sizes]
    [answers] = await _transfer(messages, hold=False)
    assert [a[0] for a in answers] == [digest(m) for m in messages]
    # Messages after one of several fragments and of about the same size were assembled in
    # place: their buffer is the message plus the frame header's headroom (not a join).
    for i in (2, 3, 7, 8, 15):
        assert answers[i][2] == HEADER_SIZE + sizes[i - 1], (i, answers[i])


async def test_the_buffer_of_a_released_message_serves_a_later_one():
    messages = [os.urandom(4 * F + 3) for _ in range(5)]
    [answers] = await _transfer(messages, hold=False, plain_recv=frozenset(), lockstep=True)
    assert [a[0] for a in answers] == [digest(m) for m in messages]
    # the first message is joined; from the second on they are assembled in place, and each
    # was released before the next one came: one buffer serves them all
    assert answers[0][1] != answers[1][1]
    assert answers[1][1] == answers[2][1] == answers[3][1] == answers[4][1] != 0


async def test_a_message_the_application_holds_is_never_overwritten():
    messages = [os.urandom(4 * F + 3) for _ in range(6)] + [os.urandom(2 * F)]
    [answers] = await _transfer(messages, hold=True, lockstep=True)
    assert [a[0] for a in answers] == [digest(m) for m in messages]
    assert len({a[1] for a in answers}) == len(answers)  # no buffer reused while held


async def test_interleaved_bulk_streams_lose_nothing():
    # The sender alternates the two streams frame by frame, so the receiver's guess of
    # which message the next record belongs to is often wrong.
    messages = [os.urandom(6 * F + i) for i in range(5)]
    results = await _transfer(messages, hold=False, streams=2)
    for answers in results:
        assert [a[0] for a in answers] == [digest(m) for m in messages]


async def test_spare_buffers_stay_within_the_budgets_of_unfinished_messages():
    # Each stream keeps the buffer of its last message assembled in place for reuse; a peer
    # that left many streams open after such messages pinned 16 MiB per stream (1 MiB here)
    # outside every budget: 40 MiB for 40 streams against a connection budget of 4.
    mib = 1 << 20
    server = Host(config=HostConfig(max_partial_bytes=4 * mib, max_partial_bytes_total=8 * mib))
    client = Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")

    async def sink(ctx, stream):
        while (message := await stream.recv()) is not None:
            await stream.send(digest(message))

    server.add_stream_handler("sink", sink)
    try:
        streams = [await client.open_stream(addr, "sink") for _ in range(12)]
        for stream in streams:
            for i in range(3):
                message = bytes([i]) * mib
                await stream.send(message)
                assert await stream.recv() == digest(message)
        conn = server.connection_to(client.peer_id)
        pinned = sum(len(b) for st in conn._streams.values() for b in st._spare)
        assert 0 < pinned <= 4 * mib and server._partial_budget.spares == pinned
        # spares never make a message refused: one of 3.5 MiB still fits the connection's
        big = os.urandom(7 * mib // 2)
        await streams[0].send(big)
        assert await streams[0].recv() == digest(big)
        for stream in streams:
            await stream.close()
            assert await stream.recv() is None
        assert server._partial_budget.spares == 0  # (the ends came before the answers)
    finally:
        await client.close()
        await server.close()
    assert server._partial_budget.spares == 0


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(0, 6 * F), min_size=1, max_size=6), hold=st.booleans())
def test_random_message_sizes_survive_in_place_assembly(sizes, hold):
    messages = [os.urandom(n) for n in sizes]
    [answers] = asyncio.run(_transfer(messages, hold=hold))
    assert [a[0] for a in answers] == [digest(m) for m in messages]


async def _inject(streams_messages: list[list[bytes]], rng) -> list[list[bytes]]:
    """An authenticated peer that frames and cuts into records as it likes (as another
    implementation may): frames of random sizes, the two streams interleaved, records cut at
    frame boundaries or anywhere. Returns the digests the server saw, per stream."""
    server, client = Host(), Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")

    async def sink(ctx, stream):
        seen = []
        while (message := await stream.recv_buffer()) is not None:
            seen.append(digest(message))
            message.release()
        await stream.send(repr(seen).encode())

    server.add_stream_handler("sink", sink)
    try:
        streams = [await client.open_stream(addr, "sink") for _ in streams_messages]
        queues = []
        for stream, messages in zip(streams, streams_messages, strict=True):
            frames = []
            for message in messages:
                pos = 0
                while True:
                    size = min(len(message) - pos, rng.choice([F, F, rng.randint(1, F)]))
                    last = pos + size == len(message)
                    frames.append(HEADER.pack(DATA, END if last else 0, stream.stream_id, size)
                                  + message[pos:pos + size])
                    pos += size
                    if last:
                        break
            frames.append(HEADER.pack(DATA, FIN, stream.stream_id, 0))
            queues.append(frames)
        wire = bytearray()
        bounds = []  # frame ends in `wire`
        while any(queues):
            queue = rng.choice([q for q in queues if q])
            wire += queue.pop(0)
            bounds.append(len(wire))
        conn = client.connection_to(server.peer_id)
        pos = 0
        while pos < len(wire):
            ends = [b for b in bounds if pos < b <= pos + RECORD]
            cut = rng.choice(ends) if ends and rng.random() < 0.8 else pos + rng.randint(1, RECORD)
            cut = min(cut, len(wire))
            conn._transport.write(conn._writer.seal(wire[pos:cut]))
            pos = cut
        return [literal_eval((await stream.recv()).decode()) for stream in streams]
    finally:
        await client.close()
        await server.close()


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.lists(st.one_of(st.sampled_from([3 * F + 1, 3 * F + 1, 2 * F + 9]),
                                         st.integers(0, 3 * F)), min_size=1, max_size=4),
                      min_size=1, max_size=2),
       rng=st.randoms(use_true_random=False))
def test_any_legal_framing_and_record_cutting_arrives_intact(sizes, rng):
    messages = [[os.urandom(n) for n in stream_sizes] for stream_sizes in sizes]
    seen = asyncio.run(_inject(messages, rng))
    assert seen == [[digest(m) for m in stream_messages] for stream_messages in messages]


# ------------------------------------------------------------------------ sans-IO pieces
def _read_all(reader: RecordReader, wire: bytes, place) -> list:
    room = reader.get_buffer()
    room[:len(wire)] = wire
    reader.received(len(wire))
    out = []
    while (plaintext := reader.next_record(place)) is not None:
        out.append(plaintext if type(plaintext) is bytes else bytes(plaintext))
    return out


def test_next_record_decrypts_into_the_place_it_is_given():
    sender, receiver = transports()
    plaintexts = [os.urandom(n) for n in (100, 2000, 17)]
    target = memoryview(bytearray(4000))
    given = []

    def place(size):
        given.append(size)
        return target[:size] if size == 2000 else None

    reader = RecordReader(receiver)
    assert _read_all(reader, bytes(seal_records(sender, plaintexts)), place) == plaintexts
    assert given == [100, 2000, 17]
    assert bytes(target[:2000]) == plaintexts[1]


def test_a_forged_record_decrypted_in_place_is_an_error():
    sender, receiver = transports()
    wire = bytearray(seal_records(sender, [b"y" * 300]))
    wire[50] ^= 1
    target = memoryview(bytearray(300))
    with pytest.raises(RecordError):
        _read_all(RecordReader(receiver), bytes(wire), lambda size: target[:size])


def _opened_stream() -> tuple[MuxConnection, int]:
    mux = MuxConnection(initiator=False)
    mux.receive_data(HEADER.pack(DATA, SYN, 1, 3) + b"abc")
    mux.events.clear()
    return mux, 1


def test_receive_data_frame_delivers_the_payload_it_was_given():
    mux, sid = _opened_stream()
    payload = memoryview(bytearray(b"x" * 1000))
    mux.receive_data_frame(END, sid, payload)
    [event] = mux.events
    assert type(event) is DataReceived and event.data is payload and event.end


def test_receive_data_frame_keeps_the_flow_control_and_flag_checks():
    mux, sid = _opened_stream()
    chunk = memoryview(bytearray(F))
    for _ in range(INITIAL_WINDOW // F):
        mux.receive_data_frame(0, sid, chunk)
    mux.receive_data_frame(0, sid, chunk)  # beyond the window: the connection ends
    assert type(mux.events[-1]) is ConnectionTerminated and mux.is_closed

    mux, sid = _opened_stream()
    mux.receive_data_frame(0x40, sid, memoryview(b"z"))
    assert type(mux.events[-1]) is ConnectionTerminated

    mux, sid = _opened_stream()
    mux.receive_data_frame(0, 7, memoryview(b"z"))  # never opened
    assert type(mux.events[-1]) is ConnectionTerminated


def test_receive_data_frame_refuses_to_cut_into_a_pending_frame():
    mux, sid = _opened_stream()
    mux.receive_data(HEADER.pack(DATA, 0, sid, 100) + b"only part")
    assert mux.frame_pending
    with pytest.raises(MuxError):
        mux.receive_data_frame(0, sid, memoryview(b"z"))
