"""Route choice: which servers a client chains to run blocks [start, end) of a model.

Two policies, both over a `SwarmView` snapshot and both usable on any sub-range (recovery
replaces exactly the failed range):

- `RoutePlanner.inference_route`: minimum latency per inference step. Cost model (Petals,
  `RemoteSequenceManager._build_inference_graph`), in seconds:
    client -> first server:   one-way delay (client's RTT / 2) + hop overhead
    server p -> server q:      one-way delay (p's announced next_pings[q] / 2) + hop overhead
    compute on q:              blocks run on q / q's inference_rps (tokens/s per block)
    last server -> client:     one-way delay (client's RTT / 2)
  An unmeasured delay counts as `default_delay`, an unreachable one (RTT = inf) as
  `max_delay`. That is the cost of a step when servers push their outputs to the next server
  (docs/block_protocol.md, "push"); with `RoutingConfig.relay` (old servers, push off) the
  client relays every hidden state, and a hop p -> q costs p -> client + client -> q instead.
  As in Petals, a route that enters a server stays on it to the end of its span (or of the
  range): hops happen only at span ends, which keeps the problem small. Nodes are
  (block, server holding the hidden state); every edge moves forward in blocks or hops at one
  block, so the graph is a DAG ordered by block and one pass in block order finds the same
  shortest path Dijkstra would, without a heap.
- `RoutePlanner.spread_route`: forward/backward for fine-tuning spread load: at each block
  the next server is drawn among those covering it, with probability proportional to its
  announced throughput (random source injected); servers the client measured as unreachable
  (RTT = inf) are drawn only when nothing else covers the block (Petals'
  `_make_sequence_with_max_throughput` gives them weight 1e-6).

Only ONLINE servers of the client's protocol version are used; banned servers, servers
without the requested adapter, servers whose request or backward limit is below the smallest
request the work can be cut into, and (for inference) servers whose free attention cache is
below what the session needs are excluded. Blocks nobody eligible serves raise MissingBlocksError.

Pure: no torch, no asyncio, no I/O, no clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

from blocks.announcement import PROTOCOL_VERSION, ServedSpan, ServerState, SwarmView

# Petals `_build_inference_graph(overhead_delay=0.018)`: "serialization overhead
# (empirically measured)", seconds per request to a server.
HOP_OVERHEAD = 0.018
# Petals `_rtt_to_delay(default_delay=0.15)`: one-way seconds assumed when never measured.
DEFAULT_DELAY = 0.15
# Petals `_rtt_to_delay(max_delay=5)`: an unreachable link is penalised, not removed.
MAX_DELAY = 5.0
# Petals `_build_inference_graph(default_inference_rps=300)`: tokens/s per block when a
# server announces none.
DEFAULT_INFERENCE_RPS = 300.0
# Weight of a server announcing zero throughput in spread routes: chosen only when alone.
MIN_SPREAD_WEIGHT = 1e-9


# Servers named in a MissingBlocksError's message (all of them stay in `.excluded`).
MAX_EXCLUSIONS_SHOWN = 8


class MissingBlocksError(RuntimeError):
    """No eligible server covers these blocks (sorted block indices in `missing`).

    `excluded`: (peer id, start, end, why) of the announced servers that hold some of them but
    may not be used, so that the message says whether the blocks are unserved or their servers
    banned, full, joining, of another version or without the adapter."""

    def __init__(self, missing: Sequence[int],
                 excluded: Sequence[tuple[str, int, int, str]] = ()):
        self.missing = sorted(missing)
        self.excluded = list(excluded)
        message = f"no eligible server holds blocks {_ranges(self.missing)}"
        if self.excluded:
            shown = [f"...{peer[-6:]}[{a}:{b}) {why}"
                     for peer, a, b, why in self.excluded[:MAX_EXCLUSIONS_SHOWN]]
            if len(self.excluded) > MAX_EXCLUSIONS_SHOWN:
                shown.append(f"{len(self.excluded) - MAX_EXCLUSIONS_SHOWN} more")
            message += " (" + "; ".join(shown) + ")"
        else:
            message += " (no server announces them)"
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Latency model of `inference_route`; defaults are Petals' values cited above."""

    hop_overhead: float = HOP_OVERHEAD
    default_delay: float = DEFAULT_DELAY
    max_delay: float = MAX_DELAY
    default_inference_rps: float = DEFAULT_INFERENCE_RPS
    # False: servers push hidden states along the chain (server -> server links cost their
    # announced next_pings); True: the client relays every hidden state between spans.
    relay: bool = False


