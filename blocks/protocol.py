"""The block-server RPCs (documented in docs/block_protocol.md): names, requests, error codes.

Pure: validates the metadata maps of untrusted requests and builds typed requests from them.
No torch and no asyncio here, so the simulator and the client's pure rules can use it. Tensors
travel as tensor_wire messages whose metadata maps are checked by the functions below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1

METHOD_INFO = "blocks.info"
METHOD_FORWARD = "blocks.forward"
METHOD_INFERENCE = "blocks.inference"
METHOD_BACKWARD = "blocks.backward"
METHOD_LORA_PUT = "blocks.lora_put"

# Error codes (RemoteError.code) of the block RPCs, beyond the transport's own.
UNKNOWN_MODEL = "unknown_model"
BAD_RANGE = "bad_range"
BAD_INPUT = "bad_input"
CACHE_FULL = "cache_full"
SESSION_CLOSED = "session_closed"
TOO_LONG = "too_long"
OVERLOADED = "overloaded"
UNKNOWN_ADAPTER = "unknown_adapter"  # no adapter of that name is hosted by this server
ADAPTER_MISSING = "adapter_missing"  # an uploaded LoRA this server no longer holds: upload again
TOO_LARGE = "too_large"  # over a size limit of this server (request/backward tokens, adapter bytes)

COMPRESSIONS = ("none", "float16", "bfloat16", "int8_blockwise", "lz4")
# What a session's steps may carry beyond position and step id, as the opening answer lists it
# ("features"): a client sends a step's "mask" or "reorder" only to servers that list them (a
# server without them would ignore the field and compute something else, silently).
SESSION_FEATURES = ("mask", "reorder")
# Batch x length of one forward or step a server takes by default
# (blocks.server.ServingConfig.max_request_tokens), and what clients assume of a server that
# does not say (announcements and opening answers from before the limit was announced).
DEFAULT_MAX_REQUEST_TOKENS = 16384
# Batch x length of one `blocks.backward` a server takes by default (ServingConfig.
# max_backward_tokens; a backward costs about three forwards), and what clients assume of a
# server that does not announce it (every server before it was announced took this).
DEFAULT_MAX_BACKWARD_TOKENS = 8192
MAX_BATCH = 1024
MAX_LENGTH = 1 << 20
MAX_MASK_BYTES = 1 << 22  # a step's padding mask: one byte per new position and sequence
MAX_LORA_RANK = 1024
MAX_LORA_MODULES = 64  # target modules per layer
MAX_ADAPTER_NAME = 128
_MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
_DIGEST = re.compile(r"[0-9a-f]{64}")


class RequestError(ValueError):
    """A request the server must refuse; `code` is sent to the caller with the message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BlockRange:
    model_id: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SessionRequest:
    blocks: BlockRange
    batch_size: int
    max_length: int
    wait_timeout: float  # seconds the caller will wait for free attention cache
    compression: str  # of the server's answers


@dataclass(frozen=True, slots=True)
class StepRequest:
    position: int  # the position this step starts at; lower than the session's: roll back
    step_id: int
    # Padding of the new positions: batch x length bytes, row-major, 1 = token, 0 = padding
    # (docs/block_protocol.md, "Padding"); None: every new position is a token.
    mask: bytes | None = None
    reorder: Reorder | None = None  # beam search: the cache's rows first (see Reorder)


@dataclass(frozen=True, slots=True)
class Reorder:
    """Beam search (docs/block_protocol.md, "Reordering"): before the step, row i of the
    session's cache becomes row ids[i]. `version` numbers the session's reorders from 1, so
    that a step sent again (after a failed push) does not apply its reorder twice."""

    version: int
    ids: tuple[int, ...]


def _int(meta: dict, key: str, low: int, high: int) -> int:
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(BAD_INPUT, f"{key!r} must be an integer in [{low}, {high}]")
    return value


def _compression(meta: dict) -> str:
    value = meta.get("compression", "none")
    if value not in COMPRESSIONS:
        raise RequestError(BAD_INPUT, f"unknown compression {value!r}; known: {COMPRESSIONS}")
    return value


