"""The multiplexer state machine, driven by hand: no sockets, no sleeps."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
from overlay.mux.connection import INITIAL_WINDOW, MAX_FRAME_PAYLOAD, MAX_QUEUED_CONTROL
from overlay.mux.frames import HEADER, Flag, FrameType


def events(conn: MuxConnection) -> list:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def pump(a: MuxConnection, b: MuxConnection, rounds: int = 1000) -> None:
    """Move bytes both ways until neither side has anything to send."""
    for _ in range(rounds):
        ab, ba = a.data_to_send(), b.data_to_send()
        if not ab and not ba:
            return
        if ab:
            b.receive_data(ab)
        if ba:
            a.receive_data(ba)
    raise AssertionError("connections never went quiet")


def messages(evts: list, stream_id: int) -> list[bytes]:
    out, partial = [], b""
    for e in evts:
        if isinstance(e, OneShotStream | LastMessage) and e.stream_id == stream_id:
            out.append(partial + bytes(e.data))
            partial = b""
        elif isinstance(e, DataReceived) and e.stream_id == stream_id:
            partial += bytes(e.data)
            if e.end:
                out.append(partial)
                partial = b""
    return out


def frame(kind: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, flags, stream_id, length) + payload


def test_open_send_receive_and_close_both_ways():
    a, b = MuxConnection(True), MuxConnection(False)
    sid = a.open_stream()
    assert sid == 1
    a.send(sid, b"header")
    a.send(sid, b"payload", fin=True)
    pump(a, b)
    got = events(b)
    assert isinstance(got[0], StreamOpened) and got[0].stream_id == sid
    assert messages(got, sid) == [b"header", b"payload"]
    assert isinstance(got[-1], StreamEnded | LastMessage)
    b.send(sid, b"answer", fin=True)
    pump(a, b)
    got = events(a)
    assert messages(got, sid) == [b"answer"]
    assert isinstance(got[-1], StreamEnded | LastMessage)
    assert a.stream_ids() == [] and b.stream_ids() == []


def test_stream_ids_have_the_dialers_parity():
    a, b = MuxConnection(True), MuxConnection(False)
    assert [a.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [b.open_stream() for _ in range(2)] == [2, 4]


def test_large_message_is_split_into_frames_and_reassembled():
    a, b = MuxConnection(True), MuxConnection(False)
    sid = a.open_stream()
    data = bytes(range(256)) * 4000  # ~1 MiB, less than the window
    a.send(sid, data)
    out = a.data_to_send(1 << 30)
    assert len(out) > len(data)
    b.receive_data(out)
    got = events(b)
    frames = [e for e in got if isinstance(e, DataReceived)]
    assert all(len(f.data) <= MAX_FRAME_PAYLOAD for f in frames)
    assert messages(got, sid) == [data]


def test_flow_control_blocks_sender_until_receiver_acknowledges():
    a, b = MuxConnection(True), MuxConnection(False, MuxConfig(max_stream_window=INITIAL_WINDOW))
    sid = a.open_stream()
    a.send(sid, b"x" * (INITIAL_WINDOW * 3))
    b.receive_data(a.data_to_send(1 << 30))
    received = sum(len(e.data) for e in events(b) if isinstance(e, DataReceived))
    assert received == INITIAL_WINDOW  # exactly one window, then the sender stops
    assert a.data_to_send(1 << 30) == b""
    assert a.queued_bytes(sid) == INITIAL_WINDOW * 2
    b.acknowledge(sid, received)
    a.receive_data(b.data_to_send())
    b.receive_data(a.data_to_send(1 << 30))
    more = sum(len(e.data) for e in events(b) if isinstance(e, DataReceived))
    assert more == INITIAL_WINDOW


def received_bytes(conn: MuxConnection, sid: int) -> int:
    return sum(len(e.data) for e in events(conn) if isinstance(e, DataReceived))


def test_window_of_a_reader_that_keeps_up_doubles_up_to_the_limit():
    a = MuxConnection(True)
    b = MuxConnection(False, MuxConfig(max_stream_window=4 * INITIAL_WINDOW))
    sid = a.open_stream()
    a.send(sid, b"x" * (64 * INITIAL_WINDOW))
    bursts = []
    for _ in range(8):
        b.receive_data(a.data_to_send(1 << 30))
        got = received_bytes(b, sid)
        bursts.append(got)
        b.acknowledge(sid, got)  # the application read it all
        a.receive_data(b.data_to_send())
    # Each burst is what the window allowed: it doubles while the reader keeps up, then stays.
    assert bursts[:4] == [INITIAL_WINDOW, 2 * INITIAL_WINDOW, 4 * INITIAL_WINDOW,
                          4 * INITIAL_WINDOW]
    assert set(bursts[4:]) == {4 * INITIAL_WINDOW}


def test_window_growth_is_bounded_per_connection():
    a = MuxConnection(True)
    b = MuxConnection(False, MuxConfig(max_stream_window=8 * INITIAL_WINDOW,
                                       max_window_growth=3 * INITIAL_WINDOW))
    s1, s2 = a.open_stream(), a.open_stream()
    for sid in (s1, s2):
        a.send(sid, b"y" * (64 * INITIAL_WINDOW))
    total = []
    for _ in range(6):
        b.receive_data(a.data_to_send(1 << 30))
        got = [e for e in events(b) if isinstance(e, DataReceived)]
        total.append(sum(len(e.data) for e in got))
        for sid in (s1, s2):
            b.acknowledge(sid, sum(len(e.data) for e in got if e.stream_id == sid))
        a.receive_data(b.data_to_send())
    # Two streams of 1 MiB each, plus at most 3 MiB of growth between them.
    assert max(total) == 5 * INITIAL_WINDOW
    b.reset_stream(s1, "done")  # a closed stream gives its growth back
    assert b._window_growth == b._streams[s2].recv_window - INITIAL_WINDOW < 3 * INITIAL_WINDOW


def test_sender_exceeding_the_window_is_a_protocol_error():
    b = MuxConnection(False)
    b.receive_data(frame(FrameType.DATA, Flag.SYN, 1, 0))
    chunk = b"y" * MAX_FRAME_PAYLOAD
    for _ in range(INITIAL_WINDOW // MAX_FRAME_PAYLOAD + 1):
        b.receive_data(frame(FrameType.DATA, 0, 1, len(chunk), chunk))
    got = events(b)
    assert isinstance(got[-1], ConnectionTerminated)
    assert "window" in got[-1].reason and not got[-1].by_peer
    assert b.is_closed


def test_big_transfer_does_not_starve_a_small_request():
    a, b = MuxConnection(True), MuxConnection(False)
    big = a.open_stream()
    a.send(big, b"B" * (100 << 20))
    for _ in range(3):
        b.receive_data(a.data_to_send())  # the big transfer is under way
    events(b)
    small = a.open_stream()
    a.send(small, b"ping", fin=True)
    # The small request waits behind at most one frame of the big transfer.
    b.receive_data(a.data_to_send())
    b.receive_data(a.data_to_send())
    assert messages(events(b), small) == [b"ping"]


def test_round_robin_is_fair_between_two_bulk_streams():
    a, b = MuxConnection(True), MuxConnection(False)
    s1, s2 = a.open_stream(), a.open_stream()
    a.send(s1, b"1" * 400_000)
    a.send(s2, b"2" * 400_000)
    b.receive_data(a.data_to_send(300_000))
    got = [e for e in events(b) if isinstance(e, DataReceived)]
    per_stream = {s1: 0, s2: 0}
    for e in got:
        per_stream[e.stream_id] += len(e.data)
    assert abs(per_stream[s1] - per_stream[s2]) <= MAX_FRAME_PAYLOAD


def test_streams_over_the_limit_are_refused_but_the_connection_lives():
    a, b = MuxConnection(True), MuxConnection(False, MuxConfig(max_streams=2))
    ids = [a.open_stream() for _ in range(3)]
    for sid in ids:
        a.send(sid, b"hi")
    pump(a, b)
    assert [e.stream_id for e in events(b) if isinstance(e, StreamOpened)] == ids[:2]
    resets = [e for e in events(a) if isinstance(e, StreamReset)]
    assert [(r.stream_id, r.reason) for r in resets] == [(ids[2], "stream limit reached")]
    assert not a.is_closed and not b.is_closed


def test_local_stream_limit_raises():
    a = MuxConnection(True, MuxConfig(max_streams=1))
    a.open_stream()
    with pytest.raises(MuxError, match="too many"):
        a.open_stream()


def test_message_over_the_size_limit_resets_only_that_stream():
    a, b = MuxConnection(True), MuxConnection(False, MuxConfig(max_message_size=1000))
    big, ok = a.open_stream(), a.open_stream()
    a.send(big, b"z" * 5000)
    a.send(ok, b"fine")
    pump(a, b)
    got = events(b)
    assert any(isinstance(e, StreamReset) and e.stream_id == big and e.local for e in got)
    assert messages(got, ok) == [b"fine"]
    assert any(isinstance(e, StreamReset) and e.stream_id == big for e in events(a))


def test_reset_reaches_the_peer_with_its_reason():
    a, b = MuxConnection(True), MuxConnection(False)
    sid = a.open_stream()
    a.send(sid, b"req")
    pump(a, b)
    events(b)
    b.reset_stream(sid, "unknown_method: nope")
    pump(a, b)
    assert [(e.stream_id, e.reason) for e in events(a)] == [(sid, "unknown_method: nope")]
    # the stream is gone on both sides
    with pytest.raises(MuxError):
        a.send(sid, b"more")


def test_late_frames_for_a_reset_stream_are_ignored():
    a, b = MuxConnection(True), MuxConnection(False)
    sid = a.open_stream()
    a.send(sid, b"one")
    pump(a, b)
    events(b)
    b.reset_stream(sid, "bye")
    b.receive_data(frame(FrameType.DATA, 0, sid, 3, b"two"))  # was in flight
    assert events(b) == [] and not b.is_closed


def test_ping_is_answered():
    a, b = MuxConnection(True), MuxConnection(False)
    a.ping(77)
    pump(a, b)
    assert events(a) == [PongReceived(77)]


def test_a_peer_that_pings_and_never_reads_the_acks_is_cut_off():
    """Each unread PING ack stayed queued: a peer that never read grew our memory unbounded."""
    b = MuxConnection(False)
    b.receive_data(frame(FrameType.PING, 0, 0, 1) * MAX_QUEUED_CONTROL)
    assert events(b) == [] and not b.is_closed  # the bound itself is allowed
    b.receive_data(frame(FrameType.PING, 0, 0, 1) * 1000)
    got = events(b)
    assert isinstance(got[-1], ConnectionTerminated) and "does not read" in got[-1].reason
    assert b.data_to_send().endswith(HEADER.pack(FrameType.GO_AWAY, 0, 0, 1))


def test_refusals_of_streams_over_the_limit_are_bounded_too():
    b = MuxConnection(False, MuxConfig(max_streams=1))
    syns = b"".join(frame(FrameType.DATA, Flag.SYN, 2 * i + 1, 0) for i in range(5000))
    b.receive_data(syns)
    assert b.is_closed and "does not read" in events(b)[-1].reason


def test_resets_of_refused_requests_are_bounded_too():
    """A peer sending requests the host refuses (an unknown method) and reading nothing:
    each RESET stayed queued, without bound (the node's memory grew ~5x what it was sent)."""
    b = MuxConnection(False)
    for i in range(MAX_QUEUED_CONTROL + 10):
        b.receive_data(frame(FrameType.DATA, Flag.SYN | Flag.FIN, 2 * i + 1, 0))
        if b.is_closed:
            break
        b.reset_stream(2 * i + 1, "unknown method")
    got = events(b)
    assert b.is_closed and "does not read" in got[-1].reason


def test_pings_answered_as_they_come_never_hit_the_bound():
    a, b = MuxConnection(True), MuxConnection(False)
    for i in range(2 * MAX_QUEUED_CONTROL):
        a.ping(i)
        pump(a, b)
    assert len(events(a)) == 2 * MAX_QUEUED_CONTROL and not b.is_closed


def test_go_away_terminates():
    a, b = MuxConnection(True), MuxConnection(False)
    a.close()
    pump(a, b)
    got = events(b)
    assert isinstance(got[0], ConnectionTerminated) and got[0].by_peer
    with pytest.raises(MuxError):
        a.open_stream()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (frame(9, 0, 1, 0), "unknown frame type"),
        (frame(FrameType.DATA, 0x80, 1, 0), "flags"),
        (frame(FrameType.DATA, 0, 7, 1, b"x"), "unknown stream"),
        (frame(FrameType.DATA, Flag.SYN, 2, 0), "parity"),
        (frame(FrameType.DATA, Flag.SYN, 0, 0), "parity"),
        (frame(FrameType.DATA, Flag.SYN, 3, 0) + frame(FrameType.DATA, Flag.SYN, 1, 0), "reused"),
        (struct.pack(">BBII", 0, 0, 1, MAX_FRAME_PAYLOAD + 1), "exceeds limit"),
        (frame(FrameType.DATA, Flag.SYN | Flag.FIN, 1, 0) + frame(FrameType.DATA, 0, 1, 1, b"x"),
         "after FIN"),
        (frame(FrameType.PING, Flag.SYN, 0, 1), "flags"),
        (frame(FrameType.RESET, 0, 1, 1025, b"r" * 1025), "reset reason of 1025 bytes"),
    ],
)
def test_protocol_violations_end_the_connection(data, reason):
    b = MuxConnection(False)
    b.receive_data(data)
    got = events(b)
    assert isinstance(got[-1], ConnectionTerminated), got
    assert reason in got[-1].reason
    assert b.data_to_send().startswith(HEADER.pack(FrameType.GO_AWAY, 0, 0, 1))
    b.receive_data(frame(FrameType.PING, 0, 0, 1))  # nothing more is processed
    assert events(b) == []


