"""Fine-tuning RPCs of a block server behind a real Host (loopback, encrypted): blocks.backward
and blocks.lora_put, deep prompts and LoRA in forward and inference, hosted PEFT adapters; checked
against transformers' own layers run under autograd here, and every kind of bad input refused
with the server still serving."""

from __future__ import annotations

import json

import msgpack
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.masking_utils import create_causal_mask

import tensor_wire
from blocks import protocol
from blocks.lora import AdapterError, load_hosted_adapters, load_peft_lora
from blocks.server import BlockServer, ServingConfig
from blocks.span import BlockSpan
from model_parts.lora_format import tensors_digest
from overlay.host import RemoteError
from tests.blocks.serving import served_in_process
from tests.model_factory import HIDDEN_SIZE, build_model, save_model

MODEL_ID = "tiny-llama-finetune"
MODULES = ("self_attn.q_proj", "self_attn.v_proj")
RANK, ALPHA = 4, 8.0
PREFIX = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def reference():
    return build_model("llama")


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(build_model("llama"), LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    directory = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def span(model_dir):
    return BlockSpan.load(model_dir, 0, 4)


@pytest.fixture
async def served(span, peft_dir):
    config = ServingConfig(model_id=MODEL_ID, cache_tokens=64, max_length=32,
                           max_backward_tokens=64, max_adapter_bytes=64 << 10,
                           adapter_cache_bytes=256 << 10)
    server = BlockServer(span, config, load_hosted_adapters([f"tuned={peft_dir}"], span))
    async with served_in_process(server) as (host, client):
        yield server, host, client


def random_lora(seed: int, start: int = 0, end: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for block in range(start, end):
        for name in MODULES:
            out_features = HIDDEN_SIZE if name.endswith("q_proj") else HIDDEN_SIZE // 2
            out[(block, name)] = (torch.randn(RANK, HIDDEN_SIZE, generator=g) * 0.1,
                                  torch.randn(out_features, RANK, generator=g) * 0.1)
    return out


def put_message(lora, start=0, end=4, **changes):
    tensors = [t for b in range(start, end) for m in MODULES for t in lora[(b, m)]]
    meta = {"model": MODEL_ID, "start": start, "end": end, "rank": RANK, "alpha": ALPHA,
            "modules": list(MODULES)}
    if "digest" not in changes:
        meta["digest"] = tensors_digest(start, end, RANK, ALPHA, False, MODULES, tensors)
    meta.update(changes)
    return tensor_wire.encode_message(tensors, meta), meta["digest"]


async def call(client, host, method, tensors, **meta):
    answer = await client.call(host.peer_id, method, tensor_wire.encode_message(
        tensors, {"model": MODEL_ID, "start": 0, "end": 4, **meta}))
    return tensor_wire.decode_message(answer)


def reference_blocks(model, hidden, prompts=None, lora=None, scaling=ALPHA / RANK,
                     start=0, end=4):
    """transformers' own layers [start, end), with the prompts added before each block and
    LoRA hooks on the target modules: what the servers must compute."""
    handles = []
    if lora is not None:
        for (block, name), (a, b) in lora.items():
            module = model.model.layers[block].get_submodule(name)
            handles.append(module.register_forward_hook(
                lambda mod, args, out, a=a, b=b: out + (args[0] @ a.T) @ b.T * scaling))
    try:
        length = hidden.shape[1]
        positions = torch.arange(length).unsqueeze(0)
        rotary = model.model.rotary_emb(hidden, positions)
        x = hidden
        for j, block in enumerate(range(start, end)):
            if prompts is not None:
                x = torch.cat([x[:, :PREFIX] + prompts[j], x[:, PREFIX:]], dim=1)
            mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None,
                                      cache=None, position_ids=positions)
            x = model.model.layers[block](x, attention_mask=mask, position_embeddings=rotary,
                                          position_ids=positions)
            x = x[0] if isinstance(x, tuple) else x
        return x
    finally:
        for handle in handles:
            handle.remove()


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


async def test_backward_matches_autograd_through_transformers_layers(served, reference):
    server, host, client = served
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, HIDDEN_SIZE, generator=g)
    prompts = torch.randn(4, 1, PREFIX, HIDDEN_SIZE, generator=g) * 0.3
    grad_out = torch.randn(2, 7, HIDDEN_SIZE, generator=g)
    lora = random_lora(2)
    payload, digest = put_message(lora)
    answer = tensor_wire.decode_message(
        await client.call(host.peer_id, protocol.METHOD_LORA_PUT, payload))
    assert answer.meta == {"digest": digest}

    got = await call(client, host, protocol.METHOD_BACKWARD, [hidden, grad_out, prompts],
                     prompts=True, lora=digest)
    forward = await call(client, host, protocol.METHOD_FORWARD, [hidden, prompts], prompts=True,
                         lora=digest)
    leaves = {key: (a.clone().requires_grad_(), b.clone().requires_grad_())
              for key, (a, b) in lora.items()}
    h, p = hidden.clone().requires_grad_(), prompts.clone().requires_grad_()
    out = reference_blocks(reference, h, p[:, 0], leaves)
    order = [t for b in range(4) for m in MODULES for t in leaves[(b, m)]]
    expected = torch.autograd.grad(out, [h, p, *order], grad_out)
    assert close(forward.tensors[0], out)
    assert got.meta["lora"] == len(order) and len(got.tensors) == 2 + len(order)
    for mine, theirs in zip(got.tensors, expected):
        assert mine.shape == theirs.shape and close(mine, theirs)


