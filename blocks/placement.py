"""Which blocks a server serves: Petals' block-selection and rebalancing rules, and an exact
optimum to measure them against.

The rules (Petals, `src/petals/server/block_selection.py`; NeurIPS 2023 paper, section 3.2):
1. The throughput of a block is the sum of the announced `throughput` of the servers covering
   it. JOINING servers count fully, like ONLINE ones (they are loading and will serve soon,
   and counting them stops a stampede onto the same blocks); OFFLINE ones do not count.
2. A new server serving n blocks takes the window of n consecutive blocks whose throughputs,
   sorted ascending, are lexicographically smallest: it raises the weakest block first, then
   the next weakest. Ties go to the lowest start.
3. Periodically a server simulates moving to its best window and the other servers greedily
   re-choosing in turn (random order, until nobody moves). It moves only if the swarm's
   bottleneck (the minimum per-block throughput) would grow enough:
       current / simulated < balance_quality      (default 0.75),
   i.e. only when today's bottleneck is below 75% of what it would become.

Everything is a pure function of the announced infos; randomness comes from an injected
`random.Random`. No torch, no asyncio, no I/O, no clock: the simulator calls these as is.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from itertools import accumulate, compress, islice
from operator import attrgetter, ne

from blocks.announcement import ServerInfo, ServerState

# Petals `Server(balance_quality=0.75)`: move only if the bottleneck would grow by more than
# 1 / 0.75 = 1.33x. A value above 1 forces a move at every check (Petals: for debugging).
BALANCE_QUALITY = 0.75
# Petals `Server(mean_balance_check_period=120)` (src/petals/server/server.py; its older
# cli/run_server.py flag defaulted to 60): checks happen after uniform(0, 2x) seconds.
MEAN_BALANCE_CHECK_PERIOD = 120.0
# Petals `Server(mean_block_selection_delay=5)`: a joining server waits uniform(0, 2x)
# seconds before reading the DHT, so servers started together do not pick the same blocks.
MEAN_BLOCK_SELECTION_DELAY = 5.0
# Petals' `eps = 1e-3` plays two roles, named separately here:
# - a server judging its own position removes (1 + STAY_BIAS) x its throughput, so its current
#   window looks slightly weaker and wins near-ties (no moves for rounding noise);
STAY_BIAS = 1e-3
# - a block served at less than MIN_THROUGHPUT tokens/s counts as uncovered.
MIN_THROUGHPUT = 1e-3
# Petals loops "until nobody moves" with no bound; greedy re-choosing can cycle, so we stop
# after this many rounds (each round: every server re-chooses once).
MAX_SETTLE_ROUNDS = 64
# Relative slack of the capacity shortcut in `should_choose_other_blocks`: the float sums
# behind the bottleneck and the bound differ from exact ones by far less than this (about
# servers x blocks x 1e-16), so the shortcut never answers differently from the simulation.
CAPACITY_MARGIN = 1e-9
# Budget of search nodes for `optimal_bottleneck`; beyond it the instance is too large.
OPTIMAL_MAX_NODES = 2_000_000


class PlacementError(ValueError):
    """Arguments that describe no valid placement problem."""


def counts_for_placement(info: ServerInfo) -> bool:
    """Rule 1: JOINING and ONLINE servers count, OFFLINE ones do not."""
    return info.state != ServerState.OFFLINE


def block_throughputs(infos: Mapping[str, ServerInfo], num_blocks: int) -> list[float]:
    """Per-block sum of the throughput of the servers covering it (rule 1).

    Summed in sorted peer order, so the same swarm always gives bit-identical numbers.
    """
    throughputs = [0.0] * num_blocks
    for start, length, throughput in _spans(infos, num_blocks).values():
        _add(throughputs, start, length, throughput)
    return throughputs


def swarm_bottleneck(infos: Mapping[str, ServerInfo], num_blocks: int) -> float:
    """The swarm's throughput: the smallest per-block throughput."""
    return min(block_throughputs(infos, num_blocks))


