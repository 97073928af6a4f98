"""Keeps a block server's announcement in the DHT (DESIGN.md, "What is announced").

For every block of its span the server stores, under key `{model_id}.{block}`, a subkey equal
to its peer id whose value is its `ServerInfo`; the DHT signs such records with the server's
identity. The record expires after 2 x the period and is refreshed every period, so a server
that dies silently vanishes from routing within two periods; a clean exit announces OFFLINE.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from blocks.announcement import (
    ANNOUNCE_PERIOD,
    PROTOCOL_VERSION,
    ServerInfo,
    ServerState,
    block_keys,
)
from blocks.throughput import ComputeRates

log = logging.getLogger(__name__)


# A DHT cannot list its keys: servers also register their model under this key (subkey = their
# peer id, so the record is signed), which is how `overlay-node status` finds the models.
MODELS_KEY = "overlay-node.models"


class Announcer:
    def __init__(self, dht, host, server, rates: ComputeRates, num_blocks: int,
                 period: float = ANNOUNCE_PERIOD, public_addrs: list[str] | None = None):
        self.num_blocks = num_blocks  # of the whole model
        self.dht = dht
        self.host = host
        self.server = server
        self.rates = rates
        self.period = period
        self.public_addrs = public_addrs
        self._task: asyncio.Task | None = None

    def info(self, state: ServerState) -> ServerInfo:
        server = self.server
        start, end = server.served
        addrs = self.public_addrs or [str(a) for a in self.host.addrs]
        return ServerInfo(
            state=state,
            start=start,
            end=end,
            throughput=self.rates.throughput(end - start),
            inference_rps=self.rates.inference_rps,
            forward_rps=self.rates.forward_rps,
            cache_tokens_left=server.cache_tokens_free,
            dtype=str(server.span.dtype).removeprefix("torch."),
            addrs=tuple(addrs),
            version=PROTOCOL_VERSION,
        )

    async def announce(self, state: ServerState) -> int:
        """Store the record for every block; returns how many blocks were stored somewhere."""
        info = self.info(state)
        value = info.to_wire()
        expiration = time.time() + 2 * self.period
        model_id = self.server.config.model_id
        keys = block_keys(model_id, info.start, info.end)
        subkey = str(self.host.peer_id)
        registry = {"model": model_id, "num_blocks": self.num_blocks, "state": int(state)}
        # No republishing by the DHT: this announcer refreshes the records itself, and a
        # republished copy would outlive the state it describes.
        replicas = await self.dht.store_many(
            [(key, value, expiration, subkey) for key in keys]
            + [(MODELS_KEY, registry, expiration, subkey)],
            republish=False,
        )
        stored = sum(1 for r in replicas[:-1] if r > 0)
        if stored < len(keys):
            log.warning("announced %d of %d blocks as %s", stored, len(keys), state.name)
        return stored

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
        await self.announce(ServerState.OFFLINE)