@dataclass(frozen=True, slots=True)
class RouteNeeds:
    """What a request needs from a server, beyond covering the blocks."""

    cache_tokens: int = 0  # attention-cache positions (batch x max length) of the session
    adapter: str | None = None  # the server must have loaded this adapter
    # the smallest request the work can be cut into (a session: one position of every row);
    # a server that announces a lower request limit could not run it
    request_tokens: int = 0
    # likewise for `blocks.backward` (a training pass: one whole row, it cannot be cut by
    # positions), against the announced backward limit
    backward_tokens: int = 0
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class RouteSpan:
    """Run blocks [start, end) on `peer_id`."""

    peer_id: str
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


_NO_BANS: frozenset[str] = frozenset()
_NO_RTTS: Mapping[str, float] = {}


class RoutePlanner:
    """Routes over one swarm snapshot; build a new planner when the view is refreshed."""

    __slots__ = ("config", "view")

    def __init__(self, view: SwarmView, config: RoutingConfig = RoutingConfig()):
        self.view = view
        self.config = config

    # -- inference: minimum latency -----------------------------------------------------------

    def inference_route(
        self,
        start: int,
        end: int,
        *,
        client_rtts: Mapping[str, float] = _NO_RTTS,
        banned: Container[str] = _NO_BANS,
        needs: RouteNeeds = RouteNeeds(),
    ) -> list[RouteSpan]:
        """The minimum-latency chain of servers for one inference step over [start, end).

        `client_rtts`: the client's own measured round-trip seconds per peer id.
        """
        self._check_range(start, end)
        if start == end:
            return []
        eligible = self._eligible(start, end, banned, needs, inference=True)
        cfg = self.config
        overhead = cfg.hop_overhead
        default_delay, max_delay, relay = cfg.default_delay, cfg.max_delay, cfg.relay

        # A node is (cost, span or None for the client, entry block, previous node).
        arrivals: dict[int, dict[int, tuple]] = {start: {0: (0.0, None, start, None)}}
        block = start
        while block < end:
            at_block = arrivals.pop(block, None)
            if at_block:
                sources = sorted(at_block.values(), key=lambda node: node[0])
                floor = sources[0][0] + overhead  # no entry costs less: links are >= 0
                for span in self.view.covering(block):
                    if id(span) not in eligible:
                        continue
                    stop = min(span.end, end)
                    rps = span.info.inference_rps or cfg.default_inference_rps
                    compute = (stop - block) / rps
                    landing = arrivals.setdefault(stop, {})
                    held = landing.get(id(span))
                    if held is not None and floor + compute >= held[0]:
                        continue  # entering here cannot beat entering this span earlier
                    peer = span.peer_id
                    best, best_src = math.inf, None
                    for src in sources:
                        if src[0] + overhead >= best:
                            break  # sources are sorted by cost; hops cost >= overhead
                        # _delay and _link, inlined (the innermost loop); min(half,
                        # max_delay) written as min() decides, NaN included
                        prev = src[1]
                        if prev is None:
                            rtt = client_rtts.get(peer)
                            if rtt is None:
                                link = default_delay
                            else:
                                half = rtt / 2
                                link = max_delay if max_delay < half else half
                        elif prev.peer_id == peer:
                            link = 0.0  # another span of the same server: no network
                        elif relay:
                            link = _link(prev.peer_id, prev.info, peer, client_rtts, cfg)
                        else:
                            rtt = prev.info.next_pings.get(peer)
                            if rtt is None:
                                link = default_delay
                            else:
                                half = rtt / 2
                                link = max_delay if max_delay < half else half
                        cost = src[0] + link + overhead
                        if cost < best:
                            best, best_src = cost, src
                    cost = best + compute
                    if held is None or cost < held[0]:
                        landing[id(span)] = (cost, span, block, best_src)
            block = min((b for b in arrivals if b < end), default=end)

        finals = arrivals.get(end, {})
        best_node, best_total = None, math.inf
        for node in finals.values():
            total = node[0] + _delay(client_rtts.get(node[1].peer_id), cfg)
            if total < best_total:
                best_node, best_total = node, total
        if best_node is None:  # unreachable: _eligible found every block covered
            raise MissingBlocksError(list(range(start, end)))
        route: list[RouteSpan] = []
        node = best_node
        while node is not None and node[1] is not None:
            stop = min(node[1].end, end) if not route else route[-1].start
            route.append(RouteSpan(node[1].peer_id, node[2], stop))
            node = node[3]
        route.reverse()
        return route

    def route_latency(
        self, route: Sequence[RouteSpan], *, client_rtts: Mapping[str, float] = _NO_RTTS
    ) -> float:
        """Seconds one inference step takes along `route` under the cost model above."""
        cfg = self.config
        total, prev = 0.0, None
        for hop in route:
            info = self.view.servers[hop.peer_id]
            if prev is None:
                link = _delay(client_rtts.get(hop.peer_id), cfg)
            else:
                link = _link(prev, self.view.servers[prev], hop.peer_id, client_rtts, cfg)
            total += link + cfg.hop_overhead
            total += hop.length / (info.inference_rps or cfg.default_inference_rps)
            prev = hop.peer_id
        if prev is not None:
            total += _delay(client_rtts.get(prev), cfg)
        return total

    # -- forward / backward: spread the load ------------------------------------------------------

    def spread_route(
        self,
        start: int,
        end: int,
        rng: random.Random,
        *,
        banned: Container[str] = _NO_BANS,
        needs: RouteNeeds = RouteNeeds(),
        client_rtts: Mapping[str, float] = _NO_RTTS,
    ) -> list[RouteSpan]:
        """A random chain over [start, end): at each block a server covering it, drawn with
        probability proportional to its throughput; it runs to the end of its span. Servers
        whose measured RTT is inf (unreachable) weigh MIN_SPREAD_WEIGHT."""
        self._check_range(start, end)
        if start == end:
            return []
        eligible = self._eligible(start, end, banned, needs, inference=False)
        route: list[RouteSpan] = []
        block = start
        while block < end:
            candidates = [s for s in self.view.covering(block) if id(s) in eligible]
            weights = [MIN_SPREAD_WEIGHT if client_rtts.get(s.peer_id) == math.inf
                       else max(s.info.throughput, MIN_SPREAD_WEIGHT) for s in candidates]
            point = rng.random() * sum(weights)
            chosen = candidates[-1]
            for span, weight in zip(candidates, weights):
                point -= weight
                if point < 0:
                    chosen = span
                    break
            stop = min(chosen.end, end)
            route.append(RouteSpan(chosen.peer_id, block, stop))
            block = stop
        return route

    # -- shared ---------------------------------------------------------------------------------

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.view.num_blocks:
            raise ValueError(f"block range [{start}, {end}) not in [0, {self.view.num_blocks})")

    def _eligible(
        self, start: int, end: int, banned: Container[str], needs: RouteNeeds, *, inference: bool
    ) -> set[int]:
        """ids of the spans a request may use; raises MissingBlocksError for uncovered blocks.

        Per-block coverage is counted with a difference array over the eligible spans
        (integers, exact), so the check costs O(servers + blocks)."""
        eligible: set[int] = set()
        excluded: list[tuple[ServedSpan, str]] = []  # for the error's message
        delta = [0] * (end - start + 1)
        for span in self.view.spans:
            if span.end <= start or span.start >= end:
                continue
            why = _exclusion(span, banned, needs, inference)
            if why is not None:
                excluded.append((span, why))
                continue
            eligible.add(id(span))
            delta[max(span.start, start) - start] += 1
            delta[min(span.end, end) - start] -= 1
        missing, covered = [], 0
        for offset in range(end - start):
            covered += delta[offset]
            if covered == 0:
                missing.append(start + offset)
        if missing:
            wanted = set(missing)
            raise MissingBlocksError(missing, [
                (span.peer_id, span.start, span.end, why) for span, why in excluded
                if not wanted.isdisjoint(range(span.start, span.end))])
        return eligible