def best_start(throughputs: Sequence[float], length: int) -> int:
    """Rule 2 on raw per-block throughputs: the start of the window of `length` blocks whose
    sorted throughputs are lexicographically smallest (lowest start on ties).

    Exact, and cheaper than sorting every window:
    1. A window lacking some block of the smallest value loses to one holding them all, so
       when those blocks fit in one window only the windows holding all of them compete.
    2. Between two starts where neither the block leaving nor the block entering the window
       changes value (the throughputs are piecewise constant: servers cover runs of blocks),
       each step swaps one copy of a value `a` for one of `b`, so the sorted window grows
       (a < b), shrinks (a > b) or stays (a == b) all along: only the ends of such a stretch
       can be the best, and the window moves to the next end in one deletion and one
       insertion of k copies.
    """
    num_blocks = len(throughputs)
    if not 1 <= length <= num_blocks:
        raise PlacementError(f"cannot place {length} blocks in a model of {num_blocks}")
    last = num_blocks - length
    if last == 0:
        return 0
    total = sum(throughputs)
    if total != total:  # a NaN: no order to reason with; the plain search gives its answer
        return _best_start_sliding(throughputs, length)
    low = min(throughputs)
    first = throughputs.index(low)
    final = first
    for _ in range(throughputs.count(low) - 1):
        final = throughputs.index(low, final + 1)
    if final - first >= length:
        return _best_start_stretches(throughputs, length, 0, last)
    lo, hi = max(0, final - length + 1), min(first, last)
    if lo == hi:
        return lo
    return _best_start_stretches(throughputs, length, lo, hi)


def _best_start_stretches(throughputs: Sequence[float], length: int, lo: int, hi: int) -> int:
    """`best_start` among the starts lo..hi (rule 2 of its docstring)."""
    segment = throughputs[lo:hi + length]
    # starts s where the block entering or leaving the window changes value
    changes = compress(range(lo + 1, hi + length), map(ne, segment, islice(segment, 1, None)))
    ends = set()
    for at in changes:
        if lo < at < hi:
            ends.add(at)
        if lo < at - length < hi:
            ends.add(at - length)
    points = sorted(ends)
    points.append(hi)
    window = sorted(throughputs[lo:lo + length])
    best, best_at = window[:], lo
    prev = lo
    for start in points:
        leaving, entering = throughputs[prev], throughputs[prev + length]
        if leaving != entering:
            k = start - prev  # <= length: a longer stretch has leaving == entering
            at = bisect_left(window, leaving)
            del window[at:at + k]
            at = bisect_left(window, entering)
            window[at:at] = [entering] * k
            if leaving > entering and window < best:
                best, best_at = window[:], start
        prev = start
    return best_at


def _best_start_sliding(throughputs: Sequence[float], length: int) -> int:
    """`best_start` by sliding one sorted window along every start."""
    window = sorted(throughputs[:length])
    best, best_at = window[:], 0
    for start in range(1, len(throughputs) - length + 1):
        del window[bisect_left(window, throughputs[start - 1])]
        insort(window, throughputs[start + length - 1])
        if window < best:
            best, best_at = window[:], start
    return best_at


def choose_best_blocks(
    num_blocks_to_serve: int, infos: Mapping[str, ServerInfo], num_blocks: int
) -> int:
    """Rule 2: the start of the span a new server should serve, given the swarm's infos
    (which must not include the choosing server itself)."""
    return best_start(block_throughputs(infos, num_blocks), num_blocks_to_serve)


