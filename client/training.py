"""Forward and backward passes through the swarm, for fine-tuning (asyncio).

`SwarmTrainer.forward` runs full sequences through blocks [start, end) like RemoteBlocks.forward
but keeps, for every span of the route, the hidden states it sent (the client holds the
activations at span boundaries; servers keep nothing between requests). `backward` walks the
same spans in reverse with `blocks.backward`: each server recomputes its span's forward under
autograd and returns the gradients of its inputs, of the deep prompts and of the LoRA weights
it was sent; the client sums those over chunks.

- Chunks: a batch larger than `chunk_tokens` (batch x length) is split by rows, and the
  chunks run concurrently, each on its own throughput-weighted random route
  (RoutePlanner.spread_route), so replicas of a span share the work.
- Request limits: each span's part of a chunk is cut again into requests of as many whole
  rows as its server announces it takes, forwards to `max_request_tokens`, backwards to
  `max_backward_tokens` (client/request_chunks.py), run concurrently; their gradients are
  summed as the chunks' are. A row is never cut (its positions attend to each other, and a
  backward recomputes the whole row under autograd), so routing leaves out servers whose
  limits are below one row (RouteNeeds: the forward's, and the backward's when the pass is
  kept for one); with none left, the MissingBlocksError names their limits.
- Failures: a server that fails (lost connection, timeout, malformed answer, a stale route:
  the codes of RemoteBlocks) is banned and its span re-run on a route found again for exactly
  its blocks (client/recovery.py, as for forward). In backward the replacement chain first
  recomputes the span's inner boundaries by forward, then runs backward through them. One
  recovery deadline per pass (`recovery_timeout` after its first failure, all chunks).
- Tuning: deep prompts and a LoRA snapshot go with each request (the LoRA uploaded once per
  server and content digest, `blocks.lora_put`; re-uploaded if the server evicted it), or a
  hosted adapter is named and routing keeps to servers that announce it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

import tensor_wire
from blocks import protocol
from client.lora import LoraSnapshot
from client.padding import token_mask
from client.recovery import PassDeadline, splice_route
from client.remote_blocks import _SERVER_FAULTS, RemoteBlocks
from client.request_chunks import RequestLimitError, cuts, rows_per_forward
from client.routing import MissingBlocksError, RouteNeeds, RoutePlanner, RouteSpan, _ranges
from client.span_forward import BadAnswer, all_or_cancel
from overlay.host import RemoteError
from overlay.identity import PeerId
from overlay.streams import ConnectionLost, StreamClosed

log = logging.getLogger(__name__)

# Ours: batch x length of one chunk (its own route); smaller chunks spread better. Each
# span's requests are cut again to what its server announces it takes (8192 tokens per
# backward by default, blocks.protocol.DEFAULT_MAX_BACKWARD_TOKENS).
DEFAULT_CHUNK_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class TrainingConfig:
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    timeout: float = 120.0  # one request to one server
    compression: str = "none"  # of hidden states and gradients on the wire

    def __post_init__(self) -> None:
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")


@dataclass(frozen=True, slots=True)
class Tuning:
    """What a pass adds to the frozen blocks."""

    prompts: torch.Tensor | None = None  # deep prompts [num_blocks, 1 or batch, prefix, hidden]
    lora: LoraSnapshot | None = None  # client-owned LoRA weights, trained
    adapter: str | None = None  # a LoRA adapter servers host, by name (frozen)

    def needs(self, length: int, backward: bool) -> RouteNeeds:
        """What a server must take to run rows of `length` positions: one whole row per
        forward request, and per backward request when `backward` follows."""
        return RouteNeeds(adapter=self.adapter, request_tokens=length,
                          backward_tokens=length if backward else 0)


@dataclass(slots=True)
class _Run:
    span: RouteSpan
    inputs: torch.Tensor


@dataclass(slots=True)
class _Chunk:
    rows: tuple[int, int]
    mask: torch.Tensor | None
    prompts: torch.Tensor | None  # the chunk's deep prompts (rows sliced if per-row)
    runs: list[_Run] = field(default_factory=list)

    def part(self, start: int, stop: int) -> _Chunk:
        """Rows [start, stop) of this chunk (counted from its first row) as a chunk of
        their own, without runs: one request's mask and per-row prompts."""
        prompts = self.prompts
        if prompts is not None and prompts.shape[1] != 1:
            prompts = prompts[:, start:stop]
        first = self.rows[0]
        return _Chunk((first + start, first + stop),
                      None if self.mask is None else self.mask[start:stop], prompts)


