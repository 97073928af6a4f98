"""What `overlay-node serve` adds for issue 6: its placement and throughput options, choosing
the span from the DHT when no `--blocks` is given, and starting the rebalancing loop.

Kept apart from blocks/cli.py so that the serve command's body stays a short sequence of
calls: `add_arguments`, `link_bps`, `resolve_rates`, `choose_span`, `start_balancer`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
from collections.abc import Callable

from blocks.announcement import ServerState
from blocks.placement import BALANCE_QUALITY, MEAN_BALANCE_CHECK_PERIOD, MEAN_BLOCK_SELECTION_DELAY
from blocks.rebalancing import HANDOVER_GRACE, BalanceConfig, SpanPlanner, placement_infos
from blocks.swarm_reader import DICTIONARY_QUORUM, read_view
from overlay.cli.arguments import number

log = logging.getLogger("blocks.serve")


def add_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--throughput", default="auto", type=_throughput, metavar="auto|eval|X",
                       help="tokens/s to announce: auto (measure one block once and cache it, "
                            "the default), eval (measure again, refresh the cache) or a number")
    serve.add_argument("--network-mbps", type=positive, metavar="MBPS",
                       help="the link's speed, capping the announced throughput (default: "
                            "measured at start against a known peer, about a second; 100 when "
                            "no peer answers; not measured with --throughput X)")
    serve.add_argument("--balance-period", type=positive, default=MEAN_BALANCE_CHECK_PERIOD,
                       metavar="SECONDS",
                       help="mean seconds between rebalancing checks, each after "
                            "uniform(0, 2x) (default %(default)g, as in Petals); only without "
                            "--blocks")
    serve.add_argument("--balance-quality", type=_non_negative, default=BALANCE_QUALITY,
                       help="move when the swarm's bottleneck is below this share of what "
                            "moving would give (default %(default)g, as in Petals; 0 never "
                            "moves, above 1 moves at every check)")
    serve.add_argument("--block-selection-delay", type=_non_negative,
                       default=MEAN_BLOCK_SELECTION_DELAY, metavar="SECONDS",
                       help="mean random wait before choosing blocks, uniform(0, 2x), so that "
                            "servers started together spread out (default %(default)g)")
    serve.add_argument("--handover-grace", type=_non_negative, default=HANDOVER_GRACE,
                       metavar="SECONDS",
                       help="after a move, how long sessions open on the old span may run on "
                            "(both spans stay in memory meanwhile; default %(default)g)")


def balance_config(args: argparse.Namespace) -> BalanceConfig:
    return BalanceConfig(mean_balance_period=args.balance_period,
                         balance_quality=args.balance_quality,
                         mean_selection_delay=args.block_selection_delay,
                         handover_grace=args.handover_grace)


async def start_server_dht(host, bootstrap: list[str]):
    """The server's DHT node; its reads merge every replica (blocks/swarm_reader.py)."""
    from overlay.dht.config import DHTConfig
    from overlay.dht.driver import DHT, DHTError

    try:
        return await DHT.start(host, bootstrap, DHTConfig(value_quorum=DICTIONARY_QUORUM))
    except DHTError as e:
        raise SystemExit(f"overlay-node: {e}") from None


async def link_bps(args: argparse.Namespace, host, bootstrap) -> tuple[float, str]:
    """The link's speed in bits/s and how it was found: `--network-mbps` as given; else
    measured against the peers we know (the bootstrap peers first, then the other DHT
    contacts), the slower of upload and download (overlay/bandwidth.py); else, when no peer
    answers or `--throughput X` makes the figure moot, `DEFAULT_NETWORK_BPS`.

    Not cached: the figure depends on the peer tested against and on the traffic of the
    moment, a stale one misleads placement for as long as it is announced, and a fresh one
    costs about a second (compute, which depends only on the hardware, is cached)."""
    from blocks.throughput import DEFAULT_NETWORK_BPS
    from overlay.bandwidth_service import measure_link

    if args.network_mbps:
        return args.network_mbps * 1e6, "given"
    if isinstance(args.throughput, float):
        return DEFAULT_NETWORK_BPS, "assumed"
    first = [b.peer_id for b in bootstrap if b.peer_id is not None]
    try:
        measured, failures = await measure_link(host, first + host.connected_peers)
    except Exception as e:  # a bug in the test must not keep the server from starting
        log.warning("network speed test failed (%r); assuming %.0f Mbit/s", e,
                    DEFAULT_NETWORK_BPS / 1e6, exc_info=True)
        return DEFAULT_NETWORK_BPS, "assumed"
    if measured is None:
        log.warning("network speed not measured (%s); assuming %.0f Mbit/s",
                    "; ".join(failures) or "no peer known", DEFAULT_NETWORK_BPS / 1e6)
        return DEFAULT_NETWORK_BPS, "assumed"
    log.info("network measured against %s: %.0f Mbit/s up, %.0f Mbit/s down (%.1f MiB in "
             "%.2f s, round trip %.2f ms): %.0f Mbit/s", measured.peer[-8:],
             measured.upload_bps / 1e6, measured.download_bps / 1e6,
             measured.total_bytes / (1 << 20), measured.seconds, measured.rtt * 1e3,
             measured.bps / 1e6)
    return measured.bps, "measured"


