"""The asyncio runtime of the DHT: runs a `DHTNode` core on a `Host`.

All decisions are the core's; this module only moves bytes and time (the counterpart of
aioquic's asyncio/protocol.py):
- incoming "dht" RPCs are decoded, answered by `DHTNode.handle_request` and encoded back;
- every `SendRequest` effect becomes a `host.call`; the decoded answer goes back through
  `on_response`, and any error (timeout, lost connection, remote error, undecodable answer)
  through `on_failure`, logged;
- one timer, re-armed after every input at the core's `next_deadline()`.

The core's clock is wall-clock time (`time.time()`), not `loop.time()`: record expirations
are absolute and travel between machines, so they must be read on a clock that all nodes
share. Timers are scheduled as delays from it on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack

from overlay.dht.config import DHTConfig
from overlay.dht.contact import Contact
from overlay.dht.effects import (
    BootstrapResult,
    FindResult,
    GetResult,
    OperationDone,
    SendRequest,
    StoreResult,
)
from overlay.dht.ids import key_id_of
from overlay.dht.messages import (
    MAX_MESSAGE_BYTES,
    RPC_METHOD,
    MessageError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from overlay.dht.node import DHTNode, DHTProtocolError
from overlay.dht.records import Record
from overlay.host import ConnectionLost, Host, RemoteError, RpcContext, RpcTimeout
from overlay.identity import PeerId
from overlay.multiaddr import Multiaddr, MultiaddrError

log = logging.getLogger("overlay.dht")

_WILDCARD_HOSTS = ("0.0.0.0", "::")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_MAX_REMEMBERED_ADDRS = 4096
# An answer past a DHT message and its RPC envelope fails the call as it arrives (it was
# held whole, up to the connection's 256 MiB message limit, before the decoder refused it).
_MAX_ANSWER_BYTES = MAX_MESSAGE_BYTES + 4096


class DHTError(RuntimeError):
    """The DHT could not do what was asked (no bootstrap peer reachable, closed, ...)."""


def encode_key(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def records_to_value(records: list[Record]) -> Any:
    """A plain value, or {subkey: value} for a dictionary; None when nothing was found."""
    if not records:
        return None
    if len(records) == 1 and records[0].subkey is None:
        return msgpack.unpackb(records[0].value, raw=False, strict_map_key=False)
    return {
        r.subkey: msgpack.unpackb(r.value, raw=False, strict_map_key=False) for r in records
    }


class DHT:
    """A DHT node (or, with serve=False, a client) on a Host. Create it with `DHT.start`."""

    def __init__(self, host: Host, node: DHTNode):
        self.host = host
        self.node = node
        self._loop = asyncio.get_running_loop()
        self._waiters: dict[int, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline: float | None = None
        self._known_addrs: dict[PeerId, tuple[str, ...]] = {}
        self._closed = False
        self.rpcs_sent = 0

    @classmethod
    async def start(
        cls,
        host: Host,
        bootstrap: Iterable[str | Multiaddr] = (),
        config: DHTConfig | None = None,
        *,
        serve: bool = True,
        bootstrap_timeout: float = 10.0,
    ) -> DHT:
        """Join the network through `bootstrap` (none: start a new network).

        A serving node must already listen: its addresses are announced to peers. Raises
        DHTError when bootstrap peers were given and none of them could be reached.
        """
        if serve and not host.addrs:
            raise DHTError("a serving DHT node must listen first (its addresses are announced)")
        node = DHTNode(
            host.peer_id,
            config,
            rng=random.SystemRandom(),
            now=time.time(),
            serves=serve,
            addrs=[str(a) for a in host.addrs] if serve else (),
            sign=host.identity.sign,
        )
        dht = cls(host, node)
        if serve:
            # No DHT message is larger: a larger request is refused before it is read.
            host.add_handler(RPC_METHOD, dht._handle, max_request=MAX_MESSAGE_BYTES)
        seeds = await dht._dial_bootstrap(list(bootstrap), bootstrap_timeout)
        if bootstrap and not seeds:
            await dht.close()
            raise DHTError("none of the bootstrap peers could be reached")
        if seeds:
            result = await dht._run(lambda now: node.bootstrap(seeds, now))
            assert isinstance(result, BootstrapResult)
            if not result.reached:
                await dht.close()
                raise DHTError("no bootstrap peer answered DHT requests")
            log.log(logging.INFO if serve else logging.DEBUG,
                    "joined the DHT: %d peers in the routing table", result.table_size)
        return dht

    async def _dial_bootstrap(
        self, addrs: list[str | Multiaddr], timeout: float
    ) -> list[Contact]:
        async def dial(addr: str | Multiaddr) -> Contact | None:
            try:
                maddr = Multiaddr.parse(addr)
                peer = await self.host.connect(maddr, timeout=timeout)
            except (MultiaddrError, ConnectionLost, OSError) as e:
                log.warning("bootstrap peer %s unreachable: %s", addr, e)
                return None
            return Contact(peer, (str(maddr.with_peer(peer)),))

        found = await asyncio.gather(*(dial(a) for a in addrs))
        return [c for c in found if c is not None and c.peer != self.host.peer_id]

    # -- the public API ------------------------------------------------------------------

    async def store(
        self,
        key: str | bytes,
        value: Any,
        expiration: float,
        subkey: str | None = None,
        *,
        republish: bool = True,
    ) -> bool:
        """Store `value` (msgpack-encodable) until `expiration` (wall-clock seconds).

        True once at least one node holds it. A subkey equal to our peer id is signed.
        """
        [replicas] = await self.store_many([(key, value, expiration, subkey)],
                                           republish=republish)
        return replicas > 0

    async def store_many(
        self,
        items: Sequence[tuple[str | bytes, Any, float, str | None]],
        *,
        republish: bool = True,
    ) -> list[int]:
        """Store several (key, value, expiration, subkey) at once, batching per peer;
        returns how many nodes hold each."""
        records = [
            self.node.make_record(
                encode_key(key), msgpack.packb(value, use_bin_type=True), expiration, subkey
            )
            for key, value, expiration, subkey in items
        ]
        result = await self._run(
            lambda now: self.node.store(records, now, republish=republish)
        )
        assert isinstance(result, StoreResult)
        return result.replicas

    async def get(self, key: str | bytes) -> Any:
        """The value of `key`, {subkey: value} for a dictionary, or None when not found."""
        key = encode_key(key)
        result = await self.get_records([key])
        return records_to_value(result.records[key])

    async def get_records(self, keys: Sequence[str | bytes]) -> GetResult:
        """Verified records of several keys in one operation, with its cost (stats)."""
        encoded = [encode_key(k) for k in keys]
        result = await self._run(lambda now: self.node.get(encoded, now))
        assert isinstance(result, GetResult)
        return result

    async def find_closest(self, key: str | bytes) -> list[PeerId]:
        """The k nodes closest to `key` that answered, nearest first."""
        target = key_id_of(encode_key(key))
        result = await self._run(lambda now: self.node.find_closest([target], now))
        assert isinstance(result, FindResult)
        return [c.peer for c in result.closest[target]]

    async def close(self) -> None:
        """Stop serving and timers; pending operations fail with DHTError."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(DHTError("the DHT was closed"))
        self._waiters.clear()

    # -- driving the core ----------------------------------------------------------------

    async def _run(self, start: Callable[[float], int]) -> Any:
        if self._closed:
            raise DHTError("the DHT is closed")
        op_id = start(time.time())
        waiter = self._loop.create_future()
        self._waiters[op_id] = waiter
        self._after_input()
        return await waiter

    def _after_input(self) -> None:
        """Carry out the core's effects, then re-arm the timer at its next deadline."""
        if self._closed:
            return
        for effect in self.node.take_effects():
            if isinstance(effect, SendRequest):
                task = self._loop.create_task(self._call(effect))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            elif isinstance(effect, OperationDone):
                waiter = self._waiters.pop(effect.op_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(effect.result)
        deadline = self.node.next_deadline()
        if deadline != self._timer_deadline:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._timer_deadline = deadline
            if deadline is not None:
                delay = max(0.0, deadline - time.time())
                self._timer = self._loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_deadline = None
        self.node.handle_timer(time.time())
        self._after_input()

    def _remember_addrs(self, contact: Contact) -> None:
        """Give the host the contact's addresses (once per change: parsing is not free)."""
        peer = contact.peer
        if not contact.addrs or self._known_addrs.get(peer) == contact.addrs:
            return
        known = self._known_addrs
        known.pop(peer, None)
        if len(known) >= _MAX_REMEMBERED_ADDRS:
            del known[next(iter(known))]
        known[peer] = contact.addrs
        parsed = []
        for text in contact.addrs:
            try:
                parsed.append(Multiaddr.parse(text))
            except MultiaddrError as e:
                log.debug("ignoring address %r of %s: %s", text, peer.short(), e)
        if parsed:
            self.host.add_peer_addrs(peer, parsed)

    async def _call(self, effect: SendRequest) -> None:
        contact = effect.contact
        self._remember_addrs(contact)
        self.rpcs_sent += 1
        try:
            data = await self.host.call(
                contact.peer, RPC_METHOD, encode_request(effect.request), timeout=effect.timeout,
                max_answer=_MAX_ANSWER_BYTES)
            response = decode_response(data, effect.request)
        except (RpcTimeout, ConnectionLost, RemoteError, OSError) as e:
            log.debug("dht request to %s failed: %s", contact.peer.short(), e)
            self.node.on_failure(effect.req_id, time.time())
        except MessageError as e:
            # Peers send malformed answers and requests at will: these lines share the core's
            # limiter with the lines it limits itself, on the clock the core is given.
            now = time.time()
            self.node.peer_log.log_at(now, logging.WARNING, "bad dht answers",
                                      "bad dht answer from %s: %s", contact.peer.short(), e)
            self.node.on_failure(effect.req_id, now)
        else:
            self.node.on_response(effect.req_id, response, time.time())
        self._after_input()

    async def _handle(self, ctx: RpcContext, payload: bytes) -> bytes:
        if self._closed:
            raise RemoteError("unavailable", "this DHT node is shutting down")
        try:
            request = decode_request(payload)
        except MessageError as e:
            self.node.peer_log.log_at(time.time(), logging.INFO, "bad dht requests",
                                      "bad dht request from %s: %s", ctx.peer.short(), e)
            raise RemoteError("bad_request", str(e)) from None
        if request.serves and request.addrs:
            addrs = _dialable(request.addrs, ctx)
            if addrs != request.addrs:
                request = dataclasses.replace(request, addrs=addrs)
        try:
            response = self.node.handle_request(ctx.peer, request, time.time())
        except DHTProtocolError as e:
            raise RemoteError("bad_request", str(e)) from None
        finally:
            self._after_input()
        return encode_response(response)


def _dialable(addrs: tuple[str, ...], ctx: RpcContext) -> tuple[str, ...]:
    """The sender's announced addresses that others could dial, wildcards replaced by the
    observed one. The core hands its contacts' addresses to every peer that looks them up:
    without this, one peer made an honest node spread text that is no multiaddr, port 0,
    multicast or broadcast hosts, or a /p2p suffix naming another peer. Each is kept once:
    wildcards of both families (a dual-stack listener) become the same observed address."""
    if any(_is_wildcard(a) for a in addrs):
        addrs = _observed(addrs, ctx)
    out = []
    for text in addrs:
        if text in out:
            continue
        try:
            maddr = Multiaddr.parse(text)
        except MultiaddrError:
            continue
        if maddr.port == 0 or maddr.peer_id not in (None, ctx.peer):
            continue
        if maddr.protocol in ("ip4", "ip6"):
            ip = ipaddress.ip_address(maddr.host)
            if ip.is_multicast or ip.is_unspecified or ip == _BROADCAST:
                continue
        out.append(text)
    return tuple(out)


def _is_wildcard(text: str) -> bool:
    parts = text.split("/")
    return len(parts) > 2 and parts[2] in _WILDCARD_HOSTS


def _observed(addrs: tuple[str, ...], ctx: RpcContext) -> tuple[str, ...]:
    """Replace wildcard listen hosts (0.0.0.0, ::) by the address the request came from, when
    it is of the wildcard's family; a wildcard of the other family is dropped (its host is
    unknown here). A listener on :: is not one on 0.0.0.0: asyncio binds it IPv6-only, so the
    sender's IPv4 address with that port named a socket nobody listens on."""
    remote = getattr(ctx.connection, "remote_address", None)
    seen = None
    if remote:
        with contextlib.suppress(ValueError):
            seen = ipaddress.ip_address(remote[0])
            if seen.version == 6 and seen.ipv4_mapped is not None:  # a dual-stack socket's
                seen = seen.ipv4_mapped
    out = []
    for text in addrs:
        if not _is_wildcard(text):
            out.append(text)
            continue
        if seen is None:
            continue
        with contextlib.suppress(MultiaddrError, ValueError):
            maddr = Multiaddr.parse(text)
            if maddr.protocol == f"ip{seen.version}":
                out.append(str(Multiaddr.from_socket_address(str(seen), maddr.port,
                                                             maddr.peer_id)))
    return tuple(out)
