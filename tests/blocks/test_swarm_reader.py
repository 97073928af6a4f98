"""Swarm readers merge the announcements of every close replica, never just the first ones."""

from __future__ import annotations

import msgpack

from blocks.swarm_reader import DICTIONARY_QUORUM
from overlay.dht.config import DHTConfig
from overlay.dht.effects import GetResult
from overlay.dht.ids import key_id_of
from overlay.dht.memnet import MemoryNetwork
from overlay.dht.records import Record

KEY = b"model.0"
HOLDERS = 12


def subkeys_read(quorum: int) -> set[str]:
    """12 of the key's closest nodes each hold a different server's entry (as after churn:
    each server stored on the closest nodes of its moment, gets cached snapshots on others);
    the farthest node reads the key."""
    net = MemoryNetwork(seed=5, config=DHTConfig(value_quorum=quorum))
    nodes = [net.add_node() for _ in range(40)]
    net.join_all()
    by_distance = sorted(nodes, key=lambda n: n.node_id ^ key_id_of(KEY))
    for i, holder in enumerate(by_distance[:HOLDERS]):
        assert holder.store_local(
            Record(KEY, f"server-{i}", msgpack.packb(i), net.now + 600), net.now)
    reader = by_distance[-1]
    result = net.run_op(reader, lambda now: reader.get([KEY], now))
    assert isinstance(result, GetResult)
    return {r.subkey for r in result.records[KEY]}


def test_readers_merge_all_close_replicas():
    assert subkeys_read(DICTIONARY_QUORUM) == {f"server-{i}" for i in range(HOLDERS)}


def test_a_get_that_stops_at_the_replica_count_misses_servers():
    """Why DICTIONARY_QUORUM is not num_replicas (and proof the test above can fail)."""
    assert len(subkeys_read(DHTConfig().num_replicas)) < HOLDERS
