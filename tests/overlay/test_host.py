"""Loopback tests of the asyncio driver: real sockets, real encryption, hosts in one process."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import struct
import time
import tracemalloc

import pytest

from overlay.host import (
    ConnectionLost,
    Host,
    HostConfig,
    RemoteError,
    RpcTimeout,
    address_family,
)
from overlay.identity import Identity
from overlay.multiaddr import Multiaddr
from overlay.secure_handshake import PROLOGUE
from overlay.streams import SEND_HIGH_WATER, Stream


async def echo(ctx, payload: bytes) -> bytes:
    return payload


@pytest.fixture
async def pair():
    server, client = Host(), Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)
    yield server, client, addr
    await client.close()
    await server.close()


async def test_call_round_trip_and_connection_reuse(pair):
    server, client, addr = pair
    assert addr.peer_id == server.peer_id and str(addr).startswith("/ip4/127.0.0.1/tcp/")
    assert await client.call(addr, "echo", b"hello") == b"hello"
    assert await client.call(server.peer_id, "echo", b"") == b""
    results = await asyncio.gather(*(client.call(server.peer_id, "echo", bytes([i]) * i)
                                     for i in range(100)))
    assert results == [bytes([i]) * i for i in range(100)]
    assert len(client._all) == 1 and len(server._all) == 1  # one connection, reused
    assert server.connection_to(client.peer_id) is not None  # usable in the other direction
    client.add_handler("whoami", lambda ctx, p: _async(str(ctx.peer).encode()))
    assert await server.call(client.peer_id, "whoami", b"") == str(server.peer_id).encode()


async def _async(value):
    return value


async def test_unary_answers_of_every_size_and_calls_that_end_early(pair):
    server, client, addr = pair
    # Answers of one frame, of two fragments (status byte, then the payload), and larger than
    # the initial flow-control window (the caller must return credit as it receives).
    for size in (0, 1000, 20_000, 3 << 20):
        payload = os.urandom(size)
        assert await client.call(addr, "echo", payload) == payload
    conn = client.connection_to(server.peer_id)
    assert conn.num_streams == 0  # every finished call left the connection's table

    started = asyncio.Event()

    async def stall(ctx, payload):
        started.set()
        await asyncio.sleep(30)

    server.add_handler("stall", stall)
    task = asyncio.ensure_future(client.call(addr, "stall", b"x"))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn.num_streams == 0  # a cancelled call is reset and forgotten
    with pytest.raises(RpcTimeout):
        await client.call(addr, "stall", b"x", timeout=0.05)
    assert conn.num_streams == 0
    assert await client.call(addr, "echo", b"still fine") == b"still fine"


async def test_an_answer_past_the_callers_bound_fails_as_it_arrives(pair):
    """The DHT's answers are at most 1 MiB, but a call held any answer whole (up to the
    connection's 256 MiB message limit) before its decoder refused it."""
    server, client, addr = pair
    for size, bound in ((3 << 20, 1 << 20), (5000, 4000)):  # many fragments; one frame
        with pytest.raises(ConnectionLost, match=f"exceeds the {bound} bytes"):
            await client.call(addr, "echo", os.urandom(size), max_answer=bound)
    assert await client.call(addr, "echo", b"x" * 1000, max_answer=4000) == b"x" * 1000
    assert client.connection_to(server.peer_id).num_streams == 0


async def test_concurrent_dials_are_deduplicated(pair):
    _server, client, addr = pair
    await asyncio.gather(*(client.connect(addr) for _ in range(20)))
    assert len(client._all) == 1


async def test_wrong_peer_id_aborts_the_dial(pair):
    server, client, addr = pair
    impostor = addr.with_peer(Identity.generate().peer_id)
    with pytest.raises(ConnectionLost, match="peer"):
        await client.connect(impostor)
    assert client.connection_to(server.peer_id) is None
    assert await client.call(addr, "echo", b"ok") == b"ok"  # the server is unharmed