def test_input_split_at_every_byte_gives_the_same_events():
    a, reference = MuxConnection(True), MuxConnection(False)
    sid = a.open_stream()
    a.send(sid, b"hello")
    a.send(sid, b"world" * 100, fin=True)
    wire = a.data_to_send(1 << 20)
    reference.receive_data(wire)
    expected = messages(events(reference), sid)
    split = MuxConnection(False)
    for i in range(len(wire)):
        split.receive_data(wire[i:i + 1])
    assert messages(events(split), sid) == expected == [b"hello", b"world" * 100]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_random_bytes_never_raise(data):
    b = MuxConnection(False)
    b.receive_data(data)
    events(b)
    b.data_to_send()


def _valid_wire() -> bytes:
    a = MuxConnection(True)
    s1, s2 = a.open_stream(), a.open_stream()
    a.send(s1, b"abc" * 50)
    a.send(s2, b"def", fin=True)
    a.ping(5)
    a.reset_stream(s1, "x")
    return a.data_to_send(1 << 20)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_frames_never_raise(data):
    wire = bytearray(_valid_wire())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(wire)))
    b = MuxConnection(False)
    b.receive_data(bytes(wire[:cut]))
    b.receive_data(bytes(wire[cut:]))
    for event in events(b):
        assert isinstance(event, StreamOpened | DataReceived | StreamEnded | StreamReset
                          | PongReceived | ConnectionTerminated | OneShotStream | LastMessage)
    b.data_to_send()


