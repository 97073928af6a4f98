"""A block server: a span of a model's blocks behind the overlay's RPCs (blocks/protocol.py).

The I/O half: it owns a Host, answers `blocks.info`, `blocks.forward` and `blocks.inference`,
accounts the attention cache (blocks/cache_budget.py), closes idle sessions, and runs torch
work on one worker thread so the event loop keeps answering pings and the DHT meanwhile.
Announcing itself in the DHT is blocks/announcer.py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import msgpack
import torch

import tensor_wire
from blocks import protocol
from blocks.backward import ServerTuning
from blocks.cache_budget import CacheBudget, CacheFullError
from blocks.lora import LoraWeights
from blocks.protocol import RequestError
from blocks.push import Pushed, PushService
from blocks.request_decoder import (
    MAX_WAITING_BYTES,
    MAX_WAITING_BYTES_PER_PEER,
    RequestDecoder,
    decode,
    request_limits,
)
from blocks.span import BlockSpan, SessionTooLongError, SpanInputError
from overlay import timeline
from overlay.host import Host, RemoteError, RpcContext
from overlay.streams import ConnectionLost, Stream, StreamClosed

log = logging.getLogger(__name__)

# Work expected to take less than this (thread CPU time) runs on the event loop itself;
# longer work goes to the worker thread so pings, the DHT and other sessions are not held up
# for long. A step on the worker costs far more than the hop (~50-100 us): while torch drops
# and retakes the GIL in every op, the loop's own work for the chain (decrypting, encoding,
# the push) waits for GIL hand-offs (the switch interval is 5 ms). Measured on the 8-layer x
# 512 CPU model (scripts/trace_token.py, 2 spans of 3.7 ms each in a hot loop): 13.7 ms/token
# with the steps on the worker, 11.2 inline (2026-12-02). 10 ms of a blocked loop is far below
# every timeout of the DHT, pings and sessions (seconds), and steps that long are prefills
# or big spans on a CPU, where the worker's cost no longer matters.
INLINE_COMPUTE_LIMIT = 0.010


@dataclass(frozen=True, slots=True)
class ServingConfig:
    model_id: str
    cache_tokens: int = 8192  # attention-cache capacity, in tokens on every block of the span
    max_length: int = 8192  # the longest session a client may open
    session_idle_timeout: float = 300.0
    # An inference stream whose opening message has not come by then is refused (clients send
    # it with the stream's first frame; a stream held open without one costs a handler each).
    session_opening_timeout: float = 30.0
    # batch x length of one forward or step; announced, so clients split to fit it
    max_request_tokens: int = protocol.DEFAULT_MAX_REQUEST_TOKENS
    # batch x length of one backward (~3x a forward's work); announced, clients cut to fit
    max_backward_tokens: int = protocol.DEFAULT_MAX_BACKWARD_TOKENS
    max_adapter_bytes: int = 256 << 20  # one uploaded LoRA (blocks.lora_put)
    adapter_cache_bytes: int = 1 << 30  # all uploaded LoRAs held at once
    adapter_idle_timeout: float = 600.0  # an uploaded LoRA unused this long is dropped
    # Bytes of requests arrived whole and not yet answered, per peer and in all
    # (blocks/request_decoder.py, rule 4): beyond, new ones are refused with `overloaded`.
    max_waiting_bytes_per_peer: int = MAX_WAITING_BYTES_PER_PEER
    max_waiting_bytes: int = MAX_WAITING_BYTES


class _Session:
    __slots__ = ("blocks", "budget", "cost", "inbox", "last_active", "lora", "session",
                 "session_id", "stream", "tuning")

    def __init__(self, session_id, session, blocks, cost, stream, budget, tuning=None,
                 lora=None):
        self.session_id = session_id
        self.stream = stream
        self.session = session
        self.blocks = blocks
        self.cost = cost
        self.budget = budget  # of the span it was opened on (a server may have moved since)
        self.last_active = time.monotonic()
        self.inbox = None
        self.tuning = tuning  # protocol.TuningRequest of the opening, or None
        self.lora = lora  # its LoRA weights (pinned in the upload cache while open)


class BlockServer:
    """Serves one span. Create, then `attach(host)`; `close()` frees every session."""

    def __init__(self, span: BlockSpan, config: ServingConfig,
                 adapters: dict[str, LoraWeights] | None = None):
        self.span = span
        self.config = config
        self.budget = CacheBudget(config.cache_tokens * span.num_blocks)
        self.limits = request_limits(  # what one request may decode to
            span.hidden_size, max(config.max_request_tokens, config.max_backward_tokens))
        self.decoder = RequestDecoder(
            self.limits, max_waiting_bytes_per_peer=config.max_waiting_bytes_per_peer,
            max_waiting_bytes=config.max_waiting_bytes)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="blocks")
        self._sessions: dict[int, _Session] = {}
        self._ids = itertools.count(1)
        self._reaper: asyncio.Task | None = None
        self._views: dict[tuple[int, int], BlockSpan] = {(span.start, span.end): span}
        self.requests_served = 0
        self._seconds_per_token: float | None = None  # moving average of compute time
        self._in_worker = 0  # computations queued on or running in the worker thread
        self.push: PushService | None = None  # server-to-server push (blocks/push.py)
        self.tuning = ServerTuning(self, adapters)  # backward, LoRA, deep prompts

    # ------------------------------------------------------------------ lifetime
    def attach(self, host: Host) -> None:
        host.add_handler(protocol.METHOD_INFO, self._info)
        host.add_handler(protocol.METHOD_FORWARD, self._forward)
        host.add_stream_handler(protocol.METHOD_INFERENCE, self._inference)
        self.push = PushService(host, self.limits, decoder=self.decoder)
        self.tuning.attach(host)
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle_sessions())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for entry in list(self._sessions.values()):
            self._end_session(entry)
        if self.push is not None:
            await self.push.aclose()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def served(self) -> tuple[int, int]:
        return self.span.start, self.span.end

    @property
    def cache_tokens_free(self) -> int:
        return self.budget.free // self.span.num_blocks

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    # ------------------------------------------------------------------ moving (issue 6)
    def switch_span(self, span: BlockSpan) -> None:
        """Serve `span` from now on: new requests must fall inside it, while sessions already
        open on the old span keep running on it (their own view and cache budget) until they
        end or `free_old_spans()`. The old span stays in memory meanwhile."""
        self.span = span
        self._views = {(span.start, span.end): span}
        self.budget = CacheBudget(self.config.cache_tokens * span.num_blocks)
        self.tuning.switch_span(span)

    @property
    def old_span_sessions(self) -> int:
        """Sessions still running on a span this server has left."""
        return sum(1 for e in self._sessions.values() if e.budget is not self.budget)

    def free_old_spans(self) -> int:
        """Close the sessions still on a span this server has left (their clients recover
        elsewhere), so its weights and caches can be freed; returns how many were closed."""
        closed = 0
        for entry in list(self._sessions.values()):
            if entry.budget is not self.budget:
                self._end_session(entry)
                entry.stream.reset(f"{protocol.SESSION_CLOSED}: the server moved to blocks "
                                   f"[{self.span.start}, {self.span.end})")
                closed += 1
        return closed

    def info(self) -> dict:
        return {
            "v": protocol.PROTOCOL_VERSION,
            "model": self.config.model_id,
            "start": self.span.start,
            "end": self.span.end,
            "hidden_size": self.span.hidden_size,
            "dtype": str(self.span.dtype).removeprefix("torch."),
            "quant": self.span.quant,
            "cache_tokens": self.config.cache_tokens,
            "cache_tokens_free": self.cache_tokens_free,
            "max_length": self.max_length,
            "max_request_tokens": self.config.max_request_tokens,
            "max_backward_tokens": self.config.max_backward_tokens,
            "sessions": len(self._sessions),
            "adapters": list(self.tuning.adapter_names),
        }

    # ------------------------------------------------------------------ handlers
    async def _info(self, ctx: RpcContext, payload: bytes) -> bytes:
        return msgpack.packb(self.info())

    async def _forward(self, ctx: RpcContext, payload: bytes) -> bytes:
        async with self.decoder.request(payload, peer=ctx.peer) as (tensors, meta):
            try:
                blocks = protocol.parse_range(meta, self.config.model_id, self.served)
                compression = protocol.response_compression(meta)
                tuned = protocol.parse_tuning(meta, len(tensors), leading=1)
                hidden, *rest = tensors
                self._check_size(hidden)
                mask = rest.pop(0) if tuned.mask else None
                prompts = rest.pop(0) if tuned.prompts else None
                view = self._view(blocks.start, blocks.end)
                tuning = self.tuning.tuning(tuned, view, prompts,
                                            self.tuning.lora_for(tuned, view), _batch(hidden))
                output = await self._compute(_run_forward, view, mask, tuning, hidden)
            except RequestError as e:
                raise RemoteError(e.code, str(e)) from None
        self.requests_served += 1
        return tensor_wire.encode_message([output], None, compression)

    async def _inference(self, ctx: RpcContext, stream: Stream) -> None:
        timeout = self.config.session_opening_timeout
        try:
            async with asyncio.timeout(timeout):
                opening = await stream.recv()
        except TimeoutError:
            raise RemoteError(protocol.BAD_INPUT, f"no session opening came within "
                                                  f"{timeout:g} s of the stream") from None
        if opening is None:
            return
        with contextlib.suppress(tensor_wire.WireError):  # (malformed: decode says so)
            if tensor_wire.decoded_size(opening):  # an lz4 one decoded, on the loop, to GBs
                raise RemoteError(protocol.BAD_INPUT, "a session's opening carries no tensors")
        _, meta = decode(opening, self.limits)
        try:
            request = protocol.parse_session_request(
                meta, self.config.model_id, self.served, self.config.max_length
            )
            tuned = protocol.parse_tuning(meta, 0, leading=0)
            view = self._view(request.blocks.start, request.blocks.end)
            limit = view.position_limit
            if limit is not None and request.max_length > limit:
                raise RequestError(protocol.TOO_LONG, f"max_length {request.max_length} "
                                                      f"exceeds this model's {limit} positions")
            lora = self.tuning.lora_for(tuned, view, pin=True)
        except RequestError as e:
            raise RemoteError(e.code, str(e)) from None
        blocks = request.blocks
        # A compiled span rounds its static caches up (blocks/span.py), where the budget allows.
        length = view.session_cache_length(request.max_length)
        cost = request.batch_size * length * (blocks.end - blocks.start)
        if cost > self.budget.capacity:
            length = request.max_length
            cost = request.batch_size * length * (blocks.end - blocks.start)
        budget = self.budget
        granted = False
        entry = None
        try:  # until the session exists, its pin (and grant) are released on every way out
            try:
                await _acquire_while_connected(budget, cost, request.wait_timeout, stream)
            except CacheFullError as e:
                raise RemoteError(protocol.CACHE_FULL, str(e)) from None
            except StreamClosed:
                return
            granted = True
            if budget is not self.budget:  # moved to another span while this one waited
                raise RemoteError(protocol.BAD_RANGE, f"this server now serves blocks "
                                                      f"[{self.span.start}, {self.span.end})")
            session = view.new_session(request.batch_size, request.max_length, length)
            entry = _Session(next(self._ids), session, blocks, cost, stream, budget, tuned, lora)
            entry.inbox = self.push.open(stream, meta)
            self._sessions[entry.session_id] = entry
        finally:
            # (also when cancelled: the handler's deadline passed while it waited for cache)
            if entry is None:
                if granted:
                    budget.release(cost)
                self.tuning.unpin(tuned)
        try:
            await stream.send(tensor_wire.encode_message([], {
                "session": entry.session_id, "cache_tokens_free": self.cache_tokens_free,
                "features": list(protocol.SESSION_FEATURES),
                "max_request_tokens": self.config.max_request_tokens,  # steps are cut to fit
                **self.push.opening_fields(entry.inbox),
            }))
            await self._serve_steps(stream, entry, request)
        finally:
            self._end_session(entry)

    async def _serve_steps(self, stream: Stream, entry: _Session,
                           request: protocol.SessionRequest) -> None:
        while True:
            message = await entry.inbox.next()  # the client's message, or a pushed step
            if timeline.ENABLED:
                timeline.mark("server_step_received")
            if message is None:
                return
            if entry.session_id not in self._sessions:
                raise RemoteError(protocol.SESSION_CLOSED, "the session was closed for idleness")
            entry.last_active = time.monotonic()
            if isinstance(message, Pushed):
                await self._serve_step(stream, entry, request, message.tensors, message.meta)
            elif (decoded := self.decoder.small(message)) is not None:
                await self._serve_step(stream, entry, request, *decoded)
            else:  # a long prefill, say
                async with self.decoder.large(message) as (tensors, meta):
                    await self._serve_step(stream, entry, request, tensors, meta)
            entry.last_active = time.monotonic()

    async def _serve_step(self, stream: Stream, entry: _Session,
                          request: protocol.SessionRequest, tensors: list, meta) -> None:
        session = entry.session
        try:
            step = protocol.parse_step_request(meta)
            prompts = None
            if isinstance(meta, dict) and meta.get("prompts") is True and len(tensors) == 2:
                hidden, prompts = tensors  # deep prompts, added at the prefix positions
            elif len(tensors) != 1:
                raise RequestError(protocol.BAD_INPUT, "a step carries one tensor (and deep "
                                                       "prompts when 'prompts' is true)")
            else:
                hidden = tensors[0]
            self._check_size(hidden)
            tuning = self.tuning.tuning(protocol.TuningRequest(), session.span, prompts,
                                        entry.lora, _batch(hidden), step.position)
            output = await self._compute(self._step, session, step, tuning, hidden)
        except RequestError as e:
            # A bad step is refused; the session and its cache stay as they were.
            reply = {"step": _step_id(meta), "error": e.code, "message": str(e)}
            await stream.send(tensor_wire.encode_message([], reply))
            return
        self.requests_served += 1
        if timeline.ENABLED:
            timeline.mark("server_step_computed")
        # to the client, and on to the next server when the step asks for push
        await self.push.answer(entry.inbox, step.step_id, output, meta, request.compression)
        if timeline.ENABLED:
            timeline.mark("server_step_answered")

    @staticmethod
    def _step(session, step: protocol.StepRequest, tuning, hidden: torch.Tensor
              ) -> torch.Tensor:
        reorder = None if step.reorder is None else (step.reorder.version, step.reorder.ids)
        return session.step_at(step.position, hidden, tuning, step.mask, reorder)

    # ------------------------------------------------------------------ helpers
    async def _compute(self, fn: Callable, *args):
        """Run torch work: on the worker thread, unless it is known to take less than
        INLINE_COMPUTE_LIMIT (see there: on the worker, the loop's own work waits for the GIL)."""
        tokens = _tokens(args[-1])
        estimate = None if self._seconds_per_token is None else self._seconds_per_token * tokens
        elapsed: list[float] = []

        def timed():
            # The CPU time of the thread that runs it: neither the thread hop nor waits for the
            # GIL (torch drops it in every op; taking it back may wait the 5 ms switch interval
            # while the loop runs Python) nor preemption on a loaded machine may count, or work
            # once sent to the worker would be timed too slow to ever come back inline.
            began = time.thread_time()
            try:
                return fn(*args)
            finally:
                elapsed.append(time.thread_time() - began)

        try:
            # Inline only while the worker thread is idle: it may hold the span's lock.
            if estimate is not None and estimate < INLINE_COMPUTE_LIMIT and not self._in_worker:
                result = timed()
            else:
                self._in_worker += 1
                try:
                    result = await _outlasting_cancel(self._executor.submit(timed))
                finally:
                    self._in_worker -= 1
        except RequestError:
            raise
        except SessionTooLongError as e:
            raise RequestError(protocol.TOO_LONG, str(e)) from None
        except SpanInputError as e:
            raise RequestError(protocol.BAD_INPUT, str(e)) from None
        except ValueError as e:
            raise RequestError(protocol.BAD_INPUT, str(e)) from None
        per_token = elapsed[0] / max(tokens, 1)
        previous = self._seconds_per_token
        self._seconds_per_token = (
            per_token if previous is None else 0.8 * previous + 0.2 * per_token)
        return result

    @property
    def max_length(self) -> int:
        """The longest session this server opens: ``--max-length``, or fewer where the model
        has a learned table of positions (blocks/span.py ``position_limit``)."""
        limit = self.span.position_limit
        return self.config.max_length if limit is None else min(self.config.max_length, limit)

    def _check_size(self, hidden) -> None:
        if hidden.ndim == 3 and hidden.shape[0] * hidden.shape[1] > self.config.max_request_tokens:
            raise RequestError(protocol.TOO_LARGE, f"{hidden.shape[0] * hidden.shape[1]} tokens "
                                                   f"in one request exceed "
                                                   f"{self.config.max_request_tokens}")

    def _view(self, start: int, end: int) -> BlockSpan:
        view = self._views.get((start, end))
        if view is None:
            view = self._views[(start, end)] = self.span.subspan(start, end)
        return view

    def _end_session(self, entry: _Session | None) -> None:
        if entry is None or self._sessions.pop(entry.session_id, None) is None:
            return
        with contextlib.suppress(Exception):
            entry.session.close()
        if entry.inbox is not None:
            self.push.close(entry.inbox)
        entry.budget.release(entry.cost)
        if entry.tuning is not None:
            self.tuning.unpin(entry.tuning)

    async def _reap_idle_sessions(self) -> None:
        timeout = self.config.session_idle_timeout
        while True:
            await asyncio.sleep(min(timeout / 4, 30.0))
            now = time.monotonic()
            for entry in list(self._sessions.values()):
                if now - entry.last_active > timeout:
                    log.info("closing session %d: idle for %.0f s", entry.session_id,
                             now - entry.last_active)
                    self._end_session(entry)
                    entry.stream.reset(f"{protocol.SESSION_CLOSED}: idle for more than "
                                       f"{timeout:g} s")


async def _acquire_while_connected(budget: CacheBudget, amount: int, timeout: float,
                                   stream: Stream) -> None:
    """`budget.acquire`, given up (StreamClosed) as soon as the client leaves: an abandoned
    wait would otherwise keep its place in the queue, ahead of everyone after it, for as long
    as the client had said it would wait."""
    if budget.try_acquire(amount):
        return
    acquiring = asyncio.ensure_future(budget.acquire(amount, timeout))
    gone = asyncio.ensure_future(stream.wait_peer_gone())
    try:
        await asyncio.wait((acquiring, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not acquiring.done():
            acquiring.cancel()  # the budget drops the wait (or returns a grant just made)
            with contextlib.suppress(asyncio.CancelledError):
                await acquiring
    if acquiring.cancelled():
        raise StreamClosed("the client left while its session waited for attention cache")
    acquiring.result()  # CacheFullError after the timeout


async def _outlasting_cancel(work: Future):
    """The result of `work` (on the worker thread). Cancelled (the request's deadline, the
    client gone), it still waits for work already running to end before the cancel goes on:
    until then the thread holds the span's lock and the request's tensors, and the caller's
    accounting (the worker count that keeps later steps off the loop, the request's bytes and
    decode slot) must say so. Work not started yet is dropped at once."""
    try:
        return await asyncio.wrap_future(work)
    except asyncio.CancelledError:
        if not work.cancelled():  # it was running: wait for it, cancelled again or not
            rest = asyncio.wrap_future(work)
            while not rest.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait((rest,))
            if not rest.cancelled():
                rest.exception()  # retrieved: nobody wants its outcome any more
        raise


def _run_forward(view: BlockSpan, mask, tuning, hidden):
    return view.forward(hidden, mask, tuning)


def _batch(hidden) -> int:
    return int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.ndim == 3 else 1


def _tokens(hidden) -> int:
    shape = getattr(hidden, "shape", ())
    return int(shape[0] * shape[1]) if len(shape) == 3 else 1


def _step_id(meta) -> int:
    value = meta.get("step") if isinstance(meta, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


__all__ = ["BlockServer", "ConnectionLost", "ServingConfig", "StreamClosed"]
