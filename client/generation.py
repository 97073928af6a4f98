"""Token generation for the asyncio client, without transformers' generation loop.

Greedy decoding and sampling (temperature, top-k, top-p, repetition penalty) through one
inference session: the prompt goes in as one multi-token step, then one token per step.

The score rules reproduce transformers' logits processors exactly: same order (repetition
penalty, then temperature, top-k, top-p), same arithmetic, same defaults (top-k 50 when sampling),
and the token is drawn with `torch.multinomial` over the softmax, as transformers draws it. So
with equal logits and the same random state (`torch.manual_seed(s)` before each, or equal
`generator`s) this produces the very tokens `transformers`' `generate` produces locally.

`next_token_scores` and `choose_tokens` are plain tensor functions with no I/O; `generate` is the
asyncio driver.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PretrainedConfig

from client.padding import token_mask
from model_parts.skeleton import ModelInputError

if TYPE_CHECKING:
    from client.model import ModelSession, RemoteModel

# transformers' `GenerationConfig` default for `top_k` when sampling (and ours, to match it).
DEFAULT_TOP_K = 50


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What to generate and how. Defaults are transformers' `generate` defaults."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = DEFAULT_TOP_K  # sampling only; None or 0: off
    top_p: float = 1.0  # sampling only; 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off; applies to greedy decoding too
    eos_token_id: tuple[int, ...] = ()  # a sequence ends after one of these tokens
    pad_token_id: int | None = None  # what ended sequences are padded with (default: an eos)
    max_length: int | None = None  # of the session, >= prompt + max_new_tokens - 1 (default: sum)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "pad_token_id", "max_length"):
            value = getattr(self, name)
            if not (_is_int(value) or (value is None and name != "max_new_tokens")):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be positive, got "
                             f"{self.repetition_penalty}")

    @classmethod
    def from_kwargs(cls, base: GenerationParams | None, config: PretrainedConfig | None = None,
                    **kwargs: Any) -> GenerationParams:
        """`base` (or defaults, with the end and pad tokens taken from `config` as transformers
        takes them) with the given fields replaced. `eos_token_id` may be an int, a list or
        None."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation parameters {unknown}; known: {sorted(known)}")
        if base is None:
            base = cls(eos_token_id=_token_tuple(_config_token(config, "eos_token_id")),
                       pad_token_id=_config_token(config, "pad_token_id"))
        if "eos_token_id" in kwargs:
            kwargs["eos_token_id"] = _token_tuple(kwargs["eos_token_id"])
        return dataclasses.replace(base, **kwargs)

    @property
    def pad_token(self) -> int | None:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else None


def _config_token(config: PretrainedConfig | None, name: str) -> Any:
    if config is None:
        return None
    return getattr(config.get_text_config(), name, None)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if _is_int(value):
        return (value,)
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    if not isinstance(value, list | tuple) or not all(_is_int(v) for v in value):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(value)


def next_token_scores(logits: torch.Tensor, tokens: torch.Tensor,
                      params: GenerationParams) -> torch.Tensor:
    """Scores [batch, vocab] for the next token, from the last position's `logits` [batch,
    vocab] and every token so far `tokens` [batch, length], as transformers computes them."""
    scores = logits.to(dtype=torch.float32, copy=True)
    if params.repetition_penalty != 1.0:
        # Seen tokens: negative scores are multiplied by the penalty, positive ones divided.
        seen = scores.gather(1, tokens)
        penalised = torch.where(seen < 0, seen * params.repetition_penalty,
                                seen / params.repetition_penalty)
        scores = scores.scatter(1, tokens, penalised)
    if not params.do_sample:
        return scores
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k:
        k = min(max(params.top_k, 1), scores.shape[-1])
        kth_best = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth_best, -float("inf"))
    if params.top_p < 1.0:
        # Drop the least likely tokens whose total probability stays within 1 - top_p; the
        # most likely token always stays.
        ascending, order = torch.sort(scores, descending=False)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - params.top_p)
        drop_sorted[..., -1:] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, -float("inf"))
    return scores


