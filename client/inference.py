"""Inference sessions through a chain of block servers (asyncio).

An `InferenceSession` holds one `blocks.inference` stream per server of its route. Each step
sends only the new positions through the chain and returns the last server's hidden states;
the servers keep the attention caches. The session remembers, per span, every input it sent,
so that a failed server can be replaced by replaying them.

Push (docs/block_protocol.md, "Push"; on by default): servers that accept it get a step's
hidden states from the previous server of the chain instead of from the client, so a step
crosses the chain once (client/push_chain.py). Every server still answers the client, which
keeps each span's inputs exactly as in relay mode; a push that fails is reported by the
pushing server and the client relays that hop itself. Servers that do not speak push (older
versions) are relayed to, as before.

Recovery (when the session was given a `Rerouter`): a span whose server fails during a step
(lost connection, timeout, reset stream, malformed answer; never a `RemoteError`, which means
the caller's input was refused), or refuses to open the session for a reason of its own
(`OPENING_FAULTS`: a full cache, blocks it no longer serves), is banned (client/recovery.py
`BanList`), exactly its block range is routed again around the bans, the replacement servers
get the span's stored inputs (each replacement's outputs feeding the next) together with the
current step, and they take the failed span's place in the chain. A range nobody serves is
retried with `RetryPolicy` delays until `SessionConfig.recovery_timeout`, then
`BlocksUnavailableError` names the blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

import tensor_wire
from blocks import protocol
from blocks.protocol import Reorder
from blocks.push_protocol import (
    PUSH_VERSION,
    TOKEN_BYTES,
    PushHop,
    reorder_to_wire,
)
from client.held_tokens import HeldTokens
from client.padding import PaddingMask
from client.recovery import BanList, RetryPolicy
from client.request_chunks import REQUEST_CHUNK_TOKENS, positions_per_step
from client.routing import MissingBlocksError
from model_parts.skeleton import ModelInputError
from overlay import timeline
from overlay.host import Host, RemoteError
from overlay.identity import PeerId
from overlay.streams import ConnectionLost, Stream, StreamClosed

log = logging.getLogger(__name__)

# Ours: how long a session waits for a failed span's blocks to be served again by default.
RECOVERY_TIMEOUT = 60.0
# Seconds one server may take to answer an inference step before it is replaced (a server
# that froze, or left without closing its connection).
STEP_TIMEOUT = 60.0
# Codes with which a server refuses to open a session that another server may well open: its
# cache is full, it is overloaded, or it no longer serves these blocks (it moved or restarted
# since the announcement the route was read from). A session replaces such a server.
OPENING_FAULTS = frozenset({protocol.CACHE_FULL, protocol.OVERLOADED, protocol.BAD_RANGE,
                            protocol.UNKNOWN_MODEL})

# A route as the session uses it: (server, first block, end block) per span.
Route = list[tuple[PeerId, int, int]]
# Routes blocks [start, end) around the banned peer ids; `refresh` asks for a fresh swarm view.
# Raises client.routing.MissingBlocksError when some blocks have no eligible server.
Rerouter = Callable[[int, int, frozenset[str], bool], Awaitable[Route]]
# Extra meta for the opening request of blocks [start, end) on a server (fine-tuned weights).
Opening = Callable[[PeerId, int, int], Awaitable[dict]]


@dataclass(frozen=True, slots=True)
class SessionTuning:
    """Fine-tuned additions to every span's session (client/finetune.py builds them)."""

    opening: Opening | None = None
    prompts: torch.Tensor | None = None  # deep prompts [num_blocks, 1, prefix, hidden]


class InferenceError(RuntimeError):
    """A session could not go on; the message says which server and why."""


class BlocksUnavailableError(InferenceError, MissingBlocksError):
    """Recovery gave up at its deadline: nobody could serve `missing` (sorted block indices)
    in its last attempt: the blocks no unbanned server announces, or the span of the server that
    failed, within the lost span the message names (dead servers stay announced until their
    records expire, so blocks not tried yet are not named). Both an InferenceError (the
    session cannot go on) and a MissingBlocksError (what is missing)."""

    def __init__(self, missing: list[int], message: str):
        MissingBlocksError.__init__(self, missing)
        self.args = (message,)

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class Recovery:
    """One replaced span, for logs and measurements."""

    start: int
    end: int
    failed_peer: str
    replacement: tuple[tuple[str, int, int], ...]
    replayed: int  # positions replayed into the replacement
    seconds: float  # from the failure to the current step's answer from the replacement
    reason: str


