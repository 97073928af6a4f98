"""Reading a model's swarm from the DHT: every block's announcements, as one `SwarmView`.

Shared by block servers (placement) and clients (routing), so that both see the swarm the
same way. No torch and no asyncio import: it needs only a DHT object with `get_records`.

Every block's record is a dictionary (peer id -> announcement) whose entries were stored by
different servers on the nodes closest to the key at the time; a node that joined later holds
none of the earlier entries, and a node that a get cached the record on (Kademlia 2.3) holds a
snapshot that later entries never reach. A get that stopped at the first replicas would show a
partial or stale swarm (a new server missing, or still "joining" after it went online), so
readers run their DHT with `value_quorum=DICTIONARY_QUORUM`: the get never stops early, it
merges the answers of all k closest nodes, each entry at its latest expiration (as hivemind's
`DHT.get(latest=True)` searches on for the latest entry instead of returning the first). Such
a get asks every node for closer peers even when it holds the key ("near", overlay/PROTOCOL.md
section 5): a client's own table fills with servers that left, so it must learn the new ones
from answers. The price: a close node that vanished holds the read up for its adaptive
timeout (tens of ms for a peer the reader has measured, 1 s for one it never talked to) where a
get stopping at 5 values might not have asked it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from blocks.announcement import RejectedRecord, SwarmView, block_keys
from overlay.dht.config import DHTConfig

log = logging.getLogger(__name__)

DICTIONARY_QUORUM = DHTConfig().k


def view_from_records(num_blocks: int, keys: Sequence[str],
                      records: Mapping[bytes, Sequence]) -> tuple[SwarmView, list[RejectedRecord]]:
    """Pure: the view from a DHT get result's `records` (encoded key -> records with
    `subkey` and `value`), for `keys = block_keys(model_id, 0, num_blocks)`."""
    per_block = {}
    for block, key in enumerate(keys):
        found = records.get(key.encode(), [])
        per_block[block] = {r.subkey: r.value for r in found if r.subkey is not None}
    return SwarmView.from_block_records(num_blocks, per_block)


async def read_view(dht, model_id: str, num_blocks: int) -> SwarmView:
    """The swarm of `model_id` as the DHT holds it now; malformed records are logged (the
    first few) and left out."""
    keys = block_keys(model_id, 0, num_blocks)
    result = await dht.get_records(keys)
    view, rejected = view_from_records(num_blocks, keys, result.records)
    for bad in rejected[:5]:
        log.warning("ignored announcement of %s for block %d: %s", bad.peer_id, bad.block,
                    bad.reason)
    return view