async def test_prompts_and_lora_in_another_precision_are_converted(served):
    """A client whose head runs another precision than the server sends its prompts and LoRA
    in its own (as its hidden states): the server converts them (they were refused)."""
    server, host, client = served
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 6, HIDDEN_SIZE, generator=g)
    prompts = (torch.randn(4, 1, PREFIX, HIDDEN_SIZE, generator=g) * 0.3).to(torch.float16)
    grad_out = torch.randn(2, 6, HIDDEN_SIZE, generator=g)
    low = {key: (a.to(torch.bfloat16), b.to(torch.bfloat16))
           for key, (a, b) in random_lora(6).items()}
    same = {key: (a.float(), b.float()) for key, (a, b) in low.items()}
    answers = []
    for lora, deep in ((low, prompts), (same, prompts.float())):
        payload, digest = put_message(lora)
        await client.call(host.peer_id, protocol.METHOD_LORA_PUT, payload)
        forward = await call(client, host, protocol.METHOD_FORWARD, [hidden, deep],
                             prompts=True, lora=digest)
        backward = await call(client, host, protocol.METHOD_BACKWARD, [hidden, grad_out, deep],
                              prompts=True, lora=digest)
        answers.append((forward.tensors, backward.tensors))
    (low_forward, low_backward), (forward, backward) = answers
    assert close(low_forward[0], forward[0])
    assert low_backward[1].dtype == torch.float16  # the prompts' gradient, in their dtype
    assert len(low_backward) == len(backward)
    assert all(close(a.float(), b, tol=1e-3) for a, b in zip(low_backward, backward))


async def test_sub_span_backward_and_per_row_prompts(served, reference):
    server, host, client = served
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 5, HIDDEN_SIZE, generator=g)
    prompts = torch.randn(2, 3, PREFIX, HIDDEN_SIZE, generator=g) * 0.3  # one per row
    grad_out = torch.randn(3, 5, HIDDEN_SIZE, generator=g)
    answer = tensor_wire.decode_message(await client.call(
        host.peer_id, protocol.METHOD_BACKWARD, tensor_wire.encode_message(
            [hidden, grad_out, prompts],
            {"model": MODEL_ID, "start": 1, "end": 3, "prompts": True})))
    h, p = hidden.clone().requires_grad_(), prompts.clone().requires_grad_()
    out = reference_blocks(reference, h, p, start=1, end=3)
    expected = torch.autograd.grad(out, [h, p], grad_out)
    assert answer.meta["lora"] == 0
    assert all(close(a, b) for a, b in zip(answer.tensors, expected))


