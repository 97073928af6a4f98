"""What `overlay-node status` reports: every announced model, its servers and its coverage."""

from __future__ import annotations

from blocks.announcement import MODELS_KEY, ServerState
from client.swarm import SwarmClient

MAX_BLOCKS = 4096  # a registry entry claiming more blocks than this is ignored


async def read_status(client: SwarmClient) -> dict:
    registry = await client.dht.get(MODELS_KEY) or {}
    models: dict[str, int] = {}
    if isinstance(registry, dict):
        for entry in registry.values():
            if not isinstance(entry, dict):
                continue
            model_id, num_blocks = entry.get("model"), entry.get("num_blocks")
            if isinstance(model_id, str) and isinstance(num_blocks, int) \
                    and 0 < num_blocks <= MAX_BLOCKS:
                models[model_id] = max(models.get(model_id, 0), num_blocks)
    out = []
    for model_id, num_blocks in sorted(models.items()):
        view = await client.view(model_id, num_blocks)
        servers = [
            {
                "peer_id": peer,
                "start": info.start,
                "end": info.end,
                "state": ServerState(info.state).name.lower(),
                "throughput": info.throughput,
                "cache_tokens_left": info.cache_tokens_left,
                "dtype": info.dtype,
                "addrs": list(info.addrs),
            }
            for peer, info in sorted(view.servers.items(), key=lambda kv: (kv[1].start, kv[0]))
        ]
        out.append({
            "model_id": model_id,
            "num_blocks": num_blocks,
            "coverage": view.coverage(),
            "servers": servers,
        })
    return {"models": out}
