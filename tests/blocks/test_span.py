"""BlockSpan and SpanSession against the same model run whole by transformers.

For every family: a LocalHead and two spans, [0, 2) and [2, 4), composed in one process, must
give the local model's logits (full forward, single-token steps, multi-token steps), its greedy
tokens for 64 new tokens, the same for a batch of 3, and survive rollbacks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from blocks.fast_decode import DecodeOptions
from blocks.span import (
    BlockSpan,
    SessionClosedError,
    SessionTooLongError,
    SpanInputError,
    SpanSession,
)
from client.local_head import LocalHead
from model_parts.skeleton import DeviceOptions
from tests.model_factory import FAMILIES, MAX_POSITIONS, NUM_LAYERS, VOCAB_SIZE, save_model

TOLERANCE = 1e-4
NEW_TOKENS = 64


@dataclass
class Chain:
    """A model split as the swarm splits it, plus the whole model as reference."""

    directory: Path
    reference: PreTrainedModel
    head: LocalHead
    spans: tuple[BlockSpan, BlockSpan]

    def sessions(self, batch_size: int, max_length: int) -> list[SpanSession]:
        return [span.new_session(batch_size, max_length) for span in self.spans]

    def step(self, sessions: list[SpanSession], input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.head.embed(input_ids, sessions[0].position)
        for session in sessions:
            hidden = session.step(hidden)
        return self.head.logits(hidden)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.head.embed(input_ids, attention_mask=mask)
        for span in self.spans:
            hidden = span.forward(hidden, mask)
        return self.head.logits(hidden)

    def greedy_padded(self, prompt: torch.Tensor, mask: torch.Tensor, new_tokens: int
                      ) -> torch.Tensor:
        """Greedy decoding of left-padded prompts: the padding goes with the prefill only."""
        sessions = self.sessions(prompt.shape[0], prompt.shape[1] + new_tokens)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        hidden = self.head.embed(prompt, positions, attention_mask=mask)
        sequence, seen = prompt, mask.sum(-1, keepdim=True)
        step_mask: torch.Tensor | None = mask
        for _ in range(new_tokens):
            for session in sessions:
                hidden = session.step(hidden, mask=step_mask)
            token = self.head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, token], dim=1)
            hidden = self.head.embed(token, seen)  # position = tokens before it, per row
            seen, step_mask = seen + 1, None
        return sequence

    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        sessions = self.sessions(prompt.shape[0], prompt.shape[1] + new_tokens)
        sequence, fresh = prompt, prompt
        for _ in range(new_tokens):
            next_token = self.step(sessions, fresh)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
            fresh = next_token
        return sequence


@pytest.fixture(scope="module", params=FAMILIES)
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Chain:
    family = request.param
    directory = save_model(family, tmp_path_factory.mktemp(family) / family)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    head = LocalHead.load(directory)
    spans = (BlockSpan.load(directory, 0, 2), BlockSpan.load(directory, 2, NUM_LAYERS))
    return Chain(directory, reference, head, spans)


def _prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB_SIZE, (batch, length), generator=generator)


def _local_logits(
    chain: Chain, ids: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    with torch.no_grad():
        return chain.reference(ids, attention_mask=mask).logits


def test_full_forward_matches_local(chain: Chain) -> None:
    ids = _prompt(3, 12)
    assert (chain.forward(ids) - _local_logits(chain, ids)).abs().max() < TOLERANCE


def test_forward_with_padding_mask_matches_local(chain: Chain) -> None:
    ids = _prompt(3, 10, seed=2)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row
    mask[2, :1] = 0
    ours, local = chain.forward(ids, mask), _local_logits(chain, ids, mask)
    real = mask.bool()
    assert (ours[real] - local[real]).abs().max() < TOLERANCE


def test_single_token_steps_match_local(chain: Chain) -> None:
    ids = _prompt(1, 20, seed=3)
    sessions = chain.sessions(1, 20)
    stepped = torch.cat([chain.step(sessions, ids[:, i : i + 1]) for i in range(20)], dim=1)
    assert sessions[0].position == sessions[1].position == 20
    assert (stepped - _local_logits(chain, ids)).abs().max() < TOLERANCE


def test_multi_token_steps_after_prefix_match_local(chain: Chain) -> None:
    ids = _prompt(2, 21, seed=4)
    sessions = chain.sessions(2, 32)
    pieces = [chain.step(sessions, ids[:, a:b]) for a, b in ((0, 7), (7, 8), (8, 13), (13, 21))]
    assert (torch.cat(pieces, dim=1) - _local_logits(chain, ids)).abs().max() < TOLERANCE


def test_greedy_tokens_equal_local_generate(chain: Chain) -> None:
    prompt = _prompt(1, 6, seed=5)
    local = chain.reference.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert local.shape[1] == 6 + NEW_TOKENS
    assert torch.equal(chain.greedy(prompt, NEW_TOKENS), local)


def test_greedy_batch_of_three_equals_local_generate(chain: Chain) -> None:
    prompt = _prompt(3, 5, seed=6)
    local = chain.reference.generate(
        prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(chain.greedy(prompt, 24), local)


def test_left_padded_batch_greedy_equals_local_generate(chain: Chain) -> None:
    """Prompts of different lengths, left-padded: the session takes the padding mask with the
    prefill and keeps it; tokens equal transformers' generate with the same attention mask."""
    prompt = _prompt(3, 7, seed=9)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    mask[2, :1] = 0
    prompt = prompt.masked_fill(mask == 0, 0)  # the pad token's id
    new_tokens = 20
    local = chain.reference.generate(prompt, attention_mask=mask, max_new_tokens=new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(chain.greedy_padded(prompt, mask, new_tokens), local)


def test_a_reordered_session_continues_the_chosen_rows(chain: Chain) -> None:
    """Beam search: after a reorder, each row goes on from the row it names."""
    ids, new = _prompt(3, 6, seed=11), _prompt(3, 2, seed=12)
    sessions = chain.sessions(3, 16)
    chain.step(sessions, ids)
    for session in sessions:
        session.reorder(1, [2, 2, 0])
    got = chain.step(sessions, new)
    expected = _local_logits(chain, torch.cat([ids[[2, 2, 0]], new], dim=1))[:, -2:]
    assert (got - expected).abs().max() < TOLERANCE
    session = sessions[0]
    session.reorder(1, [1, 0, 2])  # version 1 again (a step sent twice): skipped
    with pytest.raises(SpanInputError, match="missing"):
        session.reorder(3, [0, 1, 2])
    with pytest.raises(SpanInputError, match="one row"):
        session.reorder(2, [0, 1])
    with pytest.raises(SpanInputError, match="one row"):
        session.reorder(2, [0, 1, 3])


def test_rollback_then_new_steps_equal_a_fresh_run(chain: Chain) -> None:
    # Short enough to stay inside the smallest sliding window of the test models (8).
    ids = _prompt(2, 11, seed=7)
    drafts = _prompt(2, 3, seed=8)
    sessions = chain.sessions(2, 32)
    chain.step(sessions, ids[:, :4])
    chain.step(sessions, drafts)  # speculative tokens, then two of them rejected
    for session in sessions:
        session.rollback(5)
        assert session.position == 5
    kept = torch.cat([ids[:, :4], drafts[:, :1]], dim=1)
    after = chain.step(sessions, ids[:, 5:11])

    fresh = chain.sessions(2, 32)
    chain.step(fresh, kept)
    expected = chain.step(fresh, ids[:, 5:11])
    assert (after - expected).abs().max() < TOLERANCE
    local = _local_logits(chain, torch.cat([kept, ids[:, 5:11]], dim=1))[:, 5:]
    assert (after - local).abs().max() < TOLERANCE


# --------------------------------------------------------------------------------------------
# One family is enough for what does not depend on the family.


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model("llama", tmp_path_factory.mktemp("llama") / "tiny-llama")


@pytest.fixture(scope="module")
def llama_span(llama_dir: Path) -> BlockSpan:
    return BlockSpan.load(llama_dir, 1, 3)


def test_positions_past_a_learned_table_are_refused_clearly(chain: Chain) -> None:
    """Where transformers itself fails past the model's positions (a learned table of them:
    GPT-2, OPT), the span refuses such lengths with its own error (the base forward's lookup
    raised IndexError, an `internal` error on a server); elsewhere it takes any length."""
    ids = _prompt(1, MAX_POSITIONS + 1)
    try:
        _local_logits(chain, ids)
        bounded = False
    except IndexError:
        bounded = True
    for span in chain.spans:
        assert span.position_limit == (MAX_POSITIONS if bounded else None)
    if not bounded:
        return
    span = chain.spans[1]
    hidden = torch.zeros(1, MAX_POSITIONS + 1, span.hidden_size)
    with pytest.raises(SessionTooLongError, match="positions for 256 tokens"):
        span.forward(hidden)
    with pytest.raises(SessionTooLongError, match="max_length 257"):
        span.new_session(1, MAX_POSITIONS + 1)
    assert span.forward(hidden[:, :MAX_POSITIONS]).shape == (1, MAX_POSITIONS, span.hidden_size)


def test_bad_hidden_states_raise_clear_errors(llama_span: BlockSpan) -> None:
    good = torch.zeros(2, 3, llama_span.hidden_size)
    session = llama_span.new_session(2, 8)
    cases = [
        (torch.zeros(2, 3, llama_span.hidden_size + 1), "hidden size"),
        (good.to(torch.float64), "float64"),
        (torch.zeros(3, llama_span.hidden_size), "batch, length"),
        (torch.zeros(2, 0, llama_span.hidden_size), "empty"),
        (torch.zeros(1, 3, llama_span.hidden_size), "opened for 2"),
        (good.numpy(), "torch.Tensor"),
    ]
    for bad, message in cases:
        with pytest.raises(SpanInputError, match=message):
            session.step(bad)
    assert session.position == 0
    session.step(good)
    with pytest.raises(SpanInputError, match="9 tokens exceed the session's max_length 8"):
        session.step(torch.zeros(2, 6, llama_span.hidden_size))
    assert session.position == 3
    with pytest.raises(SpanInputError, match="roll back"):
        session.rollback(4)
    with pytest.raises(SpanInputError, match="attention mask"):
        llama_span.forward(good, torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(SpanInputError, match="integers or booleans"):
        llama_span.forward(good, torch.ones(2, 3))
    with pytest.raises(SpanInputError, match=r"only 0 \(padding\) and 1"):
        llama_span.forward(good, torch.full((2, 3), 7))
    session.close()
    with pytest.raises(SessionClosedError):
        session.step(good)
    for batch, length in ((0, 4), (1, 0), (1.5, 4)):
        with pytest.raises(SpanInputError):
            llama_span.new_session(batch, length)  # type: ignore[arg-type]


def test_bad_padding_masks_raise_and_leave_the_session_usable(llama_span: BlockSpan) -> None:
    hidden = torch.randn(2, 3, llama_span.hidden_size)
    session = llama_span.new_session(2, 16)
    for mask, message in [
        (bytes(5), "5 bytes"),
        (bytes([1, 1, 2, 1, 1, 1]), "only 0"),
        (torch.ones(2, 4, dtype=torch.long), "shape"),
        (torch.ones(2, 3), "integers or booleans"),
        ([1, 1, 1, 1, 1, 1], "shape"),
    ]:
        with pytest.raises(SpanInputError, match=message):
            session.step(hidden, mask=mask)
    assert session.position == 0
    padded = session.step(hidden, mask=bytes([0, 1, 1, 1, 1, 1]))
    assert session.position == 3 and padded.shape == hidden.shape
    # Back before the padding: the session runs as one that never had any.
    session.rollback(0)
    plain = llama_span.new_session(2, 16)
    assert torch.equal(session.step(hidden), plain.step(hidden))
    assert session._first_pad is None


def test_a_static_cache_is_reordered_in_place(llama_dir: Path) -> None:
    """Static caches (CUDA graph sessions read their buffers by address) are reordered where
    they are, with the result of a fresh session fed the chosen rows."""
    span = BlockSpan.load(llama_dir, 0, NUM_LAYERS, decode=DecodeOptions(static_cache=True))
    assert span.decode_paths["static_cache"]
    prefix, new = torch.randn(3, 6, span.hidden_size), torch.randn(3, 1, span.hidden_size)
    with torch.inference_mode():
        session = span.new_session(3, 12)
        session.step(prefix)
        def buffers() -> list[int]:
            return [t.data_ptr() for layer in session._cache.layers
                    for t in (layer.keys, layer.values)]

        before = buffers()
        session.reorder(1, [2, 0, 0])
        assert buffers() == before
        fresh = span.new_session(3, 12)
        fresh.step(prefix[[2, 0, 0]])
        assert (session.step(new) - fresh.step(new)).abs().max() < TOLERANCE


def test_bad_load_arguments_raise(llama_dir: Path) -> None:
    for start, end in ((0, 0), (2, 1), (-1, 2), (0, NUM_LAYERS + 1)):
        with pytest.raises(ValueError, match="not a non-empty range"):
            BlockSpan.load(llama_dir, start, end)
    with pytest.raises(ValueError, match="dtype"):
        BlockSpan.load(llama_dir, 0, 1, DeviceOptions(dtype="float8"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            BlockSpan.load(llama_dir, 0, 1, DeviceOptions(device="cuda"))


def test_cache_accounting_is_exact(llama_span: BlockSpan) -> None:
    batch, max_length = 3, 17
    session = llama_span.new_session(batch, max_length)
    session.step(torch.randn(batch, 10, llama_span.hidden_size))
    session.step(torch.randn(batch, 7, llama_span.hidden_size))
    # [batch, kv_heads, length, head_dim] keys and values, float32, per layer.
    config = llama_span._config
    per_token = 2 * config.num_key_value_heads * config.head_dim * 4 * llama_span.num_blocks
    assert llama_span.cache_bytes_per_token == per_token
    assert session.cache_bytes == llama_span.cache_bytes(batch, max_length) == (
        batch * max_length * per_token
    )
    assert llama_span.cache_tokens(batch, max_length) == batch * max_length * 2
    session.rollback(5)
    assert session.cache_bytes == batch * 5 * per_token


def test_sliding_window_cache_is_bounded_and_refuses_deep_rollback(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    directory = save_model("mistral", tmp_path_factory.mktemp("mistral") / "m")
    span = BlockSpan.load(directory, 0, 2)
    window = span._config.sliding_window
    session = span.new_session(1, 3 * window)
    session.step(torch.randn(1, window // 2, span.hidden_size))
    session.rollback(2)  # inside the window: fine
    session.step(torch.randn(1, 2 * window, span.hidden_size))
    assert session.cache_bytes <= span.cache_bytes(1, 3 * window)
    assert span.cache_bytes(1, 3 * window) < 3 * window * span.cache_bytes_per_token
    with pytest.raises(SpanInputError, match="sliding-window"):
        session.rollback(3)


def test_bfloat16_span_matches_local_bfloat16(llama_dir: Path) -> None:
    span = BlockSpan.load(llama_dir, 0, NUM_LAYERS, DeviceOptions(dtype="bfloat16"))
    assert span.dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    ids = _prompt(2, 9, seed=9)
    with torch.no_grad():
        states = reference(ids, output_hidden_states=True).hidden_states
    ours = span.forward(states[0])
    # Our output is the last layer's, before the final norm, as hidden_states[-1] is not.
    captured: list[torch.Tensor] = []
    last_layer = reference.model.layers[-1]
    handle = last_layer.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        reference(ids)
    handle.remove()
    assert torch.equal(ours, captured[0])


def test_span_reads_only_its_own_shards(tmp_path: Path) -> None:
    directory = save_model("llama", tmp_path / "sharded", max_shard_size="20KB")
    import json

    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {shard for name, shard in weight_map.items() if name.startswith("model.layers.1.")}
    removed = set(weight_map.values()) - needed
    assert removed, "the test needs shards that span [1, 2) does not use"
    for shard in removed:
        (directory / shard).unlink()
    span = BlockSpan.load(directory, 1, 2)
    assert span.forward(torch.randn(1, 4, span.hidden_size)).shape == (1, 4, span.hidden_size)
    with pytest.raises(ValueError, match="missing shard"):
        BlockSpan.load(directory, 0, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_chain_matches_local_cuda_model(llama_dir: Path, dtype: str) -> None:
    options = DeviceOptions(device="cuda", dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch_dtype).cuda().eval()
    chain = Chain(
        llama_dir,
        reference,
        LocalHead.load(llama_dir, options),
        (BlockSpan.load(llama_dir, 0, 2, options), BlockSpan.load(llama_dir, 2, 4, options)),
    )
    ids = _prompt(3, 12).cuda()
    tolerance = TOLERANCE if dtype == "float32" else 1e-2
    assert (chain.forward(ids) - _local_logits(chain, ids)).abs().max() < tolerance
    sessions = chain.sessions(3, 12)
    stepped = torch.cat([chain.step(sessions, ids[:, :5]), chain.step(sessions, ids[:, 5:])], 1)
    assert (stepped - _local_logits(chain, ids)).abs().max() < tolerance
    prompt = ids[:1, :6]
    local = reference.generate(
        prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(chain.greedy(prompt, 32), local)
    if dtype == "float32":  # padded sessions on CUDA: the plain path over a static cache
        mask = torch.ones_like(ids[:, :7])
        mask[0, :3] = 0
        padded = ids[:, :7].masked_fill(mask == 0, 0)
        local = reference.generate(padded, attention_mask=mask, max_new_tokens=16,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(chain.greedy_padded(padded, mask, 16), local)
    # beam search on CUDA: static caches reordered in place, single tokens through the graph
    sessions = chain.sessions(3, 12)
    chain.step(sessions, ids[:, :6])
    chain.step(sessions, ids[:, 6:7])
    for session in sessions:
        session.reorder(1, [2, 0, 0])
    got = torch.cat([chain.step(sessions, ids[:, i:i + 1]) for i in (7, 8)], dim=1)
    expected = _local_logits(chain, torch.cat([ids[[2, 0, 0], :7], ids[:, 7:9]], dim=1))
    assert (got - expected[:, 7:9]).abs().max() < tolerance


def test_subspans_share_weights_and_match_separately_loaded_spans(llama_dir: Path) -> None:
    whole = BlockSpan.load(llama_dir, 0, NUM_LAYERS)
    middle, tail = whole.subspan(1, 3), whole.subspan(3, NUM_LAYERS)
    assert (middle.start, middle.end, middle.num_blocks) == (1, 3, 2)
    assert whole.subspan(0, NUM_LAYERS) is whole
    same = BlockSpan.load(llama_dir, 1, 3)
    assert middle.cache_bytes(2, 9) == same.cache_bytes(2, 9)
    shared = {p.data_ptr() for p in whole._loaded.layers.parameters()}
    assert {p.data_ptr() for p in middle._model.parameters()} <= shared | {
        p.data_ptr() for p in whole._model.parameters()
    }
    hidden = torch.randn(2, 7, whole.hidden_size)
    assert torch.equal(middle.forward(hidden), same.forward(hidden))
    # Interleaved sessions on the whole span and on sub-spans keep their own caches right.
    sessions = [whole.new_session(2, 7), middle.new_session(2, 7), same.new_session(2, 7)]
    tail_session = tail.new_session(2, 7)
    outputs: list[list[torch.Tensor]] = [[], [], []]
    for a, b in ((0, 3), (3, 4), (4, 7)):
        for index, session in enumerate(sessions):
            outputs[index].append(session.step(hidden[:, a:b]))
        tail_session.step(hidden[:, a:b])
    whole_out, middle_out, same_out = (torch.cat(parts, 1) for parts in outputs)
    assert torch.equal(middle_out, same_out)
    assert (whole_out - whole.forward(hidden)).abs().max() < TOLERANCE
    for start, end in ((0, 0), (3, 2), (-1, 2), (0, NUM_LAYERS + 1)):
        with pytest.raises(SpanInputError, match="not a non-empty range"):
            whole.subspan(start, end)
    with pytest.raises(SpanInputError):
        middle.subspan(0, 2)


def test_a_failure_inside_the_model_closes_only_that_session(llama_span: BlockSpan) -> None:
    hidden = torch.randn(1, 2, llama_span.hidden_size)
    healthy, doomed = llama_span.new_session(1, 8), llama_span.new_session(1, 8)
    expected = llama_span.new_session(1, 8)
    healthy.step(hidden)

    def fail(module: torch.nn.Module, args: object, output: object) -> None:
        raise RuntimeError("simulated device failure")

    handle = llama_span._loaded.layers[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            doomed.step(hidden)
    finally:
        handle.remove()
    assert doomed.closed and not healthy.closed
    with pytest.raises(SessionClosedError):
        doomed.step(hidden)
    expected.step(hidden)
    assert torch.equal(healthy.step(hidden), expected.step(hidden))


def _rewrite_checkpoint(directory: Path, target: Path, rename: dict[str, str | None]) -> Path:
    """Copy a single-file model, renaming (or with None, dropping) tensors; extra via '+'."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(directory, target)
    tensors = load_file(target / "model.safetensors")
    rewritten = {}
    for name, tensor in tensors.items():
        new_name = rename.get(name, name)
        if new_name is not None:
            rewritten[new_name] = tensor
    for name, source in rename.items():
        if name.startswith("+"):
            rewritten[name[1:]] = tensors[source] if source in tensors else torch.zeros(4)
    save_file(rewritten, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_checkpoint_layouts_load_or_fail_clearly(tmp_path: Path) -> None:
    gpt2 = save_model("gpt2", tmp_path / "gpt2")
    reference = AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.float32).eval()
    ids = _prompt(2, 8, seed=10)
    with torch.no_grad():
        expected = reference(ids).logits
    from safetensors import safe_open

    with safe_open(gpt2 / "model.safetensors", "pt") as handle:
        names = list(handle.keys())
    # Base-model layout (no "transformer." prefix, tied head absent) plus stale extra tensors.
    legacy = {name: name.removeprefix("transformer.") for name in names}
    legacy["lm_head.weight"] = None
    legacy["+h.0.attn.masked_bias"] = "stale"
    variant = _rewrite_checkpoint(gpt2, tmp_path / "gpt2-legacy", legacy)
    chain = Chain(
        variant,
        reference,
        LocalHead.load(variant),
        (BlockSpan.load(variant, 0, 2), BlockSpan.load(variant, 2, NUM_LAYERS)),
    )
    assert (chain.forward(ids) - expected).abs().max() < TOLERANCE

    dropped = {"transformer.h.3.mlp.c_fc.bias": None}
    broken = _rewrite_checkpoint(gpt2, tmp_path / "gpt2-broken", dropped)
    BlockSpan.load(broken, 0, 3)  # the missing tensor belongs to block 3 only
    message = r"lacks 1 tensors of blocks \[3, 4\), e\.g\. transformer\.h\.3\.mlp\.c_fc\.bias"
    with pytest.raises(ValueError, match=message):
        BlockSpan.load(broken, 3, 4)


def test_steps_use_the_installed_transformers_cache_argument(llama_span: BlockSpan) -> None:
    """transformers 5.24 renamed the base forward's `past_key_values` to `cache`: passing the
    old name put a FutureWarning into every server's log."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        session = llama_span.new_session(1, 8)
        session.step(torch.randn(1, 3, llama_span.hidden_size))
        session.step(torch.randn(1, 1, llama_span.hidden_size))
        llama_span.forward(torch.randn(1, 3, llama_span.hidden_size))
        session.close()