async def test_remote_errors_are_structured(pair):
    server, client, addr = pair

    async def fails(ctx, payload):
        raise RemoteError("bad_shape", "expected (1, 8)")

    async def crashes(ctx, payload):
        raise KeyError("secret internals")

    server.add_handler("fails", fails)
    server.add_handler("crashes", crashes)
    with pytest.raises(RemoteError) as info:
        await client.call(addr, "fails", b"")
    assert (info.value.code, info.value.message) == ("bad_shape", "expected (1, 8)")
    with pytest.raises(RemoteError) as info:
        await client.call(addr, "crashes", b"")
    assert info.value.code == "internal" and "secret" not in str(info.value)
    with pytest.raises(RemoteError) as info:
        await client.call(addr, "nope", b"")
    assert info.value.code == "unknown_method"
    assert await client.call(addr, "echo", b"still fine") == b"still fine"


async def test_a_method_name_over_the_documented_limit_is_a_bad_request(pair):
    """PROTOCOL.md allows 1 to 128 bytes; longer names were looked up (and echoed back)."""
    server, client, addr = pair
    await client.connect(addr)
    conn = client.connection_to(server.peer_id)
    for name, code in ((b"e" * 129, "bad_request"), (b"e" * 128, "unknown_method")):
        header = struct.pack(">BBI", 0, len(name), 0xFFFFFFFF) + name
        answer = asyncio.get_running_loop().create_future()
        conn.start_call((header,), answer)
        with pytest.raises(RemoteError) as refused:
            await asyncio.wait_for(answer, 5)
        assert refused.value.code == code


async def test_deadline_exceeded_on_both_sides(pair):
    server, client, addr = pair
    cancelled = asyncio.Event()

    async def slow(ctx, payload):
        assert ctx.deadline is not None
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b""

    server.add_handler("slow", slow)
    with pytest.raises(RpcTimeout):
        await client.call(addr, "slow", b"", timeout=0.2)
    await asyncio.wait_for(cancelled.wait(), 5)  # the server stopped working on it too
    assert await client.call(addr, "echo", b"after") == b"after"


async def test_bidirectional_stream(pair):
    server, client, addr = pair

    async def doubler(ctx, stream):
        while (message := await stream.recv()) is not None:
            await stream.send(message * 2)

    server.add_stream_handler("double", doubler)
    stream = await client.open_stream(addr, "double")
    for i in range(50):
        await stream.send(str(i).encode())
        assert await stream.recv() == str(i).encode() * 2
    await stream.close()
    assert await stream.recv() is None


async def test_large_transfer_does_not_starve_small_calls(pair):
    server, client, addr = pair
    received = []

    async def sink(ctx, stream):
        total = 0
        while (message := await stream.recv()) is not None:
            total += len(message)
            await asyncio.sleep(0)  # a slow consumer
        received.append(total)

    server.add_stream_handler("sink", sink)
    stream = await client.open_stream(addr, "sink")
    chunk = os.urandom(4 << 20)

    async def push():
        for _ in range(25):  # 100 MiB
            await stream.send(chunk)
        await stream.close()

    pusher = asyncio.ensure_future(push())
    await asyncio.sleep(0.05)
    latencies, queued = [], []
    loop = asyncio.get_running_loop()
    conn = client.connection_to(server.peer_id)
    while not pusher.done() and len(latencies) < 200:
        start = loop.time()
        assert await client.call(addr, "echo", b"small") == b"small"
        latencies.append(loop.time() - start)
        queued.append(conn.queued_bytes(stream.stream_id))
    # Small calls were answered while the transfer ran, not queued behind all of it.
    assert len(latencies) >= 5, latencies
    await asyncio.wait_for(pusher, 120)
    # Bounded buffering: the sender holds at most one message beyond its high-water mark.
    assert max(queued) <= SEND_HIGH_WATER + len(chunk)
    for _ in range(200):
        if received:
            break
        await asyncio.sleep(0.05)
    assert received == [100 << 20]
    assert max(latencies) < 5.0  # served during the transfer, not after it


async def test_garbage_closes_only_that_connection(caplog):
    server, client = Host(config=HostConfig(handshake_timeout=1.0)), Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)
    garbage = [
        b"\x00\x05hello",  # a first message that is not an ephemeral key: refused at once
        b"\x00\x00",  # an empty handshake message
        b"\x01\x00" + os.urandom(256),  # a full-size message of noise
        b"GET / HTTP/1.1\r\n\r\n",  # claims an 18 KB message and stalls: the timeout ends it
    ]
    try:
        assert await client.call(addr, "echo", b"x") == b"x"
        with caplog.at_level(logging.INFO, logger="overlay.connection"):
            for data in garbage:
                reader, writer = await asyncio.open_connection(addr.host, addr.port)
                writer.write(data)
                await writer.drain()
                await asyncio.wait_for(reader.read(), 5)  # the server closes it
                writer.close()
                assert await client.call(addr, "echo", b"y") == b"y"  # others unharmed
        assert caplog.text.count("handshake failed") == 3
        assert "handshake timed out" in caplog.text
    finally:
        await client.close()
        await server.close()


