"""Keeps a block server's announcement in the DHT (docs/block_protocol.md, "Finding servers").

For every block of its span the server stores, under key `{model_id}.{block}`, a subkey equal
to its peer id whose value is its `ServerInfo`; the DHT signs such records with the server's
identity. The record expires after 2 x the period and is refreshed every period, so a server
that dies silently vanishes from routing within two periods; a clean exit announces OFFLINE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from blocks.announcement import (
    ANNOUNCE_PERIOD,
    MODELS_KEY,
    PROTOCOL_VERSION,
    ServerInfo,
    ServerState,
    block_keys,
)
from blocks.protocol import DEFAULT_MAX_BACKWARD_TOKENS, DEFAULT_MAX_REQUEST_TOKENS
from blocks.throughput import ComputeRates

log = logging.getLogger(__name__)




class Announcer:
    """Announces the server's span, refreshed every period; while the server moves
    (blocks/balancer.py) it also announces the span being loaded (`joining`, JOINING) or the
    span being left (`leaving`, OFFLINE outside the new one) - per block, the latest wins."""

    def __init__(self, dht, host, server, rates: ComputeRates, num_blocks: int,
                 period: float = ANNOUNCE_PERIOD):
        self.num_blocks = num_blocks  # of the whole model
        self.dht = dht
        self.host = host
        self.server = server
        self.rates = rates
        self.period = period
        self.joining: tuple[int, int] | None = None
        self.leaving: tuple[int, int] | None = None
        self.next_pings = None  # () -> {peer id: RTT seconds} (blocks/next_hop_pinger.py)
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one announcement at a time: the latest state wins

    def info(self, state: ServerState, span: tuple[int, int] | None = None) -> ServerInfo:
        server = self.server
        served = server.served
        start, end = span or served
        cache_free = (server.cache_tokens_free if (start, end) == served
                      else server.config.cache_tokens)
        info = server_info(self.host, self.rates, state, start, end,
                           cache_free, str(server.span.dtype).removeprefix("torch."),
                           None if server.span.quant == "none" else server.span.quant,
                           server.tuning.adapter_names, server.config.max_request_tokens,
                           server.config.max_backward_tokens)
        if self.next_pings is not None and state == ServerState.ONLINE and (start, end) == served:
            info = dataclasses.replace(info, next_pings=self.next_pings())
        return info

    def records(self, state: ServerState) -> dict[int, ServerInfo]:
        """Block -> the record to store now: the left span OFFLINE, the served span in
        `state`, the span being loaded JOINING (later ones overwrite earlier ones)."""
        out: dict[int, ServerInfo] = {}
        for span, span_state in ((self.leaving, ServerState.OFFLINE),
                                 (self.server.served, state),
                                 (self.joining, ServerState.JOINING)):
            if span is not None:
                info = self.info(span_state, span)
                out.update(dict.fromkeys(range(*span), info))
        return out

    async def announce(self, state: ServerState) -> int:
        """Store the records of every block; returns how many blocks of the served span were
        stored somewhere."""
        async with self._lock:
            records = self.records(state)
            stored = await store_records(self.dht, self.host, self.server.config.model_id,
                                         self.num_blocks, records, state, self.period)
        start, end = self.server.served
        held = sum(1 for block in range(start, end) if block in stored)
        if held < end - start:
            log.warning("announced %d of %d blocks as %s", held, end - start, state.name)
        return held

    async def withdraw_joining(self) -> None:
        """A move given up: its JOINING records become OFFLINE (where not served)."""
        self.leaving, self.joining = self.joining, None
        try:
            await self.announce(ServerState.ONLINE)
        finally:
            self.leaving = None

    async def start(self) -> None:
        await self.announce(ServerState.JOINING)
        await self.announce(ServerState.ONLINE)
        self._task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            try:
                await self.announce(ServerState.ONLINE)
            except Exception:  # a DHT hiccup must not stop the server
                log.exception("announcement failed; retrying next period")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.leaving = self.leaving if self.joining is None else self.joining
        self.joining = None
        await self.announce(ServerState.OFFLINE)


def server_info(host, rates: ComputeRates, state: ServerState, start: int, end: int,
                cache_tokens_left: int, dtype: str, quant: str | None = None,
                adapters: tuple[str, ...] = (),
                max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS,
                max_backward_tokens: int = DEFAULT_MAX_BACKWARD_TOKENS) -> ServerInfo:
    """The record a server on `host` announces for blocks [start, end), with the addresses
    the host gives out (never a wildcard: Host.public_addrs)."""
    addrs = [str(a) for a in host.public_addrs]
    return ServerInfo(
        state=state,
        start=start,
        end=end,
        throughput=rates.throughput(end - start),
        inference_rps=rates.inference_rps,
        forward_rps=rates.forward_rps,
        network_rps=rates.network_rps,
        cache_tokens_left=cache_tokens_left,
        dtype=dtype,
        quant=quant,
        adapters=adapters,
        addrs=tuple(addrs),
        version=PROTOCOL_VERSION,
        max_request_tokens=max_request_tokens,
        max_backward_tokens=max_backward_tokens,
    )


async def store_records(dht, host, model_id: str, num_blocks: int,
                        records: dict[int, ServerInfo], state: ServerState, period: float
                        ) -> set[int]:
    """Store `records` (block -> info) under the blocks' keys, signed, expiring after two
    periods, and register the model; returns the blocks stored on at least one node."""
    expiration = time.time() + 2 * period
    subkey = str(host.peer_id)
    blocks = sorted(records)
    registry = {"model": model_id, "num_blocks": num_blocks, "state": int(state)}
    # No republishing by the DHT: the announcer refreshes the records itself, and a
    # republished copy would outlive the state it describes.
    replicas = await dht.store_many(
        [(block_keys(model_id, block, block + 1)[0], records[block].to_wire(), expiration,
          subkey) for block in blocks]
        + [(MODELS_KEY, registry, expiration, subkey)],
        republish=False,
    )
    return {block for block, r in zip(blocks, replicas[:-1]) if r > 0}
