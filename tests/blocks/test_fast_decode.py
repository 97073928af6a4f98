"""The single-token fast paths (blocks/fast_decode.py) against the plain path, for every family.

Each family either gets a fast path that equals the plain path (float32 on the CPU: within 1e-5)
over many steps (past every sliding window), batches and rollbacks, or has a stated reason for
staying on the plain path. The same for static caches, which CUDA graphs replay on a GPU; the
CUDA tests (graphs themselves, bf16) skip without a GPU and run on the GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from blocks import compiled_decode
from blocks.fast_decode import DecodeOptions
from blocks.span import BlockSpan, SpanSession
from client.local_head import LocalHead
from model_parts.skeleton import DeviceOptions
from tests.model_factory import FAMILIES, NUM_LAYERS, VOCAB_SIZE, save_model

CPU_TOLERANCE = 1e-5
STEPS = 40  # past the test models' sliding windows (8 and 24)
PLAIN = DecodeOptions(direct_layers=False, static_cache=False)
# Families whose plain forward passes the layers something only it computes (ALiBi, or a mask
# built for one token): no direct path. Listed here only to catch a silent loss of the others.
EXPECTED_DIRECT = {"llama", "mistral", "qwen2", "mixtral", "gpt2", "deepseek_v3", "opt"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family = request.param
    return save_model(family, tmp_path_factory.mktemp(family) / family)


def _hidden(span: BlockSpan, batch: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, span.hidden_size, generator=generator).to(
        span.device, span.dtype
    )


def _run_steps(session: SpanSession, span: BlockSpan, batch: int) -> list[torch.Tensor]:
    """A prompt, single-token steps, a rollback and more steps; every output."""
    outputs = [session.step(_hidden(span, batch, 5, seed=0))]
    for index in range(STEPS):
        outputs.append(session.step(_hidden(span, batch, 1, seed=100 + index)))
        if index == 1:  # early: gemma2's window of 8 must not have dropped anything yet
            session.rollback(5)
    return outputs


def _max_difference(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, want, strict=True))


def _assert_fast_equals_plain(directory: Path, decode: DecodeOptions, batch: int) -> BlockSpan:
    fast = BlockSpan.load(directory, 1, 3, decode=decode)
    plain = BlockSpan.load(directory, 1, 3, decode=PLAIN)
    assert plain.decode_paths == {
        "direct_layers": False, "static_cache": False, "cuda_graphs": False, "compiled": False,
    }
    max_length = 5 + STEPS
    with fast.new_session(batch, max_length) as a, plain.new_session(batch, max_length) as b:
        assert _max_difference(_run_steps(a, fast, batch), _run_steps(b, plain, batch)) <= (
            CPU_TOLERANCE
        )
    return fast


@pytest.mark.parametrize("batch", [1, 3])
def test_direct_layer_calls_equal_the_plain_path(family_dir: Path, batch: int) -> None:
    span = _assert_fast_equals_plain(family_dir, DecodeOptions(static_cache=False), batch)
    family = family_dir.name
    assert span.decode_paths["direct_layers"] == (family in EXPECTED_DIRECT), (
        span.fast_path_notes
    )
    if not span.decode_paths["direct_layers"]:
        assert span.fast_path_notes["direct_layers"]  # a stated reason


@pytest.mark.parametrize("batch", [1, 3])
def test_static_caches_equal_the_plain_path(family_dir: Path, batch: int) -> None:
    span = _assert_fast_equals_plain(family_dir, DecodeOptions(static_cache=True), batch)
    if not span.decode_paths["static_cache"]:
        assert span.fast_path_notes["static_cache"]


def test_direct_path_on_a_subspan_and_across_subspans(tmp_path: Path) -> None:
    directory = save_model("llama", tmp_path / "llama")
    whole = BlockSpan.load(directory, 0, NUM_LAYERS)
    plain = BlockSpan.load(directory, 0, NUM_LAYERS, decode=PLAIN)
    views = [whole.subspan(0, 2), whole.subspan(2, NUM_LAYERS)]
    plain_views = [plain.subspan(0, 2), plain.subspan(2, NUM_LAYERS)]
    sessions = [view.new_session(1, 30) for view in views]
    plain_sessions = [view.new_session(1, 30) for view in plain_views]
    for index in range(20):
        hidden = _hidden(whole, 1, 3 if index == 0 else 1, seed=index)
        got, want = hidden, hidden
        for session, reference in zip(sessions, plain_sessions, strict=True):
            got, want = session.step(got), reference.step(want)
        assert float((got - want).abs().max()) <= CPU_TOLERANCE
    assert all(view.decode_paths["direct_layers"] for view in views)


def test_a_static_cache_is_reused_by_the_next_session_of_its_shape(tmp_path: Path) -> None:
    directory = save_model("llama", tmp_path / "llama")
    span = BlockSpan.load(directory, 0, 2, decode=DecodeOptions(static_cache=True))
    plain = BlockSpan.load(directory, 0, 2, decode=PLAIN)
    first = span.new_session(2, 45)
    outputs = _run_steps(first, span, 2)
    cache = first._cache
    first.close()
    second = span.new_session(2, 45)
    assert second._cache is cache  # same buffers, emptied
    with plain.new_session(2, 45) as reference:
        assert _max_difference(_run_steps(second, span, 2), _run_steps(reference, plain, 2)) <= (
            CPU_TOLERANCE
        )
    assert _max_difference(outputs, _run_steps(span.new_session(2, 45), span, 2)) <= 0
    other = span.new_session(1, 45)  # another shape: a new cache, the idle one is dropped
    assert other._cache is not cache


def test_a_failed_step_does_not_offer_its_cache_to_the_next_session(tmp_path: Path) -> None:
    directory = save_model("llama", tmp_path / "llama")
    span = BlockSpan.load(directory, 0, 2, decode=DecodeOptions(static_cache=True))
    session = span.new_session(1, 8)
    session.step(_hidden(span, 1, 2, seed=0))

    def fail(module: torch.nn.Module, args: object, output: object) -> None:
        raise RuntimeError("out of memory (simulated)")

    handle = span._loaded.layers[0].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError):
            session.step(_hidden(span, 1, 1, seed=1))
    finally:
        handle.remove()
    assert session.closed
    assert span._loaded.idle_graph is None


# ------------------------------------------------------------------ torch.compile (CPU too)
def test_compiled_steps_equal_the_plain_path(tmp_path: Path) -> None:
    """Compiled at load (batch 1), a new batch size compiled at its first step, a second session
    of a shape reusing the compiled step; every output equal to the plain path's."""
    directory = save_model("llama", tmp_path / "llama")
    span = BlockSpan.load(directory, 1, 3, decode=DecodeOptions(static_cache=True, compile=True))
    plain = BlockSpan.load(directory, 1, 3, decode=PLAIN)
    assert span.decode_paths["compiled"], span.fast_path_notes
    compiled = span._compiled
    assert list(compiled.compile_seconds) == [(1, compiled_decode.MIN_CACHE_LENGTH)]
    for batch in (1, 3, 1):
        with span.new_session(batch, 45) as a, plain.new_session(batch, 45) as b:
            assert a._cache_length == compiled_decode.MIN_CACHE_LENGTH
            got, want = _run_steps(a, span, batch), _run_steps(b, plain, batch)
            scale = max(1.0, max(float(w.abs().max()) for w in want))
            assert _max_difference(got, want) <= CPU_TOLERANCE * scale
    assert set(compiled.compile_seconds) == {(1, 256), (3, 256)} and not compiled.failed
    # Another span of the same structure reuses the compiled code (found so on a GPU: dynamo's
    # guards do not pin the modules), and computes with its own layers.
    other = BlockSpan.load(directory, 2, 4, decode=DecodeOptions(static_cache=True, compile=True))
    other_plain = BlockSpan.load(directory, 2, 4, decode=PLAIN)
    assert other.decode_paths["compiled"], other.fast_path_notes
    with other.new_session(1, 45) as a, other_plain.new_session(1, 45) as b:
        got, want = _run_steps(a, other, 1), _run_steps(b, other_plain, 1)
        scale = max(1.0, max(float(w.abs().max()) for w in want))
        assert _max_difference(got, want) <= CPU_TOLERANCE * scale