def resolve_rates(args: argparse.Namespace, model_id: str, device, dtype, hidden_size: int,
                  load_block: Callable[[], object], bps: float, bps_source: str = "assumed"):
    """The server's ComputeRates: `--throughput X` as given, else the cached measurement of
    one block (`load_block()` gives a span whose first block is timed; called only when the
    cache has no figure); the network cap from `bps` (`link_bps`). Runs torch work: call it
    on a worker thread."""
    from blocks.throughput import ComputeRates, cache_key, cached_rates, measure, network_rps

    network = network_rps(hidden_size, bps)
    if isinstance(args.throughput, float):
        return ComputeRates(None, None, network, override=args.throughput)
    key = cache_key(model_id, device, dtype, getattr(args, "quant", None) or "none")
    rates, measured = cached_rates(key, lambda: measure(load_block()),
                                   force=args.throughput == "eval")
    log.info("compute (%s): %.0f tokens/s per block in single-token steps, %.0f in forward "
             "passes; network %s %.0f Mbit/s (%.0f tokens/s)",
             "measured" if measured else "cached", rates.inference_rps, rates.forward_rps,
             bps_source, bps / 1e6, network)
    return ComputeRates(rates.inference_rps, rates.forward_rps, network)


async def choose_span(args: argparse.Namespace, planner: SpanPlanner, dht, host, model_id: str,
                      total: int, rates, dtype_name: str) -> tuple[int, int]:
    """Wait the random selection delay, read the swarm, take the best window (rule 1 of
    blocks/rebalancing.py) and announce it JOINING at once, before loading."""
    from blocks.announcer import server_info, store_records

    loop = asyncio.get_running_loop()
    delay = planner.selection_time(loop.time()) - loop.time()
    log.info("choosing %d blocks in %.1f s", planner.span_length, delay)
    await asyncio.sleep(delay)
    view = await read_view(dht, model_id, total)
    start, end = planner.choose(placement_infos(view))
    log.info("chose blocks [%d, %d) (throughput per block now: %s)", start, end,
             _throughputs(view, total))
    info = server_info(host, rates, ServerState.JOINING, start, end, args.cache_tokens,
                       dtype_name, max_request_tokens=args.max_request_tokens,
                       max_backward_tokens=args.max_backward_tokens)
    await store_records(dht, host, model_id, total, dict.fromkeys(range(start, end), info),
                        ServerState.JOINING, args.announce_period)
    return start, end


async def withdraw_span(args: argparse.Namespace, dht, host, model_id: str, total: int,
                        span: tuple[int, int], rates, dtype_name: str) -> None:
    """The chosen span could not be loaded: replace its JOINING records by OFFLINE ones, so
    that no other server counts on us there."""
    from blocks.announcer import server_info, store_records

    info = server_info(host, rates, ServerState.OFFLINE, *span, 0, dtype_name)
    try:
        await asyncio.wait_for(store_records(dht, host, model_id, total,
                                             dict.fromkeys(range(*span), info),
                                             ServerState.OFFLINE, args.announce_period), 5)
    except Exception as e:  # the records expire after two periods anyway
        log.warning("could not withdraw the announcement of blocks [%d, %d): %s", *span, e)


def make_planner(args: argparse.Namespace, peer_id: str, total: int, count: int) -> SpanPlanner:
    return SpanPlanner(peer_id, total, count, balance_config(args), random.SystemRandom())


def start_balancer(planner: SpanPlanner, dht, announcer, server, load_span, total: int
                   ) -> asyncio.Task:
    from blocks.balancer import Balancer

    balancer = Balancer(planner, dht, announcer, server, load_span, total)
    return asyncio.get_running_loop().create_task(balancer.run())


def _throughputs(view, total: int) -> str:
    from blocks.placement import block_throughputs

    values = block_throughputs(placement_infos(view), total)
    return " ".join(f"{v:.0f}" for v in values)


def _throughput(text: str) -> str | float:
    if text in ("auto", "eval"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, eval or a number, got {text!r}"
                                         ) from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"throughput must be a finite number >= 0, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = number(text)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    value = number(text)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    if value == 0:
        raise argparse.ArgumentTypeError("expected a finite number > 0, got 0")
    return value
