"""A block server behind a real Host (loopback sockets, real encryption), called by a client
host: the RPCs, the cache budget, and every kind of bad input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import msgpack
import pytest
import torch

import tensor_wire
from blocks import protocol
from blocks.cache_budget import CacheBudget, CacheFullError
from blocks.server import BlockServer, ServingConfig
from blocks.span import BlockSpan
from client.inference import InferenceError, InferenceSession, SessionConfig
from model_parts.skeleton import DeviceOptions, ModelInputError
from overlay.host import RemoteError
from tests.blocks.serving import served_in_process
from tests.model_factory import MAX_POSITIONS, build_model, save_model

MODEL_ID = "tiny-llama-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def spans(model_dir):
    return BlockSpan.load(model_dir, 0, 4), BlockSpan.load(model_dir, 0, 2)


@pytest.fixture
async def served(spans):
    span = spans[0]
    server = BlockServer(span, ServingConfig(model_id=MODEL_ID, cache_tokens=64, max_length=32,
                                             session_idle_timeout=0.4))
    async with served_in_process(server) as (host, client):
        yield server, host, client


def forward_request(hidden, **meta):
    return tensor_wire.encode_message([hidden], {"model": MODEL_ID, "start": 0, "end": 4, **meta})


async def test_forward_matches_the_local_model(served):
    server, host, client = served
    model = build_model("llama")
    ids = torch.randint(3, 100, (2, 7))
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    answer = await client.call(host.peer_id, protocol.METHOD_FORWARD, forward_request(states[0]))
    [output], _ = tensor_wire.decode_message(answer)
    # hidden_states[-1] has the final norm applied; compare through the last layer's input
    expected = model.model.layers[3](states[3], position_embeddings=model.model.rotary_emb(
        states[3], torch.arange(7).unsqueeze(0)))
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert torch.allclose(output, expected, atol=1e-5)
    # a slice of the span: blocks [1, 3) only
    sliced = tensor_wire.encode_message([states[1]], {"model": MODEL_ID, "start": 1, "end": 3})
    [out13], _ = tensor_wire.decode_message(
        await client.call(host.peer_id, protocol.METHOD_FORWARD, sliced))
    full = tensor_wire.encode_message([states[1]], {"model": MODEL_ID, "start": 1, "end": 4})
    assert out13.shape == states[1].shape
    assert not torch.allclose(out13, tensor_wire.decode_message(
        await client.call(host.peer_id, protocol.METHOD_FORWARD, full)).tensors[0])
    assert torch.allclose(out13, states[3], atol=1e-5)


async def test_info(served):
    server, host, client = served
    import msgpack

    info = msgpack.unpackb(await client.call(host.peer_id, protocol.METHOD_INFO, b""))
    assert (info["model"], info["start"], info["end"], info["cache_tokens_free"]) == \
        (MODEL_ID, 0, 4, 64)


@pytest.mark.parametrize(
    ("meta", "tensors", "code"),
    [
        ({"model": "other", "start": 0, "end": 4}, [torch.zeros(1, 2, 64)], "unknown_model"),
        ({"model": MODEL_ID, "start": 0, "end": 5}, [torch.zeros(1, 2, 64)], "bad_range"),
        ({"model": MODEL_ID, "start": 2, "end": 2}, [torch.zeros(1, 2, 64)], "bad_range"),
        ({"model": MODEL_ID, "start": "0", "end": 4}, [torch.zeros(1, 2, 64)], "bad_input"),
        ({"model": MODEL_ID, "start": 0, "end": 4}, [torch.zeros(1, 2, 63)], "bad_input"),
        ({"model": MODEL_ID, "start": 0, "end": 4}, [torch.zeros(1, 2, 64).double()], "bad_input"),
        ({"model": MODEL_ID, "start": 0, "end": 4}, [torch.zeros(1, 2, 64).long()], "bad_input"),
        ({"model": MODEL_ID, "start": 0, "end": 4}, [torch.zeros(2, 64)], "bad_input"),
        ({"model": MODEL_ID, "start": 0, "end": 4}, [], "bad_input"),
        ({"model": MODEL_ID, "start": 0, "end": 4}, [torch.zeros(1, 20000, 64)], "too_large"),
        ({"model": MODEL_ID, "start": 0, "end": 4, "compression": "zip"},
         [torch.zeros(1, 2, 64)], "bad_input"),
    ],
)
async def test_bad_forward_requests_are_refused(served, meta, tensors, code):
    server, host, client = served
    with pytest.raises(RemoteError) as info:
        await client.call(host.peer_id, protocol.METHOD_FORWARD,
                          tensor_wire.encode_message(tensors, meta))
    assert info.value.code == code
    ok = await client.call(host.peer_id, protocol.METHOD_FORWARD,
                           forward_request(torch.randn(1, 3, 64)))
    assert tensor_wire.decode_message(ok).tensors[0].shape == (1, 3, 64)


async def test_garbage_payload_is_refused(served):
    server, host, client = served
    with pytest.raises(RemoteError) as info:
        await client.call(host.peer_id, protocol.METHOD_FORWARD, b"\x00garbage")
    assert info.value.code == "bad_input"


def session(client, host, max_length=16, batch=1, **config):
    return InferenceSession(client, MODEL_ID, [(host.peer_id, 0, 4)],
                            SessionConfig(batch_size=batch, max_length=max_length, **config))


async def test_session_steps_rollback_and_errors(served, spans):
    server, host, client = served
    local = spans[0].new_session(2, 16)
    async with session(client, host, batch=2) as remote:
        assert server.cache_tokens_free == 64 - 2 * 16
        prefix = torch.randn(2, 5, 64)
        assert torch.allclose(await remote.step(prefix), local.step(prefix), atol=1e-5)
        token = torch.randn(2, 1, 64)
        first = await remote.step(token)
        assert torch.allclose(first, local.step(token), atol=1e-5)
        remote.rollback(5)  # move back and take a different branch
        local.rollback(5)
        other = torch.randn(2, 3, 64)
        assert torch.allclose(await remote.step(other), local.step(other), atol=1e-5)
        with pytest.raises(RemoteError) as info:  # wrong batch: refused, session intact
            await remote.spans[0].step(torch.randn(1, 1, 64), remote.position)
        assert info.value.code == "bad_input"
        with pytest.raises(RemoteError) as info:  # past max_length
            await remote.spans[0].step(torch.randn(2, 9, 64), remote.position)
        assert info.value.code == "too_long"
        with pytest.raises(InferenceError, match="max_length"):
            await remote.step(torch.randn(2, 9, 64))
        again = torch.randn(2, 1, 64)
        assert torch.allclose(await remote.step(again), local.step(again), atol=1e-5)
    for _ in range(100):
        if server.cache_tokens_free == 64:
            break
        await asyncio.sleep(0.01)
    assert server.cache_tokens_free == 64 and server.num_sessions == 0
    with pytest.raises(InferenceError, match="closed"):
        await remote.step(torch.randn(2, 1, 64))


@contextlib.asynccontextmanager
async def twin_sessions(client, host, spans, prefix: torch.Tensor):
    """A batch-2 session on the server and the same span's session run locally, both past
    `prefix`, to compare step by step."""
    local = spans[0].new_session(2, 16)
    async with session(client, host, batch=2) as remote:
        local.step(prefix)
        await remote.step(prefix)
        yield local, remote


async def refusal(span, meta: dict, hidden: torch.Tensor | None = None) -> str:
    """The error code a server answers a step with this meta (sent as is) and these hidden
    states ([2, 1] by default)."""
    step_id = span.next_step_id()
    hidden = torch.randn(2, 1, 64) if hidden is None else hidden
    await span._send(tensor_wire.encode_message([hidden], {"step": step_id, **meta}))
    with pytest.raises(RemoteError) as info:
        span.read(await span._receive(10), step_id)
    return info.value.code


async def test_padded_steps_match_the_span_and_bad_masks_are_refused(served, spans):
    server, host, client = served
    local = spans[0].new_session(2, 16)
    prefix, mask = torch.randn(2, 4, 64), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    async with session(client, host, batch=2) as remote:
        expected = local.step(prefix, mask=mask)
        assert torch.allclose(await remote.step(prefix, mask), expected, atol=1e-5)
        for bad in (b"\x01", bytes([1, 2]), b"\x00" * 3, "0101"):
            assert await refusal(remote.spans[0], {"position": 4, "mask": bad}) == "bad_input"
        token = torch.randn(2, 1, 64)  # the session kept its padding through the refusals
        assert torch.allclose(await remote.step(token), local.step(token), atol=1e-5)


async def test_reordered_steps_match_the_span_and_bad_reorders_are_refused(served, spans):
    server, host, client = served
    async with twin_sessions(client, host, spans, torch.randn(2, 4, 64)) as (local, remote):
        for bad in ([1, [0, 5]], [2, [0, 1]], [1, [0]], [1, "01"]):
            assert await refusal(remote.spans[0], {"position": 4, "reorder": bad}) == "bad_input"
        remote.reorder(torch.tensor([1, 0]))
        local.reorder(1, [1, 0])
        token = torch.randn(2, 1, 64)
        assert torch.allclose(await remote.step(token), local.step(token), atol=1e-5)


async def test_a_refused_step_changes_nothing_in_the_session(served, spans):
    """Each bad step goes back to position 2 with a valid reorder: had the server rolled back
    or reordered before finding the step bad, the next honest step at 8 would be refused or
    computed on permuted rows."""
    server, host, client = served
    async with twin_sessions(client, host, spans, torch.randn(2, 8, 64)) as (local, remote):
        back = {"position": 2, "reorder": [1, [1, 0]]}
        bad_steps = [
            (torch.randn(2, 1, 64, dtype=torch.float64), back, "bad_input"),
            (torch.tensor(1.0), back, "bad_input"),  # rank 0 (was an internal error)
            (torch.randn(2, 64), back, "bad_input"),  # rank 2 (was called too long)
            (torch.randn(1, 1, 64), back, "bad_input"),  # batch
            (torch.randn(2, 15, 64), back, "too_long"),
            (torch.randn(2, 1, 64), {**back, "mask": b"\x01\x07"}, "bad_input"),
            (torch.randn(2, 1, 64), {**back, "reorder": [2, [1, 0]]}, "bad_input"),  # skips 1
        ]
        for hidden, meta, code in bad_steps:
            assert await refusal(remote.spans[0], meta, hidden) == code, (hidden.shape, meta)
        token = torch.randn(2, 1, 64)
        assert torch.allclose(await remote.step(token), local.step(token), atol=1e-5)
        assert remote.position == 9


async def test_a_server_with_a_small_request_limit_gets_steps_cut_to_fit(spans):
    """The opening answer gives the limit (8 tokens); the client cuts a 2 x 11 prefill and a
    replay into steps of 4 positions, a step over the limit sent as is changes nothing, and a
    session with more rows than the limit takes is refused when it opens, naming the limit."""
    import msgpack

    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID, cache_tokens=64,
                                                 max_length=32, max_request_tokens=8))
    async with served_in_process(server) as (host, client):
        info = msgpack.unpackb(await client.call(host.peer_id, protocol.METHOD_INFO, b""))
        assert info["max_request_tokens"] == 8
        local = spans[0].new_session(2, 16)
        prefix = torch.randn(2, 11, 64)
        async with session(client, host, batch=2) as remote:
            assert remote.spans[0].max_request_tokens == 8
            assert torch.allclose(await remote.step(prefix), local.step(prefix), atol=1e-5)
            assert [t.shape[1] for t in remote.spans[0].inputs] == [4, 4, 3]
            assert await refusal(remote.spans[0], {"position": 11},
                                 torch.randn(2, 5, 64)) == "too_large"
            token = torch.randn(2, 1, 64)
            assert torch.allclose(await remote.step(token), local.step(token), atol=1e-5)
            from client.inference import _step_in_pieces

            async with session(client, host, batch=2) as replayed:  # a replacement's replay
                again = torch.cat([prefix, token], dim=1)
                assert torch.allclose(await _step_in_pieces(replayed.spans[0], again),
                                      torch.cat([local.step_at(0, prefix), local.step(token)],
                                                dim=1), atol=1e-5)
                assert [t.shape[1] for t in replayed.spans[0].inputs] == [4, 4, 4]
        with pytest.raises(InferenceError, match=r"at most 8 tokens per request.* 9 rows"):
            await session(client, host, max_length=2, batch=9).open()


async def test_padding_and_reorders_are_not_sent_to_servers_without_them(served, monkeypatch):
    """A server of a version before these features would ignore the fields and compute
    something else: the client refuses to send them, saying why."""
    server, host, client = served
    monkeypatch.setattr(protocol, "SESSION_FEATURES", ())  # what an older server answers
    async with session(client, host, batch=2) as remote:
        with pytest.raises(ModelInputError, match="upgrade"):
            await remote.step(torch.randn(2, 3, 64), torch.tensor([[0, 1, 1], [1, 1, 1]]))
        await remote.step(torch.randn(2, 3, 64))  # plain steps still work
        remote.reorder(torch.tensor([1, 0]))
        with pytest.raises(ModelInputError, match="upgrade"):
            await remote.step(torch.randn(2, 1, 64))


async def test_cache_budget_waits_then_fails_clearly(served):
    server, host, client = served
    first = await session(client, host, max_length=32, batch=2).open()  # all 64 tokens
    try:
        with pytest.raises(RemoteError) as info:
            await session(client, host, max_length=8, wait_timeout=0.2).open()
        assert info.value.code == "cache_full" and "within 0.2 s" in info.value.message
        with pytest.raises(RemoteError) as info:  # more than the whole budget: at once
            await session(client, host, max_length=32, batch=3).open()
        assert info.value.code in ("cache_full", "bad_input")
        waiting = asyncio.ensure_future(session(client, host, max_length=8, wait_timeout=10)
                                        .open())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await first.close()  # frees the cache: the waiting session gets it
        second = await asyncio.wait_for(waiting, 10)
        await second.close()
    finally:
        await first.close()


async def test_a_server_of_another_precision_converts_the_clients_hidden_states(model_dir):
    """A bfloat16 server of a model whose client runs float32 (`serve --dtype bfloat16` next
    to float32 servers: the same model id): the server converts, the client gets its own
    dtype back, and the numbers are those of the bfloat16 span."""
    span = BlockSpan.load(model_dir, 0, 4, DeviceOptions(dtype="bfloat16"))
    server = BlockServer(span, ServingConfig(model_id=MODEL_ID, cache_tokens=64, max_length=32))
    prefix, token = torch.randn(1, 5, 64), torch.randn(1, 1, 64)
    local = span.new_session(1, 16)
    expected = [local.step(prefix.bfloat16()), local.step(token.bfloat16())]
    async with served_in_process(server) as (host, client):
        async with session(client, host) as remote:
            got = [await remote.step(prefix), await remote.step(token)]
        answer = await client.call(host.peer_id, protocol.METHOD_FORWARD,
                                   forward_request(prefix))
    assert [g.dtype for g in got] == [torch.float32] * 2
    assert all(torch.equal(g.bfloat16(), e) for g, e in zip(got, expected))
    assert tensor_wire.decode_message(answer).tensors[0].dtype == torch.bfloat16


@pytest.mark.parametrize("push", [True, False])
async def test_closing_a_session_ends_a_step_in_flight(served, push):
    """The server freezes mid-step; the application closes the session from another task:
    the step fails at once instead of waiting out step_timeout (with push it waited for
    ever: nothing woke the mailbox)."""
    server, host, client = served
    remote = await session(client, host, push=push, step_timeout=300).open()
    await remote.step(torch.randn(1, 2, 64))
    host.freeze()
    stepping = asyncio.ensure_future(remote.step(torch.randn(1, 1, 64)))
    await asyncio.sleep(0.05)
    assert not stepping.done()
    await remote.close()
    with pytest.raises(InferenceError):
        await asyncio.wait_for(stepping, 5)


async def test_a_second_step_while_one_runs_is_refused(served):
    server, host, client = served
    async with session(client, host) as remote:
        first = asyncio.ensure_future(remote.step(torch.randn(1, 3, 64)))
        await asyncio.sleep(0)
        with pytest.raises(InferenceError, match="already running"):
            await remote.step(torch.randn(1, 1, 64))
        assert (await first).shape == (1, 3, 64)
        assert (await remote.step(torch.randn(1, 1, 64))).shape == (1, 1, 64)


async def test_a_wait_for_cache_ends_when_its_client_leaves(spans):
    """A session queued for the whole cache, whose client then leaves, must not stay ahead of
    later sessions that fit (it did, for as long as its wait_timeout said)."""
    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID, cache_tokens=64,
                                                 max_length=32))  # nothing idles out here
    async with served_in_process(server) as (host, client):
        first = await session(client, host, max_length=16).open()  # 64 of 256 block-tokens
        waiting = asyncio.ensure_future(
            session(client, host, max_length=32, batch=2, wait_timeout=3600).open())  # all 256
        for _ in range(500):
            if server.budget._waiters:
                break
            await asyncio.sleep(0.01)
        assert server.budget._waiters and not waiting.done()
        waiting.cancel()  # the client gives up: it closes the stream
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        third = await session(client, host, max_length=16, wait_timeout=2).open()
        assert not server.budget._waiters
        await third.close()
        await first.close()


async def test_compressed_requests_may_not_decode_past_the_servers_limit(served):
    """16384 tokens x hidden 64 is the largest request: an lz4 message of zeros that would
    decode to 60 MiB is refused before anything is allocated, and the server serves on."""
    server, host, client = served
    bomb = torch.zeros(4, 1, 60_000, 64)  # deep prompts, 61 MB; compressed: 0.3 MB
    payload = tensor_wire.encode_message(
        [torch.zeros(1, 2, 64), bomb], {"model": MODEL_ID, "start": 0, "end": 4, "prompts": True},
        ["none", "lz4"])
    assert len(payload) < 1 << 20 and server.limits.max_decoded_bytes < bomb.numel() * 4
    with pytest.raises(RemoteError, match="decoded-size limit") as info:
        await client.call(host.peer_id, protocol.METHOD_FORWARD, payload)
    assert info.value.code == "bad_input"
    hidden = torch.randn(1, 3, 64)
    answer = await client.call(host.peer_id, protocol.METHOD_FORWARD, forward_request(hidden))
    assert tensor_wire.decode_message(answer).tensors[0].shape == hidden.shape


async def test_idle_sessions_are_closed_and_their_cache_returned(served):
    server, host, client = served
    remote = await session(client, host).open()
    await remote.step(torch.randn(1, 2, 64))
    assert server.num_sessions == 1
    for _ in range(100):
        if server.num_sessions == 0:
            break
        await asyncio.sleep(0.05)
    assert server.num_sessions == 0 and server.cache_tokens_free == 64
    with pytest.raises((RemoteError, InferenceError)):
        await remote.step(torch.randn(1, 1, 64))
    await remote.close()


async def test_no_growth_after_hundreds_of_sessions(served):
    server, host, client = served
    for i in range(200):
        remote = await session(client, host, max_length=8).open()
        await remote.step(torch.randn(1, 3, 64))
        if i % 2:
            await remote.close()
        else:
            remote.spans[0]._stream.reset("client vanished")  # abrupt end
    for _ in range(100):
        if server.num_sessions == 0 and server.cache_tokens_free == 64:
            break
        await asyncio.sleep(0.02)
    assert server.num_sessions == 0 and server.cache_tokens_free == 64
    conn = client.connection_to(host.peer_id)
    assert conn.num_streams == 0 and conn._mux.stream_ids() == []


async def test_cache_budget_is_fifo_and_exact():
    budget = CacheBudget(10)
    await budget.acquire(6, 1)
    big = asyncio.ensure_future(budget.acquire(8, 5))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(budget.acquire(2, 5))
    await asyncio.sleep(0)
    assert not small.done(), "a small request must not overtake a waiting large one"
    budget.release(6)
    await big
    await small
    assert budget.used == 10
    with pytest.raises(CacheFullError):
        await budget.acquire(11, 0)
    with pytest.raises(CacheFullError):
        await budget.acquire(1, 0.01)
    budget.release(10)
    assert budget.free == 10


@pytest.mark.parametrize("push", [True, False])
async def test_a_reset_session_returns_its_cache_at_once(spans, push):
    """A client that resets its session's stream (a crash, a recovery elsewhere) frees the
    server's cache right away, not after the idle timeout; with push on too, where the
    session reads its client stream through an inbox."""
    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID, cache_tokens=64,
                                                 max_length=32, session_idle_timeout=60.0))
    async with served_in_process(server) as (host, client):
        remote = await session(client, host, push=push).open()
        await remote.step(torch.randn(1, 3, 64))
        assert server.num_sessions == 1 and server.cache_tokens_free < 64
        remote.spans[0]._stream.reset("client vanished")
        for _ in range(100):
            if server.num_sessions == 0:
                break
            await asyncio.sleep(0.02)
        assert server.num_sessions == 0 and server.cache_tokens_free == 64
        await remote.close()


async def test_requests_waiting_for_compute_are_bounded_per_peer(spans):
    """A peer's finished requests queued for the worker thread hold memory until served: past
    its limit the server refuses them with `overloaded` (before, it held them all)."""
    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID, max_waiting_bytes_per_peer=1))
    async with served_in_process(server) as (host, client):
        payload = forward_request(torch.randn(2, 64, 64))
        results = await asyncio.gather(*(
            client.call(host.peer_id, protocol.METHOD_FORWARD, payload) for _ in range(8)),
            return_exceptions=True)
        codes = [r.code if isinstance(r, RemoteError) else type(r).__name__ for r in results]
        assert "bytes" in codes and "overloaded" in codes and set(codes) == {"bytes", "overloaded"}
        assert server.decoder.waiting_bytes() == 0
        answer = await client.call(host.peer_id, protocol.METHOD_FORWARD, payload)
        assert tensor_wire.decode_message(answer).tensors[0].shape == (2, 64, 64)


async def test_a_push_session_queues_few_of_the_steps_a_client_sends_without_waiting(spans):
    """With push on, a reader task moves the client's messages into the session's queue: it
    read on regardless, so steps sent without reading the answers piled up there (292 of 300
    within a second); now they wait in the transport, under its flow control."""
    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID, max_length=32))
    async with served_in_process(server) as (host, client):
        await _flood_a_push_session(server, host, client)


async def _flood_a_push_session(server, host, client) -> None:
    stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
    await stream.send(tensor_wire.encode_message([], {
        "model": MODEL_ID, "start": 0, "end": 4, "max_length": 32, "batch_size": 16, "push": 1}))
    assert "push" in tensor_wire.decode_message(await stream.recv()).meta
    step = tensor_wire.encode_message([torch.randn(16, 32, 64)], {"position": 0, "step": 1})

    async def flood():
        for _ in range(300):
            await stream.send(step)

    sender = asyncio.ensure_future(flood())
    try:
        [entry] = server._sessions.values()
        queued = []
        for _ in range(100):
            await asyncio.sleep(0.01)
            queued.append(len(entry.inbox._items))
        assert max(queued) <= 2
    finally:
        sender.cancel()
        stream.reset("done")


async def test_pushes_count_as_waiting_requests_while_they_are_decoded(spans):
    """A push is decoded before its token can be checked (it is in the metadata): pushes with
    made-up tokens were all decoded at once, on threads, with no bound; now they count in the
    peer's waiting bytes, and past them are refused with `overloaded`."""
    from blocks.push_protocol import METHOD_PUSH

    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID, max_waiting_bytes_per_peer=1))
    async with served_in_process(server) as (host, client):
        payload = tensor_wire.encode_message(  # 8 MiB: decoded off the loop
            [torch.randn(2, 16384, 64)], {"token": bytes(16), "step": 1, "position": 0})
        results = await asyncio.gather(*(
            client.call(host.peer_id, METHOD_PUSH, payload) for _ in range(12)),
            return_exceptions=True)
        codes = {r.code for r in results}
        assert codes == {"session_closed", "overloaded"}
        assert server.decoder.waiting_bytes() == 0


