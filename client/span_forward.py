"""One span of a forward pass on one server, cut to fit that server's request limit
(client/request_chunks.py): rows that fit go as `blocks.forward` requests of as many rows as the
limit takes, run concurrently; a row longer than the limit goes through an inference session
on that server, in steps (causal attention over the cache gives what one pass gives).

Failures are the caller's to judge (client/remote_blocks.py re-routes): RemoteError,
transport errors, tensor_wire.WireError, BadAnswer, and InferenceError from a session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass

import torch

import tensor_wire
from blocks import protocol
from client.inference import InferenceSession, SessionConfig
from client.request_chunks import cuts, rows_per_forward
from overlay.host import Host
from overlay.identity import PeerId


@dataclass(frozen=True, slots=True)
class SpanTarget:
    """Blocks [start, end) of `model_id` on `peer`, which takes `limit` tokens per request."""

    peer: PeerId
    model_id: str
    start: int
    end: int
    limit: int


class BadAnswer(RuntimeError):
    """A server's answer that does not have the expected shape."""


async def forward_span(host: Host, target: SpanTarget, hidden: torch.Tensor,
                       mask: torch.Tensor | None, *, compression: str,
                       timeout: float) -> torch.Tensor:
    """`hidden` [batch, length, hidden size] (and its mask) through the target's blocks."""
    if hidden.ndim != 3 or 0 in hidden.shape[:2]:  # as is: the server says what is wrong
        return await _call(host, target, hidden, mask, compression, timeout)
    rows = rows_per_forward(target.limit, hidden.shape[1])
    if rows == 0:
        return await _through_sessions(host, target, hidden, mask, compression, timeout)
    pieces = cuts(hidden.shape[0], rows)
    if len(pieces) == 1:
        return await _call(host, target, hidden, mask, compression, timeout)
    outs = await all_or_cancel(
        _call(host, target, hidden[a:b], None if mask is None else mask[a:b], compression,
              timeout) for a, b in pieces)
    return torch.cat(outs, dim=0)


async def _call(host: Host, target: SpanTarget, hidden: torch.Tensor,
                mask: torch.Tensor | None, compression: str, timeout: float) -> torch.Tensor:
    tensors = [hidden] if mask is None else [hidden, mask]
    payload = tensor_wire.encode_message(tensors, {
        "model": target.model_id, "start": target.start, "end": target.end,
        "compression": compression,
    }, [compression] + (["none"] if mask is not None else []))
    answer = await host.call(target.peer, protocol.METHOD_FORWARD, payload, timeout=timeout)
    (hidden_out,), _ = decode(answer, expected=1)
    return hidden_out


async def _through_sessions(host: Host, target: SpanTarget, hidden: torch.Tensor,
                            mask: torch.Tensor | None, compression: str,
                            timeout: float) -> torch.Tensor:
    """Rows longer than the limit, one session each and one after the other: a session holds
    attention cache on the server, which a forward never waited for."""
    config = SessionConfig(batch_size=1, max_length=hidden.shape[1], step_timeout=timeout,
                           compression=compression, push=False)
    outs = []
    for row in range(hidden.shape[0]):
        session = InferenceSession(host, target.model_id,
                                   [(target.peer, target.start, target.end)], config)
        try:
            await session.open()
            outs.append(await session.step(hidden[row:row + 1],
                                           None if mask is None else mask[row:row + 1]))
        finally:
            await session.close()
    return torch.cat(outs, dim=0)


def decode(data: bytes, expected: int):
    message = tensor_wire.decode_message(data)
    if len(message.tensors) != expected:
        raise BadAnswer(f"expected {expected} tensors in the answer, got "
                        f"{len(message.tensors)}")
    return message


async def all_or_cancel(coros: Iterable[Awaitable]) -> list:
    """The results of `coros`, run concurrently (a pass's chunks). The first to fail cancels
    the others, whose results would be dropped, and is raised once they have ended; gather
    alone let them run on, holding servers and connections for nothing."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