def test_a_failed_compile_leaves_the_uncompiled_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_compile(fn: object, **kwargs: object) -> object:
        def run(*args: object) -> None:
            raise RuntimeError("backend compiler failed (simulated)")

        return run

    monkeypatch.setattr(compiled_decode.torch, "compile", failing_compile)
    directory = save_model("llama", tmp_path / "llama")
    span = BlockSpan.load(directory, 0, 2, decode=DecodeOptions(static_cache=True, compile=True))
    assert not span.decode_paths["compiled"] and span.decode_paths["static_cache"]
    assert "simulated" in span.fast_path_notes["compiled"]
    plain = BlockSpan.load(directory, 0, 2, decode=PLAIN)
    with span.new_session(1, 45) as a, plain.new_session(1, 45) as b:
        assert a._cache_length == 45  # no rounding without compiled steps
        assert _max_difference(_run_steps(a, span, 1), _run_steps(b, plain, 1)) <= CPU_TOLERANCE


def test_cache_lengths_of_compiled_spans() -> None:
    assert [compiled_decode.cache_length(n) for n in (1, 256, 257, 600, 8192)] == [
        256, 256, 512, 1024, 8192,
    ]


# --------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize(
    ("dtype", "decode"), [("float32", "fast"), ("bfloat16", "fast"), ("bfloat16", "compiled")]
)
def test_cuda_graphs_equal_the_plain_path_and_local_generate(
    tmp_path: Path, dtype: str, decode: str
) -> None:
    directory = save_model("llama", tmp_path / "llama")
    options = DeviceOptions(device="cuda", dtype=dtype)
    fast = DecodeOptions(compile=decode == "compiled")
    spans = [
        BlockSpan.load(directory, 0, 2, options, decode=fast),
        BlockSpan.load(directory, 2, 4, options, decode=fast),
    ]
    plain = [
        BlockSpan.load(directory, 0, 2, options, decode=PLAIN),
        BlockSpan.load(directory, 2, 4, options, decode=PLAIN),
    ]
    assert all(span.decode_paths["cuda_graphs"] for span in spans), spans[0].fast_path_notes
    assert all(span.decode_paths["compiled"] == (decode == "compiled") for span in spans), (
        spans[0].fast_path_notes
    )
    tolerance = CPU_TOLERANCE if dtype == "float32" else 3e-2
    for batch in (1, 3):
        sessions = [span.new_session(batch, 5 + STEPS) for span in spans]
        references = [span.new_session(batch, 5 + STEPS) for span in plain]
        got = _run_chain_steps(sessions, spans[0], batch)
        want = _run_chain_steps(references, plain[0], batch)
        scale = max(1.0, max(float(w.abs().max()) for w in want))
        assert _max_difference(got, want) <= tolerance * scale
        assert all(session._graph is not None for session in sessions)
        for session in sessions + references:
            session.close()
    if decode == "compiled":
        for span in spans:
            assert set(span._compiled.compile_seconds) == {(1, 256), (3, 256)}
            assert not span._compiled.failed
    head = LocalHead.load(directory, options)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    reference = reference.cuda().eval()
    prompt = torch.randint(3, VOCAB_SIZE, (1, 6), generator=torch.Generator().manual_seed(3))
    prompt = prompt.cuda()
    local = reference.generate(
        prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    for _ in range(2):  # the second run replays the graphs kept from the first
        assert torch.equal(_greedy(head, spans, prompt, 32), local)


def _run_chain_steps(sessions: list[SpanSession], span: BlockSpan, batch: int):
    outputs = []
    for index in range(STEPS):
        hidden = _hidden(span, batch, 5 if index == 0 else 1, seed=200 + index)
        for session in sessions:
            hidden = session.step(hidden)
        outputs.append(hidden)
        if index == 12:
            for session in sessions:
                session.rollback(9)
    return outputs


def _greedy(head: LocalHead, spans: list[BlockSpan], prompt: torch.Tensor, new: int):
    sessions = [span.new_session(prompt.shape[0], prompt.shape[1] + new) for span in spans]
    sequence, fresh = prompt, prompt
    for _ in range(new):
        hidden = head.embed(fresh, sessions[0].position)
        for session in sessions:
            hidden = session.step(hidden)
        token = head.logits(hidden)[:, -1].argmax(-1, keepdim=True)
        sequence, fresh = torch.cat([sequence, token], dim=1), token
    for session in sessions:
        session.close()
    return sequence


def test_serve_decode_modes() -> None:
    """`serve --decode`: auto compiles where that is the default (CUDA); compiled asks for a
    static cache too, which a CPU step needs to be compiled at all."""
    from blocks.cli import _decode_options

    assert _decode_options("auto").compile is None and _decode_options("auto").static_cache is None
    compiled = _decode_options("compiled")
    assert compiled.compile is True and compiled.static_cache is True
    assert _decode_options("fast").compile is False
    plain = _decode_options("plain")
    assert not (plain.direct_layers or plain.static_cache or plain.cuda_graphs or plain.compile)