async def test_stalled_handshake_times_out():
    server = Host(config=HostConfig(handshake_timeout=0.3))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    try:
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        # Silent dialer: the server gives up after its handshake timeout.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        await server.close()


async def test_forged_transport_record_closes_the_connection(pair):
    server, client, addr = pair
    assert await client.call(addr, "echo", b"x") == b"x"
    conn = client.connection_to(server.peer_id)
    conn._transport.write(struct.pack(">H", 40) + os.urandom(40))  # not sealed with the key
    for _ in range(100):
        if conn.closed:
            break
        await asyncio.sleep(0.01)
    assert conn.closed
    assert await client.call(addr, "echo", b"redial") == b"redial"


async def test_peer_that_vanishes_fails_pending_calls(pair):
    server, client, addr = pair
    started = asyncio.Event()

    async def hang(ctx, payload):
        started.set()
        await asyncio.sleep(30)
        return b""

    server.add_handler("hang", hang)
    call = asyncio.ensure_future(client.call(addr, "hang", b"", timeout=30))
    await started.wait()
    server.connection_to(client.peer_id)._transport.abort()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(call, 5)


async def test_connection_limit():
    """At the limit an idle connection makes room; busy ones are kept."""
    server = Host(config=HostConfig(max_connections=1))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)
    started, release = asyncio.Event(), asyncio.Event()

    async def hang(ctx, payload):
        started.set()
        await release.wait()
        return b"done"

    server.add_handler("hang", hang)
    a, b = Host(), Host()
    try:
        assert await a.call(addr, "echo", b"1") == b"1"
        call = asyncio.ensure_future(a.call(addr, "hang", b""))
        await started.wait()
        with pytest.raises(ConnectionLost):  # a's connection is busy: b is refused
            await b.call(addr, "echo", b"2", timeout=5)
        release.set()
        assert await call == b"done"
        assert await b.call(addr, "echo", b"3") == b"3"  # a's idle connection made room
        assert await a.call(addr, "echo", b"4", timeout=5) == b"4"  # and a redials
    finally:
        for host in (a, b, server):
            await host.close()


async def test_idle_connections_cannot_lock_others_out():
    """A peer holding max_connections idle connections, some of them never starting the
    handshake, refused every other peer until it let go."""
    server = Host(config=HostConfig(max_connections=8))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)
    hoarders = [Host() for _ in range(4)]
    silent = []
    client = Host()
    try:
        for hoarder in hoarders:
            await hoarder.connect(addr)
        for _ in range(4):
            silent.append(await asyncio.open_connection(addr.host, addr.port))
        await asyncio.sleep(0.05)
        assert await client.call(addr, "echo", b"in", timeout=5) == b"in"
    finally:
        for _, writer in silent:
            writer.close()
        for host in (*hoarders, client, server):
            await host.close()


async def test_unfinished_requests_are_bounded_per_connection():
    """Credit comes back for the fragments of unfinished messages, so each of a peer's 1024
    streams could hold a message of up to max_message_size (256 MiB) it never finished."""
    server = Host(config=HostConfig(max_partial_bytes=8 << 20))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)
    client = Host()
    try:
        big = bytes(2 << 20)
        answers = await asyncio.gather(*(client.call(addr, "echo", big) for _ in range(3)))
        assert answers == [big] * 3  # honest concurrent requests fit the budget
        conn = client.connection_to(server.peer_id)
        header = struct.pack(">BBI", 0, 4, 0xFFFFFFFF) + b"echo"
        streams = [conn.open_stream() for _ in range(4)]
        for stream in streams:
            conn._mux.send(stream.stream_id, header, end=False)
            conn._mux.send(stream.stream_id, bytes(3 << 20), end=False)
        conn._flush()
        for _ in range(200):
            if sum(s._error is not None for s in streams) >= 2:
                break
            await asyncio.sleep(0.02)
        errors = [s._error for s in streams if s._error is not None]
        assert len(errors) >= 2 and "unfinished messages" in str(errors[0])
        served = server.connection_to(client.peer_id)
        assert served._mux.partial_bytes <= 8 << 20
        assert await client.call(addr, "echo", b"still served") == b"still served"
        await client.close()
        for _ in range(100):
            if not server._partial_budget.held:
                break
            await asyncio.sleep(0.02)
        assert server._partial_budget.held == 0  # a closed connection holds nothing
    finally:
        await client.close()
        await server.close()