@dataclass(frozen=True, slots=True)
class SessionConfig:
    batch_size: int = 1
    max_length: int = 2048
    wait_timeout: float = 30.0  # for free attention cache on the servers
    step_timeout: float = STEP_TIMEOUT
    compression: str = "none"  # of the activations, in both directions
    recovery_timeout: float = RECOVERY_TIMEOUT  # to replace a failed span, then give up
    push: bool = True  # servers send hidden states on to the next server themselves


class Mailbox:
    """The messages of a session's push-capable spans, as their reader tasks receive them, so
    that a step can wait on two streams at once (a span's answer, or its pusher's notice).
    A span's end or failure stays at the head of its queue: every later read sees it."""

    __slots__ = ("_queues", "_waiter")

    def __init__(self):
        # weak: a span replaced after a failure, and the replay inputs it holds, must not
        # stay alive for the rest of the session through its queue
        self._queues: weakref.WeakKeyDictionary[SpanSession, deque] = \
            weakref.WeakKeyDictionary()
        self._waiter: asyncio.Future | None = None

    def post(self, span: SpanSession, item: bytes | BaseException | None) -> None:
        self._queues.setdefault(span, deque()).append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, span: SpanSession) -> None:
        """`span` was closed: its unread messages are dropped for an error that every later
        read of it sees, and a step waiting on it wakes (it would otherwise wait for ever)."""
        self._queues.pop(span, None)
        self.post(span, StreamClosed("the session was closed"))

    async def get(self, spans: tuple[SpanSession, ...]):
        """(span, item): the oldest message of the first of `spans` that has one."""
        while True:
            for span in spans:
                queue = self._queues.get(span)
                if queue:
                    item = queue[0]
                    if isinstance(item, bytes):
                        queue.popleft()
                    return span, item
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


# What `SpanSession.read` makes of one message of a step.
ANSWER, STALE, NOTICE = "answer", "stale", "notice"


