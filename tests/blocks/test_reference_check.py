"""The float32-reference rule (blocks/reference_check.py) that judges bf16 fast steps.

A compiled bf16 span is accepted (torch.compile on the CPU), the plain path's own static-cache
step is accepted, and deliberately wrong candidates (noise of a few percent, one wrong element)
are rejected; the float32 reference is the same in chunks as in one piece and leaves the
weights bit for bit as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blocks import compiled_decode, fast_decode, reference_check
from blocks.fast_decode import DecodeOptions, new_static_cache
from blocks.span import PLAIN_DECODE, BlockSpan
from model_parts.skeleton import DeviceOptions
from tests.model_factory import save_model

BF16 = DeviceOptions(device="cpu", dtype="bfloat16")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model("llama", tmp_path_factory.mktemp("llama") / "llama")


@pytest.fixture(scope="module")
def bf16_span(llama_dir: Path) -> BlockSpan:
    return BlockSpan.load(llama_dir, 0, 4, BF16, decode=PLAIN_DECODE)


def _static_step(span: BlockSpan, distort=None):
    def step(hidden: torch.Tensor, cache, position: int) -> torch.Tensor:
        output = span._run(hidden, cache, None)
        return output if distort is None else distort(output)

    return step


def _judge(span: BlockSpan, step) -> reference_check.Verdict:
    cases = fast_decode.probe_cases(span)
    return reference_check.judge(
        span, cases, lambda batch, length: new_static_cache(span, batch, length), step
    )


def test_the_plain_static_cache_step_is_accepted(bf16_span: BlockSpan) -> None:
    verdict = _judge(bf16_span, _static_step(bf16_span))
    assert verdict.problem is None, verdict.summary()
    assert len(verdict.errors) == len(fast_decode.probe_cases(bf16_span)) * fast_decode.PROBE_STEPS
    assert all(0 < e.plain_l2 < 0.05 for e in verdict.errors)  # bf16 is not float32


def test_wrong_candidates_are_rejected(bf16_span: BlockSpan) -> None:
    generator = torch.Generator().manual_seed(7)

    def noisy(output: torch.Tensor) -> torch.Tensor:  # 5% relative noise
        noise = torch.randn(output.shape, generator=generator)
        noise = noise * 0.05 * output.float().norm() / noise.norm()
        return (output.float() + noise).to(output.dtype)

    verdict = _judge(bf16_span, _static_step(bf16_span, noisy))
    assert verdict.problem is not None and "relative L2" in verdict.problem

    # One element wrong among many (hidden 4096): L2 hardly moves, the largest error does.
    ref = torch.randn(4096, generator=generator)
    plain = ref + 0.01 * torch.randn(4096, generator=generator)
    wrong = plain.clone()
    wrong[5] += 0.2 * ref.abs().max()
    errors = reference_check.step_errors(wrong, plain, ref)
    assert errors.candidate_l2 < 1.25 * errors.plain_l2 + 2**-8
    assert "largest error" in errors.problem(torch.bfloat16, reference_check.FLOAT32_REFERENCE_RULE)
    assert reference_check.step_errors(plain, plain, ref).problem(
        torch.bfloat16, reference_check.FLOAT32_REFERENCE_RULE) is None
    verdict = _judge(bf16_span, _static_step(bf16_span, lambda out: out * float("nan")))
    assert verdict.problem == "batch 1, position 3: non-finite output"


def test_the_reference_in_chunks_equals_one_piece_and_restores_the_weights(
    bf16_span: BlockSpan,
) -> None:
    before = {name: p.clone() for name, p in bf16_span._model.state_dict().items()}
    cases = fast_decode.probe_cases(bf16_span, batches=(2,))
    whole = reference_check.float32_reference(bf16_span, cases, chunk=4)
    chunked = reference_check.float32_reference(bf16_span, cases, chunk=1)
    for a_steps, b_steps in zip(whole, chunked, strict=True):
        for a, b in zip(a_steps, b_steps, strict=True):
            assert a.dtype == torch.float32
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    after = bf16_span._model.state_dict()
    assert before.keys() == after.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_a_compiled_bf16_span_is_accepted(llama_dir: Path) -> None:
    span = BlockSpan.load(llama_dir, 1, 3, BF16,
                          decode=DecodeOptions(static_cache=True, compile=True))
    assert span.decode_paths["compiled"], span.fast_path_notes
    step = span._compiled
    assert step.probe_distance is not None and 0 < step.probe_distance < 0.05
    plain = BlockSpan.load(llama_dir, 1, 3, BF16, decode=PLAIN_DECODE)
    generator = torch.Generator().manual_seed(2)
    with span.new_session(1, 20) as a, plain.new_session(1, 20) as b:
        for length in (5, 1, 1, 1):
            hidden = torch.randn(1, length, span.hidden_size, generator=generator).bfloat16()
            got, want = a.step(hidden), b.step(hidden)
            assert reference_check.relative_l2(got, want) <= 4 * step.probe_distance + 0.01


def test_the_capture_check_of_a_compiled_step(bf16_span: BlockSpan) -> None:
    step = compiled_decode.CompiledStep(bf16_span)
    eager = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3))
    # float32 (no probe distance): the compiled step must equal the eager one.
    assert step.capture_problem(eager, eager, eager * 1.01) is not None
    assert step.capture_problem(eager, eager, eager.clone()) is None
    eager = eager.bfloat16()
    near = (eager.float() * 1.01).bfloat16()
    step.probe_distance = 0.01
    assert step.capture_problem(near, near, eager) is None
    far = (eager.float() + 0.2 * eager.float().norm() / 8).bfloat16()
    assert "relative L2" in step.capture_problem(far, far, eager)
    assert "CUDA graph differs" in step.capture_problem(far, near, eager)


def test_no_memory_for_the_reference_means_no_compiled_steps(
    llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reference_check, "_free_bytes", lambda device: 1000)
    span = BlockSpan.load(llama_dir, 0, 2, BF16,
                          decode=DecodeOptions(static_cache=True, compile=True))
    assert not span.decode_paths["compiled"] and span.decode_paths["static_cache"]
    assert "no float32 reference" in span.fast_path_notes["compiled"]
    assert "GiB free" in span.fast_path_notes["compiled"]