async def test_streams_without_a_request_header_cannot_lock_others_out():
    """At the limit only connections with no stream open made room: a peer that kept one
    stream without a request header open on each of its connections (a fresh one before the
    header timeout reset the last) refused every other peer."""
    server = Host(config=HostConfig(max_connections=8))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)
    hoarders = [Host() for _ in range(8)]
    client = Host()
    try:
        for hoarder in hoarders:
            conn = hoarder.connection_to(await hoarder.connect(addr))
            stream = conn.open_stream()
            conn._mux.send(stream.stream_id, b"", end=False)  # a SYN, and no header
            conn._flush()
        for _ in range(100):
            served = [c for c in server._all if c.headerless]
            if len(served) == 8:
                break
            await asyncio.sleep(0.02)
        assert len(served) == 8 and all(c.unused for c in served)
        assert await client.call(addr, "echo", b"in", timeout=5) == b"in"
        conn = server.connection_to(client.peer_id)
        assert conn is not None and not conn.headerless and len(server._all) == 8
    finally:
        for host in (*hoarders, client, server):
            await host.close()


async def test_buffers_sized_ahead_count_against_the_budget_of_unfinished_messages():
    """A stream whose previous message came in several fragments gets a buffer of that size
    at the next message's first fragment: a peer that sent one such message on each stream,
    then one byte of the next, had us allocate the whole of each while the budget of
    unfinished messages counted one byte per stream."""
    server = Host(config=HostConfig(max_partial_bytes=6 << 20))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    opened: list[Stream] = []

    async def sink(ctx, stream):
        opened.append(stream)
        while await stream.recv() is not None:
            pass

    server.add_stream_handler("sink", sink)
    client = Host()
    try:
        streams = [await client.open_stream(addr, "sink") for _ in range(4)]
        for stream in streams:
            await stream.send(bytes(2 << 20))
        conn = client.connection_to(server.peer_id)
        for stream in streams:
            conn._mux.send(stream.stream_id, b"x", end=False)
        conn._flush()
        for _ in range(200):
            if len(opened) == 4 and all(s._partial_size == 1 for s in opened):
                break
            await asyncio.sleep(0.02)
        assert all(s._partial_size == 1 for s in opened)
        sized = sum(len(s._asm) - 10 for s in opened if s._asm is not None)
        served = server.connection_to(client.peer_id)
        assert sized >= 2 << 20 and sized <= served._mux.partial_bytes <= 6 << 20
    finally:
        await client.close()
        await server.close()


async def test_a_peer_that_reads_no_answers_gets_no_more_of_them_queued():
    """Tiny requests can ask for large answers: a peer that sent 1,000 find_value requests
    of 50 bytes and read nothing had the node queue 1 GiB of answers on its connection."""
    server = Host(config=HostConfig(max_unsent_bytes=4 << 20))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    answer = bytes(1 << 20)

    async def large(ctx, payload):
        return answer

    server.add_handler("large", large)
    client = Host()
    try:
        conn = client.connection_to(await client.connect(addr))
        conn._transport.pause_reading()  # and reads nothing
        calls = [asyncio.ensure_future(client.call(addr, "large", b"", timeout=30))
                 for _ in range(40)]
        served = server.connection_to(client.peer_id)
        for _ in range(200):
            if served._mux.stream_ids() and served._mux.unsent_bytes >= 4 << 20:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert 4 << 20 <= served._mux.unsent_bytes <= 6 << 20
        conn._transport.resume_reading()
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, RemoteError)]
        assert refused and all(r.code == "busy" for r in refused)
        assert sum(r == answer for r in results) == 40 - len(refused) >= 4
        assert await client.call(addr, "large", b"") == answer  # read again: served again
        assert server._unsent_budget.held <= 1 << 20
    finally:
        await client.close()
        await server.close()