async def test_a_session_opening_with_tensors_is_refused_before_decoding(served):
    """Openings carry no tensors (docs/block_protocol.md): one with 12 MiB of lz4 zeros (50 KB
    sent) was decoded on the event loop anyway, then opened a session."""
    server, host, client = served
    stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
    await stream.send(tensor_wire.encode_message([torch.zeros(3, 16384, 64)], {
        "model": MODEL_ID, "start": 0, "end": 4, "max_length": 16, "batch_size": 1}, "lz4"))
    with pytest.raises(RemoteError, match="opening carries no tensors") as refused:
        await stream.recv()
    assert refused.value.code == "bad_input" and not server._sessions


async def test_push_failures_a_client_causes_at_will_log_a_bounded_number_of_lines(
        served, caplog):
    """A client names the push hops: one that names an unreachable one on every step made the
    server log one line per step."""
    from overlay.identity import Identity
    from overlay.log_limit import DEFAULT_BURST

    server, host, client = served
    stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
    await stream.send(tensor_wire.encode_message([], {
        "model": MODEL_ID, "start": 0, "end": 4, "max_length": 32, "batch_size": 1}))
    await stream.recv()
    hop = {"peer": str(Identity.generate().peer_id), "token": bytes(16), "step": 1}  # no addrs
    with caplog.at_level(logging.INFO, logger="blocks.push"):
        for i in range(DEFAULT_BURST + 10):
            await stream.send(tensor_wire.encode_message(
                [torch.zeros(1, 1, 64)], {"position": i, "step": i + 1, "next": [hop]}))
            await stream.recv()  # the output, then the failure notice
            await stream.recv()
    assert server.push.push_failures == DEFAULT_BURST + 10
    assert caplog.text.count("the client relays") == DEFAULT_BURST
    stream.reset("done")


