"""Server-to-server push (docs/block_protocol.md, "Push") against real `overlay-node serve`
processes: a step is sent to the first span only, the servers push it along, the client
still holds every span's input, a failed push falls back to the client relaying, and a push
target killed mid-generation is replaced with the tokens of the local model."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from client.inference import SessionConfig
from client.local_swarm import LocalSwarm
from client.model import ModelSession, RemoteModel
from tests.client.test_fault_tolerance import prompt, server_index, wait_until_visible
from tests.model_factory import NUM_LAYERS

# Three spans in the chain; a spare [1, 3) so a killed middle server can be replaced.
SPANS = [(0, 1), (1, 3), (3, NUM_LAYERS), (1, 3)]


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    # a short announce period, so that the measured next_pings are announced within the test
    local = LocalSwarm(model_dir, SPANS, log_dir=tmp_path_factory.mktemp("logs"),
                       extra_serve_args=("--announce-period", "2"))
    with local:
        yield local


async def run_steps(model: RemoteModel, hidden: torch.Tensor, push: bool, spoil=None):
    """Steps of 4, 1, 1, 1 positions through a 3-span session; outputs and the session."""
    blocks = model.blocks
    session = await blocks.inference_session(1, 16)
    streams = [s._stream for s in session.spans]
    assert await session.open() is session  # `async with await ...` opens twice: a no-op
    assert [s._stream for s in session.spans] == streams
    if not push:  # the same chain, opened as a relay-only (push version 0) client would
        await session.close()
        route = [(s.peer, s.start, s.end) for s in session.spans]
        session = type(session)(session.host, session.model_id, route,
                                SessionConfig(max_length=16, push=False))
        await session.open()
    if spoil is not None:
        spoil(session)
    outs = []
    for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 7)]:
        outs.append(await session.step(hidden[:, lo:hi]))
    await session.close()
    return outs, session


async def settled_view(model: RemoteModel, timeout: float = 20.0) -> dict:
    """{span: [(peer, info)]} once every server announces round trips to all the servers of
    the span after it (or at the timeout): each has then read where those listen, the only
    addresses its pushes dial (blocks/push.py)."""
    await wait_until_visible(model, len(SPANS))
    deadline = time.monotonic() + timeout
    while True:
        view = await model.blocks.view(refresh=True)
        by_span = {}
        for peer, info in view.servers.items():
            by_span.setdefault((info.start, info.end), []).append((peer, info))
        (_, first_info), = by_span[(0, 1)]
        middle = {peer for peer, _ in by_span[(1, 3)]}
        last = {peer for peer, _ in by_span[(3, NUM_LAYERS)]}
        # Each server announces its first measurement at its own first refresh.
        settled = set(first_info.next_pings) == middle and all(
            set(info.next_pings) == last for _, info in by_span[(1, 3)])
        if settled or time.monotonic() > deadline:
            return by_span
        await asyncio.sleep(0.5)


@pytest.mark.slow
async def test_servers_announce_round_trips_to_the_servers_after_them(swarm, model_dir):
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        by_span = await settled_view(model)
        (_, first_info), = by_span[(0, 1)]
        middle = {peer for peer, _ in by_span[(1, 3)]}
    finally:
        await model.close()
    assert set(first_info.next_pings) == middle  # both servers of block 1, nobody else
    assert all(0 < rtt < 1.0 for rtt in first_info.next_pings.values())  # loopback
    for _, info in by_span[(1, 3)]:
        assert set(info.next_pings) == {p for p, _ in by_span[(3, NUM_LAYERS)]}
    assert by_span[(3, NUM_LAYERS)][0][1].next_pings == {}  # the last span: nobody after it


@pytest.mark.slow
async def test_push_and_relay_give_the_same_states_and_push_sends_once(swarm, model_dir):
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(2))
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await settled_view(model)  # run alone: the servers know where their next hops are
        pushed, push_session = await run_steps(model, hidden, push=True)
        relayed, relay_session = await run_steps(model, hidden, push=False)
    finally:
        await model.close()
    assert len(push_session.spans) == 3
    assert all(s.push_token is not None for s in push_session.spans)
    assert all(s.push_token is None for s in relay_session.spans)
    assert push_session.client_sends == 4  # one per step: the servers pushed the rest
    assert relay_session.client_sends == 12
    for a, b in zip(pushed, relayed):
        assert torch.equal(a, b)
    # the client kept every span's inputs, as relay mode does (what replay needs)
    for p, r in zip(push_session.spans, relay_session.spans):
        assert p.position == r.position == 7
        assert torch.equal(torch.cat(p.inputs, dim=1), torch.cat(r.inputs, dim=1))


@pytest.mark.slow
async def test_a_refused_push_falls_back_to_the_client_relaying(swarm, model_dir):
    """The middle span's token is spoiled on the client, so the first server's push is
    refused (no such session) and reported; the client relays that hop, with the same
    results. The last span, an "old server" here (no token), is relayed to throughout."""
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(3))

    def spoil(session):
        session.spans[1].push_token = bytes(16)  # a token no server issued
        session.spans[2].push_token = None

    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, len(SPANS))
        clean, _ = await run_steps(model, hidden, push=True)
        spoiled, session = await run_steps(model, hidden, push=True, spoil=spoil)
    finally:
        await model.close()
    assert session.client_sends == 12  # every hop relayed after a failed push or to old
    assert session.recoveries == []
    for a, b in zip(clean, spoiled):
        assert torch.equal(a, b)


@pytest.mark.slow
async def test_a_generate_cancelled_twice_still_closes_its_sessions(swarm, model_dir):
    """Cancelled, then cancelled again while its session closes (nested timeouts do this):
    the close must still reach every server (it was cut short and left the servers' sessions
    and caches taken for as long as the client stayed connected)."""
    import msgpack

    from blocks.protocol import METHOD_INFO
    from overlay.identity import PeerId

    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, len(SPANS))
        for _ in range(3):
            task = asyncio.ensure_future(model.generate(prompt(3), max_new_tokens=500,
                                                        max_length=600, eos_token_id=None))
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        peers = [PeerId.from_string(a.rsplit("/p2p/", 1)[1]) for a in swarm.server_addrs]
        for _ in range(100):
            infos = [msgpack.unpackb(await model.swarm.host.call(p, METHOD_INFO, b"",
                                                                  timeout=10)) for p in peers]
            if all(info["sessions"] == 0 for info in infos):
                break
            await asyncio.sleep(0.05)
        assert [info["sessions"] for info in infos] == [0] * len(peers)
    finally:
        await model.close()


@pytest.mark.slow
async def test_closing_waits_for_the_push_readers_to_end(swarm, model_dir):
    """After `await close()` (of a session, or of the model with sessions open) no reader
    task of a push chain is left pending: they were only cancelled, and could outlive the
    session, or their loop ("Task was destroyed but it is pending")."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, len(SPANS))
        readers = []
        for closing in ("session", "model"):
            session = await model.inference_session(max_length=16)
            await session.step(prompt(4))
            readers = [span._reader for span in session.blocks_session.spans]
            assert all(reader is not None and not reader.done() for reader in readers)
            await (session.close() if closing == "session" else model.close())
            assert all(reader.done() for reader in readers), closing
    finally:
        await model.close()