@dataclass(slots=True)
class PassRecord:
    """What `backward` needs from a forward pass."""

    start: int
    end: int
    shape: tuple[int, ...]
    tuning: Tuning
    chunks: list[_Chunk]

    def boundaries(self) -> list[torch.Tensor]:
        """The hidden states sent to each span, chunk by chunk (the bulk of the record)."""
        return [run.inputs for chunk in self.chunks for run in chunk.runs]

    def with_boundaries(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]
                        ) -> PassRecord:
        """A copy holding `tensors` (`boundaries()`'s order) as the spans' inputs, so that a
        caller may keep those tensors elsewhere (autograd's saved tensors) and drop them."""
        it = iter(tensors)
        chunks = [_Chunk(c.rows, c.mask, c.prompts, [_Run(run.span, next(it)) for run in c.runs])
                  for c in self.chunks]
        return PassRecord(self.start, self.end, self.shape, self.tuning, chunks)


@dataclass(slots=True)
class Gradients:
    hidden: torch.Tensor  # of the pass's input hidden states
    prompts: torch.Tensor | None  # of the deep prompts (the shape they were given in)
    lora: dict[tuple[int, str], list[torch.Tensor]]  # (block, module) -> [of A, of B]


class AdapterUnavailableError(MissingBlocksError):
    """No server hosting the requested adapter covers some blocks."""

    def __init__(self, adapter: str, missing: list[int], hosted: list[str]):
        super().__init__(missing)
        self.adapter = adapter
        self.args = (f"no server hosting adapter {adapter!r} holds blocks "
                     f"{_ranges(self.missing)} (adapters announced in the swarm: "
                     f"{', '.join(hosted) or 'none'})",)

    def __str__(self) -> str:
        return str(self.args[0])


async def check_adapter(blocks: RemoteBlocks, adapter: str, start: int = 0,
                        end: int | None = None) -> None:
    """Raise AdapterUnavailableError unless servers hosting `adapter` cover [start, end)."""
    end = blocks.num_blocks if end is None else end
    view = await blocks.view(refresh=True)
    try:
        RoutePlanner(view).spread_route(start, end, random.Random(0),
                                        needs=RouteNeeds(adapter=adapter))
    except MissingBlocksError as e:
        hosted = sorted({name for info in view.servers.values() for name in info.adapters})
        raise AdapterUnavailableError(adapter, e.missing, hosted) from None


class _ServerFault(Exception):
    def __init__(self, span: RouteSpan, error: BaseException):
        super().__init__(f"{span.peer_id[-6:]}[{span.start}:{span.end}): {error}")
        self.span = span
        self.error = error