class SpanSession:
    """One server's part of an inference session: blocks [start, end) on `peer`."""

    def __init__(self, host: Host, peer: PeerId, model_id: str, start: int, end: int,
                 config: SessionConfig, mailbox: Mailbox | None = None,
                 tuning: SessionTuning | None = None, padding: PaddingMask | None = None):
        self.host = host
        self.padding = padding  # the session's, shared by its spans
        self.opening = None if tuning is None else tuning.opening
        prompts = None if tuning is None else tuning.prompts
        self.prompts = None if prompts is None else prompts[start:end].contiguous()
        self.peer = peer
        self.model_id = model_id
        self.start = start
        self.end = end
        self.config = config
        self.position = 0
        self.inputs: list[torch.Tensor] = []  # everything sent, for replay on another server
        # Beam search: the reorders the server has applied, and the one its next step carries
        # (several made between two steps compose into one).
        self.order_version = 0
        self.pending_order: torch.Tensor | None = None
        self.push_token: bytes | None = None  # the server accepts pushes into this session
        self.features: frozenset[str] = frozenset()  # step fields the server understands
        # batch x positions of one step the server takes (its opening answer says; older
        # servers do not, and took the default)
        self.max_request_tokens = protocol.DEFAULT_MAX_REQUEST_TOKENS
        self._stream: Stream | None = None
        self._step_ids = 0
        self._mailbox = mailbox
        self._receiving = False  # a relayed step waits on the stream
        self._reader: asyncio.Task | None = None

    async def open(self) -> None:
        if self._stream is not None:
            return  # open already (a second open would leak the server's session)
        config = self.config
        try:
            self._stream = await self.host.open_stream(self.peer, protocol.METHOD_INFERENCE,
                                                       timeout=None)
            extra = {} if self.opening is None else await self.opening(self.peer, self.start,
                                                                         self.end)
        except (ConnectionLost, OSError, TimeoutError) as e:
            raise InferenceError(f"{self._where()}: {e}") from None
        opening = {
            "model": self.model_id, "start": self.start, "end": self.end,
            "batch_size": config.batch_size, "max_length": config.max_length,
            "wait_timeout": config.wait_timeout, "compression": config.compression, **extra,
        }
        if config.push and self._mailbox is not None:
            opening["push"] = PUSH_VERSION
        await self._send(tensor_wire.encode_message([], opening))
        message = await self._receive(config.wait_timeout + config.step_timeout)
        if not isinstance(message, bytes):
            self.read(message, 0)  # raises: the server is lost
        try:
            _, meta = tensor_wire.decode_message(message)
        except tensor_wire.WireError as e:
            raise InferenceError(f"{self._where()}: malformed answer: {e}") from None
        if "session" not in meta:
            raise InferenceError(f"{self._where()}: unexpected answer to the session request")
        features = meta.get("features")
        if isinstance(features, list):
            self.features = frozenset(f for f in features if isinstance(f, str))
        limit = meta.get("max_request_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
            self.max_request_tokens = limit
        if self.max_request_tokens < config.batch_size:  # routing leaves such servers out
            raise InferenceError(f"{self._where()}: takes at most {self.max_request_tokens} "
                                 f"tokens per request, fewer than one position of each of the "
                                 f"session's {config.batch_size} rows")
        push = meta.get("push") if self._mailbox is not None else None
        if isinstance(push, dict) and isinstance(push.get("token"), bytes) and \
                len(push["token"]) == TOKEN_BYTES:
            self.push_token = push["token"]
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """Relay: send `hidden` (positions from `position` on) and wait for the output."""
        step_id = self.next_step_id()
        await self.send_step(hidden, position, step_id)
        while True:
            kind, out = self.read(await self._receive(self.config.step_timeout), step_id)
            if kind == ANSWER:
                break
        self.commit(hidden, position)
        return out

    # -- the parts of a step, for push chains (client/push_chain.py) --------------------------

    def next_step_id(self) -> int:
        step_id = self._step_ids
        self._step_ids += 1
        return step_id

    def hop(self, step_id: int) -> PushHop:
        """How the previous server pushes this span's part of step `step_id` to it (no
        addresses: servers dial only those the next server announced)."""
        reorder = self._reorder()
        if reorder is not None:
            self.require("reorder")
        return PushHop(str(self.peer), self.push_token, step_id, reorder=reorder)

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i of this span's cache becomes row index[i] before the next step;
        the inputs kept for replay are reordered now (a replacement gets them in the new
        order, and no reorder)."""
        self.pending_order = index if self.pending_order is None else self.pending_order[index]
        self.inputs = [t.index_select(0, index.to(t.device)) for t in self.inputs]

    def require(self, feature: str) -> None:
        """A step field this span's server must understand, or a clear error (an older server
        would ignore the field and compute something else)."""
        if feature not in self.features:
            raise ModelInputError(f"{self._where()}: this server's version does not take a "
                                  f"step's {feature!r} (padding or beam search); it needs an "
                                  f"upgrade")

    def _reorder(self) -> Reorder | None:
        if self.pending_order is None:
            return None
        return Reorder(self.order_version + 1, tuple(self.pending_order.tolist()))

    async def send_step(self, hidden: torch.Tensor, position: int, step_id: int,
                        chain: list[PushHop] | None = None) -> None:
        if self._stream is None:
            raise InferenceError(f"{self._where()}: session is not open")
        tensors, meta = [hidden], {"position": position, "step": step_id}
        if chain:
            meta["next"] = [hop.to_wire() for hop in chain]
        if self.padding is not None and self.padding.any:
            mask = self.padding.wire(position, position + hidden.shape[1])
            if mask is not None:
                self.require("mask")
                meta["mask"] = mask
        reorder = self._reorder()
        if reorder is not None:
            self.require("reorder")
            meta["reorder"] = reorder_to_wire(reorder)
        if self.prompts is not None and position < self.prompts.shape[2]:
            tensors.append(self.prompts)  # deep prompts: the server adds them at the prefix
            meta["prompts"] = True
        await self._send(tensor_wire.encode_message(tensors, meta, self.config.compression))

    def read(self, item: bytes | BaseException | None, step_id: int):
        """(ANSWER, output), (STALE, None) for a message of an earlier step, or (NOTICE,
        reason) when the server could not push step `step_id` on. Raises InferenceError when
        the server is lost, RemoteError when it refused the step."""
        if isinstance(item, RemoteError):
            raise item
        if isinstance(item, BaseException):
            raise InferenceError(str(item) if isinstance(item, TimeoutError) else
                                 f"{self._where()}: {item}")
        if item is None:
            raise InferenceError(f"{self._where()}: the server ended the session")
        try:
            tensors, meta = tensor_wire.decode_message(item)
        except tensor_wire.WireError as e:
            raise InferenceError(f"{self._where()}: malformed answer: {e}") from None
        got = meta.get("step")
        if not isinstance(got, int) or got > step_id:
            raise InferenceError(f"{self._where()}: answer out of order")
        if got < step_id:
            return STALE, None
        if "push_failed" in meta:
            return NOTICE, str(meta["push_failed"])
        if "error" in meta:
            raise RemoteError(str(meta.get("error")), str(meta.get("message", "")))
        if len(tensors) != 1:
            raise InferenceError(f"{self._where()}: answer out of order")
        return ANSWER, tensors[0]

    def commit(self, hidden: torch.Tensor, position: int) -> None:
        """The server has run `hidden` from `position` on: keep it for replay."""
        if position != self.position:  # `inputs` hold exactly [0, self.position): moved back
            _trim(self.inputs, position)
        self.inputs.append(hidden)
        self.position = position + hidden.shape[1]
        if self.pending_order is not None:  # the server applied it with this step
            self.order_version += 1
            self.pending_order = None

    def arm_timeout(self, timeout: float) -> asyncio.TimerHandle:
        """At the deadline the stream is reset, which fails the wait with a timeout."""
        return asyncio.get_running_loop().call_later(
            timeout, _expire, self._stream, f"{self._where()}: no answer within {timeout:g} s")

    async def _read(self) -> None:
        """Push mode: move every message of the stream to the session's mailbox."""
        stream, mailbox = self._stream, self._mailbox
        try:
            while True:
                message = await stream.recv()
                mailbox.post(self, message)
                if message is None:
                    return
        except Exception as e:  # RemoteError too: `read` raises it to the caller
            mailbox.post(self, e)

    async def _send(self, message: bytes) -> None:
        try:
            await self._stream.send(message)
        except (ConnectionLost, StreamClosed) as e:
            raise InferenceError(f"{self._where()}: {e}") from None

    async def _receive(self, timeout: float) -> bytes | BaseException | None:
        """The next message, or the stream's end (None) or failure, for `read` to judge."""
        # One timer instead of asyncio.wait_for, which creates a task per call (Python 3.11):
        # at the deadline the stream is reset, which wakes recv() with the timeout error.
        timer = self.arm_timeout(timeout)
        try:
            if self._reader is not None:
                return (await self._mailbox.get((self,)))[1]
            self._receiving = True
            try:
                return await self._stream.recv()
            finally:
                self._receiving = False
        except (ConnectionLost, StreamClosed, TimeoutError) as e:
            return e
        finally:
            timer.cancel()

    async def close(self) -> None:
        """close_now, then wait for the reader task to end: none outlives the span."""
        self.close_now()
        await _ended(self._reader)

    def close_now(self) -> None:
        """Half-close the stream (the server frees the session) and wake a step waiting on
        this span; the reader task is cancelled (`close` also waits for it to end).
        Synchronous: a cancellation arriving during cleanup cannot stop it half way, which
        left the server's session, and its cache, open."""
        if self._reader is not None:
            self._reader.cancel()
        if self._mailbox is not None:
            self._mailbox.close(self)
        stream, self._stream = self._stream, None
        if stream is None:
            return
        with contextlib.suppress(Exception):
            if self._receiving:  # a relayed step waits for the answer: reset wakes it
                stream.reset("the client closed the session")
            else:
                stream.close_nowait()

    def _where(self) -> str:
        return f"blocks [{self.start}, {self.end}) on {self.peer.short()}"