def choose_tokens(scores: torch.Tensor, params: GenerationParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each sequence [batch]: the argmax, or a draw from softmax(scores)."""
    if not params.do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def next_tokens(logits: torch.Tensor, tokens: torch.Tensor, params: GenerationParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each sequence [batch], on the device of `tokens`, from the last
    position's `logits` [batch, vocab] wherever the head computed them (a GPU, say).

    Greedy without a repetition penalty takes the argmax where the logits are, so only the
    chosen ids are read back; every other rule reads the logits back first and applies
    transformers' rules there (the random source of sampling is `tokens`' device's)."""
    if not params.do_sample and params.repetition_penalty == 1.0:
        return torch.argmax(logits, dim=-1).to(tokens.device)
    scores = next_token_scores(logits.to(tokens.device), tokens, params)
    return choose_tokens(scores, params, generator)


async def generate(model: RemoteModel, input_ids: torch.Tensor, params: GenerationParams, *,
                   session: ModelSession | None = None,
                   on_tokens: Callable[[torch.Tensor], Any] | None = None,
                   generator: torch.Generator | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`input_ids` [batch, length] followed by up to `params.max_new_tokens` new tokens.

    `attention_mask` [batch, length] (1 = token, 0 = padding) allows left-padded prompts of
    different lengths in one batch, as transformers' generate takes them.

    With `session`, reuses it: the positions on which `input_ids` agree with the tokens the
    session was stepped with are kept, the rest is sent (ModelSession.keep_agreeing), so the
    result is a fresh session's. Positions stepped with embeddings have no known ids: those
    the session holds must be the first of `input_ids`. `on_tokens(new [batch])` is called
    (and awaited if it returns an awaitable) after each step, like a transformers streamer's
    `put`.
    Generation stops early once every sequence has produced an end token.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.numel() == 0:
        raise ModelInputError("input_ids must be a non-empty [batch, length] tensor")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ModelInputError(f"input ids must be integers, not {input_ids.dtype}")  # not cut
    tokens = input_ids.to(torch.long)
    batch, length = tokens.shape
    if attention_mask is not None:  # 0/1 of any dtype, as transformers takes it
        attention_mask = token_mask(attention_mask)
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
        raise ModelInputError(f"attention_mask must have the shape of input_ids, "
                              f"{(batch, length)}")
    if params.max_new_tokens == 0:
        return tokens
    # the prompt's step, then one per new token but the last: checked before any of them runs
    # (a session too short failed mid-way, its tokens lost)
    needed = length + params.max_new_tokens - 1
    own_session = session is None
    held = params.max_length if session is None else session.max_length
    if held is not None and held < needed:
        raise ModelInputError(f"a prompt of {length} tokens and max_new_tokens="
                              f"{params.max_new_tokens} need a session of max_length >= "
                              f"{needed}, not {held}")
    if session is None:
        max_length = params.max_length or length + params.max_new_tokens
        session = await model.inference_session(batch, max_length)
    else:  # keeps what input_ids share with the session's tokens, sends the rest
        session.keep_agreeing(tokens, attention_mask)
    eos = torch.tensor(params.eos_token_id, dtype=torch.long) if params.eos_token_id else None
    pad = params.pad_token
    unfinished = torch.ones(batch, dtype=torch.bool)
    try:
        new = tokens[:, session.position:]
        mask = None if attention_mask is None else attention_mask[:, session.position:]
        greedy = not params.do_sample and params.repetition_penalty == 1.0
        for _ in range(params.max_new_tokens):
            if greedy:  # the argmax where the head is; only the ids come back
                chosen = (await session.step_greedy(new, mask)).to(tokens.device)
            else:
                logits = await session.step(new, attention_mask=mask, last_only=True)
                chosen = next_tokens(logits[:, -1], tokens, params, generator)
            if eos is not None:
                chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
            tokens = torch.cat([tokens, chosen[:, None]], dim=1)
            if on_tokens is not None:
                result = on_tokens(chosen)
                if inspect.isawaitable(result):
                    await result
            if eos is not None:
                unfinished &= ~torch.isin(chosen, eos)
                if not unfinished.any():
                    break
            new, mask = chosen[:, None], None  # new tokens are never padding
    finally:
        if own_session:
            await session.close()
    return tokens


__all__ = ["DEFAULT_TOP_K", "GenerationParams", "choose_tokens", "generate",
           "next_token_scores", "next_tokens"]