async def test_streams_are_bounded_across_connections():
    """Each connection could hold max_streams_per_connection streams, whatever the others
    held: a million streams at the defaults, some 5 KiB and a task each."""
    server = Host(config=HostConfig(max_streams_total=8))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)
    hog, client = Host(), Host()
    try:
        conn = hog.connection_to(await hog.connect(addr))
        streams = [conn.open_stream() for _ in range(20)]
        for stream in streams:
            conn._mux.send(stream.stream_id, b"", end=False)  # SYN-only streams
        conn._flush()
        for _ in range(100):
            if sum(s._error is not None for s in streams) >= 12:
                break
            await asyncio.sleep(0.02)
        assert sum(s._error is not None for s in streams) == 12
        assert server._stream_budget.held == 8
        assert await client.call(addr, "echo", b"fits", timeout=5) == b"fits"
        await hog.close()
        for _ in range(100):
            if server._stream_budget.held == 0:
                break
            await asyncio.sleep(0.02)
        assert server._stream_budget.held == 0
    finally:
        for host in (hog, client, server):
            await host.close()


async def test_a_host_uses_one_static_key_for_all_its_connections(pair):
    server, client, addr = pair
    other = Host()
    try:
        await client.connect(addr)
        await other.connect(addr)
        seen = {h.connection_to(server.peer_id)._reader._cipher.remote_static
                for h in (client, other)}
        assert seen == {server._static[0].public}
    finally:
        await other.close()


async def test_an_answer_without_fin_does_not_keep_the_call_open(pair):
    """A callee that answered without FIN kept each call's stream open on the caller until
    all 1,024 were taken and every call to it failed."""
    server, client, addr = pair
    await client.connect(addr)
    served = server.connection_to(client.peer_id)
    served.answer = lambda stream_id, parts: served.mux_send_parts(stream_id, parts, False)
    conn = client.connection_to(server.peer_id)
    for i in range(3):
        assert await client.call(addr, "echo", b"%d" % i) == b"%d" % i
    assert conn.num_streams == 0 and not conn._mux.stream_ids()


async def test_unreachable_address_is_a_clear_error():
    host = Host()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    try:
        with pytest.raises(ConnectionLost, match="dial"):
            await host.connect(Multiaddr.parse(f"/ip4/127.0.0.1/tcp/{port}"))
    finally:
        await host.close()


@pytest.mark.parametrize(
    ("text", "family"),
    [("/ip4/127.0.0.1/tcp/1", socket.AF_INET), ("/ip6/::1/tcp/1", socket.AF_INET6),
     ("/dns/localhost/tcp/1", socket.AF_UNSPEC), ("/dns4/localhost/tcp/1", socket.AF_INET),
     ("/dns6/localhost/tcp/1", socket.AF_INET6)],
)
def test_address_family_follows_the_protocol(text, family):
    assert address_family(Multiaddr.parse(text)) == family


async def test_dns6_never_dials_an_ipv4_address(pair):
    server, client, addr = pair  # listens on 127.0.0.1 only
    try:
        socket.getaddrinfo("localhost", addr.port, socket.AF_INET)
    except socket.gaierror:
        pytest.skip("localhost has no IPv4 address here")
    # Concurrent dials of one name and port: the /dns6 one must not share the /dns4 attempt.
    dns4, dns6 = await asyncio.gather(
        client.connect(f"/dns4/localhost/tcp/{addr.port}", timeout=5),
        client.connect(f"/dns6/localhost/tcp/{addr.port}", timeout=5),
        return_exceptions=True,
    )
    assert dns4 == server.peer_id
    assert isinstance(dns6, ConnectionLost) and "dial /dns6/localhost" in str(dns6)


async def test_graceful_close_tells_the_peer(pair):
    server, client, addr = pair
    gone = asyncio.Event()
    server.on_peer_disconnected(lambda peer: gone.set() if peer == client.peer_id else None)
    await client.call(addr, "echo", b"x")
    await client.close()
    await asyncio.wait_for(gone.wait(), 5)


def test_prologue_is_the_documented_one():
    assert PROLOGUE == b"overlay-node/1"