async def _ended(*tasks: asyncio.Task | None) -> None:
    """Wait until `tasks` (cancelled readers) have ended, without raising what they raised:
    a task left pending past its session's close could be destroyed pending with its loop."""
    pending = {task for task in tasks if task is not None and not task.done()}
    if pending:
        await asyncio.wait(pending)


def _expire(stream: Stream, message: str) -> None:
    stream.expire(TimeoutError(message))


def _trim(inputs: list[torch.Tensor], position: int) -> None:
    """Keep exactly positions [0, position) of the stored inputs (a rollback drops the rest,
    possibly the end of a multi-position input)."""
    total = 0
    for i, tensor in enumerate(inputs):
        length = tensor.shape[1]
        if total + length > position:
            del inputs[i + 1:]
            if position > total:
                inputs[i] = tensor[:, :position - total]
            else:
                del inputs[i]
            return
        total += length


async def _step_in_pieces(span: SpanSession, data: torch.Tensor) -> torch.Tensor:
    """A replay from position 0 into `span`, as steps of at most REQUEST_CHUNK_TOKENS or the
    server's limit (servers refuse larger requests: a long session could not be replayed)."""
    per_step = positions_per_step(min(REQUEST_CHUNK_TOKENS, span.max_request_tokens),
                                  data.shape[0])
    if data.shape[1] <= per_step:
        return await span.step(data, 0)
    outs = [await span.step(data[:, i:i + per_step], i)
            for i in range(0, data.shape[1], per_step)]
    return torch.cat(outs, dim=1)


