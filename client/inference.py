"""Inference sessions through a chain of block servers (asyncio).

An `InferenceSession` holds one `blocks.inference` stream per server of its route. Each step
sends only the new positions through the chain and returns the last server's hidden states;
the servers keep the attention caches. The session remembers, per span, every input it sent,
so that a failed server can be replaced by replaying them (client/recovery.py decides when).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import torch

import tensor_wire
from blocks import protocol
from overlay.host import Host, RemoteError
from overlay.identity import PeerId
from overlay.streams import ConnectionLost, Stream, StreamClosed


class InferenceError(RuntimeError):
    """A session could not go on; the message says which server and why."""


@dataclass(frozen=True, slots=True)
class SessionConfig:
    batch_size: int = 1
    max_length: int = 2048
    wait_timeout: float = 30.0  # for free attention cache on the servers
    step_timeout: float = 60.0
    compression: str = "none"  # of the activations, in both directions


class SpanSession:
    """One server's part of an inference session: blocks [start, end) on `peer`."""

    def __init__(self, host: Host, peer: PeerId, model_id: str, start: int, end: int,
                 config: SessionConfig):
        self.host = host
        self.peer = peer
        self.model_id = model_id
        self.start = start
        self.end = end
        self.config = config
        self.position = 0
        self.inputs: list[torch.Tensor] = []  # everything sent, for replay on another server
        self._stream: Stream | None = None
        self._step_ids = 0

    async def open(self) -> None:
        config = self.config
        self._stream = await self.host.open_stream(self.peer, protocol.METHOD_INFERENCE,
                                                   timeout=None)
        await self._send(tensor_wire.encode_message([], {
            "model": self.model_id, "start": self.start, "end": self.end,
            "batch_size": config.batch_size, "max_length": config.max_length,
            "wait_timeout": config.wait_timeout, "compression": config.compression,
        }))
        _, meta = await self._receive(config.wait_timeout + config.step_timeout)
        if "session" not in meta:
            raise InferenceError(f"{self._where()}: unexpected answer to the session request")

    async def step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        if self._stream is None:
            raise InferenceError(f"{self._where()}: session is not open")
        step_id = self._step_ids
        self._step_ids += 1
        message = tensor_wire.encode_message([hidden], {"position": position, "step": step_id},
                                             self.config.compression)
        await self._send(message)
        tensors, meta = await self._receive(self.config.step_timeout)
        if "error" in meta:
            raise RemoteError(str(meta.get("error")), str(meta.get("message", "")))
        if meta.get("step") != step_id or len(tensors) != 1:
            raise InferenceError(f"{self._where()}: answer out of order")
        del self.inputs[_count_upto(self.inputs, position):]
        self.inputs.append(hidden)
        self.position = position + hidden.shape[1]
        return tensors[0]

    async def _send(self, message: bytes) -> None:
        try:
            await self._stream.send(message)
        except (ConnectionLost, StreamClosed) as e:
            raise InferenceError(f"{self._where()}: {e}") from None

    async def _receive(self, timeout: float):
        try:
            message = await asyncio.wait_for(self._stream.recv(), timeout)
        except TimeoutError:
            raise InferenceError(f"{self._where()}: no answer within {timeout:g} s") from None
        except (ConnectionLost, StreamClosed) as e:
            raise InferenceError(f"{self._where()}: {e}") from None
        if message is None:
            raise InferenceError(f"{self._where()}: the server ended the session")
        try:
            return tensor_wire.decode_message(message)
        except tensor_wire.WireError as e:
            raise InferenceError(f"{self._where()}: malformed answer: {e}") from None

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.close()

    def _where(self) -> str:
        return f"blocks [{self.start}, {self.end}) on {self.peer.short()}"


def _count_upto(inputs: list[torch.Tensor], position: int) -> int:
    """How many stored inputs lie wholly before `position` (a rollback drops the rest)."""
    total = 0
    for i, tensor in enumerate(inputs):
        total += tensor.shape[1]
        if total > position:
            return i
    return len(inputs)


class InferenceSession:
    """A chain of SpanSessions covering the model's blocks; `step` runs new positions through."""

    def __init__(self, host: Host, model_id: str, route: list[tuple[PeerId, int, int]],
                 config: SessionConfig | None = None):
        self.host = host
        self.model_id = model_id
        self.config = config or SessionConfig()
        self.spans = [SpanSession(host, peer, model_id, start, end, self.config)
                      for peer, start, end in route]
        self.position = 0
        self._closed = False

    async def open(self) -> InferenceSession:
        try:
            await asyncio.gather(*(span.open() for span in self.spans))
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> InferenceSession:
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """Run `hidden` ([batch, new positions, hidden size]) through every span."""
        if self._closed:
            raise InferenceError("the inference session is closed")
        if self.position + hidden.shape[1] > self.config.max_length:
            raise InferenceError(f"{self.position + hidden.shape[1]} tokens exceed the "
                                 f"session's max_length {self.config.max_length}")
        position = self.position
        for span in self.spans:
            hidden = await span.step(hidden, position)
        self.position = position + hidden.shape[1]
        return hidden

    def rollback(self, position: int) -> None:
        """Forget positions from `position` on (the next step starts there)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot move back to {position}: the session holds "
                             f"{self.position} positions")
        self.position = position

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(span.close() for span in self.spans), return_exceptions=True)
