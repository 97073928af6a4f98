"""`overlay-node status` reads a bounded part of the model registry, which anyone can write to.

The choice is pure (no sockets); one loopback test registers fake models in a real DHT on
127.0.0.1 and reads the status as the command does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from blocks.announcement import MODELS_KEY
from client.swarm import SwarmClient
from client.swarm_status import (
    MAX_BLOCKS,
    MAX_BLOCKS_READ,
    MAX_MODELS,
    RegisteredModel,
    choose_models,
    left_out_note,
    read_status,
    registered_models,
)
from overlay.dht.driver import DHT
from overlay.host import Host


def test_registry_entries_are_counted_per_model_and_malformed_ones_skipped():
    registry = {
        "a": {"model": "llama", "num_blocks": 80}, "b": {"model": "llama", "num_blocks": 80},
        "c": {"model": "aaa-fake", "num_blocks": 2}, "d": {"model": "big", "num_blocks": 9},
        "e": {"model": "huge", "num_blocks": MAX_BLOCKS + 1}, "f": {"model": "x"}, "g": 3,
        "h": {"model": "flag", "num_blocks": True},
    }
    assert registered_models(registry) == [
        RegisteredModel("llama", 80, 2),  # most registrants first, whatever its name
        RegisteredModel("aaa-fake", 2, 1), RegisteredModel("big", 9, 1)]
    assert registered_models(None) == [] and registered_models([1, 2]) == []
    # a size claimed by one peer does not outvote the servers' (it used to be the largest)
    inflated = {"s1": {"model": "llama", "num_blocks": 80}, "s2": {"model": "llama",
                "num_blocks": 80}, "liar": {"model": "llama", "num_blocks": MAX_BLOCKS}}
    assert registered_models(inflated) == [RegisteredModel("llama", 80, 3)]
    assert registered_models({"a": {"model": "m", "num_blocks": 9},
                              "b": {"model": "m", "num_blocks": 7}}) == [
        RegisteredModel("m", 7, 2)]


def test_the_models_read_are_bounded_in_number_and_in_blocks():
    many = [RegisteredModel(f"m{i:03d}", 1, 1) for i in range(MAX_MODELS + 5)]
    chosen, left_out = choose_models(many)
    assert chosen == many[:MAX_MODELS] and left_out == many[MAX_MODELS:]
    big = [RegisteredModel(f"b{i}", MAX_BLOCKS, 1) for i in range(3)]
    small = RegisteredModel("small", 10, 1)
    chosen, left_out = choose_models([*big, small])
    assert chosen == [big[0]] and left_out == [*big[1:], small]
    assert sum(m.num_blocks for m in chosen) <= MAX_BLOCKS_READ
    # one named model: only it, however many others there are
    chosen, left_out = choose_models([*big, small], wanted="small")
    assert chosen == [small] and left_out == big
    assert choose_models(big, wanted="missing") == ([], big)


def test_the_note_says_what_was_not_read():
    assert left_out_note({"models": [{}], "left_out": []}) is None
    status = {"models": [{}], "left_out": [{"model_id": f"m{i}", "num_blocks": 1}
                                           for i in range(7)]}
    note = left_out_note(status)
    assert note.startswith("7 more registered models not read") and "m4, ..." in note
    assert note.endswith("name one with --model ID")
    assert left_out_note({"models": [], "left_out": []}, "gone") == \
        "model 'gone' is not registered in this swarm"


async def test_status_reads_a_bounded_part_of_a_registry_full_of_fake_models():
    async with asyncio.timeout(60):
        host = Host()
        await host.listen("/ip4/127.0.0.1/tcp/0")
        node = await DHT.start(host, [])
        bootstrap = [str(host.addrs[0])]
        clients: list[SwarmClient] = []
        try:
            expiration = time.time() + 300
            for i in range(MAX_MODELS + 4):  # each from its own identity, as anyone may
                fake = await SwarmClient.connect(bootstrap)
                clients.append(fake)
                entry = {"model": f"fake-{i:02d}", "num_blocks": 1}
                assert await fake.dht.store(MODELS_KEY, entry, expiration,
                                            subkey=str(fake.host.peer_id))
            reader = await SwarmClient.connect(bootstrap)
            clients.append(reader)
            status = await read_status(reader)
            assert [m["model_id"] for m in status["models"]] == [
                f"fake-{i:02d}" for i in range(MAX_MODELS)]
            assert [m["model_id"] for m in status["left_out"]] == [
                f"fake-{i:02d}" for i in range(MAX_MODELS, MAX_MODELS + 4)]
            assert all(m["coverage"] == [0] and m["servers"] == [] for m in status["models"])
            named = await read_status(reader, "fake-19")
            assert [m["model_id"] for m in named["models"]] == ["fake-19"]
            assert len(named["left_out"]) == MAX_MODELS + 3
        finally:
            for client in clients:
                await client.close()
            await node.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(host.close(), 2)
