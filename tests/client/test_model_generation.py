"""The asyncio client's generation rules equal transformers' logits processors and sampling,
bit for bit; parameters and options are validated. No swarm needed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from client.generation import (
    DEFAULT_TOP_K,
    GenerationParams,
    choose_tokens,
    next_token_scores,
    next_tokens,
)
from client.model import ModelOptions
from model_parts.skeleton import ModelInputError


def transformers_scores(logits, tokens, params: GenerationParams) -> torch.Tensor:
    """What transformers' own processors make of the logits, in its order."""
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors(tokens, logits.to(dtype=torch.float32, copy=True))


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    vocab=st.integers(2, 300),
    do_sample=st.booleans(),
    temperature=st.sampled_from([1.0, 0.3, 0.7, 1.5]),
    top_k=st.sampled_from([None, 0, 1, 5, 50, 1000]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.05]),
    penalty=st.sampled_from([1.0, 1.2, 0.8]),
)
def test_scores_equal_transformers_processors(seed, batch, vocab, do_sample, temperature, top_k,
                                              top_p, penalty):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=generator) * 4
    tokens = torch.randint(0, vocab, (batch, 7), generator=generator)
    params = GenerationParams(do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, repetition_penalty=penalty)
    ours = next_token_scores(logits, tokens, params)
    assert torch.equal(ours, transformers_scores(logits, tokens, params))
    assert torch.equal(logits, logits.clone())  # the input is left alone
    assert ours.isfinite().any(dim=-1).all()  # some token always stays possible


def test_choice_is_argmax_or_the_multinomial_draw():
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    assert torch.equal(choose_tokens(scores, GenerationParams()), scores.argmax(-1))
    sampling = GenerationParams(do_sample=True)
    torch.manual_seed(7)
    drawn = choose_tokens(scores, sampling)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.multinomial(scores.softmax(-1), 1).squeeze(1))
    ours = choose_tokens(scores, sampling, torch.Generator().manual_seed(3))
    assert torch.equal(ours, choose_tokens(scores, sampling, torch.Generator().manual_seed(3)))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", [
    GenerationParams(), GenerationParams(repetition_penalty=1.3),
    GenerationParams(do_sample=True, top_k=5, temperature=0.7),
])
def test_next_tokens_from_logits_on_any_device(device: str, params: GenerationParams):
    """The tokens come back where `tokens` lives (the CPU), equal to the rules applied to the
    logits read back, whether the head ran on the CPU or a GPU (bf16 logits, as served)."""
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 200, generator=generator) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 200, (3, 6), generator=generator)
    want = choose_tokens(next_token_scores(logits, tokens, params), params,
                         torch.Generator().manual_seed(9))
    got = next_tokens(logits.to(device), tokens, params, torch.Generator().manual_seed(9))
    assert got.device == tokens.device and torch.equal(got, want)


def test_masked_tokens_are_never_drawn():
    scores = torch.zeros(2, 10)
    scores[:, 4] = 5.0
    scores[:, 6] = 4.9
    params = GenerationParams(do_sample=True, top_k=2)
    masked = next_token_scores(scores, torch.zeros(2, 1, dtype=torch.long), params)
    draws = {int(t) for _ in range(50) for t in choose_tokens(masked, params)}
    assert draws <= {4, 6}


def test_parameters_from_keywords_and_config():
    config = LlamaConfig(eos_token_id=[2, 5])
    params = GenerationParams.from_kwargs(None, config, max_new_tokens=3, do_sample=True)
    assert params.eos_token_id == (2, 5) and params.pad_token == 2
    assert params.top_k == DEFAULT_TOP_K and params.max_new_tokens == 3
    assert GenerationParams.from_kwargs(params, eos_token_id=None).eos_token_id == ()
    assert GenerationParams.from_kwargs(params, eos_token_id=9, pad_token_id=0).pad_token == 0
    # the config's pad token, as transformers' generation config takes it, before an eos
    padded = LlamaConfig(eos_token_id=[2, 5], pad_token_id=7)
    assert GenerationParams.from_kwargs(None, padded).pad_token == 7
    with pytest.raises(TypeError, match="max_tokens"):
        GenerationParams.from_kwargs(None, config, max_tokens=3)


