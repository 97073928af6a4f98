"""Fault-tolerant inference and forward against real `overlay-node serve` processes: servers are
SIGKILLed in the middle of generations and the client replaces them (client/inference.py,
client/remote_blocks.py), giving exactly the tokens the model gives locally.

Every swarm is a LocalSwarm, stopped (its processes killed by pid) when its fixture ends.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import re
import signal
import threading
import time
import weakref

import pytest
import torch

from client.inference import (
    BlocksUnavailableError,
    InferenceError,
    InferenceSession,
    SessionConfig,
    _trim,
)
from client.local_swarm import LocalSwarm
from client.model import ModelSession, RemoteModel
from client.recovery import BanConfig, BanList
from client.remote_blocks import ClientConfig, RemoteBlocks
from client.routing import RouteNeeds
from overlay.identity import PeerId
from tests.model_factory import NUM_LAYERS, VOCAB_SIZE

LOW, HIGH = 3, VOCAB_SIZE  # prompt token ids clear of pad, bos and eos
RECOVERY_LIMIT = 2.0  # seconds, on loopback (issue 6)
CHAOS_SECONDS = 60.0
CHAOS_PERIOD = 4.0  # mean seconds between kills


def prompt(seed: int, length: int = 5) -> torch.Tensor:
    return torch.randint(LOW, HIGH, (1, length), generator=torch.Generator().manual_seed(seed))


async def wait_until_visible(model: RemoteModel, count: int, timeout: float = 30.0) -> None:
    """Until the client's view of the swarm lists `count` servers: a server prints its address
    once it has announced itself, but a DHT read right after may still miss its records."""
    deadline = time.monotonic() + timeout
    while len((await model.blocks.view(refresh=True)).servers) < count:
        assert time.monotonic() < deadline, "servers still missing from the DHT"
        await asyncio.sleep(0.5)


def server_index(swarm: LocalSwarm, peer: str) -> int:
    return next(i for i, addr in enumerate(swarm.server_addrs) if addr.endswith(peer))


# -- pure: what is replayed after a rollback ---------------------------------------------------

def test_trim_keeps_exactly_the_positions_before_a_rollback():
    inputs = [torch.arange(5.0).reshape(1, 5, 1), torch.tensor([[[5.0]]]),
              torch.arange(6.0, 9.0).reshape(1, 3, 1)]
    for position in range(10):
        kept = list(inputs)
        _trim(kept, position)
        joined = torch.cat(kept, dim=1) if kept else torch.zeros(1, 0, 1)
        assert joined.flatten().tolist() == list(range(min(position, 9))), position


# -- a server killed mid-generation, and blocks nobody serves ----------------------------------

@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    # [2, 4) is served whole by one server and, as a fallback, by two servers of one block each
    spans = [(0, 2), (2, NUM_LAYERS), (2, 3), (3, NUM_LAYERS)]
    local = LocalSwarm(model_dir, spans, log_dir=tmp_path_factory.mktemp("logs"))
    with local:
        yield local


async def session_outputs(swarm, model_dir, batch: int, before, after: torch.Tensor,
                          fail: bool):
    """Outputs of an inference session that runs `before(session)` (a list of outputs), then,
    if `fail`, loses the server holding block 2 (its stream reset: what the client sees of a
    lost server), then steps `after`; and the recoveries made."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, 4)
        session = await model.blocks.inference_session(batch, 16)
        outs = await before(session)
        if fail:
            victim = next(s for s in session.spans if s.start <= 2 < s.end)
            victim._stream.reset("test: injected failure")
        outs.append(await session.step(after))
        recoveries = list(session.recoveries)
        await session.close()
        return outs, recoveries
    finally:
        await model.close()


