"""What `overlay-node status` reports: the announced models, their servers and their coverage.

Any peer may register a model under MODELS_KEY (one entry per peer id, up to the DHT's 1,024
subkeys per key), each claiming up to MAX_BLOCKS blocks, and reading a model costs a DHT get
of every one of its blocks, one model after the other. So one status call reads at most
MAX_MODELS models and MAX_BLOCKS_READ blocks in all: the models most peers registered first
(then the smaller, then by name), or only the one asked for; the others are listed, unread,
under "left_out" (by name and claimed size), so that a user can ask for one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocks.announcement import MODELS_KEY, ServerState
from client.swarm import SwarmClient

MAX_BLOCKS = 4096  # a registry entry claiming more blocks than this is ignored
MAX_MODELS = 16  # models read by one status call
MAX_BLOCKS_READ = 4096  # blocks read by one status call, over all its models


@dataclass(frozen=True)
class RegisteredModel:
    model_id: str
    num_blocks: int  # what most registrants claim (of two claims as common, the smaller)
    registrants: int  # how many peers registered it


def registered_models(registry: object) -> list[RegisteredModel]:
    """Pure: the models of a MODELS_KEY record (peer id -> entry), malformed entries skipped;
    the ones most peers registered first, then the smaller, then by name. A model's size is
    the claim most of its registrants make: one peer claiming 4,096 blocks for a model that
    its servers register with 80 does not make every status read 4,096."""
    claims: dict[str, dict[int, int]] = {}  # model -> claimed size -> registrants
    for entry in registry.values() if isinstance(registry, dict) else ():
        if not isinstance(entry, dict):
            continue
        model_id, num_blocks = entry.get("model"), entry.get("num_blocks")
        if isinstance(model_id, str) and isinstance(num_blocks, int) \
                and not isinstance(num_blocks, bool) and 0 < num_blocks <= MAX_BLOCKS:
            sizes = claims.setdefault(model_id, {})
            sizes[num_blocks] = sizes.get(num_blocks, 0) + 1
    models = [RegisteredModel(m, min(sizes, key=lambda n: (-sizes[n], n)), sum(sizes.values()))
              for m, sizes in claims.items()]
    return sorted(models, key=lambda m: (-m.registrants, m.num_blocks, m.model_id))


def choose_models(models: list[RegisteredModel], wanted: str | None = None,
                  max_models: int = MAX_MODELS, max_blocks: int = MAX_BLOCKS_READ,
                  ) -> tuple[list[RegisteredModel], list[RegisteredModel]]:
    """Pure: (the models to read, in order, within the bounds; the ones left out). With
    `wanted`, only that model is read (its size is bounded by MAX_BLOCKS already)."""
    if wanted is not None:
        chosen = [m for m in models if m.model_id == wanted]
        return chosen, [m for m in models if m.model_id != wanted]
    chosen, left_out, blocks = [], [], 0
    for model in models:
        if len(chosen) < max_models and blocks + model.num_blocks <= max_blocks:
            chosen.append(model)
            blocks += model.num_blocks
        else:
            left_out.append(model)
    return chosen, left_out


async def read_status(client: SwarmClient, model_id: str | None = None) -> dict:
    """The status of the registered models within the bounds (of `model_id` alone if given);
    "left_out": the registered models not read, each with its claimed number of blocks."""
    chosen, left_out = choose_models(registered_models(await client.dht.get(MODELS_KEY)),
                                     model_id)
    out = []
    for model in chosen:  # one at a time: a get of every block each
        view = await client.view(model.model_id, model.num_blocks)
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
            "model_id": model.model_id,
            "num_blocks": model.num_blocks,
            "coverage": view.coverage(),
            "servers": servers,
        })
    return {"models": out,
            "left_out": [{"model_id": m.model_id, "num_blocks": m.num_blocks} for m in left_out]}


def left_out_note(status: dict, wanted: str | None = None) -> str | None:
    """The line that says what a status did not read, or None when it read everything."""
    if wanted is not None and not status["models"]:
        return f"model {wanted!r} is not registered in this swarm"
    left_out = status["left_out"]
    if not left_out:
        return None
    if wanted is not None:
        return f"{len(left_out)} other registered models not read"
    names = ", ".join(m["model_id"] for m in left_out[:5]) + (", ..." if len(left_out) > 5
                                                               else "")
    return (f"{len(left_out)} more registered models not read (one status reads at most "
            f"{MAX_MODELS} models and {MAX_BLOCKS_READ} blocks): {names}; name one with "
            f"--model ID")