def should_choose_other_blocks(
    local_peer: str,
    infos: Mapping[str, ServerInfo],
    num_blocks: int,
    *,
    rng: random.Random,
    balance_quality: float = BALANCE_QUALITY,
) -> bool:
    """Rule 3: should `local_peer` leave its span and choose again?

    False when the local server is absent from `infos` (its announcement is not visible yet:
    nothing to judge), when it is the only server of some block of a connected swarm
    (moving would cut the chain), or when it already sits on its best window.

    Also False, without simulating, when the bottleneck is already so close to the capacity
    bound sum(throughput x span) / blocks (the mean block throughput, which no placement's
    minimum can exceed) that no response of the others could make it grow past
    1 / balance_quality. That answer is the simulation's own (CAPACITY_MARGIN covers float
    rounding); it only saves the random draws the simulation would have made, so a caller
    sharing its random source with other work (the simulator) sees later draws shift.
    """
    if balance_quality > 1.0:
        return True
    _check_num_blocks(num_blocks)
    if _near_capacity(infos, num_blocks, balance_quality - STAY_BIAS):
        return False
    spans = _spans(infos, num_blocks)
    if local_peer not in spans:
        return False
    throughputs = _throughputs_of(spans, num_blocks)
    initial = min(throughputs)
    start, length, own = spans[local_peer]

    _add(throughputs, start, length, -own * (1 + STAY_BIAS))
    if initial > MIN_THROUGHPUT and min(throughputs) <= 0:
        return False
    new_start = best_start(throughputs, length)
    if new_start == start:
        return False
    _add(throughputs, start, length, own * STAY_BIAS)  # now exactly without the local server
    spans[local_peer] = (new_start, length, own)
    _add(throughputs, new_start, length, own)

    _settle(spans, throughputs, rng)
    final = min(_throughputs_of(spans, num_blocks))  # recomputed: no accumulated rounding
    if final < initial or final < MIN_THROUGHPUT:
        return False
    return initial / final < balance_quality - STAY_BIAS


def block_selection_delay(rng: random.Random, mean_delay: float = MEAN_BLOCK_SELECTION_DELAY
                          ) -> float:
    """Seconds a joining server waits before choosing its blocks (Petals: uniform(0, 2x))."""
    return rng.random() * 2 * mean_delay


def balance_check_delay(rng: random.Random, mean_period: float = MEAN_BALANCE_CHECK_PERIOD
                        ) -> float:
    """Seconds until the next rebalancing check (Petals: uniform(0, 2 x mean period))."""
    return rng.random() * 2 * mean_period


# -- validation: the greedy rules on a bare instance, and the exact optimum -------------------


def greedy_placement(
    server_throughputs: Sequence[float],
    blocks_per_server: Sequence[int],
    num_blocks: int,
    rng: random.Random,
    *,
    rebalance_rounds: int = 0,
) -> list[int]:
    """Starts chosen by servers joining one at a time in the given order (rule 2), then up to
    `rebalance_rounds` rounds in which every server, in random order, runs rule 3 and, when
    it says so, leaves and re-chooses with rule 2, as a live server does."""
    _check_instance(server_throughputs, blocks_per_server, num_blocks)
    throughputs = [0.0] * num_blocks
    starts: list[int] = []
    for own, length in zip(server_throughputs, blocks_per_server):
        start = best_start(throughputs, length)
        _add(throughputs, start, length, own)
        starts.append(start)

    def infos() -> dict[str, ServerInfo]:
        return {
            f"s{i:04d}": ServerInfo(ServerState.ONLINE, s, s + n, float(t))
            for i, (s, n, t) in enumerate(zip(starts, blocks_per_server, server_throughputs))
        }

    for _ in range(rebalance_rounds):
        moved = False
        order = list(range(len(starts)))
        rng.shuffle(order)
        for i in order:
            peer = f"s{i:04d}"
            current = infos()
            if should_choose_other_blocks(peer, current, num_blocks, rng=rng):
                del current[peer]
                starts[i] = choose_best_blocks(blocks_per_server[i], current, num_blocks)
                moved = True
        if not moved:
            break
    return starts


def placement_bottleneck(
    starts: Sequence[int],
    server_throughputs: Sequence[float],
    blocks_per_server: Sequence[int],
    num_blocks: int,
) -> float:
    """The bottleneck of servers placed at `starts`."""
    _check_instance(server_throughputs, blocks_per_server, num_blocks)
    throughputs = [0.0] * num_blocks
    for start, own, length in zip(starts, server_throughputs, blocks_per_server):
        if not 0 <= start <= num_blocks - length:
            raise PlacementError(f"start {start} does not fit {length} blocks")
        _add(throughputs, start, length, own)
    return min(throughputs)


