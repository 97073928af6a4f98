"""One inference step through a chain whose servers push to each other (docs/block_protocol.md,
"Push"): the client sends its hidden states to the first span only, with the list of the
push-capable spans after it; each server answers the client and sends its output on.

The client still reads every span's answer, in chain order, and keeps it as the next span's
input (`SpanSession.commit`), so replay after a failure is exactly the relay mode's. While
it waits for span i's answer it also watches span i-1, whose server reports a push that
failed; then the client sends span i its input itself, with the rest of the chain, and the
push goes on from there. A span that fails is replaced as in relay mode
(`InferenceSession._recover`: same bans, same replay) and the chain goes on after the
replacement, again from the client. Every (re)send gives each span of its chain a fresh step
id, so answers and pushes of an abandoned attempt are recognisably stale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from client.inference import ANSWER, NOTICE, InferenceError, SpanSession
from overlay.host import RemoteError

if TYPE_CHECKING:
    from client.inference import InferenceSession


async def push_step(session: InferenceSession, hidden: torch.Tensor,
                    position: int) -> torch.Tensor:
    """Run `hidden` (positions from `position` on) through `session.spans`; returns the last
    span's output. `session.spans` changes in place when a span is replaced."""
    spans = session.spans
    timeout = session.config.step_timeout
    ids: dict[SpanSession, int] = {}  # the step id each span's answer must carry
    inputs: dict[SpanSession, torch.Tensor] = {}  # each span's input for this step
    to_send: dict[SpanSession, torch.Tensor] = {spans[0]: hidden}  # the client sends these
    by_push: set[SpanSession] = set()  # spans whose input comes from the previous server
    index = 0
    while True:
        span = spans[index]
        try:
            if span in to_send:
                data = to_send.pop(span)
                inputs[span] = data
                ids[span] = span.next_step_id()
                chain = []
                if span.push_token is not None:
                    for later in spans[index + 1:]:
                        if later.push_token is None:
                            break  # an old server: the client relays to it
                        ids[later] = later.next_step_id()
                        chain.append(later.hop(ids[later]))
                by_push = {spans[index + 1 + k] for k in range(len(chain))}
                session.client_sends += 1
                await span.send_step(data, position, ids[span], chain)
            if span in by_push:  # wait for its answer, or its pusher's failure notice
                pusher = spans[index - 1]
                timer = span.arm_timeout(timeout)
                try:
                    got, item = await session.mailbox.get((span, pusher))
                finally:
                    timer.cancel()
            else:
                pusher, got, item = None, span, await span._receive(timeout)
            if got is pusher:
                try:
                    kind, _ = pusher.read(item, ids[pusher])
                except (InferenceError, RemoteError):
                    kind = NOTICE  # lost after answering: it may not have pushed
                if kind == NOTICE:
                    by_push.discard(span)
                    to_send[span] = inputs[span]
                continue
            kind, out = span.read(item, ids[span])
            if kind != ANSWER:
                continue  # stale, or a notice of an earlier step
        except InferenceError as e:
            if session._rerouter is None or session._closed:
                raise
            out, count = await session._recover(index, inputs[span], position, e)
            index += count
            if index == len(spans):
                return out
            to_send[spans[index]] = out
            continue
        span.commit(inputs[span], position)
        index += 1
        if index == len(spans):
            return out
        later = spans[index]
        inputs[later] = out
        if later not in by_push:
            to_send[later] = out