@pytest.mark.slow
async def test_failure_after_a_rollback_replays_exactly_what_the_session_holds(swarm, model_dir):
    """A failure after moving back into the middle of a multi-position step: the replacement
    must get positions [0, p) only."""
    hidden = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(5))
    cuts = [(0, 5), (5, 6), (6, 7)]  # then back to 3, and [3, 6), then [6, 8) after a failure

    async def before(session):
        for lo, hi in cuts:
            await session.step(hidden[:, lo:hi])
        session.rollback(3)
        return [await session.step(hidden[:, 3:6])]

    clean, none = await session_outputs(swarm, model_dir, 1, before, hidden[:, 6:8], False)
    failed, recoveries = await session_outputs(swarm, model_dir, 1, before, hidden[:, 6:8], True)
    assert none == []
    assert len(recoveries) == 1 and recoveries[0].replayed == 6
    assert recoveries[0].seconds < RECOVERY_LIMIT
    for a, b in zip(clean, failed):
        assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.slow
async def test_a_replacement_gets_the_sessions_padding_with_the_replay(swarm, model_dir):
    """A left-padded batch: the replayed positions carry their padding, so the replacement's
    outputs equal those of a run without the failure."""
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0

    async def padded(session):
        return [await session.step(hidden[:, :5], mask), await session.step(hidden[:, 5:6])]

    async def unpadded(session):
        return [await session.step(hidden[:, :6])]

    after = hidden[:, 6:9]
    clean, _ = await session_outputs(swarm, model_dir, 2, padded, after, False)
    failed, recoveries = await session_outputs(swarm, model_dir, 2, padded, after, True)
    assert len(recoveries) == 1 and recoveries[0].replayed == 6
    for a, b in zip(clean, failed):
        assert (a - b).abs().max().item() <= 1e-4
    # the padding mattered: without it the padded row comes out otherwise
    plain, _ = await session_outputs(swarm, model_dir, 2, unpadded, after, False)
    assert (plain[-1][1] - clean[-1][1]).abs().max().item() > 1e-3


@pytest.mark.slow
async def test_a_replacement_gets_the_replay_in_the_reordered_rows(swarm, model_dir):
    """Beam search: a reorder still pending when a server is lost; the replacement is built
    from the kept inputs in the new row order, and its outputs are those of no failure."""
    hidden = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(7))

    async def reordered(session):
        outs = [await session.step(hidden[:, :5])]
        session.reorder(torch.tensor([1, 1]))
        return outs

    after = hidden[[1, 1], 5:8]  # the same new positions for both rows
    clean, _ = await session_outputs(swarm, model_dir, 2, reordered, after, False)
    failed, recoveries = await session_outputs(swarm, model_dir, 2, reordered, after, True)
    assert len(recoveries) == 1 and recoveries[0].replayed == 5
    for a, b in zip(clean, failed):
        assert (a - b).abs().max().item() <= 1e-4
    # both rows now continue row 1 (without the reorder they would differ)
    assert (clean[-1][0] - clean[-1][1]).abs().max().item() <= 1e-5