def optimal_bottleneck(
    server_throughputs: Sequence[float], blocks_per_server: Sequence[int], num_blocks: int
) -> float:
    """The largest bottleneck any placement of these servers reaches, computed exactly.

    A sweep over blocks from left to right decides which servers start at each block; once
    the sweep has passed a block, its sum is final, so a branch dies as soon as one block
    cannot beat the best placement found (the greedy one to begin with). Identical servers
    are placed as one type (no permuted duplicates), a branch is cut when a later block
    cannot beat the best even with every unplaced server on it, and states already explored
    with a better running minimum are skipped. Meant for small instances (about 10 servers
    on 16 blocks takes well under a second); raises PlacementError when the search would
    exceed OPTIMAL_MAX_NODES nodes instead of running for ever.
    """
    _check_instance(server_throughputs, blocks_per_server, num_blocks)
    kinds: dict[tuple[float, int], int] = {}
    for own, length in zip(server_throughputs, blocks_per_server):
        kinds[(float(own), length)] = kinds.get((float(own), length), 0) + 1
    types = sorted(kinds, key=lambda k: (-k[0], k[1]))
    counts = [kinds[k] for k in types]
    greedy = greedy_placement(server_throughputs, blocks_per_server, num_blocks, random.Random(0))
    best = placement_bottleneck(greedy, server_throughputs, blocks_per_server, num_blocks)
    sums = [0.0] * num_blocks  # contributions of the servers started so far
    explored: dict[tuple, float] = {}
    nodes = 0

    def sweep(block: int, running_min: float) -> None:
        nonlocal best, nodes
        nodes += 1
        if nodes > OPTIMAL_MAX_NODES:
            raise PlacementError("instance too large for the exact search")
        if block == num_blocks:
            best = max(best, running_min)
            return
        unplaced = sum(own * n for (own, _), n in zip(types, counts))
        if min(sums[block:]) + unplaced <= best:
            return
        key = (block, tuple(counts), tuple(sums[block:]))
        if explored.get(key, -1.0) >= running_min:
            return
        explored[key] = running_min
        start_here(block, 0, running_min)

    def start_here(block: int, kind: int, running_min: float) -> None:
        """Choose how many servers of type `kind` (and later types) start at `block`."""
        if kind == len(types):
            new_min = min(running_min, sums[block])
            if new_min > best:
                sweep(block + 1, new_min)
            return
        own, length = types[kind]
        available = counts[kind]
        last_start = num_blocks - length
        if available and block > last_start:
            return  # servers of this type left over that fit nowhere any more
        forced = available if block == last_start else 0
        for chosen in range(available, forced - 1, -1):
            saved = sums[block:block + length]
            if chosen:
                _add(sums, block, length, own * chosen)
            counts[kind] -= chosen
            start_here(block, kind + 1, running_min)
            counts[kind] += chosen
            sums[block:block + length] = saved  # exact restore, no rounding drift

    sweep(0, math.inf)
    return best


# -- helpers -----------------------------------------------------------------------------------

_Span = tuple[int, int, float]  # (start, length, throughput)
_PLACEMENT_FIELDS = attrgetter("state", "start", "end", "throughput")


def _spans(infos: Mapping[str, ServerInfo], num_blocks: int) -> dict[str, _Span]:
    _check_num_blocks(num_blocks)
    spans: dict[str, _Span] = {}
    for peer in sorted(infos):
        info = infos[peer]
        if not counts_for_placement(info):
            continue
        if info.end > num_blocks:
            raise PlacementError(f"{peer} serves [{info.start}, {info.end}) of {num_blocks}")
        spans[peer] = (info.start, info.length, info.throughput)
    return spans


