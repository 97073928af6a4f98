"""The remote part of a model, as one asyncio object: blocks [0, num_blocks) of `model_id`
served by the swarm. Any slice of them can be run on the caller's own hidden states.

Route choice is the pure client/routing.py over a fresh SwarmView; this module only does I/O.
Fault tolerance: servers that fail are banned (one `BanList` per RemoteBlocks, shared by its
sessions); inference sessions made here re-route a failed span themselves (client/inference.py),
and `forward` re-runs a failed span on another server, waiting for blocks nobody serves until
`ClientConfig.recovery_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import torch

import tensor_wire
from blocks import protocol
from blocks.announcement import SwarmView
from client.inference import (
    RECOVERY_TIMEOUT,
    STEP_TIMEOUT,
    BlocksUnavailableError,
    InferenceError,
    InferenceSession,
    Rerouter,
    Route,
    SessionConfig,
    SessionTuning,
)
from client.padding import token_mask
from client.recovery import BanList, PassDeadline, RetryPolicy, splice_route
from client.request_chunks import REQUEST_CHUNK_TOKENS
from client.routing import (
    MissingBlocksError,
    RouteNeeds,
    RoutePlanner,
    RouteSpan,
    RoutingConfig,
)
from client.span_forward import BadAnswer, SpanTarget, all_or_cancel, forward_span
from client.swarm import SwarmClient
from overlay.host import RemoteError
from overlay.identity import PeerId
from overlay.streams import ConnectionLost, StreamClosed

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    view_ttl: float = 10.0  # seconds a swarm view is reused before re-reading the DHT
    forward_timeout: float = 120.0
    step_timeout: float = STEP_TIMEOUT  # for one server's answer to an inference step
    compression: str = "none"  # activations on the wire: none, float16, int8_blockwise, ...
    recovery_timeout: float = RECOVERY_TIMEOUT  # to find servers for blocks nobody serves
    push: bool = True  # servers push hidden states to the next server (else: client relays)


class RemoteBlocks:
    def __init__(self, swarm: SwarmClient, model_id: str, num_blocks: int,
                 config: ClientConfig | None = None, rng: random.Random | None = None):
        self.swarm = swarm
        self.model_id = model_id
        self.num_blocks = num_blocks
        self.config = config or ClientConfig()
        self._rng = rng or random.Random()
        self._view: SwarmView | None = None
        self._view_time = 0.0
        self.bans = BanList()  # servers that failed a request of this client, with backoff
        self._retry = RetryPolicy(self._rng)

    async def view(self, refresh: bool = False) -> SwarmView:
        if refresh or self._view is None or time.monotonic() - self._view_time > \
                self.config.view_ttl:
            self._view = await self.swarm.view(self.model_id, self.num_blocks)
            self._view_time = time.monotonic()
        return self._view

    async def inference_route(self, start: int, end: int, needs: RouteNeeds | None = None,
                              banned=frozenset(), measure: bool = True) -> list[RouteSpan]:
        """Minimum-latency route; `measure=False` (recovery, in a hurry) uses only round-trip
        times measured earlier instead of pinging servers now (up to PING_TIMEOUT each)."""
        self._check_range(start, end)  # before view.covering(b) reads past the last block
        needs = needs or RouteNeeds()
        view = await self.view()
        covering = {s.peer_id for b in range(start, end) for s in view.covering(b)
                    if s.peer_id not in banned}  # a dead server is not worth a ping
        if measure:
            rtts = await self.swarm.rtts(covering)
        else:  # SwarmClient keeps {peer: (rtt, measured at)}
            known = getattr(self.swarm, "_rtts", {})
            rtts = {p: known[p][0] for p in covering if p in known}
        # routes are costed as the session will run them: pushed along, or relayed
        planner = RoutePlanner(view, RoutingConfig(relay=not self.config.push))
        return planner.inference_route(start, end, client_rtts=rtts, banned=banned,
                                       needs=needs)

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.num_blocks:
            raise ValueError(f"block range [{start}, {end}) not in [0, {self.num_blocks})")

    async def forward_route(self, start: int, end: int, banned=frozenset(),
                            needs: RouteNeeds | None = None) -> list[RouteSpan]:
        view = await self.view()
        known = getattr(self.swarm, "_rtts", {})  # measured earlier; no pings here
        rtts = {peer: entry[0] for peer, entry in known.items()}
        return RoutePlanner(view).spread_route(start, end, self._rng, banned=banned,
                                               client_rtts=rtts, needs=needs or RouteNeeds())

    async def forward(self, hidden: torch.Tensor, start: int = 0, end: int | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run full sequences through blocks [start, end) (no cache). A batch of more than
        REQUEST_CHUNK_TOKENS is split by rows, the chunks run concurrently (each on its own
        route); each span's part is cut again to its server's announced request limit
        (client/span_forward.py: by rows, and a row longer than the limit as a session, in
        steps). A span whose server fails is banned and re-run on a route found again for
        exactly its blocks; all of that within one recovery_timeout from the pass's first
        failure (then BlocksUnavailableError)."""
        end = self.num_blocks if end is None else end
        dtype = hidden.dtype
        if attention_mask is not None:  # servers take integers: 0/1 floats are converted
            attention_mask = token_mask(attention_mask)
        recovery = PassDeadline(self.config.recovery_timeout)
        rows = hidden.shape[0] if hidden.ndim != 3 else \
            max(1, REQUEST_CHUNK_TOKENS // max(1, hidden.shape[1]))
        if hidden.ndim != 3 or hidden.shape[0] <= rows:
            out = await self._forward_rows(hidden, start, end, attention_mask, recovery)
            return out.to(dtype)  # servers may run another precision
        outs = await all_or_cancel(self._forward_rows(
            hidden[r:r + rows], start, end,
            None if attention_mask is None else attention_mask[r:r + rows], recovery)
            for r in range(0, hidden.shape[0], rows))
        return torch.cat(outs, dim=0).to(dtype)

    async def _forward_rows(self, hidden: torch.Tensor, start: int, end: int,
                            attention_mask: torch.Tensor | None,
                            recovery: PassDeadline) -> torch.Tensor:
        route = await self._forward_route_retrying(start, end, patient=False)
        index = 0
        while index < len(route):
            span = route[index]
            target = SpanTarget(PeerId.from_string(span.peer_id), self.model_id, span.start,
                                span.end, self.request_limit(span.peer_id))
            try:
                hidden_out = await forward_span(self.swarm.host, target, hidden, attention_mask,
                                                compression=self.config.compression,
                                                timeout=self.config.forward_timeout)
            except RemoteError as e:
                # cache_full: a row longer than the limit went as a session, which another
                # server may have room for
                if e.code not in _SERVER_FAULTS and e.code != protocol.CACHE_FULL:
                    raise  # the request itself was refused: another server would refuse it too
                failure: Exception = e
            except (ConnectionLost, StreamClosed, TimeoutError, tensor_wire.WireError,
                    BadAnswer, InferenceError) as e:
                failure = e
            else:
                self.bans.success(span.peer_id)
                hidden = hidden_out
                index += 1
                continue
            deadline = self.failed(span, failure, recovery)
            log.warning("forward on %s[%d:%d) failed: %s; re-routing", span.peer_id[-6:],
                        span.start, span.end, failure)
            replacement = await self._forward_route_retrying(span.start, span.end,
                                                             deadline=deadline)
            route = splice_route(route, index, replacement)
        return hidden

    def request_limit(self, peer_id: str) -> int:
        """Tokens of one request the server takes, as it announced (the default when it did
        not, or is not in the current view)."""
        info = self._announced(peer_id)
        return protocol.DEFAULT_MAX_REQUEST_TOKENS if info is None else info.max_request_tokens

    def backward_limit(self, peer_id: str) -> int:
        """Tokens of one `blocks.backward` the server takes, as `request_limit` reads it."""
        info = self._announced(peer_id)
        return protocol.DEFAULT_MAX_BACKWARD_TOKENS if info is None else \
            info.max_backward_tokens

    def _announced(self, peer_id: str):
        """The server's record in the current view, or None."""
        return None if self._view is None else self._view.servers.get(peer_id)

    def failed(self, span: RouteSpan, failure: BaseException, recovery: PassDeadline) -> float:
        """A pass's request to `span` failed: ban its server; the deadline to re-route by, or
        BlocksUnavailableError once the pass's recovery deadline has passed (forward and
        training passes alike)."""
        now = time.monotonic()
        self.bans.ban(span.peer_id, now)
        deadline = recovery.failed(now)
        if deadline is None:
            raise give_up(span, now - recovery.began, failure)
        return deadline

    async def _forward_route_retrying(self, start: int, end: int, patient: bool = True,
                                      needs: RouteNeeds | None = None,
                                      deadline: float | None = None) -> list[RouteSpan]:
        return await self._route_retrying(
            lambda banned: self.forward_route(start, end, banned=banned, needs=needs), patient,
            deadline)

    async def _route_retrying(self, plan, patient: bool,
                              deadline: float | None = None) -> list[RouteSpan]:
        """`await plan(banned)` around the banned servers; while it raises MissingBlocksError,
        re-reads the swarm and retries (RetryPolicy delays) until `deadline` (by default
        `recovery_timeout` from now), then raises BlocksUnavailableError naming the blocks.

        Not `patient` (a first route while no server of this client is banned, e.g. a model
        nobody serves): one retry on a fresh view, then the MissingBlocksError itself."""
        began = time.monotonic()
        if deadline is None:
            deadline = began + self.config.recovery_timeout
        patient = patient or bool(self.bans.banned(began))
        attempt = 0
        while True:
            now = time.monotonic()
            try:
                if attempt:
                    await self.view(refresh=True)
                return await plan(self.bans.banned(now))
            except MissingBlocksError as e:
                if not patient and attempt:
                    raise
                now = time.monotonic()
                delay = self._retry.next_delay(attempt, now, deadline,
                                               wake_at=self.bans.next_unban(now))
                if delay is None:  # what was waited: a caller's deadline may leave less
                    raise BlocksUnavailableError(
                        e.missing, f"{e} (waited {now - began:.1f} s)") from e
                attempt += 1
                await asyncio.sleep(delay)

    def rerouter(self, needs: RouteNeeds) -> Rerouter:
        """What an InferenceSession calls to replace a failed span (see client/inference.py)."""

        async def reroute(start: int, end: int, banned: frozenset[str], refresh: bool) -> Route:
            if refresh:
                await self.view(refresh=True)
            log.debug("re-routing [%d, %d) around %s over %s", start, end,
                      [b[-6:] for b in banned],
                      [(s.peer_id[-6:], s.start, s.end) for s in (await self.view()).spans])
            route = await self.inference_route(start, end, needs, banned=banned,
                                               measure=False)
            return [(PeerId.from_string(s.peer_id), s.start, s.end) for s in route]

        return reroute

    async def inference_session(self, batch_size: int = 1, max_length: int = 2048,
                                start: int = 0, end: int | None = None,
                                wait_timeout: float = 30.0, adapter: str | None = None,
                                tuning: SessionTuning | None = None) -> InferenceSession:
        """An open session over blocks [start, end) that replaces failed servers by itself;
        close it (or use `async with`). `adapter`: only servers hosting it; `tuning`: what
        fine-tuned weights add to each span's session (client/finetune.py)."""
        end = self.num_blocks if end is None else end
        self._check_range(start, end)
        if start == end:  # it would open no span and hand the caller's hidden states back
            raise ValueError(f"block range [{start}, {end}) is empty: an inference session "
                             f"needs at least one block")
        # a step goes in pieces down to one position of every row: no smaller request
        needs = RouteNeeds(cache_tokens=batch_size * max_length, adapter=adapter,
                           request_tokens=batch_size)
        # one deadline for the route and the replacement of servers found dead when opening:
        # a ban that lifts late in the wait must not start a second full timeout
        deadline = time.monotonic() + self.config.recovery_timeout
        route = await self._route_retrying(
            lambda banned: self.inference_route(start, end, needs, banned=banned),
            patient=False, deadline=deadline)
        log.info("route: %s", " -> ".join(f"{s.peer_id[-6:]}[{s.start}:{s.end})" for s in route))
        config = SessionConfig(batch_size=batch_size, max_length=max_length,
                               wait_timeout=wait_timeout, step_timeout=self.config.step_timeout,
                               compression=self.config.compression,
                               recovery_timeout=self.config.recovery_timeout,
                               # steps with deep prompts are relayed: a push carries no
                               # prompts for the next server
                               push=self.config.push and (tuning is None
                                                          or tuning.prompts is None))
        session = InferenceSession(
            self.swarm.host, self.model_id,
            [(PeerId.from_string(s.peer_id), s.start, s.end) for s in route], config,
            rerouter=self.rerouter(needs), bans=self.bans, rng=self._rng, tuning=tuning,
        )
        return await session.open(deadline)


# Codes of a server that cannot run a request routed to it (a stale announcement, a server
# shutting down or overloaded): another server may. Any other code refuses the request itself.
_SERVER_FAULTS = frozenset({protocol.UNKNOWN_MODEL, protocol.BAD_RANGE, protocol.OVERLOADED,
                            "deadline_exceeded", "unknown_method"})


def give_up(span: RouteSpan, waited: float, failure: BaseException) -> BlocksUnavailableError:
    """The error of a pass whose recovery deadline passed with `span` failing again."""
    error = BlocksUnavailableError(
        list(range(span.start, span.end)),
        f"could not run blocks [{span.start}, {span.end}) after {waited:.1f} s of re-routing: "
        f"{span.peer_id[-6:]} failed with {failure}")
    error.__cause__ = failure
    return error


__all__ = ["ClientConfig", "RemoteBlocks"]