@pytest.mark.slow
async def test_a_replaced_span_and_its_replay_inputs_are_let_go(swarm, model_dir):
    """The session's mailbox held every replaced span (with the inputs it kept for replay:
    the whole history of its blocks) until the session ended, one more per recovery."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, 4)
        session = await model.blocks.inference_session(1, 16)
        await session.step(torch.randn(1, 4, model.config.hidden_size))
        victim = next(s for s in session.spans if s.start <= 2 < s.end)
        assert victim.push_token is not None  # its messages went through the mailbox
        gone = weakref.ref(victim)
        victim._stream.reset("test: injected failure")
        del victim
        quiet = logging.getLogger("client.inference")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # pytest keeps the records (their errors hold the span)
        try:
            await session.step(torch.randn(1, 1, model.config.hidden_size))
        finally:
            quiet.setLevel(level)
        assert len(session.recoveries) == 1
        gc.collect()
        assert gone() is None
        await session.close()
    finally:
        await model.close()


@pytest.mark.slow
async def test_a_server_whose_cache_is_full_is_replaced_when_opening(swarm, model_dir):
    """A server that refuses a session for a reason of its own (`cache_full`: another session
    holds its cache) is replaced as a lost one is; the session used to fail with the
    server's RemoteError although other servers of its blocks had room."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, 4)
        whole = next(PeerId.from_string(peer)
                     for peer, info in (await model.blocks.view()).servers.items()
                     if (info.start, info.end) == (2, NUM_LAYERS))
        length = 6000  # two of them do not fit the 2 x 8192 block-tokens of one server
        config = SessionConfig(max_length=length, wait_timeout=0.3)
        rerouter = model.blocks.rerouter(RouteNeeds(cache_tokens=length))

        def session_on_whole() -> InferenceSession:
            return InferenceSession(model.swarm.host, model.model_id, [(whole, 2, NUM_LAYERS)],
                                    config, rerouter=rerouter)

        hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(8))
        async with session_on_whole() as holder, session_on_whole() as refused:
            assert [s.peer for s in holder.spans] == [whole]
            assert [r.failed_peer for r in refused.recoveries] == [str(whole)]
            assert "cache_full" in refused.recoveries[0].reason
            assert whole not in [s.peer for s in refused.spans]
            expected, got = await holder.step(hidden), await refused.step(hidden)
        assert (expected - got).abs().max().item() <= 1e-4
    finally:
        await model.close()


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.002, 0.01])
async def test_closing_the_model_while_a_generation_opens_its_session(swarm, model_dir, delay):
    """close() while generate is still opening its session: the generation ends with
    InferenceError("the model has been closed"), as a step in flight does (it used to end
    with whatever the closed swarm raised, DHTError "the DHT was closed")."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    generation = asyncio.ensure_future(model.generate(prompt(9), max_new_tokens=200,
                                                      eos_token_id=None))
    await asyncio.sleep(delay)
    await model.close()
    with pytest.raises(InferenceError, match="closed"):
        await asyncio.wait_for(generation, 10)


@pytest.mark.slow
async def test_closing_a_session_ends_its_recovery(swarm, model_dir):
    """close() while a step waits for a replacement server: the step ends with InferenceError
    at once and opens nothing. Recovery used to go on, open a replacement (holding its cache
    for a closed session) and answer the step."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, 4)
        needs = RouteNeeds(cache_tokens=16)
        route = await model.blocks.inference_route(0, NUM_LAYERS, needs)
        bans = BanList()
        for peer, info in (await model.blocks.view()).servers.items():
            if info.end > 2:  # every replacement of the span holding block 2 is banned
                bans.ban(peer, time.monotonic())
        session = InferenceSession(
            model.swarm.host, model.model_id,
            [(PeerId.from_string(s.peer_id), s.start, s.end) for s in route],
            SessionConfig(max_length=16), rerouter=model.blocks.rerouter(needs), bans=bans)
        await session.open()
        hidden = torch.randn(1, 3, 64)
        await session.step(hidden)
        victim = next(s for s in session.spans if s.start <= 2 < s.end)
        victim._stream.reset("test: injected failure")
        step = asyncio.ensure_future(session.step(hidden[:, :1]))
        await asyncio.sleep(0.5)  # the recovery now waits for the bans to end (15 s)
        assert not step.done()
        began = time.monotonic()
        await session.close()
        with pytest.raises(InferenceError, match="closed"):
            await asyncio.wait_for(step, 5)
        assert time.monotonic() - began < 1.0
        assert all(s._stream is None for s in session.spans)
    finally:
        await model.close()


async def test_a_step_cancelled_while_a_replacement_opens_leaves_no_session_there(
        swarm, model_dir):
    """A step (a generate under asyncio.timeout, say) cancelled while recovery waited for a
    replacement's answer to the opening: the half-open span was in no list that closing
    reaches, so that server held the session and its cache for as long as the client lived."""
    import msgpack

    from blocks.protocol import METHOD_INFO

    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    servers = [p for p in swarm.processes if p.name.startswith("server")]
    frozen = []
    try:
        await wait_until_visible(model, 4)
        session = await model.blocks.inference_session(1, 16)
        hidden = torch.randn(1, 3, 64)
        await session.step(hidden)
        victim = next(s for s in session.spans if s.start <= 2 < s.end)
        others = [PeerId.from_string(addr.rsplit("/p2p/", 1)[1])
                  for addr in swarm.server_addrs if not addr.endswith(str(victim.peer))]
        infos = {peer: msgpack.unpackb(await model.swarm.host.call(peer, METHOD_INFO, b""))
                 for peer in others}
        replacements = [peer for peer, info in infos.items() if info["start"] <= 2 < info["end"]]
        for peer in replacements:  # their answers to an opening will not come while stopped
            index = server_index(swarm, str(peer))
            servers[index].proc.send_signal(signal.SIGSTOP)
            frozen.append(servers[index].proc)
        victim._stream.reset("test: injected failure")
        step = asyncio.ensure_future(session.step(hidden[:, :1]))
        await asyncio.sleep(1.0)  # recovery now waits on a stopped replacement
        assert not step.done()
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
        frozen.clear()
        deadline = time.monotonic() + 10
        for peer in replacements:
            while True:
                info = msgpack.unpackb(await model.swarm.host.call(peer, METHOD_INFO, b""))
                if info["sessions"] == 0 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert info["sessions"] == 0 and info["cache_tokens_free"] == info["cache_tokens"]
        await session.close()
    finally:
        for proc in frozen:  # never leave a stopped server behind
            proc.send_signal(signal.SIGCONT)
        await model.close()