async def test_a_message_cut_off_by_a_lost_connection_is_freed_at_once(pair):
    """The fragments of a message in progress stayed referenced through the error's
    traceback (a cycle) until the cyclic GC ran: a peer sending most of a large message and
    then vanishing, again and again, grew a node's memory by the whole message each time."""
    server, client, addr = pair
    reading = asyncio.Event()

    async def sink(ctx, stream):
        reading.set()
        await stream.recv()

    server.add_stream_handler("sink", sink)
    gc.disable()
    tracemalloc.start()
    try:
        stream = await client.open_stream(addr, "sink")
        await reading.wait()
        message = bytes(16 << 20)
        base = tracemalloc.get_traced_memory()[0]
        conn = client.connection_to(server.peer_id)
        conn._mux.send(stream.stream_id, message, end=False)  # a message without its END
        conn._flush()
        async with asyncio.timeout(10):
            while tracemalloc.get_traced_memory()[0] - base < 15 << 20:  # the server has it
                await asyncio.sleep(0.01)
            client.abort()
            while server.connection_to(client.peer_id) is not None:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
        # (what remains: the record buffers of the two closed connections)
        assert tracemalloc.get_traced_memory()[0] - base < 4 << 20
    finally:
        tracemalloc.stop()
        gc.enable()


def _unary_header(method: bytes) -> bytes:
    return struct.pack(">BBI", 0, len(method), 0xFFFFFFFF) + method


async def _send_unfinished(conn, fragments) -> Stream:
    """Open a stream and send `fragments` of a request message that never ends."""
    stream = conn.open_stream()
    for fragment in fragments:
        conn._mux.send(stream.stream_id, fragment, end=False)
    conn._flush()
    return stream


async def test_a_request_over_its_methods_limit_is_refused_once_its_header_is_read(pair):
    """A peer could send max_message_size (256 MiB) to a method whose requests are tiny: the
    host read it whole before the handler's own check. Now the method's limit is checked as
    the header arrives, even when the rest of the request never comes."""
    server, client, addr = pair
    server.add_handler("small", echo, max_request=1000)
    assert await client.call(addr, "small", bytes(1000)) == bytes(1000)
    for size in (1001, 3 << 20):  # one frame (served whole), and a request of many frames
        with pytest.raises(RemoteError) as refused:
            await client.call(addr, "small", bytes(size), timeout=5)
        assert refused.value.code == "too_large" and "1000 bytes" in refused.value.message
    conn = client.connection_to(server.peer_id)
    header = _unary_header(b"small")
    cases = [
        ([header + bytes(1001)], "too_large"),  # the rest would follow
        ([bytes([b]) for b in header] + [bytes(1001)], "too_large"),  # a header split up
        ([_unary_header(b"nope") + b"x"], "unknown_method"),
        ([b"\x07" + header[1:]], "bad_request"),  # not a request kind
        ([struct.pack(">BBI", 1, 4, 0) + b"sink" + b"x"], "bad_request"),  # stream + payload
    ]
    for fragments, code in cases:
        stream = await _send_unfinished(conn, fragments)
        with pytest.raises(RemoteError) as refused:
            await asyncio.wait_for(stream.recv(), 5)
        assert refused.value.code == code
    assert await client.call(addr, "small", b"still fine") == b"still fine"
    assert await client.call(addr, "echo", bytes(3 << 20)) == bytes(3 << 20)  # no limit


async def _until_all_served(server: Host, client: Host) -> None:
    """Every stream of the client's connection released and no handler task left: what
    the refused and the answered requests held is given back."""
    served = server.connection_to(client.peer_id)
    async with asyncio.timeout(5):
        while served.num_streams or server._tasks:
            await asyncio.sleep(0.01)


