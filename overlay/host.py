"""A node on the overlay: listens, dials, keeps one connection per peer and serves RPCs.

An application creates as many hosts as it likes in one event loop (no global state). Peers
are named by `PeerId`; the address book maps them to multiaddrs. Concurrent dials to the same
peer share one attempt, and a live connection is reused for every call in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import CoroutineType
from typing import NamedTuple

from overlay.admission import (
    HANDSHAKE_BURST,
    HANDSHAKE_RATE,
    HandshakeLimiter,
    choose_victim,
    is_loopback,
)
from overlay.connection import Connection
from overlay.deadlines import Deadlines
from overlay.eager import resume
from overlay.identity import Identity, IdentityError, PeerId
from overlay.link_delay import delay_from_env
from overlay.log_limit import LogLimiter
from overlay.multiaddr import Multiaddr, MultiaddrError
from overlay.mux import MuxConfig
from overlay.mux.budget import PartialBudget
from overlay.noise.dh import KeyPair
from overlay.public_addrs import WILDCARD_HOSTS, expand_wildcards
from overlay.rpc_codec import (
    KIND_STREAM,
    KIND_UNARY,
    MAX_REQUEST_HEADER,
    STATUS_OK,
    RemoteError,
    RpcProtocolError,
    decode_answer,
    decode_request,
    encode_error,
    encode_request,
    peek_request,
    reset_reason,
)
from overlay.secure_handshake import encode_identity_payload
from overlay.streams import ConnectionLost, Stream, StreamClosed
from overlay.unary import PendingCall

log = logging.getLogger(__name__)

MAX_ADDRS_PER_PEER = 8
MAX_ADDRESS_BOOK = 100_000

# What a multiaddr's host may resolve to (multiaddr protocol table): /dns4 names only IPv4
# addresses and /dns6 only IPv6, where /dns takes either.
_ADDRESS_FAMILIES = {
    "ip4": socket.AF_INET,
    "ip6": socket.AF_INET6,
    "dns": socket.AF_UNSPEC,
    "dns4": socket.AF_INET,
    "dns6": socket.AF_INET6,
}


def address_family(maddr: Multiaddr) -> socket.AddressFamily:
    """The family to resolve and dial `maddr` in, so /dns6 never connects over IPv4."""
    return _ADDRESS_FAMILIES[maddr.protocol]


class RpcTimeout(TimeoutError):
    """The call's deadline passed before the answer came."""


@dataclass(frozen=True, slots=True)
class HostConfig:
    max_connections: int = 1024
    max_streams_per_connection: int = 1024
    # Streams peers may have open on all connections together; once reached, a connection
    # holding more than an equal share has its new streams refused (overlay/mux/budget.py).
    max_streams_total: int = 65536
    max_message_size: int = 256 << 20
    # Bytes of unfinished messages (fragments held until their END) one connection may hold,
    # and all of them together: beyond, the stream whose fragment goes over is reset
    # (overlay/mux/budget.py says why, and how the total is shared fairly).
    max_partial_bytes: int = 1 << 30
    max_partial_bytes_total: int = 4 << 30
    # A peer must read its answers: while more than this much of what we sent on streams it
    # opened waits unsent (or more than its share of the total, over all connections),
    # its new requests are refused with `busy`. Tiny requests can ask for large answers (a
    # find_value of 50 bytes, 1 MiB): a peer that read none had us queue 1 GiB per
    # connection. One largest message per connection always fits.
    max_unsent_bytes: int = 256 << 20
    max_unsent_bytes_total: int = 2 << 30
    handshake_timeout: float = 10.0
    # Inbound handshakes one address group may start: a burst, then so many a second
    # (overlay/admission.py says why); loopback peers are exempt unless
    # `handshake_limit_loopback` (local swarms start all their nodes from 127.0.0.1).
    handshake_burst: int = HANDSHAKE_BURST
    handshake_rate: float = HANDSHAKE_RATE
    handshake_limit_loopback: bool = False
    # A stream the peer opened must bring its request header within this time; one left
    # unused is reset, so that a peer cannot hold streams and handler tasks forever.
    request_header_timeout: float = 10.0
    # A unary request to a method with its own `max_request` (small by design: the DHT's)
    # must arrive whole, header to FIN, within this time from the SYN; one sent at a trickle
    # or never finished is reset, so that a peer cannot hold streams and tasks with it.
    # Methods without a limit take uploads of any length, bounded by the caller's deadline.
    request_timeout: float = 30.0
    dial_timeout: float = 10.0
    default_call_timeout: float = 60.0