# ---------------------------------------------------------------- the small-message paths
def test_a_stream_sent_whole_in_one_frame_is_one_event():
    a, b = MuxConnection(True), MuxConnection(False)
    sid = a.open_stream()
    a.send(sid, b"request", fin=True)
    pump(a, b)
    got = events(b)
    assert got == [OneShotStream(sid, b"request")]
    b.send(sid, b"answer", fin=True)  # the answer closes the stream on both sides
    pump(a, b)
    assert events(a) == [LastMessage(sid, b"answer")]
    assert a.stream_ids() == [] and b.stream_ids() == []


def test_a_one_frame_stream_over_the_message_limit_is_reset():
    a, b = MuxConnection(True), MuxConnection(False, MuxConfig(max_message_size=4))
    sid = a.open_stream()
    a.send(sid, b"too long", fin=True)
    pump(a, b)
    got = events(b)
    assert [type(e) for e in got] == [StreamOpened, StreamReset]
    assert not b.is_closed


def test_frame_message_writes_one_frame_that_the_peer_reads_as_sent():
    a, b = MuxConnection(True), MuxConnection(False)
    sid = a.open_stream()
    out = bytearray()
    assert a.frame_message(sid, (b"head", memoryview(b"-body")), out, fin=True)
    assert not a.has_data_to_send()  # nothing was queued
    b.receive_data(bytes(out))
    assert events(b) == [OneShotStream(sid, b"head-body")]
    out.clear()
    assert b.frame_message(sid, (b"ok",), out, fin=False)
    assert b.frame_message(sid, (b"done",), out, fin=True)
    a.receive_data(bytes(out))
    got = events(a)
    assert messages(got, sid) == [b"ok", b"done"] and isinstance(got[-1], StreamEnded | LastMessage)
    assert a.stream_ids() == [] and b.stream_ids() == []
    with pytest.raises(MuxError):  # a closed stream: refused, and `send` says why
        assert not a.frame_message(sid, (b"x",), out, fin=False)
        a.send(sid, b"x")


