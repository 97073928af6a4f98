"""A model served by the swarm, as one asyncio object: the client's side of distributed inference.

`RemoteModel` joins what the client runs itself (`LocalHead`: embeddings in, final norm and LM
head out) with what the swarm runs (`RemoteBlocks`: every transformer block, or any slice of
them). It is what an asyncio application embeds:

    model = await RemoteModel.open(model_dir, bootstrap=[...], compression="float16")
    logits = await model.logits(input_ids)                 # a full forward pass, no cache
    tokens = await model.generate(input_ids, GenerationParams(max_new_tokens=32))
    async with await model.inference_session(batch_size=1, max_length=512) as session:
        logits = await session.step(input_ids=prompt)      # the servers keep the cache
    hidden = await model.forward_blocks(my_hidden, start=3, end=7)   # hidden states in, out

The synchronous transformers-style wrapper (client/causal_lm.py) is built on this, never the
other way round. Small head computations run on the event loop; large ones (a real LM head over
many positions) go to a worker thread so the loop keeps serving other requests meanwhile.

This module may not run decoder layers locally, and does no route choice of its own (that is
client/routing.py, through RemoteBlocks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from blocks.protocol import COMPRESSIONS
from client.held_tokens import agreeing_length
from client.inference import (
    RECOVERY_TIMEOUT,
    STEP_TIMEOUT,
    BlocksUnavailableError,
    InferenceError,
    InferenceSession,
)
from client.local_head import LocalHead
from client.padding import token_mask
from client.remote_blocks import ClientConfig, RemoteBlocks
from client.routing import MissingBlocksError, RouteSpan
from client.swarm import SwarmClient
from model_parts.files import ModelFiles, default_model_id
from model_parts.skeleton import DeviceOptions, ModelInputError, load_config
from tensor_wire.blockwise import bitsandbytes_functional

log = logging.getLogger(__name__)

# Multiply-adds (positions x hidden size x vocabulary) above which the LM head runs on a worker
# thread instead of the event loop. Measured here (one CPU thread): 4M multiply-adds take
# 0.8-1.5 ms, about the longest we let the loop stall; a hop to a thread costs ~0.14 ms.
HEAD_INLINE_MACS = 1 << 22


class ModelUnavailableError(MissingBlocksError):
    """The swarm has no (eligible) server for some blocks of this model, e.g. an unknown id."""

    def __init__(self, model_id: str, missing: Iterable[int],
                 excluded: Iterable[tuple[str, int, int, str]] = ()):
        super().__init__(list(missing), list(excluded))
        self.model_id = model_id
        self.args = (f"model {model_id!r}: {self}",)

    def __str__(self) -> str:
        return self.args[0] if self.args else super().__str__()


@dataclass(frozen=True, slots=True)
class ModelOptions:
    """How a client uses a model served by the swarm."""

    compression: str = "none"  # of activations on the wire: none, float16, int8_blockwise...
    max_length: int = 2048  # default length (prompt + new tokens) of inference sessions
    dtype: str = "auto"  # of the local head ("auto": as stored); servers convert to theirs
    device: str = "cpu"  # of the local head
    model_id: str | None = None  # None: derived from the directory, as servers derive it
    connect_timeout: float = 30.0  # joining the DHT
    wait_timeout: float = 30.0  # for free attention cache on the servers
    forward_timeout: float = 120.0  # for one full forward pass through one server
    step_timeout: float = STEP_TIMEOUT  # for one server's answer to an inference step
    recovery_timeout: float = RECOVERY_TIMEOUT  # to replace failed servers, then give up
    view_ttl: float = 10.0  # seconds a swarm view is reused before the DHT is read again

    def __post_init__(self) -> None:
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {self.compression!r}; known: {COMPRESSIONS}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or \
                self.max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {self.max_length!r}")
        for name in ("connect_timeout", "wait_timeout", "forward_timeout", "step_timeout",
                     "recovery_timeout"):
            if not getattr(self, name) > 0:  # NaN too
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.view_ttl >= 0:  # NaN compares false: the view would never be re-read
            raise ValueError(f"view_ttl must be at least 0, got {self.view_ttl!r}")

    @classmethod
    def from_kwargs(cls, base: ModelOptions | None = None, **kwargs: Any) -> ModelOptions:
        """`base` with some fields replaced; unknown names are a clear error."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown model options {unknown}; known: {sorted(known)}")
        return dataclasses.replace(base or cls(), **kwargs)