class RpcContext(NamedTuple):
    """What a handler knows about the call: the authenticated caller and its deadline.
    (Immutable; a NamedTuple because one is built for every call.)"""

    peer: PeerId
    method: str
    deadline: float | None  # loop time
    connection: Connection


UnaryHandler = Callable[[RpcContext, bytes], Awaitable[bytes]]
StreamHandler = Callable[[RpcContext, Stream], Awaitable[None]]


class Host:
    def __init__(self, identity: Identity | None = None, config: HostConfig | None = None):
        self.identity = identity or Identity.generate()
        self.peer_id = self.identity.peer_id
        self.config = config or HostConfig()
        self._mux_config = MuxConfig(
            max_streams=self.config.max_streams_per_connection,
            max_message_size=self.config.max_message_size,
            max_partial_bytes=self.config.max_partial_bytes,
        )
        # The Noise static key is per process: made and signed
        # once, not for every connection.
        static = KeyPair.generate(os.urandom)
        self._static = (static, encode_identity_payload(self.identity, static.public))
        self._partial_budget = PartialBudget(self.config.max_partial_bytes_total)
        self._unsent_budget = PartialBudget(self.config.max_unsent_bytes_total)
        self._stream_budget = PartialBudget(self.config.max_streams_total)
        self._handshakes = HandshakeLimiter(self.config.handshake_burst,
                                            self.config.handshake_rate)
        self._servers: list[asyncio.AbstractServer] = []
        self._listen_addrs: list[Multiaddr] = []
        self._public_addrs: list[Multiaddr] | None = None  # set_public_addrs
        self._connections: dict[PeerId, Connection] = {}
        self._all: dict[Connection, None] = {}  # oldest first (_make_room)
        self._dials: dict[object, asyncio.Future] = {}
        self._addr_book: dict[PeerId, list[Multiaddr]] = {}
        self._reached: dict[PeerId, Multiaddr] = {}  # where a dial last found each peer
        self._unary: dict[str, UnaryHandler] = {}
        self._streaming: dict[str, StreamHandler] = {}
        self._request_limits: dict[str, int] = {}  # method -> most payload bytes (add_handler)
        self._disconnect_callbacks: list[Callable[[PeerId], None]] = []
        self._tasks: set[asyncio.Task] = set()
        self._deadlines: Deadlines | None = None  # of calls and handlers; made on first use
        self._closing = False
        self._frozen = False
        # Aborted connections and evictions at the connection limit (one per newcomer) are
        # logged per reason at a bounded rate (overlay/log_limit.py).
        self._abort_log = LogLimiter(logging.getLogger("overlay.connection"),
                                     clock=time.monotonic)
        self._evict_log = LogLimiter(log, clock=time.monotonic)
        self._link_delay = delay_from_env()  # TEST-ONLY (overlay/link_delay.py); 0 normally

    # ------------------------------------------------------------------ addresses
    @property
    def addrs(self) -> list[Multiaddr]:
        return [a.with_peer(self.peer_id) for a in self._listen_addrs]

    @property
    def public_addrs(self) -> list[Multiaddr]:
        """What this host tells others to dial (a server's announcements): the addresses given
        to `set_public_addrs`, else the listen addresses with a wildcard host (0.0.0.0, ::)
        replaced by this machine's address on its default route (overlay/public_addrs.py)."""
        addrs = self._public_addrs
        if addrs is None:
            addrs = expand_wildcards(self._listen_addrs)
        return [a.with_peer(self.peer_id) for a in addrs]

    def set_public_addrs(self, addrs: Iterable[Multiaddr | str] | None) -> None:
        """Give out these addresses instead (a public address or port forwarded to this host
        behind NAT); None goes back to the listen addresses."""
        if addrs is None:
            self._public_addrs = None
            return
        parsed = [Multiaddr.parse(a) for a in addrs]
        for addr in parsed:
            if addr.peer_id not in (None, self.peer_id):
                raise MultiaddrError(f"{addr} names another peer than this host ({self.peer_id})")
            if addr.host in WILDCARD_HOSTS.values():
                raise MultiaddrError(f"{addr}: a wildcard host cannot be dialed by others")
        self._public_addrs = [a.without_peer() for a in parsed]

    async def listen(self, address: str | Multiaddr = "/ip4/127.0.0.1/tcp/0") -> list[Multiaddr]:
        maddr = Multiaddr.parse(address)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: self._new_connection(initiator=False, expected_peer=None),
            maddr.host, maddr.port, reuse_address=True,
        )
        self._servers.append(server)
        added = []
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            added.append(Multiaddr.from_socket_address(host, port))
        self._listen_addrs.extend(added)
        return [a.with_peer(self.peer_id) for a in added]

    def add_peer_addrs(self, peer: PeerId, addrs: Iterable[Multiaddr | str]) -> None:
        """Remember where `peer` may be dialed, newest first, behind the address a dial last
        reached it at: the DHT hands in addresses that third parties claim for a peer, and
        one that blackholes, put first, made every dial by peer id time out; at the limit of
        MAX_ADDRS_PER_PEER such claims also pushed the real address out."""
        if peer == self.peer_id:
            return
        known = self._addr_book.get(peer)
        if known is None:
            if len(self._addr_book) >= MAX_ADDRESS_BOOK:
                self._reached.pop(self._forget_oldest(), None)
            known = self._addr_book[peer] = []
        reached = self._reached.get(peer)
        for addr in addrs:
            maddr = Multiaddr.parse(addr).without_peer()
            if maddr not in known:
                known.insert(1 if known and known[0] == reached else 0, maddr)
        del known[MAX_ADDRS_PER_PEER:]

    def _forget_oldest(self) -> PeerId:
        peer = next(iter(self._addr_book))
        del self._addr_book[peer]
        return peer

    def _reached_at(self, peer: PeerId, maddr: Multiaddr) -> None:
        """A dial of `maddr` reached `peer` (its handshake proved it): dial there first."""
        if peer == self.peer_id:
            return
        maddr = maddr.without_peer()
        self._reached[peer] = maddr
        known = self._addr_book.get(peer)
        if known is not None and maddr in known:
            known.remove(maddr)
        self.add_peer_addrs(peer, [maddr])

    def peer_addrs(self, peer: PeerId) -> list[Multiaddr]:
        return list(self._addr_book.get(peer, ()))

    # ------------------------------------------------------------------ handlers
    def add_handler(self, method: str, handler: UnaryHandler, *,
                    max_request: int | None = None) -> None:
        """Serve unary `method`. `max_request` bounds its requests' payload in bytes (default:
        the host's max_message_size): a larger request is refused (`too_large`) as soon as
        its header is read, not after the whole of it was."""
        if max_request is not None and max_request < 0:
            raise ValueError(f"max_request must be at least 0, not {max_request}")
        self._unary[method] = handler
        if max_request is None:
            self._request_limits.pop(method, None)
        else:
            self._request_limits[method] = max_request

    def add_stream_handler(self, method: str, handler: StreamHandler) -> None:
        self._streaming[method] = handler

    def on_peer_disconnected(self, callback: Callable[[PeerId], None]) -> None:
        self._disconnect_callbacks.append(callback)

    # ------------------------------------------------------------------ connections
    def connection_to(self, peer: PeerId) -> Connection | None:
        conn = self._connections.get(peer)
        return conn if conn is not None and not conn.closed else None

    @property
    def connected_peers(self) -> list[PeerId]:
        return list(self._connections)

    async def connect(self, target: PeerId | Multiaddr | str,
                      timeout: float | None = None) -> PeerId:
        """Dial `target` (a multiaddr, or a peer id from the address book); returns its peer id."""
        conn = await self._connection(target, timeout)
        return conn.remote_peer

    async def round_trip(self, peer: str, timeout: float) -> float | None:
        """Seconds of one transport-level ping to `peer` (a peer id string, dialled from the
        address book if need be), or None when it cannot be reached in `timeout`: what route
        choice and server-to-server pings measure."""
        try:
            peer_id = PeerId.from_string(peer)
            await self.connect(peer_id, timeout=timeout)
            conn = self.connection_to(peer_id)
            return await conn.ping(timeout=timeout) if conn is not None else None
        except (ConnectionLost, TimeoutError, IdentityError, OSError) as e:
            log.info("peer %s unreachable: %s", peer[-8:], e)
            return None

    async def _connection(self, target: PeerId | Multiaddr | str,
                          timeout: float | None) -> Connection:
        if isinstance(target, PeerId):
            conn = self.connection_to(target)
            if conn is not None:
                return conn
            addrs = self._addr_book.get(target)
            if not addrs:
                raise ConnectionLost(f"no known address for peer {target}")
            candidates = [a.with_peer(target) for a in addrs]
        else:
            maddr = Multiaddr.parse(target)
            if maddr.peer_id is not None:
                conn = self.connection_to(maddr.peer_id)
                if conn is not None:
                    return conn
            candidates = [maddr]
        errors = []
        for maddr in candidates:
            try:
                return await self._dial_once(maddr, timeout)
            except ConnectionLost as e:
                errors.append(str(e))
        raise ConnectionLost("; ".join(errors))

    async def _dial_once(self, maddr: Multiaddr, timeout: float | None) -> Connection:
        key = maddr.peer_id or (maddr.protocol, maddr.host, maddr.port)  # dns4 != dns6
        pending = self._dials.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._dial(maddr, timeout))
            self._dials[key] = pending
            pending.add_done_callback(lambda f: self._dial_done(key, f))
        return await asyncio.shield(pending)

    def _dial_done(self, key: object, dial: asyncio.Future) -> None:
        self._dials.pop(key, None)
        if not dial.cancelled():
            dial.exception()  # retrieved: every caller may have been cancelled (a timeout)

    async def _dial(self, maddr: Multiaddr, timeout: float | None) -> Connection:
        if self._closing:
            raise ConnectionLost("host is closed")
        loop = asyncio.get_running_loop()
        timeout = self.config.dial_timeout if timeout is None else timeout
        conn: Connection | None = None
        if maddr.peer_id is not None and self._reached.get(maddr.peer_id) == maddr.without_peer():
            del self._reached[maddr.peer_id]  # again once this dial succeeds (a peer may move)
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: self._new_connection(initiator=True, expected_peer=maddr.peer_id),
                    maddr.host, maddr.port, family=address_family(maddr),
                )
                await conn.ready
        except TimeoutError:
            why = ""
            if conn is not None:
                if conn.remote_peer is None:  # (the handshake is what hung)
                    why = f": {conn.handshake_account()}"
                conn.abort("dial timed out", logging.DEBUG)  # the ConnectionLost says it
            raise ConnectionLost(f"dial {maddr}: timed out after {timeout:g} s{why}") from None
        except OSError as e:
            raise ConnectionLost(f"dial {maddr}: {e.strerror or e}") from None
        except ConnectionLost as e:
            raise ConnectionLost(f"dial {maddr}: {e}") from None
        self._reached_at(conn.remote_peer, maddr)
        return conn

    def _new_connection(self, *, initiator: bool, expected_peer: PeerId | None) -> Connection:
        conn = Connection(
            self.identity,
            initiator=initiator,
            expected_peer=expected_peer,
            mux_config=self._mux_config,
            partial_budget=self._partial_budget,
            unsent_budget=self._unsent_budget,
            stream_budget=self._stream_budget,
            handshake_timeout=self.config.handshake_timeout,
            on_ready=self._on_ready,
            on_stream=self._on_stream,
            on_closed=self._on_closed,
            on_request=self._on_request,
            admit=self._admit,
            static=self._static,
            abort_log=self._abort_log,
        )
        if self._link_delay:
            conn.link_delay = self._link_delay
        return conn

    def _admit(self, conn: Connection) -> str | None:
        """A connection's socket is connected: why it is refused, or None (it is counted)."""
        if self._closing:
            return "host is closing"
        group = conn.address_group
        limited = not conn.initiator and (self.config.handshake_limit_loopback
                                          or not is_loopback(conn.remote_address))
        if limited and not self._handshakes.admit(group, conn.loop.time()):
            return f"too many handshakes from {group}"
        if not self._make_room(conn):
            return "too many connections"
        self._all[conn] = None
        if self._frozen:
            conn.pause_reading()
        return None

    def _make_room(self, newcomer: Connection) -> bool:
        """Whether one more connection fits, closing one at the limit as
        overlay/admission.py chooses. Refusing every newcomer instead let one peer lock all
        others out for good by holding max_connections idle connections (1024 handshakes
        take it two seconds); keeping every connection with a stream open let it do so with
        one stream without a request header on each."""
        if len(self._all) < self.config.max_connections:
            return True
        victim = choose_victim(list(self._all), newcomer.address_group)
        if victim is None:
            return False
        if victim.inbound_handshaking:
            victim.abort("closed to make room: the host is at its connection limit")
        else:
            self._evict_log.log(logging.INFO, "closing connections to make room",
                                "closing connection to %s (%s) to make room for %s: the host "
                                "is at its connection limit", victim.remote_peer,
                                victim.remote_address, newcomer.remote_address)
            victim.close()
        self._all.pop(victim, None)
        return True

    def _on_ready(self, conn: Connection) -> None:
        peer = conn.remote_peer
        if peer == self.peer_id:
            conn.abort("connected to ourselves")
            return
        current = self._connections.get(peer)
        if current is None or current.closed:
            self._connections[peer] = conn
        # A second connection (both sides dialed at once) stays usable until it closes.

    def _on_closed(self, conn: Connection) -> None:
        self._all.pop(conn, None)
        peer = conn.remote_peer
        if peer is None or self._connections.get(peer) is not conn:
            return
        del self._connections[peer]
        for other in self._all:
            if other.remote_peer == peer and not other.closed and other.ready.done():
                self._connections[peer] = other
                return
        for callback in self._disconnect_callbacks:
            try:
                callback(peer)
            except Exception:
                log.exception("peer-disconnected callback failed")

    # ------------------------------------------------------------------ calling
    async def call(self, peer: PeerId | Multiaddr | str, method: str, payload: bytes, *,
                   timeout: float | None = None, max_answer: int | None = None) -> bytes:
        """Unary RPC: send `payload` to `method` on `peer` and return the answer's payload.
        `max_answer`: a larger answer fails the call with ConnectionLost as soon as it has
        passed that many bytes (default: the connection's message size limit)."""
        if timeout is None:
            timeout = self.config.default_call_timeout
        conn = self._connections.get(peer) if type(peer) is PeerId else None
        if conn is not None and not conn.closed:
            loop = conn.loop  # (asyncio.get_running_loop() costs a getpid() system call)
            deadline = loop.time() + timeout
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connection(peer, timeout)
            except TimeoutError:
                raise RpcTimeout(f"{method} on {_name(peer)}: could not connect within "
                                 f"{timeout:g} s") from None
        future = loop.create_future()
        try:
            if type(payload) is not bytes:
                payload = memoryview(payload).cast("B")
            call = conn.start_call((encode_request(method, KIND_UNARY, timeout), payload), future,
                                   max_answer)
        except ConnectionLost as e:
            raise ConnectionLost(f"{method} on {_name(peer)}: {e}") from None
        # At the deadline the stream is reset and the future fails with the timeout error
        # (one shared timer for all calls: overlay/deadlines.py).
        deadlines = self._deadlines or self._deadlines_on(loop)
        entry = deadlines.add(deadline, _expire_call, (call, method, peer, timeout))
        try:
            answer = await future
        except asyncio.CancelledError:
            call.fail("cancelled: the caller gave up", ConnectionLost("cancelled"))
            raise
        finally:
            deadlines.cancel(entry)
        if answer is None:
            raise ConnectionLost(f"{method} on {_name(peer)}: the peer closed the stream early")
        try:
            return decode_answer(answer)
        except RpcProtocolError as e:
            raise ConnectionLost(f"{method} on {_name(peer)}: {e}") from None

    async def open_stream(self, peer: PeerId | Multiaddr | str, method: str, *,
                          timeout: float | None = None) -> Stream:
        """Bidirectional streaming RPC. `timeout` bounds the dial and is sent as the deadline."""
        dial_timeout = self.config.dial_timeout if timeout is None else timeout
        conn = await self._connection(peer, dial_timeout)
        stream = conn.open_stream()
        stream.send_nowait(encode_request(method, KIND_STREAM, timeout))
        return stream

    def _deadlines_on(self, loop: asyncio.AbstractEventLoop) -> Deadlines:
        deadlines = self._deadlines
        if deadlines is None:
            deadlines = self._deadlines = Deadlines(loop)
        return deadlines

    # ------------------------------------------------------------------ serving
    def _on_request(self, conn: Connection, stream_id: int, data: memoryview) -> None:
        """A stream that came whole in one frame (a small unary request), served with no
        Stream object. The handler's coroutine runs at once, here; only if it has to wait
        does a task take it over (overlay/eager.py): most handlers never wait."""
        if conn.backlogged(self.config.max_unsent_bytes):
            conn.reset_stream(stream_id, _BACKLOGGED)
            return
        try:
            header, offset = decode_request(data)
        except RpcProtocolError as e:
            conn.reset_stream(stream_id, reset_reason("bad_request", str(e)))
            return
        if header.kind != KIND_UNARY:  # a streaming call that ended in its first frame
            self._on_stream(conn.stream_from_whole(stream_id, data))
            conn.headerless.discard(stream_id)  # (its header came with it)
            return
        handler = self._unary.get(header.method)
        if handler is None:
            conn.reset_stream(stream_id, reset_reason("unknown_method",
                                                      f"no method {header.method!r}"))
            return
        limit = self._request_limits.get(header.method)
        if limit is not None and len(data) - offset > limit:
            conn.reset_stream(stream_id, _too_large(header.method, limit))
            return
        loop = conn.loop
        deadline = None if header.timeout is None else loop.time() + header.timeout
        ctx = RpcContext(conn.remote_peer, header.method, deadline, conn)
        try:
            coro = handler(ctx, bytes(data[offset:]))
            if type(coro) is not CoroutineType:
                coro = _awaiting(coro)
            yielded = coro.send(None)
        except StopIteration as stop:
            parts = _answer_parts(ctx, stop.value)
        except asyncio.CancelledError:  # raised by the handler itself before it waited
            conn.reset_stream(stream_id, reset_reason("internal", f"{header.method} failed"))
            return
        except Exception as e:
            parts = _error_parts(ctx, e)
            if parts is None:
                return
        else:
            self._serve_later(ctx, stream_id, coro, yielded)
            return
        conn.answer(stream_id, parts)

    def _serve_later(self, ctx: RpcContext, stream_id: int, coro, yielded) -> None:
        """The handler waits: a task runs the rest of it, cancelled at the deadline."""
        loop = ctx.connection.loop
        expired: list[bool] = []
        task = loop.create_task(self._finish_unary(ctx, stream_id, coro, yielded, expired))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if ctx.deadline is not None:
            deadlines = self._deadlines_on(loop)
            entry = deadlines.add(ctx.deadline, _expire_task, (task, expired))
            task.add_done_callback(lambda _task: deadlines.cancel(entry))

    async def _finish_unary(self, ctx: RpcContext, stream_id: int, coro, yielded,
                            expired: list[bool]) -> None:
        conn = ctx.connection
        try:
            result = await resume(coro, yielded)
        except asyncio.CancelledError:
            if not expired:
                raise
            asyncio.current_task().uncancel()
            conn.reset_stream(stream_id, reset_reason("deadline_exceeded",
                                                      f"{ctx.method} ran out of time"))
            return
        except Exception as e:
            parts = _error_parts(ctx, e)
            if parts is None:
                return
        else:
            parts = _answer_parts(ctx, result)
        conn.answer(stream_id, parts)

    def _on_stream(self, stream: Stream) -> None:
        if stream.connection.backlogged(self.config.max_unsent_bytes):
            stream.reset(_BACKLOGGED)
            return
        loop = stream.connection.loop
        deadlines = self._deadlines_on(loop)
        opened = loop.time()
        # The one timer of the request, swapped as it arrives: its header, then (methods with
        # a limit) the whole of it, then the FIN after it (_serve).
        timer: list = [deadlines.add(opened + self.config.request_header_timeout,
                                     self._header_timed_out, stream)]
        conn = stream.connection
        conn.headerless.add(stream.stream_id)

        def bound(head: bytes) -> tuple[int | None, str] | None:
            decided = self._request_bound(head)
            if decided is None:
                return None
            limit, reason, whole = decided  # the header is in
            conn.headerless.discard(stream.stream_id)
            deadlines.cancel(timer[0])
            timer[0] = deadlines.add(opened + self.config.request_timeout,
                                     self._request_timed_out, stream) if whole else None
            return limit, reason

        stream.bound_first_message(bound, MAX_REQUEST_HEADER)
        task = loop.create_task(self._serve(stream, timer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _header_timed_out(self, stream: Stream) -> None:
        stream.reset(reset_reason("deadline_exceeded", "no request header within "
                                  f"{self.config.request_header_timeout:g} s"))

    def _request_timed_out(self, stream: Stream) -> None:
        stream.reset(reset_reason("deadline_exceeded", "request not complete (header, payload "
                                  f"and FIN) within {self.config.request_timeout:g} s"))

    def _fin_timed_out(self, stream: Stream) -> None:
        stream.reset(reset_reason("bad_request", "a unary request ends with FIN: none came "
                                  f"within {self.config.request_header_timeout:g} s"))

    def _request_bound(self, head: bytes) -> tuple[int | None, str, bool] | None:
        """The most bytes of the request that starts with `head` (None: no bound of its own,
        so its fragments are not looked at again; the multiplexer enforces max_message_size),
        the reason to refuse it beyond them, and whether it must arrive whole within
        `request_timeout` (a unary call to a method with its own limit); None while its
        header is incomplete. A request to an unknown method or with a malformed header is
        refused at its first byte; a streaming request's first message is its header alone."""
        try:
            peeked = peek_request(head)
        except RpcProtocolError as e:
            return 0, reset_reason("bad_request", str(e)), False
        if peeked is None:
            return None
        header, size = peeked
        if header.kind == KIND_STREAM:
            return size, reset_reason("bad_request", "a streaming request header carries "
                                                     "no payload"), False
        if header.method not in self._unary:
            return 0, reset_reason("unknown_method", f"no method {header.method!r}"), False
        limit = self._request_limits.get(header.method)
        if limit is None:
            return None, "", False
        return size + limit, _too_large(header.method, limit), True

    async def _serve(self, stream: Stream, timer: list) -> None:
        conn = stream.connection
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines_on(loop)
        try:
            request = await stream.recv()
            header, offset = decode_request(request or b"")
            if header.kind == KIND_UNARY and not await self._unary_ended(stream, timer):
                return
        except (RpcProtocolError, ConnectionLost, StreamClosed, RemoteError) as e:
            stream.reset(reset_reason("bad_request", str(e)))
            return
        finally:
            if timer[0] is not None:
                deadlines.cancel(timer[0])
        deadline = None if header.timeout is None else loop.time() + header.timeout
        ctx = RpcContext(conn.remote_peer, header.method, deadline, conn)
        if header.kind == KIND_STREAM:
            handler = self._streaming.get(header.method)
            if handler is None:
                stream.reset(reset_reason("unknown_method", f"no stream method {header.method!r}"))
                return
            await self._run_stream_handler(handler, ctx, stream)
            return
        handler = self._unary.get(header.method)
        if handler is None:
            stream.reset(reset_reason("unknown_method", f"no method {header.method!r}"))
            return
        payload = request[offset:]
        # The deadline cancels this task (a shared timer, cheaper than asyncio.timeout_at on
        # the path of every call); `expired` tells its cancellation from a host shutdown.
        expired: list[bool] = []
        timer = None if deadline is None else deadlines.add(
            deadline, _expire_task, (asyncio.current_task(), expired))
        try:
            result = await handler(ctx, payload)
        except RemoteError as e:
            self._answer(stream, encode_error(e.code, e.message))
        except asyncio.CancelledError:
            if not expired:
                raise
            asyncio.current_task().uncancel()
            stream.reset(reset_reason("deadline_exceeded", f"{header.method} ran out of time"))
        except (ConnectionLost, StreamClosed):
            return
        except Exception:
            log.exception("handler %s failed for %s", header.method, ctx.peer)
            self._answer(stream, encode_error("internal", f"{header.method} failed"))
        else:
            self._answer(stream, *_answer_parts(ctx, result))
        finally:
            if timer is not None:
                deadlines.cancel(timer)

    async def _unary_ended(self, stream: Stream, timer: list) -> bool:
        """Whether the unary request just read is followed by FIN alone, as PROTOCOL.md (4)
        has it; otherwise the stream is reset. Usually the FIN came with the request (no
        wait); a FIN that follows apart is waited for up to `request_header_timeout` (or
        what is left of `request_timeout`)."""
        if timer[0] is None:  # no deadline running: the FIN gets one of its own
            loop = stream.connection.loop
            timer[0] = self._deadlines_on(loop).add(
                loop.time() + self.config.request_header_timeout, self._fin_timed_out, stream)
        if await stream.recv() is None:
            return True
        stream.reset(reset_reason("bad_request", "a unary request is one message, then FIN"))
        return False

    @staticmethod
    def _answer(stream: Stream, *parts) -> None:
        with contextlib.suppress(StreamClosed, ConnectionLost):
            stream.send_parts(parts, end_stream=True)

    async def _run_stream_handler(self, handler: StreamHandler, ctx: RpcContext,
                                  stream: Stream) -> None:
        try:
            if ctx.deadline is None:
                await handler(ctx, stream)
            else:
                async with asyncio.timeout_at(ctx.deadline):
                    await handler(ctx, stream)
        except RemoteError as e:
            stream.reset(reset_reason(e.code, e.message))
        except TimeoutError:
            stream.reset(reset_reason("deadline_exceeded", f"{ctx.method} ran out of time"))
        except (ConnectionLost, StreamClosed):
            return
        except Exception:
            log.exception("stream handler %s failed for %s", ctx.method, ctx.peer)
            stream.reset(reset_reason("internal", f"{ctx.method} failed"))
        else:
            with contextlib.suppress(StreamClosed, ConnectionLost):
                await stream.close()

    # ------------------------------------------------------------------ fault injection
    def freeze(self) -> None:
        """Behave like a machine that dropped off the network, for failure tests and
        benchmarks: connections stay open, but nothing is read or answered any more, and new
        connections are accepted and then ignored."""
        self._frozen = True
        for conn in list(self._all):
            conn.pause_reading()

    def abort(self) -> None:
        """Close every socket at once with no goodbye, as a killed process would."""
        self._closing = True
        for server in self._servers:
            server.close()
        for conn in list(self._all):
            conn.abort("host aborted")

    # ------------------------------------------------------------------ lifetime
    async def close(self) -> None:
        """Stop listening, close every connection gracefully and cancel running handlers."""
        if self._closing:
            return
        self._closing = True
        for server in self._servers:
            server.close()
        for conn in list(self._all):
            conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


_BUFFERS = (bytes, bytearray, memoryview)


def _answer_parts(ctx: RpcContext, result) -> tuple:
    """The answer message of a handler that returned `result`."""
    if type(result) is bytes:
        return (STATUS_OK, result)
    if isinstance(result, _BUFFERS):
        return (STATUS_OK, memoryview(result).cast("B"))
    log.error("handler %s returned %s, not bytes", ctx.method, type(result))
    return (encode_error("internal", "handler returned no bytes"),)


def _error_parts(ctx: RpcContext, error: Exception) -> tuple | None:
    """The answer message of a handler that raised `error`; None: no answer (the stream or
    the connection it would go on is gone)."""
    if isinstance(error, RemoteError):
        return (encode_error(error.code, error.message),)
    if isinstance(error, ConnectionLost | StreamClosed):
        return None
    log.error("handler %s failed for %s", ctx.method, ctx.peer, exc_info=error)
    return (encode_error("internal", f"{ctx.method} failed"),)


_BACKLOGGED = reset_reason("busy", "answers to your requests wait unread: read them first")


def _too_large(method: str, limit: int) -> str:
    return reset_reason("too_large", f"{method} requests carry at most {limit} bytes")


async def _awaiting(awaitable):
    return await awaitable


def _expire_task(arg: tuple[asyncio.Task, list[bool]]) -> None:
    task, expired = arg
    expired.append(True)
    task.cancel()


def _expire_call(arg: tuple[PendingCall, str, object, float]) -> None:
    call, method, peer, timeout = arg
    call.fail("deadline_exceeded: the caller gave up",
              RpcTimeout(f"{method} on {_name(peer)}: no answer within {timeout:g} s"))


def _name(peer) -> str:
    return peer.short() if isinstance(peer, PeerId) else str(peer)