@pytest.mark.slow
async def test_server_killed_mid_generation_is_replaced(swarm, model_dir, reference):
    ids, new_tokens, kill_after = prompt(1), 48, 12
    expected = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        await wait_until_visible(model, 4)
        blocks_session = await model.blocks.inference_session(1, 64)
        route = [(str(s.peer), s.start, s.end) for s in blocks_session.spans]
        victim = next(r for r in route if r[1] <= 2 < r[2])
        produced = []

        def kill_midway(chosen: torch.Tensor) -> None:
            produced.append(int(chosen))
            if len(produced) == kill_after:
                swarm.kill_server(server_index(swarm, victim[0]))

        async with ModelSession(model, blocks_session) as session:
            got = await model.generate(ids, session=session, on_tokens=kill_midway,
                                       max_new_tokens=new_tokens, do_sample=False)
            recoveries = list(blocks_session.recoveries)
            spans_after = [(str(s.peer), s.start, s.end) for s in blocks_session.spans]
    finally:
        await model.close()
    assert torch.equal(got, expected)
    assert len(produced) > kill_after  # the kill happened before the end
    assert len(recoveries) == 1
    recovery = recoveries[0]
    assert (recovery.failed_peer, recovery.start, recovery.end) == victim
    assert recovery.seconds < RECOVERY_LIMIT, recovery
    assert recovery.replayed == ids.shape[1] + kill_after - 1  # prompt + tokens fed before
    replacement = list(recovery.replacement)
    assert victim[0] not in {peer for peer, _, _ in replacement}
    assert (replacement[0][1], replacement[-1][2]) == (victim[1], victim[2])
    if victim[1:] == (2, NUM_LAYERS):  # the only other servers hold one block each
        assert [(a, b) for _, a, b in replacement] == [(2, 3), (3, NUM_LAYERS)]
    assert spans_after == [r for r in route if r != victim][:route.index(victim)] + \
        replacement + route[route.index(victim) + 1:]


def dead_peers(swarm: LocalSwarm) -> set[str]:
    return {p.addr.rsplit("/", 1)[1] for p in swarm.processes
            if p.name.startswith("server") and p.proc.poll() is not None}


def dead_or_killed(swarm: LocalSwarm) -> set[str]:
    """The dead servers' peer ids; run alone (the kill of an earlier test did not happen):
    one of the single-block servers is killed first, whose blocks another server holds."""
    dead = dead_peers(swarm)
    if not dead:
        servers = [p for p in swarm.processes if p.name.startswith("server")]
        index = next(i for i, p in enumerate(servers) if p.name.startswith("server-2-3"))
        swarm.kill_server(index)
        dead = dead_peers(swarm)
    return dead


