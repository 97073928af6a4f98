"""`overlay-node dht put|get`: one-shot DHT clients, and the DHT of `overlay-node join`.

A one-shot client dials the bootstrap nodes, joins as a client (it never enters routing
tables: it will be gone in a second), does its one operation and exits:
- `dht put KEY VALUE --bootstrap MADDR [--ttl SECONDS]` exits 0 once at least one node
  holds the value, 1 otherwise, 2 for a record no node would accept (sizes, --ttl);
- `dht get KEY --bootstrap MADDR` prints the value as the last line of standard output
  (text as is, anything else as JSON) and exits 0, or exits 1 when the key is not found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

import msgpack

from overlay.cli.arguments import positive_seconds
from overlay.dht.config import StoreLimits
from overlay.dht.driver import DHT, DHTError, encode_key
from overlay.dht.records import Record, RecordError, SignatureVerifier, check_record
from overlay.host import Host

log = logging.getLogger("overlay.cli.dht")

DEFAULT_TTL = 3600.0
# What the nodes accept (a one-shot client uses the default limits, as nodes do).
LIMITS = StoreLimits()
BAD_ARGUMENT = 2  # argparse's exit status for the same kind of mistake


async def start_dht(host: Host, bootstrap: list[str]) -> DHT:
    """The serving DHT node of `overlay-node join` (no bootstrap: a new network)."""
    try:
        return await DHT.start(host, bootstrap)
    except DHTError as e:
        raise SystemExit(f"overlay-node: {e}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    dht = sub.add_parser("dht", help="store or read a value in the DHT",
                         description="One-shot DHT client commands.")
    actions = dht.add_subparsers(dest="dht_command", metavar="ACTION", required=True)

    put = actions.add_parser("put", help="store KEY = VALUE on the nodes closest to KEY")
    put.add_argument("key", help=f"1 to {LIMITS.max_key_bytes} bytes (UTF-8)")
    put.add_argument("value", help=f"text, at most {LIMITS.max_value_bytes} bytes once "
                                   "msgpack-encoded (its UTF-8 length plus up to 5)")
    put.add_argument("--ttl", type=_ttl, default=DEFAULT_TTL, metavar="SECONDS",
                     help=f"seconds before the value expires, more than 0 and at most "
                          f"{LIMITS.max_ttl:g} (default {DEFAULT_TTL:g})")
    _common(put)
    put.set_defaults(func=run_put)

    get = actions.add_parser("get", help="print the value of KEY (exit 1 when not found)")
    get.add_argument("key")
    _common(get)
    get.set_defaults(func=run_get)


def _ttl(text: str) -> float:
    """A --ttl the nodes accept, refused while parsing rather than after dialing."""
    try:
        ttl = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < ttl <= LIMITS.max_ttl:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {LIMITS.max_ttl:g} seconds, got {text}"
        )
    return ttl


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", action="append", required=True, metavar="MADDR",
                        help="a node of the network (repeatable)")
    parser.add_argument("--timeout", type=positive_seconds, default=30.0,
                        help="give up after this many seconds (default 30)")


async def _client(args: argparse.Namespace, deadline: float) -> tuple[Host, DHT]:
    """Join as a client by `deadline` (loop time): --timeout covers dialing the bootstrap
    peers too, which alone could otherwise take the dial timeout (10 s) per attempt."""
    host = Host()
    try:
        async with asyncio.timeout_at(deadline):
            dht = await DHT.start(host, args.bootstrap, serve=False)
    except DHTError as e:
        await host.close()
        raise SystemExit(f"overlay-node dht: {e}") from None
    except TimeoutError:
        await host.close()
        raise SystemExit(f"overlay-node dht {args.dht_command}: no answer within "
                         f"{args.timeout:g} s") from None
    return host, dht


def _deadline(args: argparse.Namespace) -> float:
    return asyncio.get_running_loop().time() + args.timeout


async def run_put(args: argparse.Namespace) -> int:
    expiration = time.time() + args.ttl
    try:  # the checks every node makes, so a refused record fails before dialing
        check_record(
            Record(encode_key(args.key), None, msgpack.packb(args.value, use_bin_type=True),
                   expiration),
            time.time(), LIMITS, SignatureVerifier(),
        )
    except RecordError as e:
        return _refused(e)
    except UnicodeEncodeError:  # bytes of another encoding in argv
        return _refused("key and value must be UTF-8 text")
    deadline = _deadline(args)
    host, dht = await _client(args, deadline)
    try:
        async with asyncio.timeout_at(deadline):
            stored = await dht.store_many(
                [(args.key, args.value, expiration, None)], republish=False
            )
    except TimeoutError:
        print(f"overlay-node dht put: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    except RecordError as e:  # e.g. a short --ttl that ran out while dialing
        return _refused(e)
    finally:
        await dht.close()
        await host.close()
    replicas = stored[0]
    print(f"stored {args.key!r} on {replicas} node{'s' if replicas != 1 else ''}", flush=True)
    return 0 if replicas > 0 else 1


def _refused(reason: RecordError | str) -> int:
    print(f"overlay-node dht put: {reason}", file=sys.stderr)
    return BAD_ARGUMENT


async def run_get(args: argparse.Namespace) -> int:
    try:
        key = encode_key(args.key)
    except UnicodeEncodeError:  # bytes of another encoding in argv
        print("overlay-node dht get: the key must be UTF-8 text", file=sys.stderr)
        return BAD_ARGUMENT
    if not 0 < len(key) <= LIMITS.max_key_bytes:
        print(f"overlay-node dht get: a key has 1 to {LIMITS.max_key_bytes} bytes, not "
              f"{len(key)}", file=sys.stderr)
        return BAD_ARGUMENT
    deadline = _deadline(args)
    host, dht = await _client(args, deadline)
    try:
        async with asyncio.timeout_at(deadline):
            value = await dht.get(args.key)
    except TimeoutError:
        print(f"overlay-node dht get: no answer within {args.timeout:g} s", file=sys.stderr)
        return 1
    finally:
        await dht.close()
        await host.close()
    if value is None:
        print(f"overlay-node dht get: {args.key!r} not found", file=sys.stderr)
        return 1
    if isinstance(value, str):
        print(value, flush=True)
        return 0
    try:
        text = json.dumps(_as_json(value), default=repr)
    except RecursionError:
        print(f"overlay-node dht get: the value of {args.key!r} is nested too deeply to print "
              f"as JSON", file=sys.stderr)
        return 1
    print(text, flush=True)
    return 0


def _as_json(value: object) -> object:
    """`value` with map keys JSON cannot hold (bytes, tuples: any msgpack client may have
    stored them) as their repr, like bytes values (`default=repr`)."""
    if isinstance(value, dict):
        return {k if isinstance(k, str | int | float | bool) or k is None else repr(k):
                _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    return value