def num_blocks_of(config: PretrainedConfig) -> int:
    """The number of transformer blocks (decoder layers) of a model config."""
    return int(config.get_text_config().num_hidden_layers)


class RemoteModel:
    """A causal LM whose blocks run on the swarm; build with `await RemoteModel.open(...)`."""

    def __init__(self, config: PretrainedConfig, head: LocalHead, blocks: RemoteBlocks,
                 options: ModelOptions, owns_swarm: bool):
        self.config = config
        self.head = head
        self.blocks = blocks
        self.options = options
        self._owns_swarm = owns_swarm
        self._sessions: set[ModelSession] = set()
        # every blocks session opened here, so that close() ends those the caller left open
        # (weak: one the caller closed and dropped is not kept alive)
        self._blocks_sessions: weakref.WeakSet[InferenceSession] = weakref.WeakSet()
        self._closed = False
        self._last_session: InferenceSession | None = None

    @classmethod
    async def open(cls, model_dir: str | Path, bootstrap: Iterable[str] = (),
                   options: ModelOptions | None = None, *, swarm: SwarmClient | None = None,
                   **option_kwargs: Any) -> RemoteModel:
        """Load the local head from `model_dir` and connect to the swarm.

        `bootstrap`: multiaddrs of DHT nodes, or one as a string (ignored when an existing
        `swarm` is given, which several models may share). Options go in `options` or as
        keywords (see ModelOptions).
        """
        options = ModelOptions.from_kwargs(options, **option_kwargs)
        files = ModelFiles(model_dir)
        config = load_config(files)
        model_id = options.model_id or default_model_id(model_dir)
        head = await asyncio.to_thread(LocalHead.load, files,
                                       DeviceOptions(options.device, options.dtype))
        if options.compression == "int8_blockwise":  # its ~2 s import, off the loop
            await asyncio.to_thread(bitsandbytes_functional)
        owns = swarm is None
        if swarm is None:
            # one address as a string, as from_pretrained takes it (list() split it into
            # characters, each "unreachable")
            addrs = [bootstrap] if isinstance(bootstrap, str) else list(bootstrap)
            if not addrs:
                raise ValueError("give at least one bootstrap multiaddr (or a connected swarm)")
            try:
                swarm = await asyncio.wait_for(SwarmClient.connect(addrs),
                                               options.connect_timeout)
            except TimeoutError:
                raise TimeoutError(f"could not join the swarm through {addrs} within "
                                   f"{options.connect_timeout:g} s") from None
        client_config = ClientConfig(view_ttl=options.view_ttl,
                                     forward_timeout=options.forward_timeout,
                                     step_timeout=options.step_timeout,
                                     compression=options.compression,
                                     recovery_timeout=options.recovery_timeout)
        blocks = RemoteBlocks(swarm, model_id, num_blocks_of(config), client_config)
        return cls(config, head, blocks, options, owns)

    # ------------------------------------------------------------------ properties
    @property
    def model_id(self) -> str:
        return self.blocks.model_id

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def swarm(self) -> SwarmClient:
        return self.blocks.swarm

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_route(self) -> list[RouteSpan]:
        """The servers of the latest inference session (replacements included), in order."""
        session = self._last_session
        if session is None:
            return []
        return [RouteSpan(str(span.peer), span.start, span.end) for span in session.spans]

    # ------------------------------------------------------------------ local head
    async def embed(self, input_ids: torch.Tensor, position: int | torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states entering block 0 for `input_ids` (see LocalHead.embed)."""
        return self.head.embed(input_ids, position, attention_mask)

    async def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states leaving the last block."""
        macs = hidden.shape[0] * hidden.shape[1] * self.head.hidden_size * self.head.vocab_size
        # On a GPU the call only queues kernels: a thread hop would cost more than it saves.
        if macs > HEAD_INLINE_MACS and self.head.device.type == "cpu":
            return await asyncio.to_thread(self.head.logits, hidden)
        return self.head.logits(hidden)

    async def head_greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy next token [batch] (CPU) after hidden states leaving the last block: the
        argmax runs where the head is, only the ids come back (see LocalHead.greedy_tokens)."""
        macs = hidden.shape[0] * self.head.hidden_size * self.head.vocab_size
        if macs > HEAD_INLINE_MACS and self.head.device.type == "cpu":
            return await asyncio.to_thread(self.head.greedy_tokens, hidden)
        return self.head.greedy_tokens(hidden)

    def _inputs_to_hidden(self, input_ids: torch.Tensor | None,
                          inputs_embeds: torch.Tensor | None, position: int | torch.Tensor | None,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ModelInputError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            # checked here: tuned prompts are concatenated with them before any server sees them
            size = self.head.hidden_size
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.ndim != 3 or \
                    inputs_embeds.shape[2] != size or not inputs_embeds.is_floating_point():
                shape = (list(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor)
                         else type(inputs_embeds).__name__)
                raise ModelInputError(f"inputs_embeds must be a floating-point [batch, length, "
                                      f"{size}] tensor, got {shape}")
            return inputs_embeds.to(self.head.device, self.head.dtype)
        return self.head.embed(input_ids, position, attention_mask)

    # ------------------------------------------------------------------ remote blocks
    async def forward_blocks(self, hidden: torch.Tensor, start: int = 0, end: int | None = None,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run full sequences of the caller's hidden states through blocks [start, end)."""
        self._check_open()
        try:
            return await self.blocks.forward(hidden, start, end, attention_mask)
        except BlocksUnavailableError:
            raise
        except MissingBlocksError as e:
            raise ModelUnavailableError(self.model_id, e.missing, e.excluded) from None

    async def logits(self, input_ids: torch.Tensor | None = None, *,
                     inputs_embeds: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, length, vocab] of a full forward pass (no cache).

        `attention_mask` ([batch, length], 0 = padding) allows left-padded batches.
        """
        if attention_mask is not None:
            attention_mask = token_mask(attention_mask)
        hidden = self._inputs_to_hidden(input_ids, inputs_embeds, None, attention_mask)
        hidden = await self.forward_blocks(hidden, attention_mask=attention_mask)
        return await self.head_logits(hidden)

    @property
    def default_max_length(self) -> int:
        """A session's length when none is given: `options.max_length`, or the model's
        positions where they are a learned table (GPT-2, OPT) shorter than that."""
        limit = self.head.position_limit
        return self.options.max_length if limit is None else min(self.options.max_length, limit)

    async def open_blocks_session(self, batch_size: int = 1, max_length: int | None = None,
                                  start: int = 0, end: int | None = None,
                                  **tuning: Any) -> InferenceSession:
        """An inference session over blocks [start, end) fed with the caller's hidden states.
        It replaces failed servers by itself (client/inference.py), each within recovery_timeout.
        `tuning`: `adapter=` / `tuning=` of RemoteBlocks.inference_session (fine-tuning)."""
        self._check_open()
        max_length = self.default_max_length if max_length is None else max_length
        if not (isinstance(max_length, int) and max_length >= 1 and batch_size >= 1):
            raise ModelInputError(f"an inference session needs max_length >= 1 and "
                                  f"batch_size >= 1, not {max_length!r} and {batch_size!r}")
        limit = self.head.position_limit
        if limit is not None and max_length > limit:  # no server could run them
            raise ModelInputError(f"a session of {max_length} tokens is longer than this "
                                  f"model's {limit} positions")
        try:
            session = await self.blocks.inference_session(
                batch_size, max_length, start, end, wait_timeout=self.options.wait_timeout,
                **tuning)
        except Exception as e:
            if self._closed:  # closed meanwhile: say so, not what its closed swarm raised
                raise InferenceError("the model has been closed") from e
            if isinstance(e, MissingBlocksError) and not isinstance(e, BlocksUnavailableError):
                raise ModelUnavailableError(self.model_id, e.missing, e.excluded) from None
            raise
        if self._closed:  # close() did not see this session: it must not stay open
            session.close_now()
            raise InferenceError("the model has been closed")
        self._blocks_sessions.add(session)
        self._last_session = session
        return session

    async def inference_session(self, batch_size: int = 1, max_length: int | None = None,
                                **tuning: Any) -> ModelSession:
        """An open session through all blocks, fed with tokens or embeddings (close it, or use
        `async with`)."""
        hidden_session = await self.open_blocks_session(batch_size, max_length, **tuning)
        session = ModelSession(self, hidden_session)
        self._sessions.add(session)
        return session

    async def generate(self, input_ids: torch.Tensor, params: Any = None, *,
                       session: ModelSession | None = None,
                       on_tokens: Callable[[torch.Tensor], Any] | None = None,
                       generator: torch.Generator | None = None,
                       attention_mask: torch.Tensor | None = None,
                       **param_kwargs: Any) -> torch.Tensor:
        """Greedy or sampled generation (see client/generation.py), in one inference session;
        `attention_mask` (0 = padding) for left-padded prompts of different lengths."""
        from client.generation import GenerationParams, generate

        params = GenerationParams.from_kwargs(params, self.config, **param_kwargs)
        return await generate(self, input_ids, params, session=session, on_tokens=on_tokens,
                              generator=generator, attention_mask=attention_mask)

    # ------------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise InferenceError("the model has been closed")

    async def close(self) -> None:
        """Close every session still open (open_blocks_session's too) and, if this model
        joined the swarm, leave it."""
        if self._closed:
            return
        self._closed = True
        # a ModelSession is its blocks session (also in _blocks_sessions): each closed once
        sessions, self._sessions = self._sessions, set()
        blocks_sessions = {*(s.blocks_session for s in sessions), *self._blocks_sessions}
        for blocks_session in blocks_sessions:  # at once: a cancelled close leaves none open
            blocks_session.close_now()
        await asyncio.gather(*(s.close() for s in blocks_sessions))  # their tasks end
        if self._owns_swarm:
            await self.swarm.close()

    async def __aenter__(self) -> RemoteModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ModelSession:
    """An inference session through every block, fed with tokens (or embeddings) and giving
    logits. The servers keep the attention caches; each step sends only new positions."""

    def __init__(self, model: RemoteModel, hidden_session: InferenceSession):
        self.model = model
        self.blocks_session = hidden_session

    @property
    def position(self) -> int:
        """How many positions the session holds: where the next step starts."""
        return self.blocks_session.position

    @property
    def batch_size(self) -> int:
        return self.blocks_session.config.batch_size

    @property
    def max_length(self) -> int:
        return self.blocks_session.config.max_length

    @property
    def closed(self) -> bool:
        return self.blocks_session._closed

    async def step_hidden(self, hidden: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, *,
                          tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded new positions in, hidden states after the last block out.
        `attention_mask` [batch, new]: 0 marks padding; `tokens` [batch, new]: the ids `hidden`
        embeds, if any, for `keep_agreeing` (InferenceSession.step)."""
        return await self.blocks_session.step(hidden, attention_mask, tokens=tokens)

    def keep_agreeing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      offset: int = 0) -> int:
        """Roll back to the longest prefix of `input_ids` [batch, length] (padding
        `attention_mask`) that the session holds from position `offset` on, leaving at least
        the last id to send; returns how many of them it keeps. A call reusing the session then
        gives what a fresh session gives. Positions stepped with embeddings hold unknown ids:
        those are taken to be input_ids' (the caller's promise), and a session holding as many
        positions as input_ids or more is then a ModelInputError."""
        session = self.blocks_session
        held = session.position - offset
        length = input_ids.shape[1]
        if input_ids.shape[0] != self.batch_size:
            # (left to the step, whose ids generate had sliced to nothing: the error then
            # asked for "a non-empty [batch, length] tensor")
            raise ModelInputError(f"batch size is {input_ids.shape[0]}, the session was "
                                  f"opened for {self.batch_size}")
        known = max(0, min(session.tokens.known, session.position) - offset)
        compared = min(known, length)
        keep = 0
        if compared:
            keep = agreeing_length(
                session.tokens.ids(offset, offset + compared),
                session.padding.held(offset, offset + compared), input_ids[:, :compared],
                None if attention_mask is None else attention_mask[:, :compared])
        if keep == known < held:  # every known id agrees; the rest: the caller's promise
            if held >= length:
                raise ModelInputError(f"the session holds {held} positions; input_ids must "
                                      f"hold those and at least one more, not {length}")
            return held
        keep = min(keep, held, length - 1)
        if keep < held:
            session.rollback(keep + offset)
        return keep

    async def step(self, input_ids: torch.Tensor | None = None, *,
                   inputs_embeds: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None,
                   last_only: bool = False) -> torch.Tensor:
        """Logits [batch, new, vocab] of new positions (only the last one if `last_only`).
        `attention_mask` [batch, new]: 0 marks padding, e.g. of left-padded prompts."""
        out = await self._step_to_hidden(input_ids, inputs_embeds, attention_mask)
        if last_only:
            out = out[:, -1:]
        return await self.model.head_logits(out)

    async def step_greedy(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy next token [batch] (CPU int64) after new positions `input_ids`: the
        argmax of the last position's logits, which never leave the head's device."""
        out = await self._step_to_hidden(input_ids, None, attention_mask)
        return await self.model.head_greedy(out[:, -1:])

    async def _step_to_hidden(self, input_ids: torch.Tensor | None,
                              inputs_embeds: torch.Tensor | None,
                              attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.closed:
            raise InferenceError("the inference session is closed")
        padding = self.blocks_session.padding
        positions: int | torch.Tensor = self.position
        mask = None
        if attention_mask is not None or padding.any:
            source = input_ids if input_ids is not None else inputs_embeds
            if not isinstance(source, torch.Tensor) or source.ndim < 2:
                raise ModelInputError("give input_ids [batch, length] or inputs_embeds "
                                      "[batch, length, hidden]")
            mask = padding.check(attention_mask, source.shape[1])
            positions = padding.positions(self.position, mask, source.shape[1])
        hidden = self.model._inputs_to_hidden(input_ids, inputs_embeds, positions)
        return await self.step_hidden(hidden, mask, tokens=input_ids)

    def rollback(self, position: int) -> None:
        """Forget positions from `position` on (e.g. rejected draft tokens)."""
        self.blocks_session.rollback(position)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Beam search: sequence i continues sequence beam_idx[i] from the next step on."""
        self.blocks_session.reorder(beam_idx)

    async def close(self) -> None:
        self.model._sessions.discard(self)
        await self.blocks_session.close()

    def close_now(self) -> None:
        self.model._sessions.discard(self)
        self.blocks_session.close_now()

    async def __aenter__(self) -> ModelSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


__all__ = ["ModelOptions", "ModelSession", "ModelUnavailableError", "RemoteModel",
           "num_blocks_of"]