@pytest.mark.slow
async def test_forward_reruns_a_failed_span_elsewhere(swarm, model_dir):
    """After the kill above (its own when run alone): views still list the dead server (its
    DHT records have not expired); forward passes routed to it are re-run on the others and
    give the same result."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        hidden = torch.randn(2, 6, model.config.hidden_size,
                             generator=torch.Generator().manual_seed(3))
        blocks = RemoteBlocks(model.swarm, model.model_id, NUM_LAYERS,
                              ClientConfig(recovery_timeout=5.0), rng=random.Random(0))
        dead = dead_or_killed(swarm)
        assert len(dead) == 1
        assert dead <= set((await blocks.view()).servers)
        outputs = [await blocks.forward(hidden, 0, NUM_LAYERS) for _ in range(12)]
        banned = blocks.bans.banned(time.monotonic())
    finally:
        await model.close()
    assert dead <= banned  # it was routed to, failed, and is avoided afterwards
    for out in outputs[1:]:
        assert (out - outputs[0]).abs().max().item() <= 1e-4


@pytest.mark.slow
async def test_opening_a_session_waits_one_recovery_timeout_in_all(swarm, model_dir):
    """The route waits for a ban to lift, the server it names is found dead when opening and
    nobody else may serve its blocks: the session fails at the one deadline of the request.
    The route's wait and the opening's recovery used to take a full timeout each."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        view = await model.blocks.view(refresh=True)
        dead = dead_or_killed(swarm)
        victim = next(iter(dead))
        info = view.servers[victim]
        blocks = RemoteBlocks(model.swarm, model.model_id, NUM_LAYERS,
                              ClientConfig(recovery_timeout=4.0))
        blocks.bans = BanList(BanConfig(base=3.0))
        now = time.monotonic()
        blocks.bans.ban(victim, now)  # lifts 3 s from now, while the route still waits
        for peer, other in view.servers.items():
            if peer != victim and other.start < info.end and info.start < other.end:
                blocks.bans.ban(peer, now + 600)  # every replacement: banned throughout
        began = time.monotonic()
        with pytest.raises(BlocksUnavailableError) as caught:
            await blocks.inference_session(1, 16)
        waited = time.monotonic() - began
    finally:
        await model.close()
    assert 3.0 <= waited < 5.5  # it was 7: 3 s for the route, then 4 for the recovery
    # the message says what the recovery waited (the deadline's rest), not "within 4 s"
    said = re.search(r"after (\d+\.\d) s", str(caught.value))
    assert said is not None and float(said.group(1)) < 3.0, str(caught.value)


@pytest.mark.slow
async def test_missing_blocks_are_named_after_the_deadline(swarm, model_dir):
    """Last on this swarm: kills every server of blocks [2, 4)."""
    model = await RemoteModel.open(model_dir, [swarm.bootstrap])
    try:
        blocks = RemoteBlocks(model.swarm, model.model_id, NUM_LAYERS,
                              ClientConfig(recovery_timeout=2.0))
        session = await blocks.inference_session(1, 16)
        hidden = torch.randn(1, 3, model.config.hidden_size)
        await session.step(hidden)
        first_lost = next(s for s in session.spans if s.start >= 2)
        servers = [p for p in swarm.processes if p.name.startswith("server")]
        for index, entry in enumerate(servers):
            if entry.proc.poll() is None and not entry.name.startswith("server-0-2"):
                swarm.kill_server(index)
        began = time.monotonic()
        with pytest.raises(BlocksUnavailableError,
                           match=rf"blocks \[{first_lost.start}, {first_lost.end}\)") as caught:
            await session.step(hidden[:, :1])
        waited = time.monotonic() - began
        await session.close()
        with pytest.raises(BlocksUnavailableError) as forward_error:
            await blocks.forward(hidden, 0, NUM_LAYERS)
    finally:
        await model.close()
    # what the last attempt found unserved: block 2 at least (its servers were tried or banned);
    # block 3 too only if its server was tried (a dead server stays announced): this used to
    # demand all of the lost span, which held only in the module's full order
    missing = caught.value.missing
    assert missing[0] == first_lost.start and missing == sorted(set(missing))
    assert set(missing) <= set(range(first_lost.start, first_lost.end))
    assert isinstance(caught.value, InferenceError)
    assert 2.0 <= waited < 6.0
    # named for the range being re-routed when it ran out: a failed span's, or all of [0, 4)
    assert forward_error.value.missing in ([2], [3], [2, 3])


# -- sessions larger than one request -------------------------------------------------------

