"""`DistributedModelForCausalLM`: a synchronous, transformers-style model over the swarm.

    model = DistributedModelForCausalLM.from_pretrained(MODEL_DIR, bootstrap=[...])
    logits = model(input_ids=ids).logits
    torch.manual_seed(0)
    tokens = model.generate(ids, do_sample=True, top_p=0.9, max_new_tokens=64, streamer=s)

It is a thin layer ON TOP of the asyncio client (client/model.py): the asyncio `RemoteModel` runs
on a background event-loop thread (client/sync_loop.py) and this class submits work to it and
waits. It holds only the local head (embeddings, final norm, LM head), which runs in the caller's
thread.

Generation is transformers' own `GenerationMixin.generate` (so every logits processor, stopping
criterion, streamer and the random draws are exactly transformers'), with one change: the
`past_key_values` it threads through the steps is a `RemoteSessionCache`, a `Cache` whose
attention caches live on the servers. `get_seq_length()` reports the session's position, so
`prepare_inputs_for_generation` sends only new tokens; one remote session serves the whole
`generate` call. Pass your own `model.inference_session(...)` as `past_key_values` to keep a
session across calls: each call keeps the positions on which its `input_ids` agree with the
tokens already sent and sends the rest (a session stepped with `inputs_embeds` has no ids to
compare: its positions must be the first of `input_ids`).

Fine-tuning (client/finetune.py): `from_pretrained(..., tuning_mode="ptune" | "deep_ptune" |
"lora", ...)` gives the model trainable parameters (prompts or LoRA weights) while the blocks
stay frozen on the servers; full passes are differentiable (`labels` give transformers' causal-LM
loss) and `loss.backward()` runs the swarm's backward. `adapter="NAME"` uses an adapter the
servers host. `save_adapter(DIR)` writes a trained LoRA in PEFT's format.

Left-padded batches (prompts of different lengths, `attention_mask` with zeros) work in full
passes and in `generate`: the session keeps the padding (client/padding.py).

Beam search works: transformers reorders the cache after each step, and the servers reorder
their caches' rows with the next one (docs/block_protocol.md, "Reordering"). So does assisted
decoding (prompt lookup, a local assistant model): the session rolls back rejected drafts.

Not supported (a clear error says so): strategies that copy or shrink caches' batches,
`output_attentions` / `output_hidden_states`.
"""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from client.finetune import ModelTuning, TuningOptions
from client.held_tokens import NOT_A_TOKEN
from client.inference import InferenceError
from client.model import ModelOptions, ModelSession, RemoteModel
from client.padding import generation_positions, token_mask
from client.sync_loop import BackgroundLoop, LoopClosedError, shared_loop
from model_parts.skeleton import ModelInputError

# transformers' `generate` makes this many new tokens when neither `max_length` nor
# `max_new_tokens` is set anywhere (its default `max_length`, counted after the prompt).
TRANSFORMERS_DEFAULT_NEW_TOKENS = 20
# Seconds closing a model (its sessions, its swarm connection) may take before we move on.
CLOSE_TIMEOUT = 30.0
# transformers 5.24 renamed `past_key_values` to `cache` (in outputs, generate and
# prepare_inputs_for_generation); this model takes both names and answers with the one the
# installed version's outputs have.
_OUTPUT_CACHE_FIELD = ("cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__
                       else "past_key_values")