def parse_range(meta: Any, model_id: str, served: tuple[int, int]) -> BlockRange:
    """The block range a request asks for, which must lie inside the span this server holds."""
    if not isinstance(meta, dict):
        raise RequestError(BAD_INPUT, "request metadata must be a map")
    asked = meta.get("model")
    if asked != model_id:
        raise RequestError(UNKNOWN_MODEL, f"this server serves {model_id!r}, not {asked!r}")
    start = _int(meta, "start", 0, 1 << 20)
    end = _int(meta, "end", 0, 1 << 20)
    if not served[0] <= start < end <= served[1]:
        raise RequestError(
            BAD_RANGE, f"blocks [{start}, {end}) are not inside the served span "
                       f"[{served[0]}, {served[1]})"
        )
    return BlockRange(model_id, start, end)


def parse_session_request(meta: Any, model_id: str, served: tuple[int, int],
                          max_length: int) -> SessionRequest:
    blocks = parse_range(meta, model_id, served)
    batch = _int(meta, "batch_size", 1, MAX_BATCH)
    length = _int(meta, "max_length", 1, MAX_LENGTH)
    if length > max_length:
        raise RequestError(TOO_LONG, f"max_length {length} exceeds this server's {max_length}")
    wait = meta.get("wait_timeout", 0.0)
    if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 3600:
        raise RequestError(BAD_INPUT, "'wait_timeout' must be a number of seconds in [0, 3600]")
    return SessionRequest(blocks, batch, length, float(wait), _compression(meta))


def parse_step_request(meta: Any) -> StepRequest:
    if not isinstance(meta, dict):
        raise RequestError(BAD_INPUT, "step metadata must be a map")
    return StepRequest(_int(meta, "position", 0, MAX_LENGTH), _int(meta, "step", 0, 1 << 62),
                       parse_mask(meta.get("mask")), parse_reorder(meta.get("reorder")))


def parse_reorder(value: Any) -> Reorder | None:
    """`[version, [row ids]]` as sent (the ids' count and range are checked against the
    session's batch where it is known: blocks/span.py)."""
    if value is None:
        return None
    if not (isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[1], list)
            and 0 < len(value[1]) <= MAX_BATCH):
        raise RequestError(BAD_INPUT, "'reorder' must be [version, [row ids]]")
    version, ids = value
    if not isinstance(version, int) or isinstance(version, bool) or not 0 < version < 1 << 62:
        raise RequestError(BAD_INPUT, "a reorder's version must be a positive integer")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_BATCH
               for i in ids):
        raise RequestError(BAD_INPUT, f"reorder row ids must be integers in [0, {MAX_BATCH})")
    return Reorder(version, tuple(ids))


def parse_mask(value: Any) -> bytes | None:
    """A step's padding mask as sent (its size is checked against the step's hidden states
    where they are known: blocks/span.py)."""
    if value is None:
        return None
    if not isinstance(value, bytes) or not value or len(value) > MAX_MASK_BYTES:
        raise RequestError(BAD_INPUT, f"'mask' must be 1 to {MAX_MASK_BYTES} bytes")
    return value


def response_compression(meta: Any) -> str:
    return _compression(meta) if isinstance(meta, dict) else "none"


# ---------------------------------------------------------------------------- fine-tuning


@dataclass(frozen=True, slots=True)
class TuningRequest:
    """What a forward, backward or inference request asks beyond the frozen blocks."""

    adapter: str | None = None  # a LoRA adapter the server hosts, by name
    lora: str | None = None  # the content digest of a LoRA the client uploaded (METHOD_LORA_PUT)
    prompts: bool = False  # a deep-prompts tensor [blocks, batch or 1, prefix, hidden] follows
    mask: bool = False  # an attention-mask tensor [batch, length] follows