def _replaceable(error: BaseException) -> bool:
    """A failure of the server, not of the request: another server may do better."""
    return isinstance(error, InferenceError) or (isinstance(error, RemoteError)
                                                 and error.code in OPENING_FAULTS)


class _ChainFailed(Exception):
    def __init__(self, span: SpanSession, error: InferenceError | RemoteError):
        self.span = span
        self.error = error


class InferenceSession:
    """A chain of SpanSessions covering the model's blocks; `step` runs new positions through.

    With a `rerouter`, a failed span is replaced during `step` (see the module docstring) and
    the step's result is the one a run without the failure gives; without one, failures raise.
    `bans` may be shared with other sessions of the same client; `recoveries` lists each
    replacement made.
    """

    def __init__(self, host: Host, model_id: str, route: Route,
                 config: SessionConfig | None = None, *, rerouter: Rerouter | None = None,
                 bans: BanList | None = None, rng: random.Random | None = None,
                 tuning: SessionTuning | None = None):
        self.host = host
        self.model_id = model_id
        self._tuning = tuning
        self.config = config or SessionConfig()
        self.mailbox = Mailbox()
        self.padding = PaddingMask(self.config.batch_size, self.config.max_length)
        self.tokens = HeldTokens(self.config.batch_size, self.config.max_length)
        self.client_sends = 0  # hidden states the client sent to a span (relay: one per span)
        self.spans = [self._span(peer, start, end) for peer, start, end in route]
        self.position = 0
        self.recoveries: list[Recovery] = []
        self._rerouter = rerouter
        self._bans = bans if bans is not None else BanList()
        self._retry = RetryPolicy(rng or random.Random())
        self._closed = False
        self._closing = asyncio.Event()  # wakes a recovery waiting for servers
        self._opened = False
        self._stepping = False  # a step is in flight (one at a time: each waits for answers)

    def _span(self, peer: PeerId, start: int, end: int) -> SpanSession:
        return SpanSession(self.host, peer, self.model_id, start, end, self.config,
                           self.mailbox, self._tuning, self.padding)

    async def open(self, deadline: float | None = None) -> InferenceSession:
        """Open every span; with a rerouter, spans whose server cannot be reached are replaced
        (a server may have died since the swarm view was read). Opening twice is a no-op
        (`async with await blocks.inference_session(...)` opens in both places).

        `deadline` (time.monotonic()): when replacing them gives up, by default
        `recovery_timeout` from now; one deadline for all of them, which a caller that already
        waited for the route passes on, so that the whole opening stays within one timeout."""
        if self._opened:
            return self
        self._opened = True
        try:
            results = await asyncio.gather(*(span.open() for span in self.spans),
                                           return_exceptions=True)
            failed = [(i, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
            for _, error in failed:
                if self._rerouter is None or not _replaceable(error):
                    raise error
            if deadline is None:
                deadline = time.monotonic() + self.config.recovery_timeout
            for index, error in reversed(failed):  # from the end: indices stay valid
                await self._recover(index, None, 0, error, deadline)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> InferenceSession:
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run `hidden` ([batch, new positions, hidden size]) through every span.

        `attention_mask` ([batch, new positions], 1 = token, 0 = padding): which new positions
        are padding (left-padded prompts); every later step then attends only to tokens, and
        position ids count tokens only (client/padding.py). `tokens` [batch, new positions]:
        the ids `hidden` embeds, kept in `self.tokens` for later calls to compare (None:
        unknown). One step at a time: each starts where the previous one ended."""
        if self._closed:
            raise InferenceError("the inference session is closed")
        if self._stepping:
            raise InferenceError("a step of this session is already running: await it before "
                                 "the next (open another session for concurrent generation)")
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[1] < 1:
            # a [batch, hidden] tensor was read as hidden-size positions ("65 tokens exceed")
            shape = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)
            raise ModelInputError(f"hidden states must be [batch, new positions >= 1, hidden "
                                  f"size], got {shape}")
        self._stepping = True
        position = self.position
        try:
            if position + hidden.shape[1] > self.config.max_length:
                raise InferenceError(f"{position + hidden.shape[1]} tokens exceed the "
                                     f"session's max_length {self.config.max_length}")
            mask = self.padding.check(attention_mask, hidden.shape[1])
            if tokens is not None and tuple(tokens.shape) != tuple(hidden.shape[:2]):
                raise ModelInputError(f"the token ids of a step must have shape "
                                      f"{tuple(hidden.shape[:2])}")
            length = hidden.shape[1]
            # One position of every row always fits: servers that take fewer are refused when
            # the session opens (SpanSession.open), so a decode step skips the arithmetic.
            if length == 1 or length <= self._positions_per_step(hidden.shape[0]):
                out = await self._step(hidden, mask)
            else:  # too many for one request: in pieces, each recorded as its own step
                outs, done = [], 0
                while done < length:
                    # again for every piece: a replaced server may take fewer
                    stop = min(length, done + self._positions_per_step(hidden.shape[0]))
                    piece_mask = None if mask is None else mask[:, done:stop]
                    outs.append(await self._step(hidden[:, done:stop], piece_mask))
                    done = stop
                out = torch.cat(outs, dim=1)
            self.tokens.record(position, hidden.shape[1], tokens)
            return out
        except BaseException:
            self.position = min(self.position, position)  # a step is whole or not at all
            raise
        finally:
            self._stepping = False

    def _positions_per_step(self, batch: int) -> int:
        """Positions of one step request: a pushed step crosses every server of the chain
        unchanged, so it fits the smallest limit among them."""
        limit = min([REQUEST_CHUNK_TOKENS, *(span.max_request_tokens for span in self.spans)])
        return positions_per_step(limit, batch)

    async def _step(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """One step request; `step` checked its length and `mask` (PaddingMask.check)."""
        position = self.position
        dtype = hidden.dtype  # servers may run another precision: answered in this one
        self.padding.record(position, mask, hidden.shape[1])
        if self.padding.wire(position, position + hidden.shape[1]) is not None:
            for span in self.spans:  # pushed on to each of them: all must understand it
                span.require("mask")
        if timeline.ENABLED:
            timeline.mark("client_step_sent")
        if any(span.push_token is not None for span in self.spans):
            from client.push_chain import push_step  # imports this module

            hidden = await push_step(self, hidden, position)
            self.position = position + hidden.shape[1]
            if timeline.ENABLED:
                timeline.mark("client_step_done")
            return hidden.to(dtype)
        index = 0
        while index < len(self.spans):
            span = self.spans[index]
            try:
                self.client_sends += 1
                out = await span.step(hidden, position)
            except InferenceError as e:
                if self._rerouter is None or self._closed:
                    raise
                out, count = await self._recover(index, hidden, position, e)
                index += count
            else:
                index += 1
            hidden = out
        self.position = position + hidden.shape[1]
        if timeline.ENABLED:
            timeline.mark("client_step_done")
        return hidden.to(dtype)

    def rollback(self, position: int) -> None:
        """Forget positions from `position` on (the next step starts there)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot move back to {position}: the session holds "
                             f"{self.position} positions")
        self.position = position

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: sequence i of the session continues sequence beam_idx[i] (its cache
        rows on every server, its padding), from the next step on."""
        batch = self.config.batch_size
        index = torch.as_tensor(beam_idx).to("cpu", torch.long).reshape(-1)
        if index.numel() != batch or bool(((index < 0) | (index >= batch)).any()):
            raise ValueError(f"a reorder names one sequence in [0, {batch}) per sequence")
        for span in self.spans:
            span.reorder(index)
        self.padding.reorder(index)
        self.tokens.reorder(index)

    async def close(self) -> None:
        """close_now, then wait for the spans' reader tasks to end."""
        self.close_now()
        await _ended(*(span._reader for span in self.spans))

    def close_now(self) -> None:
        """Close every span at once (no await: see SpanSession.close_now)."""
        self._closed = True
        self._closing.set()
        for span in self.spans:
            span.close_now()

    # -- recovery ---------------------------------------------------------------------------------

    async def _recover(self, index: int, hidden: torch.Tensor | None, position: int,
                       error: InferenceError | RemoteError, deadline: float | None = None
                       ) -> tuple[torch.Tensor | None, int]:
        """Replace span `index` by a fresh chain for its blocks, rebuild the chain's caches and
        run the current step (if any) through it; returns (its output, number of new spans).
        Gives up at `deadline` (by default `recovery_timeout` from now), after one attempt."""
        failed = self.spans[index]
        began = time.monotonic()
        if deadline is None:
            deadline = began + self.config.recovery_timeout
        self._bans.ban(str(failed.peer), began)
        await failed.close()
        log.warning("%s failed: %s; replacing it", failed._where(), error)
        _trim(failed.inputs, position)
        replay = list(failed.inputs)
        attempt, refresh = 0, False
        reason = str(error)
        while True:
            if self._closed:  # closed meanwhile: a replacement would hold a cache for nobody
                raise InferenceError("the inference session was closed during recovery")
            now = time.monotonic()
            try:
                route = await self._rerouter(failed.start, failed.end, self._bans.banned(now),
                                             refresh)
                chain = [self._span(peer, start, end) for peer, start, end in route]
                out = await self._run_chain(chain, replay, hidden, position)
                if self._closed:
                    for span in chain:
                        span.close_now()
                    continue
            except MissingBlocksError as e:
                missing, reason = e.missing, str(e)
                log.info("no replacement yet for blocks [%d, %d): %s", failed.start, failed.end,
                         e)
            except _ChainFailed as e:
                self._bans.ban(str(e.span.peer), time.monotonic())
                log.warning("replacement %s failed: %s", e.span._where(), e.error)
                missing, reason = list(range(e.span.start, e.span.end)), str(e.error)
                refresh = True
                if time.monotonic() < deadline:
                    continue  # another server may be there already: no wait
            else:
                break
            now = time.monotonic()
            delay = self._retry.next_delay(attempt, now, deadline,
                                           wake_at=self._bans.next_unban(now))
            if delay is None:
                # the time really spent: a deadline shared with the route's wait leaves less
                # than recovery_timeout
                first = "" if reason == str(error) else f" (it failed with: {error})"
                raise BlocksUnavailableError(
                    missing, f"could not replace blocks [{failed.start}, {failed.end}) after "
                    f"{now - began:.1f} s: {reason}{first}") from error
            attempt += 1
            refresh = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        self.spans[index:index + 1] = chain
        record = Recovery(failed.start, failed.end, str(failed.peer),
                          tuple((str(s.peer), s.start, s.end) for s in chain),
                          sum(t.shape[1] for t in replay), time.monotonic() - began, str(error))
        self.recoveries.append(record)
        log.warning("replaced blocks [%d, %d) of %s by %s in %.3f s (%d positions replayed)",
                    failed.start, failed.end, failed.peer.short(),
                    " -> ".join(f"{s.peer.short()}[{s.start}:{s.end})" for s in chain),
                    record.seconds, record.replayed)
        return out, len(chain)

    async def _run_chain(self, chain: list[SpanSession], replay: list[torch.Tensor],
                         hidden: torch.Tensor | None, position: int) -> torch.Tensor | None:
        """Open `chain`, send it the replayed positions [0, position) and this step's `hidden`
        as one step from position 0; returns the output for this step's positions only."""
        try:
            results = await asyncio.gather(*(span.open() for span in chain),
                                           return_exceptions=True)
        except BaseException:  # cancelled while opening: not in self.spans, none else closes
            for span in chain:  # them, and a half-open span holds its server's session
                span.close_now()
            raise
        for span, result in zip(chain, results):
            if isinstance(result, BaseException):
                await asyncio.gather(*(s.close() for s in chain), return_exceptions=True)
                if _replaceable(result):
                    raise _ChainFailed(span, result)
                raise result
        parts = [*replay, *([] if hidden is None else [hidden])]
        if not parts:
            return None
        data = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        for span in chain:
            try:
                data = await _step_in_pieces(span, data)
            except InferenceError as e:
                await asyncio.gather(*(s.close() for s in chain), return_exceptions=True)
                raise _ChainFailed(span, e) from None
            except BaseException:
                await asyncio.gather(*(s.close() for s in chain), return_exceptions=True)
                raise
        return data[:, position:]