def test_frame_message_refuses_what_must_wait_and_writes_nothing():
    a = MuxConnection(True)
    sid = a.open_stream()
    out = bytearray()
    big = MAX_FRAME_PAYLOAD + 1
    assert not a.frame_message(sid, (b"x" * big,), out, fin=False)  # over one frame
    full = bytearray(MAX_FRAME_PAYLOAD)  # `out` holds nearly a record already
    assert not a.frame_message(sid, (b"x",), full, fin=False)
    assert len(full) == MAX_FRAME_PAYLOAD
    a.send(sid, b"queued first")
    assert not a.frame_message(sid, (b"later",), out, fin=False)  # order within a stream
    a.data_to_send()
    assert a.frame_message(sid, (b"now",), out, fin=False)
    s2 = a.open_stream()
    a.send(s2, b"y" * INITIAL_WINDOW)
    a.data_to_send(INITIAL_WINDOW + 100)  # the window of s2 is used up
    assert not a.frame_message(s2, (b"z",), out, fin=False)
    a.send(sid, b"", fin=True)
    assert not a.frame_message(sid, (b"after fin",), out, fin=False)
    assert len(out) == HEADER.size + 3


def fragment(stream_id: int, size: int, flags: int = 0) -> bytes:
    return frame(FrameType.DATA, flags, stream_id, size, b"x" * size)