def parse_tuning(meta: Any, tensor_count: int, leading: int) -> TuningRequest:
    """The tuning part of a request whose first `leading` tensors are fixed (hidden states, and
    output gradients for backward). Requests from before fine-tuning existed send a mask as
    the one tensor after the leading ones without saying so."""
    if not isinstance(meta, dict):
        raise RequestError(BAD_INPUT, "request metadata must be a map")
    adapter, lora = meta.get("adapter"), meta.get("lora")
    if adapter is not None and (not isinstance(adapter, str) or not adapter
                                or len(adapter) > MAX_ADAPTER_NAME):
        raise RequestError(BAD_INPUT, f"'adapter' must be a name of at most {MAX_ADAPTER_NAME} "
                                      f"characters")
    if lora is not None and not (isinstance(lora, str) and _DIGEST.fullmatch(lora)):
        raise RequestError(BAD_INPUT, "'lora' must be a 64-digit hex digest from blocks.lora_put")
    if adapter is not None and lora is not None:
        raise RequestError(BAD_INPUT, "a request uses a hosted adapter or an uploaded LoRA, "
                                      "not both")
    flags = {}
    for key in ("prompts", "mask"):
        value = meta.get(key, False)
        if not isinstance(value, bool):
            raise RequestError(BAD_INPUT, f"{key!r} must be true or false")
        flags[key] = value
    if "mask" not in meta and not flags["prompts"] and tensor_count == leading + 1:
        flags["mask"] = True  # the original layout: [hidden, attention_mask]
    expected = leading + flags["mask"] + flags["prompts"]
    if tensor_count != expected:
        raise RequestError(BAD_INPUT, f"expected {expected} tensors for this request, got "
                                      f"{tensor_count}")
    return TuningRequest(adapter, lora, flags["prompts"], flags["mask"])


@dataclass(frozen=True, slots=True)
class LoraPutRequest:
    """An uploaded LoRA for blocks [start, end): for each block in order and each module in
    `modules` order, tensors A [rank, in_features] and B [out_features, rank] (PEFT's
    lora_A / lora_B weights); the output of module m gains scaling * B(A(x))."""

    blocks: BlockRange
    rank: int
    alpha: float
    rslora: bool  # scaling alpha / sqrt(rank) instead of alpha / rank
    modules: tuple[str, ...]  # paths inside one decoder layer, e.g. "self_attn.q_proj"
    digest: str
    replaces: str | None  # a digest this client uploaded before and no longer needs

    @property
    def scaling(self) -> float:
        return lora_scaling(self.alpha, self.rank, self.rslora)

    @property
    def tensor_count(self) -> int:
        return 2 * len(self.modules) * (self.blocks.end - self.blocks.start)


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: alpha / rank, or alpha / sqrt(rank) for rank-stabilised LoRA."""
    return alpha / rank**0.5 if rslora else alpha / rank


def parse_lora_put(meta: Any, model_id: str, served: tuple[int, int],
                   tensor_count: int) -> LoraPutRequest:
    blocks = parse_range(meta, model_id, served)
    rank = _int(meta, "rank", 1, MAX_LORA_RANK)
    alpha = meta.get("alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < 1e6:
        raise RequestError(BAD_INPUT, "'alpha' must be a positive number")
    rslora = meta.get("rslora", False)
    if not isinstance(rslora, bool):
        raise RequestError(BAD_INPUT, "'rslora' must be true or false")
    modules = meta.get("modules")
    if (not isinstance(modules, list) or not 0 < len(modules) <= MAX_LORA_MODULES
            or not all(isinstance(m, str) and len(m) <= 256 and _MODULE_PATH.fullmatch(m)
                       for m in modules) or len(set(modules)) != len(modules)):
        raise RequestError(BAD_INPUT, f"'modules' must list 1 to {MAX_LORA_MODULES} distinct "
                                      f"module paths")
    digest, replaces = meta.get("digest"), meta.get("replaces")
    if not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise RequestError(BAD_INPUT, "'digest' must be a 64-digit hex SHA-256")
    if replaces is not None and not (isinstance(replaces, str) and _DIGEST.fullmatch(replaces)):
        raise RequestError(BAD_INPUT, "'replaces' must be a 64-digit hex SHA-256")
    request = LoraPutRequest(blocks, rank, float(alpha), rslora, tuple(modules), digest,
                             replaces)
    if tensor_count != request.tensor_count:
        raise RequestError(BAD_INPUT, f"a LoRA of {len(modules)} modules on "
                                      f"{blocks.end - blocks.start} blocks has "
                                      f"{request.tensor_count} tensors, got {tensor_count}")
    return request