async def test_hosted_adapter_is_the_peft_adapter(served, peft_dir):
    server, host, client = served
    assert server.info()["adapters"] == ["tuned"]
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    lora = {(b, m): (state[f"base_model.model.model.layers.{b}.{m}.lora_A.weight"],
                     state[f"base_model.model.model.layers.{b}.{m}.lora_B.weight"])
            for b in range(4) for m in MODULES}
    payload, digest = put_message(lora)
    await client.call(host.peer_id, protocol.METHOD_LORA_PUT, payload)
    hidden = torch.randn(1, 6, HIDDEN_SIZE, generator=torch.Generator().manual_seed(4))
    hosted = (await call(client, host, protocol.METHOD_FORWARD, [hidden], adapter="tuned"))
    uploaded = (await call(client, host, protocol.METHOD_FORWARD, [hidden], lora=digest))
    plain = (await call(client, host, protocol.METHOD_FORWARD, [hidden]))
    assert torch.equal(hosted.tensors[0], uploaded.tensors[0])
    assert not close(hosted.tensors[0], plain.tensors[0], 1e-3)
    # a hosted adapter is frozen: backward returns the input gradient only
    back = await call(client, host, protocol.METHOD_BACKWARD, [hidden, torch.ones_like(hidden)],
                      adapter="tuned")
    assert len(back.tensors) == 1 and back.meta["lora"] == 0


async def test_inference_with_lora_and_prompts_matches_forward(served):
    server, host, client = served
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(1, 7, HIDDEN_SIZE, generator=g)
    prompts = torch.randn(4, 1, PREFIX, HIDDEN_SIZE, generator=g) * 0.3
    payload, digest = put_message(random_lora(7))
    await client.call(host.peer_id, protocol.METHOD_LORA_PUT, payload)
    full = (await call(client, host, protocol.METHOD_FORWARD, [hidden, prompts], prompts=True,
                       lora=digest)).tensors[0]
    stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
    await stream.send(tensor_wire.encode_message([], {
        "model": MODEL_ID, "start": 0, "end": 4, "batch_size": 1, "max_length": 16,
        "lora": digest}))
    assert "session" in tensor_wire.decode_message(await stream.recv()).meta
    assert server.tuning.uploads._entries[digest].pins == 1  # kept while the session is open
    outputs = []
    # the prefix of 3 positions is split across the first two steps; the last has no prompts
    for step, (a, b) in enumerate([(0, 2), (2, 5), (5, 7)]):
        tensors = [hidden[:, a:b]] + ([prompts] if step < 2 else [])
        await stream.send(tensor_wire.encode_message(
            tensors, {"position": a, "step": step, "prompts": step < 2}))
        answer = tensor_wire.decode_message(await stream.recv())
        assert answer.meta == {"step": step}
        outputs.append(answer.tensors[0])
    await stream.close()
    assert close(torch.cat(outputs, dim=1), full)


async def test_an_opening_cut_off_while_waiting_for_cache_leaves_its_lora_unpinned(served):
    """An opening naming an uploaded LoRA pins it, then waits for attention cache. When the
    deadline of its stream header passed meanwhile, the cancelled handler kept the pin, and a
    pinned upload is never dropped: one peer could fill the adapter cache for good so."""
    server, host, client = served
    payload, digest = put_message(random_lora(12))
    await client.call(host.peer_id, protocol.METHOD_LORA_PUT, payload)
    opening = {"model": MODEL_ID, "start": 0, "end": 4, "batch_size": 2, "max_length": 32}
    holder = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE)
    await holder.send(tensor_wire.encode_message([], opening))  # all of the cache
    assert "session" in tensor_wire.decode_message(await holder.recv()).meta
    for _ in range(2):
        stream = await client.open_stream(host.peer_id, protocol.METHOD_INFERENCE, timeout=0.3)
        await stream.send(tensor_wire.encode_message([], {
            **opening, "batch_size": 1, "max_length": 8, "wait_timeout": 30.0, "lora": digest}))
        with pytest.raises(RemoteError) as info:
            await stream.recv()
        assert info.value.code == "deadline_exceeded"
    assert server.tuning.uploads._entries[digest].pins == 0
    assert server.cache_tokens_free == 0  # the holder's, and no grant was left behind
    await holder.close()