def _exclusion(span: ServedSpan, banned: Container[str], needs: RouteNeeds,
               inference: bool) -> str | None:
    """Why a request may not use `span`, or None when it may."""
    info = span.info
    if info.state != ServerState.ONLINE:
        return info.state.name.lower()
    if info.version != needs.version:
        return f"protocol version {info.version} (ours: {needs.version})"
    if span.peer_id in banned:
        return "banned after a failure"
    if needs.adapter is not None and needs.adapter not in info.adapters:
        return f"without adapter {needs.adapter!r}"
    if info.max_request_tokens < needs.request_tokens:
        return (f"takes at most {info.max_request_tokens} tokens per request, "
                f"{needs.request_tokens} needed")
    if info.max_backward_tokens < needs.backward_tokens:
        return (f"takes at most {info.max_backward_tokens} tokens per backward request, "
                f"{needs.backward_tokens} needed")
    if inference:
        if info.cache_tokens_left is not None and info.cache_tokens_left < needs.cache_tokens:
            return (f"{info.cache_tokens_left} free cache tokens, "
                    f"{needs.cache_tokens} needed")
        if info.inference_rps is not None and info.inference_rps <= 0:
            return "announces no inference throughput"
    return None


def _link(prev: str, prev_info, peer: str, client_rtts: Mapping[str, float],
          cfg: RoutingConfig) -> float:
    """One-way seconds for a hidden state to get from server `prev` to server `peer`."""
    if prev == peer:
        return 0.0  # another span of the same server: no network
    if cfg.relay:
        return _delay(client_rtts.get(prev), cfg) + _delay(client_rtts.get(peer), cfg)
    return _delay(prev_info.next_pings.get(peer), cfg)


def _delay(rtt: float | None, cfg: RoutingConfig) -> float:
    return cfg.default_delay if rtt is None else min(rtt / 2, cfg.max_delay)


def _ranges(blocks: Sequence[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