def test_unfinished_messages_over_the_connection_budget_reset_the_stream_that_goes_over():
    b = MuxConnection(False, MuxConfig(max_partial_bytes=3000))
    b.receive_data(fragment(1, 1000, Flag.SYN) + fragment(3, 1000, Flag.SYN))
    b.receive_data(fragment(1, 1000) + fragment(3, 1001))
    got = events(b)
    resets = [e for e in got if isinstance(e, StreamReset)]
    assert [(e.stream_id, e.local) for e in resets] == [(3, True)]
    assert resets[0].reason.startswith("too_large: unfinished messages")
    assert b.partial_bytes == 2000  # stream 3's fragments were dropped with it
    b.receive_data(fragment(1, 1000, Flag.END))  # what is held, once finished, frees the budget
    assert b.partial_bytes == 0
    b.receive_data(fragment(5, 2999, Flag.SYN))
    assert not any(isinstance(e, StreamReset) for e in events(b)[1:])
    assert b.partial_bytes == 2999


def test_whole_messages_never_count_against_the_budget():
    b = MuxConnection(False, MuxConfig(max_partial_bytes=100))
    for sid in (1, 3, 5):
        b.receive_data(fragment(sid, 5000, Flag.SYN | Flag.END))
    assert not any(isinstance(e, StreamReset) for e in events(b))
    assert b.partial_bytes == 0


def test_a_reset_or_finished_stream_gives_its_fragments_back():
    budget = PartialBudget(10_000)
    b = MuxConnection(False, budget=budget)
    b.receive_data(fragment(1, 700, Flag.SYN) + fragment(3, 300, Flag.SYN))
    assert (b.partial_bytes, budget.held, budget.holders) == (1000, 1000, 1)
    b.receive_data(frame(FrameType.RESET, 0, 1, 0))
    assert (b.partial_bytes, budget.held) == (300, 300)
    b.release_budget()  # the driver dropped the connection
    assert (budget.held, budget.holders) == (0, 0)