class RemoteSessionCache(Cache):
    """`past_key_values` for a distributed model: one remote inference session.

    The servers hold the keys and values; this object holds the session and its position. The
    session opens on the first step (its batch size is that step's) with room for `max_length`
    positions. Close it (or use `with`) to free the servers' memory.
    """

    def __init__(self, model: DistributedModelForCausalLM, max_length: int,
                 batch_size: int | None = None):
        super().__init__(layers=[])
        self._model = model
        self.max_length = max_length
        self._batch_size = batch_size
        self._session: ModelSession | None = None
        self._closed = False
        self._prefix = 0  # positions of the model's tuned prompts at the session's start
        # the trainable weights the session was opened with (its cache holds what they gave)
        self._weights: tuple[torch.Tensor, ...] = ()

    # -- what generate and the model read ---------------------------------------------------
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_linear(self) -> list[bool]:
        """One full-attention cache (the servers'): transformers 5.24's generate then slices a
        prompt that repeats the session's positions, as older versions did."""
        return [False]

    @property
    def is_initialized(self) -> bool:
        return self._session is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._session.position - self._prefix if self._session is not None else 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_length

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` positions; negative: drop that many from the end, and 0
        drops none (transformers 5.24's assisted decoding crops by `-rejected`, often 0)."""
        if max_length == 0:
            return
        position = self.get_seq_length()
        keep = position + max_length if max_length < 0 else max_length
        if keep < position:
            self._live_session().rollback(max(keep, 0) + self._prefix)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the servers reorder their caches' rows with the next step."""
        self._live_session().reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a remote session's batch cannot be expanded")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a remote session's batch cannot be reduced")

    # -- the session -------------------------------------------------------------------------
    def _live_session(self) -> ModelSession:
        if self._closed:
            raise InferenceError("the inference session is closed")
        if self._session is None:
            raise InferenceError("the inference session has not been started")
        return self._session

    def keep_agreeing(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> None:
        """Before a `generate` call with this session: keep only the positions on which
        `input_ids` (all of them so far, as generate takes them) agree with the tokens the
        session holds (ModelSession.keep_agreeing), so the call gives a fresh session's
        tokens. Rows repeated for beams or several return sequences are compared as generate
        repeats them. A session opened before the model's trainable weights changed is closed,
        and the call opens a fresh one."""
        if self._session is None or self._closed:
            return
        if self._model.tuning.changed_since(self._weights):
            # Trained since it opened: the servers hold the old prompts' or LoRA's results.
            # The call starts a session afresh (get_seq_length is 0 again), as a new one would.
            session, self._session, self._prefix = self._session, None, 0
            with contextlib.suppress(LoopClosedError, InferenceError, OSError):
                self._model._run(session.close())
            return
        rows = self._session.batch_size
        if input_ids.shape[0] != rows and input_ids.shape[0] and rows % input_ids.shape[0] == 0:
            repeats = rows // input_ids.shape[0]
            input_ids = input_ids.repeat_interleave(repeats, dim=0)
            if attention_mask is not None:
                attention_mask = attention_mask.repeat_interleave(repeats, dim=0)
        self._session.keep_agreeing(input_ids, attention_mask, offset=self._prefix)

    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded new positions [batch, new, hidden] through every block; opens the session
        on the first call. `attention_mask` [batch, new]: 0 marks padding; `tokens` [batch,
        new]: the ids `hidden` embeds, if any (for `keep_agreeing`)."""
        if self._closed:
            raise InferenceError("the inference session is closed")
        if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:  # not "N tokens exceed"
            raise ModelInputError("hidden states must be [batch, new positions, hidden size]")
        total = self.get_seq_length() + hidden.shape[1]
        if total > self.max_length:  # here: the session's own count includes tuned prompts
            raise InferenceError(f"{total} tokens exceed the session's max_length "
                                 f"{self.max_length}")
        model = self._model
        prompts = None
        if self._session is None:
            batch = hidden.shape[0] if self._batch_size is None else self._batch_size
            prompts = model.tuning.session_prefix(batch, hidden.dtype, hidden.device)
            prefix = 0 if prompts is None else prompts.shape[1]
            self._weights = model.tuning.weights_now()
            self._session = model._run(model.remote.inference_session(
                batch, self.max_length + prefix, **model.tuning.session_kwargs()))
            self._prefix = prefix
        if prompts is not None:
            if attention_mask is not None:  # the tuned prompts are tokens
                attention_mask = torch.cat([attention_mask.new_ones(
                    attention_mask.shape[0], prompts.shape[1]), attention_mask], dim=1)
            if tokens is not None:  # the prompts' positions are known, and no tokens
                tokens = torch.cat([torch.full((tokens.shape[0], prompts.shape[1]), NOT_A_TOKEN,
                                               dtype=torch.long), tokens.cpu()], dim=1)
            out = model._run(self._session.step_hidden(torch.cat([prompts, hidden], dim=1),
                                                       attention_mask, tokens=tokens))
            return out[:, prompts.shape[1]:]
        return model._run(self._session.step_hidden(hidden, attention_mask, tokens=tokens))

    def close(self) -> None:
        """Free the servers' caches. Idempotent."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(LoopClosedError, InferenceError, OSError):
                self._model._run(session.close())

    def __enter__(self) -> RemoteSessionCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"position {self.get_seq_length()}"
        return f"RemoteSessionCache({state}, max_length={self.max_length})"


def _session_positions(attention_mask: torch.Tensor | None, position: int, new: int
                       ) -> tuple[int | torch.Tensor, torch.Tensor | None]:
    """Position ids and the padding of `new` positions after `position` in a session, from
    the attention mask transformers' generate passes (all positions so far: [batch, position +
    new]): positions count the tokens before, as generate derives them, and padding gets 0."""
    if attention_mask is None:
        return position, None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2 or \
            attention_mask.shape[1] != position + new:
        raise ModelInputError(f"in a session the attention mask covers every position so far: "
                              f"[batch, {position + new}]")
    if bool(attention_mask.all()):
        return position, None
    return (generation_positions(attention_mask)[:, position:],
            attention_mask.to(torch.long)[:, position:])


def _close_remote(loop: BackgroundLoop, remote: RemoteModel) -> None:
    """Finalizer of a DistributedModelForCausalLM (must not reference the model itself). The
    garbage collector may run it on any thread, the loop's own included."""
    with contextlib.suppress(Exception):
        if loop.in_loop_thread():
            loop.loop.create_task(remote.close())
        else:
            loop.run(remote.close(), timeout=CLOSE_TIMEOUT)


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose transformer blocks run on the swarm; see the module docstring."""

    main_input_name = "input_ids"
    base_model_prefix = "distributed"
    _no_split_modules: ClassVar[list[str]] = []

    def __init__(self, config: PretrainedConfig, remote: RemoteModel, loop: BackgroundLoop,
                 tuning: TuningOptions | None = None):
        super().__init__(config)
        self.remote = remote
        self._loop = loop
        loop.track(remote)
        self._finalizer = weakref.finalize(self, _close_remote, loop, remote)
        # The trainable part (prompts or LoRA); its parameters are this model's parameters.
        self.tuning = ModelTuning(config, remote, loop, tuning or TuningOptions())
        self.eval()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *args: Any, bootstrap: Any = (),
                        options: ModelOptions | None = None,
                        **option_kwargs: Any) -> DistributedModelForCausalLM:
        """Load the local head from `model_dir` and connect to the swarm via `bootstrap`.

        Options (ModelOptions): compression ("none", "float16", "int8_blockwise"), max_length
        (default session length), dtype, device, model_id, and the timeouts.
        Fine-tuning (client/finetune.py TuningOptions): tuning_mode ("ptune", "deep_ptune",
        "lora"), pre_seq_len, lora=LoraConfig(...) or lora_rank / lora_alpha /
        lora_target_modules, lora_path (a saved adapter), adapter (hosted by the servers),
        chunk_tokens.
        """
        if args:
            raise TypeError("from_pretrained(model_dir, bootstrap=[...], **options) takes no "
                            "other positional arguments")
        if isinstance(bootstrap, str):
            bootstrap = [bootstrap]
        tuning = TuningOptions.pop_from(option_kwargs)
        loop = shared_loop()
        remote = loop.run(RemoteModel.open(model_dir, bootstrap, options, **option_kwargs))
        try:
            model = cls(remote.config, remote, loop, tuning)
            model.generation_config = _generation_config(model_dir, remote.config)
        except BaseException:
            loop.run(remote.close())
            raise
        return model

    # ------------------------------------------------------------------ plumbing
    def _run(self, coro: Any) -> Any:
        return self._loop.run(coro)

    @property
    def device(self) -> torch.device:
        return self.remote.head.device

    @property
    def dtype(self) -> torch.dtype:
        return self.remote.head.dtype

    @property
    def model_id(self) -> str:
        return self.remote.model_id

    def close(self) -> None:
        """Close open sessions and leave the swarm. Idempotent; also runs at exit."""
        self._finalizer()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ model API
    def embed(self, input_ids: torch.Tensor, position: int | torch.Tensor | None = None,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states entering block 0 (the local embeddings), e.g. to build inputs_embeds."""
        return self.remote.head.embed(input_ids, position, attention_mask)

    def get_input_embeddings(self) -> torch.nn.Module:
        """The local head's embedding module, as transformers and PEFT read it: its output is
        what `inputs_embeds` takes. Families that add more before block 0 (a norm, position
        embeddings) have no such module: use `embed(input_ids)`."""
        embeddings = self.remote.head.input_embeddings
        if embeddings is None:
            raise NotImplementedError(
                f"{self.config.model_type}: the input of block 0 is more than an embedding "
                f"lookup (a norm or position embeddings follow it); use model.embed(input_ids) "
                f"to build inputs_embeds")
        return embeddings

    def get_output_embeddings(self) -> torch.nn.Module | None:
        """The local head's LM head module (after the final norm, as in transformers)."""
        return self.remote.head.output_embeddings

    def forward_blocks(self, hidden: torch.Tensor, start: int = 0, end: int | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the caller's hidden states through remote blocks [start, end) (no cache)."""
        return self._run(self.remote.forward_blocks(hidden, start, end, attention_mask))

    def inference_session(self, max_length: int | None = None,
                          batch_size: int | None = None) -> RemoteSessionCache:
        """A session to pass as `past_key_values` to `generate` or `forward` across calls."""
        return RemoteSessionCache(self, max_length or self.remote.default_max_length,
                                  batch_size)

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the trained LoRA (tuning_mode="lora") in PEFT's format: adapter_config.json
        and adapter_model.safetensors, loadable by PEFT, by `lora_path=` or by
        `overlay-node serve --adapter NAME=DIR`."""
        return self.tuning.save_adapter(directory, self.model_id)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: RemoteSessionCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        cache: RemoteSessionCache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids` or `inputs_embeds` ([batch, length]).

        Without `past_key_values`: a full forward pass (no cache kept; `attention_mask` may
        mark left padding), differentiable when grad mode is on and the tuned parameters or
        `inputs_embeds` require gradients. With a RemoteSessionCache: the given positions are
        new ones, appended to the session. `logits_to_keep` > 0 computes only the last
        positions' logits. `labels` ([batch, length], -100 = ignored): the loss is
        transformers' causal-LM loss (labels shifted inside, as transformers does).
        """
        past_key_values = past_key_values if past_key_values is not None else cache
        if output_attentions or output_hidden_states:
            raise NotImplementedError("distributed models return logits only (no attentions or "
                                      "per-layer hidden states); use forward_blocks for those")
        if (input_ids is None) == (inputs_embeds is None):
            raise ModelInputError("give exactly one of input_ids and inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, RemoteSessionCache):
            raise TypeError(f"past_key_values must be a RemoteSessionCache (from "
                            f"model.inference_session()), not {type(past_key_values).__name__}")
        head = self.remote.head
        grad = False
        if attention_mask is not None:  # 0/1 of any dtype, as transformers takes it
            attention_mask = token_mask(attention_mask)
        if past_key_values is None:
            positions = None
            if self.tuning.ptune is not None and attention_mask is not None and \
                    input_ids is not None and not bool(attention_mask.all()):
                # tokens at generation's positions (see ModelTuning.full_pass)
                positions = generation_positions(attention_mask)
            hidden = self.remote._inputs_to_hidden(input_ids, inputs_embeds, positions,
                                                   attention_mask)
            grad = torch.is_grad_enabled() and (hidden.requires_grad or any(
                p.requires_grad for p in self.tuning.parameters()))
            if grad or self.tuning.active:
                hidden = self.tuning.full_pass(hidden, attention_mask)
            else:
                hidden = self.forward_blocks(hidden, attention_mask=attention_mask)
        else:
            position = past_key_values.get_seq_length()
            if inputs_embeds is not None:
                inputs_embeds = self.remote._inputs_to_hidden(None, inputs_embeds, None)
            new = input_ids if inputs_embeds is None else inputs_embeds
            positions, step_mask = _session_positions(attention_mask, position, new.shape[1])
            hidden = (head.embed(input_ids, positions) if inputs_embeds is None
                      else inputs_embeds)
            hidden = past_key_values.step(hidden, step_mask,
                                          input_ids if inputs_embeds is None else None)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = head.logits(hidden, grad=grad)
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels.to(logits.device), self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_OUTPUT_CACHE_FIELD: past_key_values})

    # ------------------------------------------------------------------ generation
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        past_key_values: RemoteSessionCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: RemoteSessionCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Only the positions the session does not hold yet go to `forward`."""
        past_key_values = past_key_values if past_key_values is not None else cache
        position = past_key_values.get_seq_length() if past_key_values is not None else 0
        first = bool(kwargs.get("is_first_iteration")) or position == 0
        new_length = kwargs.get("next_sequence_length")
        inputs: dict[str, Any] = {"past_key_values": past_key_values,
                                  "attention_mask": attention_mask,
                                  "logits_to_keep": kwargs.get("logits_to_keep", 0)}
        for flag in ("output_attentions", "output_hidden_states"):  # forward refuses them
            if kwargs.get(flag):
                inputs[flag] = True
        if inputs_embeds is not None and first:
            inputs["inputs_embeds"] = inputs_embeds[:, position:]
        elif past_key_values is None:
            inputs["input_ids"] = input_ids
        elif new_length is not None:
            inputs["input_ids"] = input_ids[:, -new_length:]
        else:
            if input_ids.shape[1] <= position:
                raise ModelInputError(f"the session holds {position} positions; input_ids must "
                                      f"hold those and the new ones, not {input_ids.shape[1]}")
            inputs["input_ids"] = input_ids[:, position:]
        return inputs

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None,
                 generation_config: GenerationConfig | None = None, **kwargs: Any) -> Any:
        """transformers' `generate`, through one remote inference session.

        Unless `past_key_values` is given (a session from `inference_session()`, left open), a
        session sized for this call is opened and closed before returning.
        """
        given = kwargs.get("past_key_values")
        given = given if given is not None else kwargs.get("cache")
        if isinstance(given, RemoteSessionCache):
            ids = inputs if inputs is not None else kwargs.get("input_ids")
            if isinstance(ids, torch.Tensor) and ids.ndim == 2 and \
                    kwargs.get("inputs_embeds") is None:
                mask = kwargs.get("attention_mask")
                given.keep_agreeing(ids, None if mask is None else token_mask(mask))
        if given is not None or kwargs.get("use_cache") is False:
            return super().generate(inputs, generation_config, **kwargs)
        cache = RemoteSessionCache(self, self._planned_length(inputs, generation_config, kwargs))
        try:
            return super().generate(inputs, generation_config, **{_OUTPUT_CACHE_FIELD: cache},
                                    **kwargs)
        finally:
            cache.close()

    def _planned_length(self, inputs: torch.Tensor | None, config: GenerationConfig | None,
                        kwargs: dict[str, Any]) -> int:
        """Positions the session needs: prompt + new tokens, as generate will count them."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        prompt_length = 0
        if isinstance(prompt, torch.Tensor) and prompt.ndim >= 2:
            prompt_length = prompt.shape[1]
        if isinstance(embeds, torch.Tensor) and embeds.ndim == 3:
            prompt_length = max(prompt_length, embeds.shape[1])
        configs = [config, self.generation_config]
        max_new = kwargs.get("max_new_tokens")
        max_length = kwargs.get("max_length")
        for source in configs:
            if source is None:
                continue
            max_new = max_new if max_new is not None else source.max_new_tokens
            max_length = max_length if max_length is not None else source.max_length
        if max_new is not None:
            return prompt_length + max_new
        if max_length is not None:
            return max(max_length, prompt_length + 1) + (prompt_length if embeds is not None
                                                         else 0)
        return prompt_length + TRANSFORMERS_DEFAULT_NEW_TOKENS


def _generation_config(model_dir: str | Path, config: PretrainedConfig) -> GenerationConfig:
    """The directory's generation_config.json if any, else one derived from the config."""
    try:
        return GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError):
        return GenerationConfig.from_model_config(config)


__all__ = ["DistributedModelForCausalLM", "RemoteSessionCache"]