async def test_a_push_that_fails_at_once_is_reported_after_the_steps_answer(served):
    """A push to a peer with no address fails before the step's answer is sent: its notice
    went out first, and the client, which reads a span's notice only after that span's
    answer, dropped it and waited out its step timeout for a push that never came."""
    from overlay.identity import Identity

    server, host, client = served
    stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
    await stream.send(tensor_wire.encode_message([], {
        "model": MODEL_ID, "start": 0, "end": 4, "max_length": 32, "batch_size": 1}))
    await stream.recv()
    hop = {"peer": str(Identity.generate().peer_id), "token": bytes(16), "step": 1}
    for step in range(3):
        await stream.send(tensor_wire.encode_message(
            [torch.zeros(1, 1, 64)], {"position": step, "step": step, "next": [hop]}))
        answer = tensor_wire.decode_message(await stream.recv())
        assert answer.meta == {"step": step} and len(answer.tensors) == 1
        notice = tensor_wire.decode_message(await stream.recv())
        assert notice.meta["step"] == step and "push_failed" in notice.meta
    assert server.push.push_failures == 3
    stream.reset("done")


async def test_a_push_dials_no_address_a_client_names(served):
    """A push hop names a made-up peer id at a listening socket: the server dialed it (a TCP
    connection and the first handshake message to any address, a reflection tool); now it
    dials only next servers it found announced, so this push fails at once and is reported."""
    from overlay.identity import Identity

    server, host, client = served
    accepted = []

    async def record(reader, writer):
        accepted.append(await reader.read(100))
        writer.close()

    listener = await asyncio.start_server(record, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
        await stream.send(tensor_wire.encode_message([], {
            "model": MODEL_ID, "start": 0, "end": 4, "max_length": 32, "batch_size": 1}))
        await stream.recv()
        hop = {"peer": str(Identity.generate().peer_id), "token": bytes(16), "step": 1,
               "addrs": [f"/ip4/127.0.0.1/tcp/{port}"]}
        await stream.send(tensor_wire.encode_message(
            [torch.zeros(1, 1, 64)], {"position": 0, "step": 0, "next": [hop]}))
        assert tensor_wire.decode_message(await stream.recv()).meta == {"step": 0}
        notice = tensor_wire.decode_message(await stream.recv()).meta
        assert "not an announced server" in notice["push_failed"]
        stream.reset("done")
        await asyncio.sleep(0.05)  # (a dial would have been accepted by now)
    finally:
        listener.close()
    assert accepted == [] and server.push.push_failures == 1


async def test_a_session_relays_to_an_unannounced_next_server_and_pushes_once_learnt(
        model_dir, spans):
    """Two servers in one chain, the second one unknown to the first: every hop is relayed by
    the client (the first server never connects to the second), with the local span's
    results; once the first server has the second's announced address, it pushes."""
    first = BlockServer(spans[1], ServingConfig(model_id=MODEL_ID, cache_tokens=64,
                                                max_length=32))
    second = BlockServer(BlockSpan.load(model_dir, 2, 4),
                         ServingConfig(model_id=MODEL_ID, cache_tokens=64, max_length=32))
    local = spans[0].new_session(1, 16)
    async with served_in_process(first) as (host1, client), \
            served_in_process(second) as (host2, _):
        [addr2] = host2.addrs
        client.add_peer_addrs(host2.peer_id, [addr2])
        route = [(host1.peer_id, 0, 2), (host2.peer_id, 2, 4)]
        async with InferenceSession(client, MODEL_ID, route, SessionConfig(max_length=16)) \
                as remote:
            assert all(s.push_token is not None for s in remote.spans)
            hidden = torch.randn(1, 6, 64)
            for lo, hi in [(0, 3), (3, 4)]:
                assert torch.allclose(await remote.step(hidden[:, lo:hi]),
                                      local.step(hidden[:, lo:hi]), atol=1e-5)
            assert remote.client_sends == 4 and first.push.push_failures == 2
            assert host2.connection_to(host1.peer_id) is None
            first.push.learn_hops({str(host2.peer_id): [str(addr2)]})  # as announced
            for lo, hi in [(4, 5), (5, 6)]:
                assert torch.allclose(await remote.step(hidden[:, lo:hi]),
                                      local.step(hidden[:, lo:hi]), atol=1e-5)
            assert remote.client_sends == 6
            # (a push counts once acknowledged, which the next server does after the step)
            for _ in range(200):
                if first.push.pushed == 2:
                    break
                await asyncio.sleep(0.01)
            assert first.push.pushed == 2


async def test_a_computation_cut_off_by_its_deadline_still_counts_until_its_thread_ends(spans):
    """A request cancelled (its deadline, its client gone) while the worker thread ran its torch
    work: the worker count dropped at once, though the thread still held the span's lock, so the
    next short step ran inline and froze the event loop on that lock for the rest of the work.
    Work still queued behind it is dropped at once."""
    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID))
    started, release = threading.Event(), threading.Event()

    def slow(hidden):
        started.set()
        release.wait(30)
        return hidden

    hidden = torch.zeros(1, 1, spans[0].hidden_size)
    running = asyncio.ensure_future(server._compute(slow, hidden))
    queued = asyncio.ensure_future(server._compute(slow, hidden))
    try:
        assert await asyncio.to_thread(started.wait, 10)
        await asyncio.sleep(0)
        assert server._in_worker == 2
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued  # not started: dropped at once
        assert server._in_worker == 1
        running.cancel()
        for _ in range(3):
            await asyncio.sleep(0.02)
        assert not running.done() and server._in_worker == 1  # its thread still runs it
        running.cancel()  # cancelled again meanwhile: still waits
        await asyncio.sleep(0.02)
        assert not running.done()
    finally:
        release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 10)
    assert server._in_worker == 0
    server._executor.shutdown()