class SwarmTrainer:
    def __init__(self, blocks: RemoteBlocks, config: TrainingConfig | None = None):
        self.blocks = blocks
        self.config = config or TrainingConfig()
        self._uploaded: set[tuple[str, str]] = set()  # (peer, digest) the peer has
        self._latest: dict[tuple[str, int, int], str] = {}  # (peer, start, end) -> digest
        self._upload_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.recoveries = 0  # spans re-run on another server (for tests and logs)

    # ------------------------------------------------------------------ forward
    async def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      tuning: Tuning = Tuning(), start: int = 0, end: int | None = None,
                      keep: bool = True) -> tuple[torch.Tensor, PassRecord | None]:
        """Hidden states after blocks [start, end), and (if `keep`) what backward needs."""
        end = self.blocks.num_blocks if end is None else end
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.numel() == 0:
            raise ValueError("hidden states must be a non-empty [batch, length, hidden] tensor")
        if attention_mask is not None:  # servers take integers: 0/1 floats are converted
            attention_mask = token_mask(attention_mask)
        chunks = self._chunks(hidden, attention_mask, tuning.prompts)
        recovery = PassDeadline(self.blocks.config.recovery_timeout)
        try:
            results = await all_or_cancel(
                self._forward_chunk(hidden[c.rows[0]:c.rows[1]], c, tuning, start, end, keep,
                                    recovery)
                for c in chunks)
        except MissingBlocksError:
            if tuning.adapter is not None:
                await check_adapter(self.blocks, tuning.adapter, start, end)
            raise
        out = torch.cat(results, dim=0) if len(results) > 1 else results[0]
        record = PassRecord(start, end, tuple(hidden.shape), tuning, chunks) if keep else None
        return out.to(hidden.dtype), record  # servers may run another precision

    def _chunks(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                prompts: torch.Tensor | None) -> list[_Chunk]:
        batch, length = hidden.shape[:2]
        whole = _Chunk((0, batch), mask, prompts)
        # a row longer than chunk_tokens is a chunk of its own
        rows = max(1, rows_per_forward(self.config.chunk_tokens, length))
        return [whole.part(r0, r1) for r0, r1 in cuts(batch, rows)]

    async def _forward_chunk(self, hidden: torch.Tensor, chunk: _Chunk, tuning: Tuning,
                             start: int, end: int, keep: bool,
                             recovery: PassDeadline) -> torch.Tensor:
        runs = await self._forward_runs(hidden, chunk, tuning, start, end, keep, False,
                                        recovery)
        hidden = runs.pop()
        if keep:
            chunk.runs = runs  # type: ignore[assignment]
        return hidden

    async def _forward_runs(self, hidden: torch.Tensor, chunk: _Chunk, tuning: Tuning,
                            start: int, end: int, keep: bool, patient: bool,
                            recovery: PassDeadline) -> list:
        """[_Run per span..., output]: the route's spans with their inputs, then the output.
        Re-routing keeps to the pass's `recovery` deadline."""
        needs = tuning.needs(hidden.shape[1], backward=keep)
        route = await self.blocks._forward_route_retrying(start, end, patient=patient,
                                                          needs=needs,
                                                          deadline=recovery.deadline)
        runs: list = []
        index = 0
        while index < len(route):
            span = route[index]
            try:
                out = await self._forward_span(span, hidden, chunk, tuning)
            except _ServerFault as fault:
                deadline = self._failed(fault, "forward", recovery)
                replacement = await self.blocks._forward_route_retrying(
                    span.start, span.end, needs=needs, deadline=deadline)
                route = splice_route(route, index, replacement)
                continue
            if keep:
                runs.append(_Run(span, hidden))
            hidden = out
            index += 1
        runs.append(hidden)
        return runs

    async def _forward_span(self, span: RouteSpan, hidden: torch.Tensor, chunk: _Chunk,
                            tuning: Tuning) -> torch.Tensor:
        """The chunk through the span, in requests that fit its server's request limit."""
        parts = self._parts(span, chunk, hidden.shape[1], backward=False)
        outs = await all_or_cancel(
            self._forward_request(span, hidden[a:b], part, tuning) for (a, b), part in parts)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    async def _forward_request(self, span: RouteSpan, hidden: torch.Tensor, chunk: _Chunk,
                               tuning: Tuning) -> torch.Tensor:
        tensors, compressions, meta = self._inputs(span, [hidden], chunk)
        message = await self._request(span, protocol.METHOD_FORWARD, tensors, compressions,
                                      meta, tuning)
        if len(message.tensors) != 1 or message.tensors[0].shape != hidden.shape:
            raise _ServerFault(span, BadAnswer("forward answer of the wrong shape"))
        return message.tensors[0]

    def _parts(self, span: RouteSpan, chunk: _Chunk, length: int, backward: bool
               ) -> list[tuple[tuple[int, int], _Chunk]]:
        """The chunk's rows cut to what the span's server announces it takes per forward
        (or backward) request: ((start, stop) within the chunk, that part) each."""
        blocks = self.blocks
        limit = (blocks.backward_limit(span.peer_id) if backward
                 else blocks.request_limit(span.peer_id))
        rows = rows_per_forward(limit, length)
        if rows == 0:  # routed on an older view: this server cannot run the pass now
            what = "backward request" if backward else "request"
            raise _ServerFault(span, RequestLimitError(
                f"takes at most {limit} tokens per {what}, fewer than one row of {length}"))
        count = chunk.rows[1] - chunk.rows[0]
        if rows >= count:
            return [((0, count), chunk)]
        return [((a, b), chunk.part(a, b)) for a, b in cuts(count, rows)]

    # ------------------------------------------------------------------ backward
    async def backward(self, record: PassRecord, grad_output: torch.Tensor) -> Gradients:
        """Gradients of the pass's inputs, deep prompts and LoRA, given those of its output."""
        if tuple(grad_output.shape) != record.shape:
            raise ValueError(f"output gradients must be {list(record.shape)}, got "
                             f"{list(grad_output.shape)}")
        tuning = record.tuning
        grad_output = grad_output.detach()
        prompts = None if tuning.prompts is None else torch.zeros_like(tuning.prompts)
        lora: dict[tuple[int, str], list[torch.Tensor]] = {}
        sums = _Sums(prompts, lora)
        recovery = PassDeadline(self.blocks.config.recovery_timeout)
        results = await all_or_cancel(
            self._backward_runs(chunk.runs, grad_output[chunk.rows[0]:chunk.rows[1]].to(
                chunk.runs[0].inputs.dtype), chunk, tuning, sums, recovery)
            for chunk in record.chunks)
        hidden = torch.cat(results, dim=0) if len(results) > 1 else results[0]
        return Gradients(hidden, sums.prompts, sums.lora)

    async def _backward_runs(self, runs: list[_Run], grad: torch.Tensor, chunk: _Chunk,
                             tuning: Tuning, sums: _Sums, recovery: PassDeadline
                             ) -> torch.Tensor:
        for run in reversed(runs):
            try:
                grad_in, extras = await self._backward_span(run, grad, chunk, tuning)
            except _ServerFault as fault:
                self._failed(fault, "backward", recovery)
                # Another chain for exactly these blocks: recompute its inner boundaries,
                # then run backward through it (which may fail over again, recursively).
                sub_runs = await self._forward_runs(run.inputs, chunk, tuning, run.span.start,
                                                    run.span.end, True, True, recovery)
                sub_runs.pop()
                grad = await self._backward_runs(sub_runs, grad, chunk, tuning, sums,
                                                 recovery)
                continue
            for part, extra in extras:  # once every request of the span has succeeded
                sums.add(run.span, part, extra, tuning)
            grad = grad_in
        return grad

    async def _backward_span(self, run: _Run, grad: torch.Tensor, chunk: _Chunk,
                             tuning: Tuning
                             ) -> tuple[torch.Tensor, list[tuple[_Chunk, list[torch.Tensor]]]]:
        """The gradients of the span's inputs, and each request's part with its gradients of
        prompts and LoRA, in requests that fit the server's backward limit."""
        parts = self._parts(run.span, chunk, run.inputs.shape[1], backward=True)
        answers = await all_or_cancel(
            self._backward_request(run.span, run.inputs[a:b], grad[a:b], part, tuning)
            for (a, b), part in parts)
        grads = [answer[0] for answer in answers]
        grad_in = grads[0] if len(grads) == 1 else torch.cat(grads, dim=0)
        return grad_in, [(part, answer[1]) for (_, part), answer in zip(parts, answers)]

    async def _backward_request(self, span: RouteSpan, inputs: torch.Tensor,
                                grad: torch.Tensor, chunk: _Chunk, tuning: Tuning
                                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        tensors, compressions, meta = self._inputs(span, [inputs, grad], chunk)
        message = await self._request(span, protocol.METHOD_BACKWARD, tensors, compressions,
                                      meta, tuning)
        expected = 1 + (chunk.prompts is not None)
        if tuning.lora is not None:
            expected += 2 * len(tuning.lora.keys_of(span.start, span.end))
        got = message.tensors
        if len(got) != expected or got[0].shape != inputs.shape:
            raise _ServerFault(span, BadAnswer(f"backward answer with {len(got)} tensors, "
                                                f"expected {expected}"))
        return got[0], got[1:]

    # ------------------------------------------------------------------ requests
    def _inputs(self, span: RouteSpan, leading: list[torch.Tensor], chunk: _Chunk):
        compression = self.config.compression
        tensors = list(leading)
        compressions = [compression] * len(leading)
        meta: dict = {"mask": chunk.mask is not None, "prompts": chunk.prompts is not None}
        if chunk.mask is not None:
            tensors.append(chunk.mask)
            compressions.append("none")
        if chunk.prompts is not None:
            tensors.append(chunk.prompts[span.start:span.end].contiguous())
            compressions.append("none")
        return tensors, compressions, meta

    async def _request(self, span: RouteSpan, method: str, tensors: list[torch.Tensor],
                       compressions: list[str], meta: dict, tuning: Tuning):
        blocks = self.blocks
        peer = PeerId.from_string(span.peer_id)
        meta = {"model": blocks.model_id, "start": span.start, "end": span.end,
                "compression": self.config.compression, **meta}
        lora = None
        if tuning.adapter is not None:
            meta["adapter"] = tuning.adapter
        if tuning.lora is not None:
            lora = tuning.lora.span(span.start, span.end)
            meta["lora"] = lora[0]["digest"]
        payload = tensor_wire.encode_message(tensors, meta, compressions)
        for attempt in range(2):
            try:
                if lora is not None:
                    await self._upload(span, *lora, again=attempt > 0)
                answer = await blocks.swarm.host.call(peer, method, payload,
                                                      timeout=self.config.timeout)
                message = tensor_wire.decode_message(answer)
            except RemoteError as e:
                if e.code == protocol.ADAPTER_MISSING and lora is not None and attempt == 0:
                    continue  # evicted since we uploaded it: upload again
                if e.code in _SERVER_FAULTS:
                    raise _ServerFault(span, e) from None
                raise
            except (ConnectionLost, StreamClosed, TimeoutError, OSError,
                    tensor_wire.WireError) as e:
                raise _ServerFault(span, e) from None
            blocks.bans.success(span.peer_id)
            return message
        raise _ServerFault(span, RuntimeError("the server keeps losing the uploaded LoRA"))

    async def _upload(self, span: RouteSpan, meta: dict, tensors: list[torch.Tensor],
                      again: bool = False) -> None:
        """Send a LoRA snapshot's part for this span to its server, once per digest."""
        digest = meta["digest"]
        key = (span.peer_id, digest)
        if again:
            self._uploaded.discard(key)
        if key in self._uploaded:
            return
        lock = self._upload_locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                await self._upload_once(key, span, meta, tensors)
        finally:  # also after a failed upload: one lock per digest ever tried would pile up
            if self._upload_locks.get(key) is lock:
                del self._upload_locks[key]

    async def _upload_once(self, key: tuple[str, str], span: RouteSpan, meta: dict,
                           tensors: list[torch.Tensor]) -> None:
        """The upload itself, under the (peer, digest) lock: waiters find it done."""
        digest = key[1]
        if key in self._uploaded:
            return
        slot = (span.peer_id, span.start, span.end)
        previous = self._latest.get(slot)
        put_meta = {**meta, "model": self.blocks.model_id}
        if previous is not None and previous != digest:
            put_meta["replaces"] = previous
        payload = tensor_wire.encode_message(tensors, put_meta)
        answer = await self.blocks.swarm.host.call(
            PeerId.from_string(span.peer_id), protocol.METHOD_LORA_PUT, payload,
            timeout=self.config.timeout)
        if tensor_wire.decode_message(answer).meta.get("digest") != digest:
            raise BadAnswer("the server named the uploaded LoRA differently")
        if previous is not None:
            self._uploaded.discard((span.peer_id, previous))
        self._latest[slot] = digest
        self._uploaded.add(key)

    def session_opening(self, tuning: Tuning) -> Callable[[PeerId, int, int],
                                                           Awaitable[dict]] | None:
        """What an inference session adds to each span's opening: the hosted adapter's name,
        or the digest of the LoRA (uploaded first)."""
        if tuning.adapter is not None:
            async def named(peer: PeerId, start: int, end: int) -> dict:
                return {"adapter": tuning.adapter}
            return named
        if tuning.lora is None:
            return None

        async def uploaded(peer: PeerId, start: int, end: int) -> dict:
            meta, tensors = tuning.lora.span(start, end)
            await self._upload(RouteSpan(str(peer), start, end), meta, tensors)
            return {"lora": meta["digest"]}
        return uploaded

    def _failed(self, fault: _ServerFault, what: str, recovery: PassDeadline) -> float:
        """Ban the failed server; the deadline to re-route by, or BlocksUnavailableError when
        the pass's recovery deadline has passed."""
        deadline = self.blocks.failed(fault.span, fault.error, recovery)
        self.recoveries += 1
        log.warning("%s on %s failed: %s; re-routing", what, fault.span.peer_id[-6:],
                    fault.error)
        return deadline


@dataclass(slots=True)
class _Sums:
    prompts: torch.Tensor | None
    lora: dict[tuple[int, str], list[torch.Tensor]]

    def add(self, span: RouteSpan, chunk: _Chunk, extra: list[torch.Tensor],
            tuning: Tuning) -> None:
        it = iter(extra)
        if chunk.prompts is not None and self.prompts is not None:
            grad = next(it).to(self.prompts.device, self.prompts.dtype)  # answers: CPU
            target = self.prompts[span.start:span.end]
            if target.shape[1] == 1:
                target += grad
            else:
                target[:, chunk.rows[0]:chunk.rows[1]] += grad
        if tuning.lora is not None:
            for key in tuning.lora.keys_of(span.start, span.end):
                pair = [next(it), next(it)]
                held = self.lora.get(key)
                if held is None:
                    self.lora[key] = pair
                else:
                    held[0] = held[0] + pair[0]
                    held[1] = held[1] + pair[1]