@pytest.fixture(scope="module")
def roomy_swarm(model_dir, tmp_path_factory):
    """Servers with room for 20000 cache tokens: more than one request may carry (16384)."""
    local = LocalSwarm(model_dir, [(0, 2), (2, NUM_LAYERS), (2, NUM_LAYERS)],
                       extra_serve_args=("--cache-tokens", "20000"),
                       log_dir=tmp_path_factory.mktemp("roomy-logs"))
    with local:
        yield local


@pytest.mark.slow
async def test_a_prompt_and_a_replay_larger_than_a_request_are_sent_in_pieces(roomy_swarm,
                                                                             model_dir,
                                                                             reference):
    """A 20 x 900 prompt (18000 positions) was refused ('exceed 16384'), and so would be the
    replay of such a session into a replacement server; both go as several steps now, with
    the tokens of transformers' generate."""
    ids = torch.randint(LOW, HIGH, (20, 900), generator=torch.Generator().manual_seed(40))
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=3, do_sample=False)
    model = await RemoteModel.open(model_dir, [roomy_swarm.bootstrap])
    try:
        await wait_until_visible(model, 3)
        failed = []

        def fail_once(_chosen):  # after the prompt: the next step replays it
            if not failed:
                session = model._last_session
                failed.append(next(s for s in session.spans if s.start == 2))
                failed[0]._stream.reset("test: injected failure")

        got = await model.generate(ids, max_new_tokens=3, on_tokens=fail_once)
        assert len(model._last_session.recoveries) == 1
        assert model._last_session.recoveries[0].replayed == 900  # 18000 positions
    finally:
        await model.close()
    assert torch.equal(got, expected)


# -- passes without a session whose servers keep failing -------------------------------------

@pytest.fixture(scope="module")
def failing_swarm(model_dir, tmp_path_factory):
    """[2, 4) served by one server only, killed by the test that uses it (still announced)."""
    local = LocalSwarm(model_dir, [(0, 2), (2, NUM_LAYERS)],
                       log_dir=tmp_path_factory.mktemp("failing-logs"))
    with local:
        yield local


@pytest.mark.slow
async def test_passes_whose_server_keeps_failing_give_up_at_one_deadline(failing_swarm,
                                                                        model_dir):
    """The only server of blocks [2, 4) dies and stays announced; its bans are short, so a
    route to it is found again and again. Forward, a training forward and a backward each
    give up one recovery_timeout after the first failure; they used to retry forever (each
    re-route started a timeout of its own)."""
    from client.training import SwarmTrainer

    model = await RemoteModel.open(model_dir, [failing_swarm.bootstrap])
    try:
        blocks = RemoteBlocks(model.swarm, model.model_id, NUM_LAYERS,
                              ClientConfig(recovery_timeout=2.0))
        blocks.bans = BanList(BanConfig(base=0.2, max_ban=0.4))
        trainer = SwarmTrainer(blocks)
        hidden = torch.randn(2, 5, model.config.hidden_size)
        _, record = await trainer.forward(hidden)
        failing_swarm.kill_server(1)
        passes = {"forward": lambda: blocks.forward(hidden),
                  "training forward": lambda: trainer.forward(hidden),
                  "backward": lambda: trainer.backward(record, torch.ones_like(hidden))}
        for name, run in passes.items():
            began = time.monotonic()
            with pytest.raises(BlocksUnavailableError, match=r"blocks (2-3|\[2, 4\))") as caught:
                await asyncio.wait_for(run(), 15.0)
            waited = time.monotonic() - began
            assert 2.0 <= waited < 5.0, (name, waited)
            assert caught.value.missing == [2, 3], name
    finally:
        await model.close()


# -- chaos --------------------------------------------------------------------------------------

CHAOS_SPANS = [(0, 2), (2, NUM_LAYERS), (0, NUM_LAYERS), (0, 2), (2, NUM_LAYERS)]