def _near_capacity(infos: Mapping[str, ServerInfo], num_blocks: int, threshold: float) -> bool:
    """True when the bottleneck is surely at least `threshold` x the capacity bound (then no
    placement's bottleneck can exceed it by more than 1 / threshold).

    A cheap, approximate pass (per-block sums from a difference array, in any order) whose
    rounding error is bounded: about (servers + blocks) x 2.2e-16 x the summed throughput,
    taken 4x over, plus CAPACITY_MARGIN on the bound. False (judge exactly) for anything
    unusual: spans outside the model, negative or non-finite throughputs."""
    delta = [0.0] * (num_blocks + 1)
    weighted = total = 0.0
    count = 0
    offline = ServerState.OFFLINE
    for state, start, end, throughput in map(_PLACEMENT_FIELDS, infos.values()):
        if state == offline:  # counts_for_placement, inlined
            continue
        if not (0 <= start < end <= num_blocks and 0.0 <= throughput < math.inf):
            return False
        delta[start] += throughput
        delta[end] -= throughput
        weighted += throughput * (end - start)
        total += throughput
        count += 1
    if not count:
        return False
    bottleneck = min(accumulate(islice(delta, num_blocks)))
    error = 4 * (2 * count + num_blocks) * 2.2e-16 * total
    return bottleneck - error >= threshold * weighted / num_blocks * (1.0 + CAPACITY_MARGIN)


def _throughputs_of(spans: Mapping[str, _Span], num_blocks: int) -> list[float]:
    throughputs = [0.0] * num_blocks
    for peer in sorted(spans):
        start, length, own = spans[peer]
        _add(throughputs, start, length, own)
    return throughputs


def _settle(spans: dict[str, _Span], throughputs: list[float], rng: random.Random) -> None:
    """The other servers' simulated response (rule 3): in random order, each removes itself
    (with the stay bias) and re-chooses its best window, until a round moves nobody.

    A server's choice depends only on the throughputs and its own span (start, length,
    throughput), and many servers share a span (same hardware, same window). So once a
    server of some span has stayed, and removing and re-adding it gave back the very same
    numbers, every later turn of a server with that span, until the throughputs change,
    would compute the same thing and change nothing: it is skipped. That includes most of
    the last round, which repeats the turns taken since the last move. The decisions, the
    numbers and the random draws are exactly those of the plain loop.
    """
    stayed: set[_Span] = set()  # spans seen to stay since the throughputs last changed
    for _ in range(MAX_SETTLE_ROUNDS):
        order = sorted(spans)
        rng.shuffle(order)
        moved = False
        for peer in order:
            span = spans[peer]
            if span in stayed:
                continue
            start, length, own = span
            end = start + length
            before = throughputs[start:end]
            bias = own * STAY_BIAS
            removal = -own * (1 + STAY_BIAS)
            throughputs[start:end] = [x + removal for x in before]
            new_start = best_start(throughputs, length)
            if new_start == start:  # the two additions below, in one pass
                throughputs[start:end] = [x + bias + own for x in throughputs[start:end]]
                if throughputs[start:end] == before:
                    stayed.add(span)
                    continue
            else:
                spans[peer] = (new_start, length, own)
                moved = True
                _add(throughputs, start, length, bias)
                _add(throughputs, new_start, length, own)
            stayed.clear()  # the throughputs changed: any answer may differ now
        if not moved:
            return


def _add(throughputs: list[float], start: int, length: int, amount: float) -> None:
    end = start + length
    throughputs[start:end] = [x + amount for x in throughputs[start:end]]


def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise PlacementError(f"a model has at least one block, got {num_blocks}")


def _check_instance(
    server_throughputs: Sequence[float], blocks_per_server: Sequence[int], num_blocks: int
) -> None:
    _check_num_blocks(num_blocks)
    if len(server_throughputs) != len(blocks_per_server):
        raise PlacementError("one throughput and one span length per server")
    for own, length in zip(server_throughputs, blocks_per_server):
        if not math.isfinite(own) or own < 0:
            raise PlacementError(f"throughput must be finite and >= 0, got {own}")
        if not 1 <= length <= num_blocks:
            raise PlacementError(f"span length {length} does not fit {num_blocks} blocks")