@pytest.mark.parametrize("bad", [
    {"max_new_tokens": -1}, {"temperature": 0.0}, {"top_k": -2}, {"top_p": 0.0},
    {"top_p": 1.5}, {"repetition_penalty": 0.0},
    # not integers: 2.5 new tokens was refused later as a session of max_length 8.5
    {"max_new_tokens": 2.5}, {"max_new_tokens": None}, {"top_k": 5.0}, {"max_length": "64"},
    {"pad_token_id": True},
])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        GenerationParams(**bad)


@pytest.mark.parametrize("eos", ["x", 2.0, [2, "3"], True])
def test_bad_end_tokens_are_named(eos):
    with pytest.raises(ValueError, match="eos_token_id must be"):
        GenerationParams.from_kwargs(None, None, eos_token_id=eos)


def test_model_options():
    options = ModelOptions.from_kwargs(None, compression="float16", max_length=64)
    assert options.compression == "float16" and options.max_length == 64
    assert ModelOptions.from_kwargs(options, dtype="float32").compression == "float16"
    with pytest.raises(ValueError, match="compression"):
        ModelOptions(compression="zip")
    with pytest.raises(ValueError, match="max_length"):
        ModelOptions(max_length=0)
    with pytest.raises(ValueError, match="recovery_timeout"):
        ModelOptions(recovery_timeout=0)
    for bad in (float("nan"), -1.0):  # NaN: the swarm view was never read again
        with pytest.raises(ValueError, match="view_ttl"):
            ModelOptions(view_ttl=bad)
    with pytest.raises(ValueError, match="step_timeout"):
        ModelOptions(step_timeout=float("nan"))
    with pytest.raises(ValueError, match="max_length"):
        ModelOptions(max_length=2.5)
    assert ModelOptions(view_ttl=0).view_ttl == 0  # re-read before every route
    with pytest.raises(TypeError, match="compresion"):
        ModelOptions.from_kwargs(None, compresion="float16")


async def test_float_ids_are_refused_not_truncated():
    """RemoteModel.generate turned [[5.0, 7.9]] into [[5, 7]] where every other entry point
    refuses float ids; refused before the model is touched."""
    from client.generation import generate

    with pytest.raises(ModelInputError, match="integers"):
        await generate(None, torch.tensor([[5.0, 7.9]]), GenerationParams(max_new_tokens=2))


async def test_one_bootstrap_address_may_be_given_as_a_string(model_dir, tmp_path):
    """RemoteModel.open(bootstrap="/ip4/...") split the string into characters: one warning
    per character, then "none of the bootstrap peers could be reached"."""
    from client.local_swarm import LocalSwarm
    from client.model import RemoteModel

    with LocalSwarm(model_dir, [], start_timeout=60, log_dir=tmp_path) as swarm:
        model = await RemoteModel.open(model_dir, bootstrap=swarm.bootstrap, connect_timeout=20)
        try:
            assert not model.closed and model.swarm.dht is not None
        finally:
            await model.close()


async def test_closing_the_model_closes_each_session_once():
    """RemoteModel.close closed a ModelSession's blocks session twice over (through the
    ModelSession and again as one of open_blocks_session's)."""
    from client.inference import InferenceSession
    from client.model import ModelSession, RemoteModel

    class Counted(InferenceSession):
        closes = 0

        async def close(self) -> None:
            self.closes += 1
            await super().close()

    model = RemoteModel(LlamaConfig(), None, None, ModelOptions(), owns_swarm=False)
    inner, alone = Counted(None, "m", []), Counted(None, "m", [])  # no spans: no sockets
    for session in (inner, alone):
        model._blocks_sessions.add(session)  # as open_blocks_session registers them
    model._sessions.add(ModelSession(model, inner))
    await model.close()
    assert (inner.closes, alone.closes) == (1, 1)
    assert inner._closed and alone._closed
