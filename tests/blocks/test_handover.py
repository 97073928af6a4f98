"""A server moving to another span (blocks/balancer.py) without dropping live sessions: real
hosts on loopback, a real one-node DHT, real spans; the move is the driver's own code."""

from __future__ import annotations

import asyncio
import gc
import random
import weakref

import pytest
import torch

from blocks.announcement import ServerState
from blocks.announcer import Announcer
from blocks.balancer import Balancer
from blocks.rebalancing import BalanceConfig, Move, SpanPlanner, placement_infos
from blocks.server import BlockServer, ServingConfig
from blocks.span import BlockSpan
from blocks.swarm_reader import DICTIONARY_QUORUM, read_view
from blocks.throughput import ComputeRates
from client.inference import InferenceError, InferenceSession, SessionConfig
from overlay.dht.config import DHTConfig
from overlay.dht.driver import DHT
from overlay.host import Host, RemoteError
from tests.model_factory import save_model

MODEL_ID = "tiny-llama-handover"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def local_spans(model_dir):
    return {(0, 2): BlockSpan.load(model_dir, 0, 2), (2, 4): BlockSpan.load(model_dir, 2, 4)}


class Swarm:
    """One server (serving [0, 2) of 4 blocks) with its DHT, and a client host."""

    def __init__(self, model_dir, grace: float):
        self.model_dir = model_dir
        self.grace = grace

    async def __aenter__(self) -> Swarm:
        self.host, self.client = Host(), Host()
        [addr] = await self.host.listen("/ip4/127.0.0.1/tcp/0")
        self.dht = await DHT.start(self.host, [], DHTConfig(value_quorum=DICTIONARY_QUORUM))
        self.server = BlockServer(BlockSpan.load(self.model_dir, 0, 2),
                                  ServingConfig(model_id=MODEL_ID, cache_tokens=64, max_length=16))
        self.server.attach(self.host)
        self.announcer = Announcer(self.dht, self.host, self.server,
                                   ComputeRates(None, None, override=10.0), 4, period=30.0)
        await self.announcer.start()
        planner = SpanPlanner(str(self.host.peer_id), 4, 2,
                              BalanceConfig(handover_grace=self.grace), random.Random(0))
        self.balancer = Balancer(planner, self.dht, self.announcer, self.server,
                                 lambda s, e: BlockSpan.load(self.model_dir, s, e), 4,
                                 contention_wait=0.05)
        self.client.add_peer_addrs(self.host.peer_id, [addr])
        return self

    def session(self, start: int, end: int) -> InferenceSession:
        return InferenceSession(self.client, MODEL_ID, [(self.host.peer_id, start, end)],
                                SessionConfig(max_length=16, wait_timeout=1.0, step_timeout=10.0))

    async def wait_served(self, span: tuple[int, int]) -> None:
        for _ in range(3000):
            if self.server.served == span:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"the server never switched to {span}")

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        await asyncio.wait_for(self.announcer.stop(), 5)
        await self.server.close()
        await self.dht.close()
        await self.host.close()


async def test_a_session_open_before_a_move_finishes_with_correct_outputs(model_dir,
                                                                         local_spans):
    async with Swarm(model_dir, grace=60.0) as swarm:
        peer = str(swarm.host.peer_id)
        local = local_spans[(0, 2)].new_session(1, 16)
        old = swarm.session(0, 2)
        await old.open()
        prefix = torch.randn(1, 5, 64)
        assert torch.allclose(await old.step(prefix), local.step(prefix), atol=1e-5)
        old_span = weakref.ref(swarm.server.span)

        moving = asyncio.create_task(swarm.balancer.move(Move(0, 2, 2, 4)))
        await swarm.wait_served((2, 4))
        # the swarm sees the server on its new span; the blocks left behind are OFFLINE
        view = await read_view(swarm.dht, MODEL_ID, 4)
        states = [{s.peer_id: s.info.state for s in view.covering(b)}[peer] for b in range(4)]
        assert states == [ServerState.OFFLINE] * 2 + [ServerState.ONLINE] * 2
        assert (placement_infos(view)[peer].start, placement_infos(view)[peer].end) == (2, 4)

        # the old session goes on, on the old span, with the right outputs
        for _ in range(3):
            token = torch.randn(1, 1, 64)
            assert torch.allclose(await old.step(token), local.step(token), atol=1e-5)
        # new sessions: refused on the old blocks, served on the new ones
        with pytest.raises((InferenceError, RemoteError), match=r"bad_range|not inside"):
            await swarm.session(0, 2).open()
        async with swarm.session(2, 4) as new:
            hidden = torch.randn(1, 4, 64)
            expected = local_spans[(2, 4)].new_session(1, 16).step(hidden)
            assert torch.allclose(await new.step(hidden), expected, atol=1e-5)
        assert not moving.done() and swarm.server.old_span_sessions == 1

        await old.close()  # the last session on the old span ends: the handover completes
        assert await asyncio.wait_for(moving, 10) is True
        assert swarm.server.old_span_sessions == 0
        for _ in range(500):
            gc.collect()
            if old_span() is None:
                break
            await asyncio.sleep(0.01)
        assert old_span() is None, "the old span's weights were not freed"


async def test_sessions_still_open_at_the_grace_deadline_are_closed(model_dir):
    async with Swarm(model_dir, grace=0.3) as swarm:
        old = swarm.session(0, 2)
        await old.open()
        await old.step(torch.randn(1, 2, 64))
        moved = await asyncio.wait_for(swarm.balancer.move(Move(0, 2, 2, 4)), 30)
        assert moved and swarm.server.served == (2, 4) and swarm.server.num_sessions == 0
        with pytest.raises(InferenceError):
            await old.step(torch.randn(1, 1, 64))
        assert swarm.server.cache_tokens_free == 64  # the new span's budget is whole


async def test_records_while_moving_put_the_joining_span_over_the_served_one(model_dir):
    async with Swarm(model_dir, grace=0.0) as swarm:
        announcer = swarm.announcer
        announcer.joining = (1, 3)
        records = announcer.records(ServerState.ONLINE)
        assert [(b, r.state, r.start, r.end) for b, r in sorted(records.items())] == [
            (0, ServerState.ONLINE, 0, 2), (1, ServerState.JOINING, 1, 3),
            (2, ServerState.JOINING, 1, 3)]
        assert records[1].cache_tokens_left == 64 and records[1].throughput == 10.0
        announcer.joining, announcer.leaving = None, (2, 4)
        records = announcer.records(ServerState.ONLINE)
        assert [(b, r.state) for b, r in sorted(records.items())] == [
            (0, ServerState.ONLINE), (1, ServerState.ONLINE), (2, ServerState.OFFLINE),
            (3, ServerState.OFFLINE)]
        announcer.leaving = None


async def test_a_move_that_cannot_load_keeps_the_old_span(model_dir):
    async with Swarm(model_dir, grace=0.0) as swarm:
        def broken(start, end):
            raise MemoryError("no room for another span")

        swarm.balancer.load_span = broken
        assert await swarm.balancer.move(Move(0, 2, 2, 4)) is False
        assert swarm.server.served == (0, 2) and swarm.announcer.joining is None
        view = await read_view(swarm.dht, MODEL_ID, 4)
        assert {(s.start, s.end, s.info.state) for s in view.spans} == {
            (0, 2, ServerState.ONLINE), (2, 4, ServerState.OFFLINE)}
        assert {p: (i.start, i.end) for p, i in placement_infos(view).items()} == {
            str(swarm.host.peer_id): (0, 2)}
