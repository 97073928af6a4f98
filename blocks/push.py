"""Server-to-server push for inference sessions (the I/O half; rules in blocks/push_protocol.py).

A `PushService` belongs to one BlockServer. For every session it hands out a `SessionInbox`:
where the session's steps come from. Without push that is just the client's stream. With
push (the client asked for it when opening) the inbox also takes steps that the previous
server of the client's chain sends with `blocks.push`, authenticated by the session's random
token; a reader task moves the client's messages into the same queue, so one loop serves both.

After a step, `answer` sends the output to the next hop first (the critical path), then to
the client (which keeps it as the next span's input, for replay). A push that fails (the
next server is gone, refuses, or does not answer within PUSH_TIMEOUT) is reported to the
client on the session stream with a failure notice; the client then relays that output
itself. A pushed step whose id is not above the last step the session answered is stale (the
client already relayed it) and is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

import tensor_wire
from blocks import protocol
from blocks.protocol import RequestError
from blocks.push_protocol import (
    METHOD_PUSH,
    PUSH_VERSION,
    TOKEN_BYTES,
    PushHop,
    failure_notice,
    parse_chain,
    parse_push_request,
    push_meta,
    wants_push,
)
from blocks.request_decoder import RequestDecoder, decode_off_loop
from overlay.eager import start_eagerly
from overlay.host import Host, RemoteError, RpcContext
from overlay.identity import IdentityError, PeerId
from overlay.log_limit import LogLimiter
from overlay.streams import ConnectionLost, Stream, StreamClosed
from tensor_wire.limits import DEFAULT_LIMITS, Limits

log = logging.getLogger(__name__)

# Ours: seconds a server waits for the next server to accept a push before telling its client
# to relay instead (loopback answers in well under a millisecond; a WAN hop in < 1 s).
PUSH_TIMEOUT = 5.0
# Ours: pushed steps queued in one session before further pushes are refused (a client runs
# one step at a time, so more than one or two queued means a misbehaving peer).
MAX_QUEUED_PUSHES = 8
# Ours: client messages the reader task moves into a session's queue ahead of the one being
# served; the rest wait in the transport, under its flow control, as without push. (Reading
# on regardless queued every step a client sent without waiting: hundreds of messages, up to
# the transport's 256 MiB each.)
MAX_QUEUED_MESSAGES = 2
# Ours: announced next servers whose addresses are kept (far above the servers of one block).
MAX_KNOWN_HOPS = 1024


class Pushed:
    """A step that another server pushed: decoded tensors and client-style step metadata."""

    __slots__ = ("meta", "tensors")

    def __init__(self, tensors, meta: dict):
        self.tensors = tensors
        self.meta = meta


class SessionInbox:
    """The steps of one session, from its client's stream and (push on) from other servers."""

    __slots__ = ("_error", "_items", "_messages", "_reader", "_room", "_waiter", "answered",
                 "held_notice", "last_step", "stream", "token")

    def __init__(self, stream: Stream, token: bytes | None):
        self.stream = stream
        self.token = token
        self.last_step = -1  # the highest step id answered
        self.answered = -1  # the step id whose answer was sent last
        # A push failure notice of the step being answered, sent right after its answer: the
        # client reads a span's notice only after that span's answer, and drops one before.
        self.held_notice: bytes | None = None
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._reader: asyncio.Task | None = None
        self._messages = 0  # client messages in _items
        self._room: asyncio.Future | None = None  # the reader waits for `next` to take one
        if token is not None:
            self._reader = asyncio.get_running_loop().create_task(self._read_stream())

    async def next(self) -> bytes | Pushed | None:
        """The next client message (bytes) or pushed step; None when the client has ended."""
        if self._reader is None:
            return await self.stream.recv()
        while True:
            while not self._items:
                if self._error is not None:
                    raise self._error
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
            item = self._items.popleft()
            if not isinstance(item, Pushed):
                self._messages -= 1
                room = self._room
                if room is not None and not room.done():
                    room.set_result(None)
            if item is None:
                return None
            if isinstance(item, Pushed) and item.meta["step"] <= self.last_step:
                continue  # stale: the client relayed this step already
            return item

    def deliver(self, item: Pushed) -> None:
        if sum(isinstance(i, Pushed) for i in self._items) >= MAX_QUEUED_PUSHES:
            raise RemoteError(protocol.OVERLOADED, "too many pushed steps queued")
        self._put(item)

    def _put(self, item) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _read_stream(self) -> None:
        try:
            while True:
                while self._messages >= MAX_QUEUED_MESSAGES:
                    self._room = asyncio.get_running_loop().create_future()
                    try:
                        await self._room
                    finally:
                        self._room = None
                message = await self.stream.recv()
                self._messages += 1
                self._put(message)
                if message is None:
                    return
        except (ConnectionLost, StreamClosed, TimeoutError, RemoteError) as e:
            # RemoteError: the client reset the stream (it crashed, or recovered elsewhere);
            # the session must end now and return its cache, not at the idle timeout.
            self._error = e
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """The session is over (ended, or closed for idleness): a loop waiting in `next` gets
        StreamClosed, as it would from the stream itself."""
        if self._reader is not None:
            self._reader.cancel()
            if self._error is None:
                self._error = StreamClosed("the session was closed")
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class PushService:
    """Accepts pushes into this server's sessions and pushes their outputs on."""

    def __init__(self, host: Host, limits: Limits = DEFAULT_LIMITS,
                 timeout: float = PUSH_TIMEOUT, *, decoder: RequestDecoder):
        self.host = host
        self.limits = limits  # what one pushed step may decode to (blocks/request_decoder.py)
        # Whose rule 4 counts pushes while they are decoded (the token is checked after:
        # it travels in the metadata), so that pushes cannot make us decode without bound.
        self.decoder = decoder
        self.timeout = timeout
        self._by_token: dict[bytes, SessionInbox] = {}
        self._tasks: set[asyncio.Task] = set()
        self._peers: dict[str, PeerId] = {}  # next hops' ids, parsed once
        # Announced servers of the block after our span: peer id -> their own signed
        # addresses, the only ones a push dials (learn_hops).
        self._hop_addrs: dict[str, tuple[str, ...]] = {}
        self.on_unknown_hop: Callable[[], None] | None = None  # read the next servers again
        self.pushed = 0  # outputs sent on to the next server
        self.push_failures = 0
        # A client names the hops: it can make every step's push fail (overlay/log_limit.py).
        self._failure_log = LogLimiter(log, clock=time.monotonic)
        host.add_handler(METHOD_PUSH, self._on_push)

    # ------------------------------------------------------------------ sessions
    def open(self, stream: Stream, request_meta) -> SessionInbox:
        """The inbox of a new session; with a push token when the client asked for push."""
        token = secrets.token_bytes(TOKEN_BYTES) if wants_push(request_meta) else None
        inbox = SessionInbox(stream, token)
        if token is not None:
            self._by_token[token] = inbox
        return inbox

    @staticmethod
    def opening_fields(inbox: SessionInbox) -> dict:
        """What the session's opening answer adds: the push version and token, if on."""
        if inbox.token is None:
            return {}
        return {"push": {"v": PUSH_VERSION, "token": inbox.token}}

    def close(self, inbox: SessionInbox) -> None:
        if inbox.token is not None:
            self._by_token.pop(inbox.token, None)
        inbox.close()

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    def learn_hops(self, addrs: Mapping[str, Iterable[str]]) -> None:
        """Where servers of the block after our span listen, from their announcements: the
        addresses a push to one of them may dial. Newest last; the oldest go beyond
        MAX_KNOWN_HOPS."""
        for peer, where in addrs.items():
            self._hop_addrs.pop(peer, None)
            self._hop_addrs[peer] = tuple(where)
        while len(self._hop_addrs) > MAX_KNOWN_HOPS:
            del self._hop_addrs[next(iter(self._hop_addrs))]

    # ------------------------------------------------------------------ a step's output
    async def answer(self, inbox: SessionInbox, step_id: int, output, meta: dict,
                     compression: str) -> None:
        """Send a step's output on along the push chain in `meta` (if any) and to the client."""
        inbox.last_step = max(inbox.last_step, step_id)
        chain = meta.get("next") if isinstance(meta, dict) else None
        problem = None
        if chain is not None:
            try:
                hops = parse_chain(chain)
            except RequestError as e:
                hops, problem = (), f"bad push chain: {e}"
            if hops:
                payload = tensor_wire.encode_message(
                    [output], push_meta(hops[0], meta["position"], hops[1:], meta.get("mask")),
                    compression)
                loop = asyncio.get_running_loop()
                push = self._push(inbox, step_id, hops[0], payload)
                # On a live connection the push starts eagerly: its request is on the socket
                # (the critical path) before the answer to the client is even encoded, and a
                # task takes over only while it waits for the next server's acknowledgement.
                # (Not before a dial: that would enter asyncio.timeout() in this task.)
                eager = self._connected(hops[0].peer)
                task = start_eagerly(loop, push) if eager else loop.create_task(push)
                if task is not None:
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if not eager:
                    await asyncio.sleep(0)  # let the push reach the socket before the answer
        await inbox.stream.send(tensor_wire.encode_message([output], {"step": step_id},
                                                           compression))
        inbox.answered = step_id
        notice, inbox.held_notice = inbox.held_notice, None
        if notice is not None:
            await inbox.stream.send(notice)
        if problem is not None:
            await inbox.stream.send(tensor_wire.encode_message(
                [], failure_notice(step_id, problem)))

    def _peer_id(self, text: str) -> PeerId:
        peer = self._peers.get(text)
        if peer is None:
            peer = PeerId.from_string(text)
            if len(self._peers) >= 1024:
                self._peers.clear()
            self._peers[text] = peer
        return peer

    def _connected(self, text: str) -> bool:
        """Whether a push to `text` goes out at once: a live connection, not our own span."""
        try:
            peer = self._peer_id(text)
        except IdentityError:
            return False
        return peer != self.host.peer_id and self.host.connection_to(peer) is not None

    async def _push(self, inbox: SessionInbox, step_id: int, hop: PushHop,
                    payload: bytes) -> None:
        try:
            peer = self._peer_id(hop.peer)
            if peer == self.host.peer_id:
                await self._on_push(None, payload)  # our own next span: no network
            else:
                if self.host.connection_to(peer) is None:
                    self._dialable(hop.peer, peer)
                await self.host.call(peer, METHOD_PUSH, payload, timeout=self.timeout)
            self.pushed += 1
            return
        except asyncio.CancelledError:
            raise
        except (RemoteError, ConnectionLost, TimeoutError, IdentityError, OSError) as e:
            reason = f"push to {hop.peer[-8:]} failed: {e}"
        self.push_failures += 1
        self._failure_log.log(logging.INFO, "push failures", "step %d: %s; the client relays",
                              step_id, reason)
        notice = tensor_wire.encode_message([], failure_notice(step_id, reason))
        if inbox.answered < step_id:  # it failed at once: before the step's answer went out
            inbox.held_notice = notice
            return
        with contextlib.suppress(ConnectionLost, StreamClosed):
            inbox.stream.send_nowait(notice)

    def _dialable(self, text: str, peer: PeerId) -> None:
        """Make `peer` dialable at its announced addresses, or raise ConnectionLost (the
        client relays) when it is no announced next server: `hop.addrs` are not used."""
        addrs = self._hop_addrs.get(text)
        if addrs is None:
            if self.on_unknown_hop is not None:
                self.on_unknown_hop()  # a server that joined since the last read, maybe
            raise ConnectionLost("not an announced server of the next block")
        self.host.add_peer_addrs(peer, addrs)

    # ------------------------------------------------------------------ receiving pushes
    async def _on_push(self, ctx: RpcContext | None, payload: bytes) -> bytes:
        if ctx is None:  # our own next span: our own output, not a peer's request
            tensors, meta = await decode_off_loop(payload, self.limits)
        else:
            with self.decoder.held(payload, ctx.peer, self.limits) as size:
                tensors, meta = await decode_off_loop(payload, self.limits, size)
        try:
            request = parse_push_request(meta)
            if len(tensors) != 1:
                raise RequestError(protocol.BAD_INPUT, "a push carries one tensor")
        except RequestError as e:
            raise RemoteError(e.code, str(e)) from None
        inbox = self._by_token.get(request.token)
        if inbox is None:
            raise RemoteError(protocol.SESSION_CLOSED, "no session with this push token")
        inbox.deliver(Pushed(tensors, request.step_meta()))
        if ctx is not None:
            # The step is on the token's critical path, the acknowledgement is not: yield
            # once, so that the session's task takes the step before the acknowledgement is
            # sealed and written (an eager handler's answer goes out first otherwise).
            # trace_token.py, server 2 "read -> step received": 119 us against 160-193 (4x64),
            # 326 against 337-418 (8x512).
            await asyncio.sleep(0)
        return b""