async def test_a_stream_that_never_sends_its_session_opening_is_refused(spans):
    server = BlockServer(spans[0], ServingConfig(model_id=MODEL_ID, session_opening_timeout=0.2))
    async with served_in_process(server) as (host, client):
        stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
        with pytest.raises(RemoteError) as info:
            await asyncio.wait_for(stream.recv(), 10)
        assert info.value.code == "bad_input" and "no session opening" in info.value.message
        opened = await session(client, host).open()  # the server serves on
        await opened.close()


async def test_sessions_longer_than_a_learned_position_table_are_refused_clearly(tmp_path):
    """GPT-2's positions are a table of 256 rows: a session opened for more, or a forward of
    more, failed inside the model (`internal`, a traceback in the log) once it got there."""
    span = BlockSpan.load(save_model("gpt2", tmp_path / "gpt2"), 0, 2)
    server = BlockServer(span, ServingConfig(model_id=MODEL_ID, cache_tokens=1024,
                                             max_length=1024))
    async with served_in_process(server) as (host, client):
        info = msgpack.unpackb(await client.call(host.peer_id, protocol.METHOD_INFO, b""))
        assert info["max_length"] == MAX_POSITIONS
        stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
        await stream.send(tensor_wire.encode_message([], {
            "model": MODEL_ID, "start": 0, "end": 2, "batch_size": 1, "max_length": 300}))
        with pytest.raises(RemoteError) as refused:
            await stream.recv()
        assert refused.value.code == "too_long" and "256 positions" in refused.value.message
        hidden = torch.zeros(1, MAX_POSITIONS + 1, span.hidden_size)
        with pytest.raises(RemoteError) as refused:
            await client.call(host.peer_id, protocol.METHOD_FORWARD, tensor_wire.encode_message(
                [hidden], {"model": MODEL_ID, "start": 0, "end": 2}))
        assert refused.value.code == "too_long"
        assert server.cache_tokens_free == 1024  # nothing held