def test_the_host_wide_budget_refuses_the_hog_first():
    budget = PartialBudget(4000)
    hog, honest = MuxConnection(False, budget=budget), MuxConnection(False, budget=budget)
    hog.receive_data(fragment(1, 3000, Flag.SYN) + fragment(3, 900, Flag.SYN))
    honest.receive_data(fragment(1, 1500, Flag.SYN))  # over the total, under half of it
    assert not any(isinstance(e, StreamReset) for e in events(honest))
    hog.receive_data(fragment(5, 100, Flag.SYN))  # over the total and over its share
    resets = [e for e in events(hog) if isinstance(e, StreamReset)]
    assert [e.stream_id for e in resets] == [5] and resets[0].reason.startswith("busy: ")
    assert budget.held == 5400 and budget.holders == 2
    honest.receive_data(fragment(1, 600))  # over its share of 2000 as well
    assert [type(e) for e in events(honest)] == [StreamReset]
    assert budget.held == 3900


def test_partial_budget_arithmetic():
    budget = PartialBudget(100)
    assert budget.admits(0, 100) and not budget.admits(0, 101)
    budget.take(0, 90)
    assert budget.admits(90, 10) and not budget.admits(90, 11)
    assert budget.admits(0, 50) and not budget.admits(0, 51)  # a newcomer's share: 100 / 2
    budget.give(90, 90)
    assert (budget.held, budget.holders) == (0, 0)
    with pytest.raises(ValueError):
        PartialBudget(0)


@given(st.integers(1, 200), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 60)),
                                      max_size=40))
def test_try_take_is_admits_then_take(limit, moves):
    """The one-call form on the stream-opening path decides and counts as the two calls do."""
    one, two = PartialBudget(limit), PartialBudget(limit)
    held = [0, 0, 0, 0]  # what each of four connections holds
    for conn, size in moves:
        admitted = two.admits(held[conn], size)
        if admitted:
            two.take(held[conn], size)
        assert one.try_take(held[conn], size) == admitted
        if admitted:
            held[conn] += size
        assert (one.held, one.holders) == (two.held, two.holders)


def test_a_frame_trickling_in_a_byte_at_a_time_is_parsed_once(monkeypatch):
    """Each byte of a pending frame re-copied and re-parsed all of it: quadratic time, about
    0.7 s of CPU for one 64 KiB frame sent in one-byte records."""
    import overlay.mux.connection as mux_module

    parsed = []

    class CountingHeader:
        size = HEADER.size

        @staticmethod
        def unpack_from(buffer, offset=0):
            parsed.append(offset)
            return HEADER.unpack_from(buffer, offset)

        pack = staticmethod(HEADER.pack)
        pack_into = staticmethod(HEADER.pack_into)

    monkeypatch.setattr(mux_module, "HEADER", CountingHeader)
    b = MuxConnection(False)
    wire = fragment(1, 5000, Flag.SYN | Flag.END) + frame(FrameType.PING, 0, 0, 7)
    for i in range(len(wire)):
        b.receive_data(bytearray(wire[i:i + 1]))
    assert len(parsed) <= 4
    got = events(b)
    assert messages(got, 1) == [b"x" * 5000]
    assert b.data_to_send() == frame(FrameType.PING, Flag.ACK, 0, 7)


def test_a_reserved_buffer_counts_against_the_budget_until_its_message_ends():
    budget = PartialBudget(1 << 20)
    b = MuxConnection(False, MuxConfig(max_partial_bytes=10_000), budget)
    b.receive_data(fragment(1, 100, Flag.SYN) + fragment(3, 100, Flag.SYN))
    assert b.reserve(1, 6000) and b.partial_bytes == 6100
    assert not b.reserve(3, 5000) and b.partial_bytes == 6100  # would take 11,000
    b.receive_data(fragment(1, 3000))  # inside what was reserved: nothing more counted
    assert b.partial_bytes == 6100 and budget.held == 6100
    b.receive_data(fragment(1, 3000))  # 6,100 received: beyond the reservation
    assert b.partial_bytes == 6200
    b.receive_data(fragment(1, 10, Flag.END))
    assert b.partial_bytes == 100 and budget.held == 100
    assert b.reserve(3, 9000) and not b.reserve(99, 10)
    b.receive_data(frame(FrameType.RESET, 0, 3, 0))
    assert b.partial_bytes == 0 and (budget.held, budget.holders) == (0, 0)