@pytest.mark.slow
async def test_push_target_killed_mid_generation(swarm, model_dir, reference):
    """Last on this swarm: SIGKILLs the middle server, the first server's push target."""
    ids, new_tokens, kill_after = prompt(11), 32, 10
    expected = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, len(SPANS))
        blocks_session = await model.blocks.inference_session(1, 64)
        assert [(s.start, s.end) for s in blocks_session.spans] == SPANS[:3]
        victim = str(blocks_session.spans[1].peer)
        produced = []

        def kill_midway(chosen: torch.Tensor) -> None:
            produced.append(int(chosen))
            if len(produced) == kill_after:
                swarm.kill_server(server_index(swarm, victim))

        async with ModelSession(model, blocks_session) as session:
            got = await model.generate(ids, session=session, on_tokens=kill_midway,
                                       max_new_tokens=new_tokens, do_sample=False)
        recoveries = list(blocks_session.recoveries)
        sends = blocks_session.client_sends
    finally:
        await model.close()
    assert torch.equal(got, expected)
    assert len(produced) == new_tokens
    assert [(r.failed_peer, r.start, r.end) for r in recoveries] == [(victim, 1, 3)]
    assert recoveries[0].replayed == ids.shape[1] + kill_after - 1
    # one send per step, plus the recovery's re-send to the span after the replacement
    assert sends <= new_tokens + 2
