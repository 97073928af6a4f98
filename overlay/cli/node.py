"""`overlay-node join`, `ping` and `id`: a node on the overlay, and tools to check one.

A joined node serves the DHT and the bandwidth test (overlay/bandwidth.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable

from overlay.bandwidth_service import BandwidthTestService, measure_link
from overlay.cli import lifeline
from overlay.cli.arguments import non_negative_seconds, positive_int, positive_seconds
from overlay.cli.dht import start_dht
from overlay.host import ConnectionLost, Host
from overlay.identity import Identity, IdentityError
from overlay.multiaddr import Multiaddr, MultiaddrError
from overlay.public_addrs import default_route_host, expand_wildcards

log = logging.getLogger("overlay.node")

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/0"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    join = sub.add_parser("join", help="run a node of the overlay (a DHT node)",
                          description="Run a node. Prints its full multiaddr as the first line "
                                      "of standard output once it listens; logs go to stderr.")
    join.add_argument("--listen", default=DEFAULT_LISTEN, metavar="MADDR",
                      help=f"address to listen on (default {DEFAULT_LISTEN})")
    join.add_argument("--bootstrap", action="append", default=[], metavar="MADDR",
                      help="a node of an existing network (repeatable); none: a new network")
    join.add_argument("--identity", metavar="PATH",
                      help="Ed25519 identity file, created when missing (default: a fresh key)")
    lifeline.add_argument(join)
    join.set_defaults(func=run_join)

    ping = sub.add_parser("ping", help="dial a node, verify its identity, print round-trip times")
    ping.add_argument("address", metavar="MADDR")
    ping.add_argument("--count", "-c", type=positive_int, default=4,
                      help="pings to send, at least 1 (default 4)")
    ping.add_argument("--interval", type=non_negative_seconds, default=0.5,
                      help="seconds between pings (default 0.5)")
    ping.add_argument("--timeout", type=positive_seconds, default=10.0,
                      help="seconds to wait for the connection and for each answer (default 10)")
    ping.add_argument("--bandwidth", action="store_true",
                      help="then measure upload and download against the node (about a "
                           "second, a few MiB; what `serve` announces as its link)")
    ping.set_defaults(func=run_ping)

    ident = sub.add_parser("id", help="print this node's peer id")
    ident.add_argument("--identity", metavar="PATH",
                       help="identity file (created when missing); without it, a fresh key")
    ident.set_defaults(func=run_id)


def load_identity(path: str | None) -> Identity:
    try:
        return Identity.load_or_create(path)
    except IdentityError as e:
        raise SystemExit(f"overlay-node: {e}") from None


def parse_addrs(texts: list[str]) -> list[Multiaddr]:
    try:
        return [Multiaddr.parse(t) for t in texts]
    except MultiaddrError as e:
        raise SystemExit(f"overlay-node: {e}") from None


def dialable(addr: Multiaddr,
             route_host: Callable[[str], str | None] = default_route_host) -> Multiaddr:
    """The address to print for others: a wildcard listen address becomes this machine's
    address on its default route (what `serve` announces), so that another machine can use it
    as `--bootstrap`; loopback where there is no such route. Either is dialable from here."""
    [shared] = expand_wildcards([addr], route_host)
    return shared


async def start_host(listen: str, identity_path: str | None) -> Host:
    """A listening host; its first address is printed on stdout (the documented first line)."""
    [listen_addr] = parse_addrs([listen])
    identity = load_identity(identity_path)
    if listen_addr.peer_id not in (None, identity.peer_id):  # (it used to be dropped unsaid)
        raise SystemExit(f"overlay-node: --listen names peer {listen_addr.peer_id}, but this "
                         f"node is {identity.peer_id} (its identity: --identity PATH)")
    host = Host(identity)
    try:
        addrs = await host.listen(listen_addr)
    except OSError as e:
        await host.close()
        reason = e.strerror or e
        raise SystemExit(f"overlay-node: cannot listen on {listen_addr}: {reason}") from None
    shared = dialable(addrs[0])
    print(shared, flush=True)
    for addr in addrs:
        log.info("listening on %s", addr)
    if shared != addrs[0]:  # a wildcard
        [local] = expand_wildcards([addrs[0]], lambda _protocol: None)
        if shared == local:
            log.warning("no default route: %s (printed on stdout) is dialable from this "
                        "machine only", shared)
        else:
            log.info("other machines dial %s (printed on stdout); this one also %s", shared,
                     local)
    return host


async def run_join(args: argparse.Namespace) -> int:
    bootstrap = parse_addrs(args.bootstrap)
    host = await start_host(args.listen, args.identity)
    BandwidthTestService().attach(host)  # servers measure their link against this node
    dht = None
    try:
        dht = await start_dht(host, [str(b) for b in bootstrap])
        log.info("node %s is up; Ctrl-C to stop", host.peer_id)
        await asyncio.Event().wait()
    finally:
        if dht is not None:
            with contextlib.suppress(Exception):
                await dht.close()
        await host.close()
    return 0


async def run_ping(args: argparse.Namespace) -> int:
    [target] = parse_addrs([args.address])
    host = Host()
    try:
        start = time.perf_counter()
        try:
            peer = await host.connect(target, timeout=args.timeout)
        except ConnectionLost as e:
            print(f"overlay-node ping: {e}", file=sys.stderr)
            return 1
        print(f"connected to {peer} in {(time.perf_counter() - start) * 1000:.2f} ms "
              "(TCP + Noise handshake, identity verified)", flush=True)
        conn = host.connection_to(peer)
        times, failures = [], 0
        for seq in range(1, args.count + 1):
            try:
                rtt = await conn.ping(timeout=args.timeout)
            except (TimeoutError, ConnectionLost) as e:
                failures += 1
                print(f"seq={seq} failed: {e or 'timeout'}", flush=True)
            else:
                times.append(rtt * 1000)
                print(f"seq={seq} time={rtt * 1000:.3f} ms", flush=True)
            if seq < args.count:
                await asyncio.sleep(args.interval)
        if times:
            print(f"{len(times)}/{args.count} answered, min/avg/max = {min(times):.3f}/"
                  f"{sum(times) / len(times):.3f}/{max(times):.3f} ms")
        if args.bandwidth:
            measured, errors = await measure_link(host, [peer])
            if measured is None:
                print(f"bandwidth not measured: {'; '.join(errors)}", flush=True)
                return 1
            print(f"bandwidth: {measured.upload_bps / 1e6:.1f} Mbit/s up, "
                  f"{measured.download_bps / 1e6:.1f} Mbit/s down "
                  f"({measured.total_bytes / (1 << 20):.1f} MiB in {measured.seconds:.2f} s)",
                  flush=True)
        return 0 if not failures else 1
    finally:
        await host.close()


async def run_id(args: argparse.Namespace) -> int:
    identity = load_identity(args.identity)
    print(identity.peer_id)
    return 0