def test_spare_buffers_are_kept_only_in_the_room_unfinished_messages_leave():
    budget = PartialBudget(8000)
    b = MuxConnection(False, MuxConfig(max_partial_bytes=5000), budget)
    b.receive_data(fragment(1, 1000, Flag.SYN))  # an unfinished message of 1,000 bytes
    assert b.keep_spare(3000) and budget.spares == 3000
    assert not b.keep_spare(1001)  # 1,000 + 3,000 + 1,001 > 5,000
    other = MuxConnection(False, MuxConfig(max_partial_bytes=5000), budget)
    assert other.keep_spare(4000) and not other.keep_spare(1)  # the host's 8,000 are used
    # spares never make a message refused: the connection's 5,000 still hold 4,000 more
    b.receive_data(fragment(1, 3900))
    assert b.partial_bytes == 4900 and not [e for e in events(b) if type(e) is StreamReset]
    b.drop_spare(3000)
    assert budget.spares == 4000
    other.release_budget()
    assert budget.spares == 0
    other.drop_spare(4000)  # (a stream letting go after its connection was dropped)
    assert budget.spares == 0


def test_unsent_answers_are_counted_until_framed_or_dropped():
    budget = PartialBudget(1 << 30)
    b = MuxConnection(False, unsent_budget=budget)
    b.receive_data(fragment(1, 0, Flag.SYN) + fragment(3, 0, Flag.SYN))  # the peer's streams
    b.send(1, b"x" * 200_000)
    b.send(3, b"y" * 50_000)
    ours = b.open_stream()
    b.send(ours, b"z" * 70_000)  # a request of ours: the peer did not ask for it
    assert b.unsent_bytes == 250_000 and (budget.held, budget.holders) == (250_000, 1)
    sent = b.data_to_send(100_000)
    answers = sum(length for kind, _, sid, length in _frames(sent) if sid in (1, 3))
    assert b.unsent_bytes == 250_000 - answers
    b.reset_stream(1)
    assert b.unsent_bytes == budget.held
    b.data_to_send(1 << 20)
    assert b.unsent_bytes == 0 and (budget.held, budget.holders) == (0, 0)
    b.send(3, b"z" * 10)
    b.release_budget()
    assert (budget.held, budget.holders) == (0, 0)


def _frames(wire: bytes):
    pos = 0
    while pos < len(wire):
        kind, flags, sid, length = HEADER.unpack_from(wire, pos)
        yield kind, flags, sid, length
        pos += HEADER.size + (length if kind in (FrameType.DATA, FrameType.RESET) else 0)


def test_streams_over_the_hosts_total_are_refused_to_the_connection_holding_most():
    streams = PartialBudget(4)
    hog, honest = MuxConnection(False, stream_budget=streams), MuxConnection(
        False, stream_budget=streams)
    hog.receive_data(b"".join(fragment(sid, 0, Flag.SYN) for sid in (1, 3, 5)))
    honest.receive_data(fragment(1, 0, Flag.SYN) + fragment(3, 0, Flag.SYN))  # its share: 2
    assert streams.held == 5 and not any(isinstance(e, StreamReset) for e in events(honest))
    hog.receive_data(fragment(7, 0, Flag.SYN))
    assert hog.data_to_send() == frame(FrameType.RESET, 0, 7, 20, b"stream limit reached")
    hog.receive_data(frame(FrameType.RESET, 0, 1, 0))
    assert streams.held == 4
    hog.release_budget()
    assert (streams.held, streams.holders) == (2, 1)
    hog.receive_data(frame(FrameType.RESET, 0, 3, 0))  # (released: counted no more)
    assert streams.held == 2