def _grad(shape=(2, 4, HIDDEN_SIZE), dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


BAD_BACKWARD = [
    ("grad of the wrong shape", lambda h: [h, _grad((2, 3, HIDDEN_SIZE))], {}, "shape"),
    ("grad of the wrong dtype", lambda h: [h, _grad(dtype=torch.float64)], {}, "float64"),
    ("grad with NaN", lambda h: [h, _grad() * float("nan")], {}, "NaN"),
    ("no grad", lambda h: [h], {}, "expected 2 tensors"),
    ("hidden of the wrong dtype", lambda h: [h.double(), _grad()], {}, "shape|dtype|float64"),
    ("prompts of the wrong shape", lambda h: [h, _grad(), torch.zeros(3, 1, 2, HIDDEN_SIZE)],
     {"prompts": True}, "deep prompts"),
    ("prompts of the wrong dtype",
     lambda h: [h, _grad(), torch.zeros(4, 1, 2, HIDDEN_SIZE, dtype=torch.float64)],
     {"prompts": True}, "float64"),
    ("prompt batch mismatch", lambda h: [h, _grad(), torch.zeros(4, 3, 2, HIDDEN_SIZE)],
     {"prompts": True}, "deep prompts"),
    # integers cannot require gradients: refused before autograd (was an internal error)
    ("integer hidden states", lambda h: [h.long(), _grad()], {}, "int64"),
    ("boolean hidden states", lambda h: [h > 0, _grad()], {}, "bool"),
    ("integer prompts", lambda h: [h, _grad(), torch.zeros(4, 1, 2, HIDDEN_SIZE).long()],
     {"prompts": True}, "int64"),
    ("unknown uploaded LoRA", lambda h: [h, _grad()], {"lora": "0" * 64}, "upload"),
    ("unknown adapter", lambda h: [h, _grad()], {"adapter": "nope"}, "hosts no adapter"),
    ("too many tokens", lambda h: [torch.zeros(9, 8, HIDDEN_SIZE), _grad((9, 8, HIDDEN_SIZE))],
     {}, "exceed"),
]


@pytest.mark.parametrize("name, tensors, meta, match", BAD_BACKWARD,
                         ids=[row[0] for row in BAD_BACKWARD])
async def test_bad_backward_is_refused_and_the_server_keeps_serving(served, name, tensors,
                                                                    meta, match):
    server, host, client = served
    hidden = torch.randn(2, 4, HIDDEN_SIZE)
    with pytest.raises(RemoteError, match=match) as info:
        await call(client, host, protocol.METHOD_BACKWARD, tensors(hidden), **meta)
    expected = {"unknown uploaded LoRA": protocol.ADAPTER_MISSING,
                "unknown adapter": protocol.UNKNOWN_ADAPTER,
                "too many tokens": protocol.TOO_LARGE}.get(name, protocol.BAD_INPUT)
    assert info.value.code == expected
    good = await call(client, host, protocol.METHOD_BACKWARD, [hidden, _grad()])
    assert good.tensors[0].shape == hidden.shape and torch.isfinite(good.tensors[0]).all()


async def test_the_backward_limit_is_given_in_info_and_announced(served):
    """Clients cut their backward requests to it (client/training.py): blocks.info and the DHT
    record both carry it, next to the request limit."""
    from blocks.announcement import ServerInfo, ServerState
    from blocks.announcer import Announcer
    from blocks.throughput import ComputeRates

    server, host, client = served
    info = msgpack.unpackb(await client.call(host.peer_id, protocol.METHOD_INFO, b""))
    assert (info["max_backward_tokens"], info["max_request_tokens"]) == (
        64, protocol.DEFAULT_MAX_REQUEST_TOKENS)
    record = Announcer(None, host, server, ComputeRates(None, None, override=1.0), 4).info(
        ServerState.ONLINE)
    assert record.max_backward_tokens == 64
    assert ServerInfo.from_bytes(record.to_bytes()).max_backward_tokens == 64


def _bad_lora(kind):
    lora = random_lora(9)
    if kind == "rank mismatch":
        lora[(1, MODULES[0])] = (torch.zeros(RANK + 1, HIDDEN_SIZE), lora[(1, MODULES[0])][1])
    elif kind == "out_features mismatch":
        lora[(2, MODULES[1])] = (lora[(2, MODULES[1])][0], torch.zeros(HIDDEN_SIZE, RANK))
    elif kind == "wrong dtype":
        lora[(0, MODULES[0])] = tuple(t.double() for t in lora[(0, MODULES[0])])
    elif kind == "a scalar":  # the digest views tensors as bytes: was an internal error
        lora[(0, MODULES[0])] = (torch.tensor(1.0), lora[(0, MODULES[0])][1])
    elif kind == "an empty matrix":  # no bytes view of it either: was an internal error too
        lora[(1, MODULES[1])] = (lora[(1, MODULES[1])][0], torch.zeros(0, RANK))
    return lora


BAD_PUTS = [
    ("rank mismatch", {}, protocol.BAD_INPUT, "rank 4 on this layer needs"),
    ("out_features mismatch", {}, protocol.BAD_INPUT, "B is"),
    ("wrong dtype", {}, protocol.BAD_INPUT, "float64"),
    ("a scalar", {"digest": "b" * 64}, protocol.BAD_INPUT, "matrices"),
    ("an empty matrix", {"digest": "b" * 64}, protocol.BAD_INPUT, "non-empty matrices"),
    ("unknown module", {"modules": ["self_attn.q_proj", "self_attn.nothing"]},
     protocol.BAD_INPUT, "no module"),
    ("not a linear module", {"modules": ["self_attn.q_proj", "input_layernorm"]},
     protocol.BAD_INPUT, "nn.Linear"),
    ("digest mismatch", {"digest": "a" * 64}, protocol.BAD_INPUT, "digest"),
]


@pytest.mark.parametrize("kind, changes, code, match", BAD_PUTS, ids=[r[0] for r in BAD_PUTS])
async def test_bad_lora_uploads_are_refused(served, kind, changes, code, match):
    server, host, client = served
    lora = _bad_lora(kind)
    made_up = kind in ("a scalar", "an empty matrix")  # no digest can be computed of them
    if made_up:
        payload, _ = put_message(lora, **changes)
    else:
        payload, _ = put_message(lora)
    if changes and not made_up:
        tensors, meta = tensor_wire.decode_message(payload)
        meta.update(changes)
        if "modules" in changes:
            meta["digest"] = tensors_digest(0, 4, RANK, ALPHA, False, changes["modules"],
                                            tensors)
        payload = tensor_wire.encode_message(tensors, meta)
    with pytest.raises(RemoteError, match=match) as info:
        await client.call(host.peer_id, protocol.METHOD_LORA_PUT, payload)
    assert info.value.code == code
    assert len(server.tuning.uploads) == 0
    good, digest = put_message(random_lora(10))
    await client.call(host.peer_id, protocol.METHOD_LORA_PUT, good)
    await call(client, host, protocol.METHOD_FORWARD, [torch.randn(1, 3, HIDDEN_SIZE)],
               lora=digest)


async def test_upload_limits_replacement_and_range(served):
    server, host, client = served
    rank = 64  # 8 pairs of [64, 64] float32 matrices: 256 KiB, over the 64 KiB per upload
    tensors = [torch.zeros(rank, HIDDEN_SIZE)] * (2 * 4 * len(MODULES))
    meta = {"model": MODEL_ID, "start": 0, "end": 4, "rank": rank, "alpha": 16,
            "modules": list(MODULES), "digest": "b" * 64}
    with pytest.raises(RemoteError, match="exceeds") as info:
        await client.call(host.peer_id, protocol.METHOD_LORA_PUT,
                          tensor_wire.encode_message(tensors, meta))
    assert info.value.code == protocol.TOO_LARGE
    first, d1 = put_message(random_lora(11))
    await client.call(host.peer_id, protocol.METHOD_LORA_PUT, first)
    second, d2 = put_message(random_lora(12), replaces=d1)
    await client.call(host.peer_id, protocol.METHOD_LORA_PUT, second)
    assert d1 not in server.tuning.uploads and d2 in server.tuning.uploads
    with pytest.raises(RemoteError) as info:
        await call(client, host, protocol.METHOD_FORWARD, [torch.randn(1, 3, HIDDEN_SIZE)],
                   lora=d1)
    assert info.value.code == protocol.ADAPTER_MISSING
    with pytest.raises(RemoteError, match="uploaded for blocks") as info:  # a LoRA is per range
        await call(client, host, protocol.METHOD_FORWARD, [torch.randn(1, 3, HIDDEN_SIZE)],
                   lora=d2, start=1, end=3)
    assert msgpack.unpackb(await client.call(host.peer_id, protocol.METHOD_INFO, b""))["v"] == 1


def test_bad_adapter_directories_are_refused_clearly(tmp_path, span, peft_dir):
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(RANK, HIDDEN_SIZE + 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(state, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    with pytest.raises(AdapterError, match="block 2"):
        load_peft_lora(bad, span)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        load_peft_lora(bad, span)
    (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX"}))
    with pytest.raises(AdapterError, match="not a PEFT LoRA"):
        load_peft_lora(bad, span)
    with pytest.raises(AdapterError, match="cannot read"):
        load_peft_lora(tmp_path / "missing", span)
    with pytest.raises(AdapterError, match="NAME=DIR"):
        load_hosted_adapters(["no-directory"], span)
    with pytest.raises(AdapterError, match="twice"):
        load_hosted_adapters([f"a={peft_dir}", f"a={peft_dir}"], span)
    # a server of blocks [2, 4) reads only its blocks' tensors
    half = load_peft_lora(peft_dir, span.subspan(2, 4))
    assert {block for block, _ in half.weights} == {2, 3}


def test_server_reads_an_adapter_the_client_saved(tmp_path, span):
    from client.lora import LoraConfig, RemoteLora

    lora = RemoteLora(build_model("llama").config, LoraConfig(rank=RANK, alpha=ALPHA))
    with torch.no_grad():
        for b in lora.lora_B:
            b.normal_(0, 0.1)
    lora.save_pretrained(tmp_path / "mine")
    hosted = load_peft_lora(tmp_path / "mine", span)
    assert hosted.modules == MODULES and hosted.scaling == ALPHA / RANK
    for key, a, b in zip(lora.keys, lora.lora_A, lora.lora_B):
        assert torch.equal(hosted.weights[key][0], a) and torch.equal(hosted.weights[key][1], b)


async def test_a_server_that_moves_reads_its_adapters_again(model_dir, span, peft_dir):
    hosted = load_hosted_adapters([f"tuned={peft_dir}"], span)
    hosted["memory"] = hosted["tuned"].restrict(0, 4)  # not from a directory: cannot be re-read
    hosted["memory"] = type(hosted["memory"])(**{**vars(hosted["memory"]), "source": None})
    server = BlockServer(span, ServingConfig(model_id=MODEL_ID), hosted)
    try:
        assert server.tuning.adapter_names == ("memory", "tuned")
        server.switch_span(BlockSpan.load(model_dir, 2, 4))
        assert server.tuning.adapter_names == ("tuned",)
        assert {block for block, _ in server.tuning.hosted["tuned"].weights} == {2, 3}
    finally:
        await server.close()