async def test_streams_opened_and_never_used_are_reset():
    """A peer that opened streams (SYN) and sent no request held them, and a handler task
    each, forever. Now they are reset after request_header_timeout; calls whose header came
    in time are not bounded by it."""
    server = Host(config=HostConfig(request_header_timeout=0.3))
    client = Host()
    try:
        [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")

        async def slow_echo(ctx, stream):
            message = await stream.recv()
            await asyncio.sleep(0.6)  # longer than the header timeout
            await stream.send(message)

        server.add_stream_handler("slow", slow_echo)
        server.add_handler("slow_unary", lambda ctx, p: _later(0.6, p))
        await client.connect(addr)
        conn = client.connection_to(server.peer_id)
        idle = [await _send_unfinished(conn, [b""]) for _ in range(50)]  # SYN, nothing else
        cut = await _send_unfinished(conn, [_unary_header(b"slow_unary")[:3]])  # half a header
        stream = await client.open_stream(addr, "slow")
        await stream.send(b"hello")
        call = asyncio.ensure_future(client.call(addr, "slow_unary", b"x"))
        for waiting in [*idle, cut]:
            with pytest.raises(RemoteError) as refused:
                await asyncio.wait_for(waiting.recv(), 5)
            assert refused.value.code == "deadline_exceeded"
        assert await asyncio.wait_for(stream.recv(), 5) == b"hello"
        assert await asyncio.wait_for(call, 5) == b"x"
        await stream.close()
        await _until_all_served(server, client)
    finally:
        await client.close()
        await server.close()


async def _later(delay: float, value):
    await asyncio.sleep(delay)
    return value


async def test_a_request_to_a_method_with_a_limit_must_arrive_whole_in_time():
    """A peer that sent a small method's request header and then the payload at a trickle,
    or never its end, held the stream and its handler task forever (the header timeout
    stopped at the header). Now such a request must be whole within request_timeout;
    requests to methods without a limit (uploads) are not bounded by it."""
    server = Host(config=HostConfig(request_header_timeout=5, request_timeout=0.3))
    client = Host()
    try:
        [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
        server.add_handler("small", echo, max_request=1000)
        server.add_handler("echo", echo)
        await client.connect(addr)
        conn = client.connection_to(server.peer_id)
        stalled = await _send_unfinished(conn, [_unary_header(b"small") + b"x" * 10])
        upload = await _send_unfinished(conn, [_unary_header(b"echo") + b"a"])
        with pytest.raises(RemoteError) as refused:
            await asyncio.wait_for(stalled.recv(), 5)
        assert refused.value.code == "deadline_exceeded"
        assert "within 0.3 s" in refused.value.message
        await asyncio.sleep(0.2)  # the upload is now older than request_timeout
        conn._mux.send(upload.stream_id, b"b", end=True, fin=True)
        conn._flush()
        assert await asyncio.wait_for(upload.recv(), 5) == b"\x00ab"
        assert await client.call(addr, "small", b"in time") == b"in time"
        await _until_all_served(server, client)
    finally:
        await client.close()
        await server.close()


async def test_a_unary_request_is_one_message_then_fin():
    """A unary request with no FIN, or with a second message, was answered all the same
    (and one without FIN held its stream until the connection closed). Now both are reset
    as bad_request; a FIN that comes in a frame of its own after the request is waited for."""
    server = Host(config=HostConfig(request_header_timeout=0.3))
    client = Host()
    try:
        [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
        server.add_handler("echo", echo)
        await client.connect(addr)
        conn = client.connection_to(server.peer_id)
        no_fin = conn.open_stream()
        conn._mux.send(no_fin.stream_id, _unary_header(b"echo") + b"hi", end=True)
        two = conn.open_stream()
        conn._mux.send(two.stream_id, _unary_header(b"echo") + b"one", end=True)
        conn._mux.send(two.stream_id, b"two", end=True, fin=True)
        fin_apart = conn.open_stream()
        conn._mux.send(fin_apart.stream_id, _unary_header(b"echo") + b"ok", end=True)
        conn._flush()
        await asyncio.sleep(0.05)
        conn.end_stream(fin_apart.stream_id)
        for stream, reason in ((no_fin, "ends with FIN"), (two, "one message")):
            with pytest.raises(RemoteError) as refused:
                await asyncio.wait_for(stream.recv(), 5)
            assert refused.value.code == "bad_request" and reason in refused.value.message
        assert await asyncio.wait_for(fin_apart.recv(), 5) == b"\x00ok"
        await _until_all_served(server, client)
    finally:
        await client.close()
        await server.close()


async def test_addresses_others_claim_for_a_peer_go_behind_the_one_it_was_reached_at():
    """The DHT hands the host addresses that third parties claim for a peer; each went to
    the front of the book and was dialed first, so one silent address made every call by
    peer id time out, and eight pushed the real one out. Now the address a dial last
    reached the peer at is tried first, until a dial of it fails (the peer moved)."""
    silent = socket.socket()  # accepts connections at the kernel, never speaks
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    victim, client = Host(), Host()
    try:
        [addr] = await victim.listen("/ip4/127.0.0.1/tcp/0")
        victim.add_handler("echo", echo)
        assert await client.call(addr, "echo", b"1") == b"1"
        client.connection_to(victim.peer_id).close()
        port = silent.getsockname()[1]
        client.add_peer_addrs(victim.peer_id, [f"/ip4/127.0.0.1/tcp/{port}"] + [
            f"/ip4/127.0.0.{i}/tcp/{port}" for i in range(2, 10)])
        book = client.peer_addrs(victim.peer_id)
        assert book[0] == addr.without_peer() and len(book) == 8
        assert await client.call(victim.peer_id, "echo", b"2", timeout=3) == b"2"
        await victim.close()  # gone from there: a dial of it fails, and it is first no more
        async with asyncio.timeout(5):
            while client.connection_to(victim.peer_id) is not None:
                await asyncio.sleep(0.01)
        with pytest.raises(ConnectionLost):
            await client.connect(addr)
        client.add_peer_addrs(victim.peer_id, ["/ip4/127.0.0.1/tcp/9"])
        assert str(client.peer_addrs(victim.peer_id)[0]) == "/ip4/127.0.0.1/tcp/9"
    finally:
        await client.close()
        await victim.close()
        silent.close()


async def test_inbound_handshakes_per_address_are_rate_limited_before_any_cryptography():
    config = HostConfig(handshake_burst=3, handshake_rate=0.01, handshake_limit_loopback=True)
    server, client = Host(config=config), Host()
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    server.add_handler("echo", echo)

    async def message_2_comes() -> bool:
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(b"\x00\x20" + os.urandom(32))  # a Noise message 1: costs nothing to send
        try:
            return len(await asyncio.wait_for(reader.read(2), 5)) == 2
        finally:
            writer.close()

    try:
        async with asyncio.timeout(20):
            assert [await message_2_comes() for _ in range(5)] == [True] * 3 + [False] * 2
            with pytest.raises(ConnectionLost):  # the bucket holds for honest dials too
                await client.call(addr, "echo", b"x")
        # loopback is exempt by default: local swarms start many nodes at once
        default = Host()
        [local] = await default.listen("/ip4/127.0.0.1/tcp/0")
        default.add_handler("echo", echo)
        try:
            callers = [Host() for _ in range(80)]
            answers = await asyncio.gather(*(c.call(local, "echo", b"y") for c in callers))
            assert answers == [b"y"] * 80
        finally:
            for c in callers:
                await c.close()
            await default.close()
    finally:
        await client.close()
        await server.close()


async def test_lines_a_peer_causes_at_will_are_rate_limited(caplog):
    """Each aborted handshake and each eviction at the connection limit logged one line: a
    peer could write as many as it opened connections."""
    from overlay.log_limit import DEFAULT_BURST

    server = Host(config=HostConfig(max_connections=4))
    [addr] = await server.listen("/ip4/127.0.0.1/tcp/0")
    clients = [Host() for _ in range(DEFAULT_BURST + 10)]
    try:
        async with asyncio.timeout(30):
            with caplog.at_level(logging.INFO, logger="overlay"):
                for _ in range(DEFAULT_BURST + 10):
                    reader, writer = await asyncio.open_connection(addr.host, addr.port)
                    writer.write(b"\x00\x00")  # an empty handshake message
                    await reader.read()
                    writer.close()
                for client in clients:
                    await client.connect(addr)  # past 4, each evicts an unused one
            text = caplog.text
        assert text.count("handshake failed") == DEFAULT_BURST
        assert text.count("to make room") == DEFAULT_BURST
    finally:
        for client in clients:
            await client.close()
        await server.close()


@pytest.mark.parametrize(("answer", "expected"), [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "it sent 28 bytes: b'HTTP/1.1 400"),
    (None, "it sent 34 bytes"),  # an echo server: our own message 1 back
    (b"", "closed the connection: the peer did not complete the overlay's handshake "
          "(it sent nothing)"),
])
async def test_a_server_that_does_not_speak_the_overlay_fails_the_dial_at_once(answer, expected):
    """A text answer's first two bytes read as a length of 18,516: the dialer waited for
    them until its timeout, and reported only that."""
    async def handle(reader, writer):
        data = await reader.read(100)
        writer.write(data if answer is None else answer)
        if answer == b"":
            writer.close()
        await reader.read(100)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    host = Host()
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionLost) as failure:
            await host.connect(f"/ip4/127.0.0.1/tcp/{port}", timeout=5.0)
        assert time.monotonic() - start < 2.0
        assert "did not complete the overlay's handshake" in str(failure.value)
        assert expected in str(failure.value)
    finally:
        await host.close()
        server.close()
        await server.wait_closed()