class Chaos:
    """Every few seconds kills a server at random (half the time one the client is using right
    now), keeping every block served by some other announced server, and starts a new one for
    the same span (in its own thread: a start takes seconds here, the kills go on meanwhile)."""

    def __init__(self, swarm: LocalSwarm, seconds: float, seed: int):
        self.swarm = swarm
        self.until = time.monotonic() + seconds
        self.rng = random.Random(seed)
        self.in_use: set[str] = set()  # peer ids of the client's current route
        self.kills = 0
        self.errors: list[BaseException] = []
        self.starters: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _announced(self) -> list[tuple[int, str, tuple[int, int]]]:
        servers = [p for p in self.swarm.processes if p.name.startswith("server")]
        return [(i, p.addr.rsplit("/", 1)[1], _span_of(p.name)) for i, p in enumerate(servers)
                if p.addr and p.proc.poll() is None]

    def _start(self, span: tuple[int, int]) -> None:
        try:
            self.swarm.start_server(*span)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def _run(self) -> None:
        try:
            while time.monotonic() < self.until:
                time.sleep(CHAOS_PERIOD * self.rng.uniform(0.5, 1.5))
                alive = self._announced()
                killable = [s for s in alive if all(
                    any(o is not s and o[2][0] <= b < o[2][1] for o in alive)
                    for b in range(s[2][0], s[2][1]))]
                if not killable:
                    continue
                using = [s for s in killable if s[1] in self.in_use]
                pool = using if using and self.rng.random() < 0.5 else killable
                index, _, span = self.rng.choice(pool)
                self.swarm.kill_server(index)
                self.kills += 1
                starter = threading.Thread(target=self._start, args=(span,), daemon=True)
                starter.start()
                self.starters.append(starter)
        except BaseException as e:  # reported by the test
            self.errors.append(e)

    def join(self) -> None:
        """Stop: servers still starting are given up (the swarm's stop() kills them)."""
        self.until = 0.0
        self.thread.join(timeout=30)
        errors = list(self.errors)
        self.swarm.abort()
        for starter in self.starters:
            starter.join(timeout=30)
        self.errors = errors


def _span_of(name: str) -> tuple[int, int]:
    _, start, end, *_ = name.split("-")
    return int(start), int(end)


@pytest.fixture(scope="module")
def chaos_swarm(model_dir, tmp_path_factory):
    local = LocalSwarm(model_dir, CHAOS_SPANS, log_dir=tmp_path_factory.mktemp("chaos-logs"),
                       extra_serve_args=("--announce-period", "5"))
    with local:
        yield local


@pytest.mark.slow
async def test_chaos_generation_never_fails(chaos_swarm, model_dir, reference):
    prompts = [prompt(100 + i, length=4 + i % 3) for i in range(4)]
    new_tokens = 24
    expected = [reference.generate(p, max_new_tokens=new_tokens, do_sample=False)
                for p in prompts]
    chaos = Chaos(chaos_swarm, CHAOS_SECONDS, seed=7)
    model = await RemoteModel.open(model_dir, [chaos_swarm.bootstrap])
    generations, failures, wrong, recoveries = 0, [], 0, []
    try:
        await wait_until_visible(model, len(CHAOS_SPANS))
        chaos.thread.start()
        while chaos.thread.is_alive():
            ids, want = prompts[generations % len(prompts)], expected[generations % len(prompts)]
            try:
                blocks_session = await model.blocks.inference_session(1, 32)
                chaos.in_use = {str(s.peer) for s in blocks_session.spans}

                def track(_chosen, session=blocks_session):
                    chaos.in_use = {str(s.peer) for s in session.spans}

                async with ModelSession(model, blocks_session) as session:
                    got = await model.generate(ids, session=session, on_tokens=track,
                                               max_new_tokens=new_tokens, do_sample=False)
                recoveries += blocks_session.recoveries
            except Exception as e:  # counted: the test asserts there are none
                failures.append(repr(e))
                continue
            finally:
                generations += 1
            wrong += not torch.equal(got, want)
    finally:
        chaos.join()
        await model.close()
    print(f"chaos: {chaos.kills} kills, {generations} generations, {len(recoveries)} "
          f"recoveries, slowest {max((r.seconds for r in recoveries), default=0):.3f} s")
    assert chaos.errors == []
    assert failures == []
    assert wrong == 0
    assert chaos.kills >= 8
    assert generations >= 10
    assert recoveries, "no kill hit a server in use: the test proved nothing"
    assert max(r.seconds for r in recoveries) < RECOVERY_LIMIT
