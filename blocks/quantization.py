"""A span's decoder-layer weights in 8 or 4 bits, through bitsandbytes (``--quant int8|nf4``).

- ``int8``: LLM.int8() (Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for
  Transformers at Scale"): row-wise int8 weights, and inputs' outlier feature dimensions (any
  value of magnitude >= 6.0, the paper's threshold) multiplied in 16 bits.
- ``nf4``: QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): 4-bit
  NormalFloat in blocks of 64 weights, with double quantization (the blocks' absmax constants
  themselves quantized to 8 bits in blocks of 256), computing in the span's dtype.

Only the ``nn.Linear`` modules inside the decoder layers are replaced, as transformers'
bitsandbytes integration does; norms, embeddings, the head, and weights stored as fused tensors
(transformers 5's MoE experts) keep the span's dtype. Quantization happens where the weights go
(bitsandbytes quantizes on the device), so it runs on CUDA, and also on the CPU where the
installed bitsandbytes can; a failure is a clear QuantizationError, not a crash later.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

# bitsandbytes warns (through warnings or its logger, by version) on every int8 multiplication
# whose inputs are not float16, i.e. on every step of a bf16 span.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

QUANT_TYPES = ("none", "int8", "nf4")
# LLM.int8(), section 3.2: features with any magnitude >= 6 are outliers, kept in 16 bits.
LLM_INT8_THRESHOLD = 6.0
# QLoRA, section 3: NF4 blocks of 64 weights; double quantization with blocks of 256 constants.
NF4_BLOCKSIZE = 64


class QuantizationError(ValueError):
    """The requested quantization is unavailable here (no bitsandbytes, or not on this device)."""


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise QuantizationError(
            "--quant needs bitsandbytes: pip install 'overlay-node[quant]'"
        ) from None
    return bitsandbytes


def quantize_linears(
    layers: nn.Module, quant: str, device: torch.device, compute_dtype: torch.dtype
) -> int:
    """Replace every ``nn.Linear`` under ``layers`` by its bitsandbytes ``quant`` version on
    ``device``; returns how many were replaced."""
    if quant not in QUANT_TYPES:
        raise QuantizationError(f"unknown quantization {quant!r}; use one of {QUANT_TYPES}")
    if quant == "none":
        return 0
    bnb = _bitsandbytes()
    targets = [
        (parent, name, child)
        for parent in layers.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    try:
        for parent, name, linear in targets:
            setattr(parent, name, _quantized(bnb, linear, quant, device, compute_dtype))
        probe = targets[0][2] if targets else None
        if probe is not None:  # one multiplication now, so an unsupported device fails here
            module = getattr(targets[0][0], targets[0][1])
            with torch.inference_mode():
                module(torch.zeros(1, probe.in_features, dtype=compute_dtype, device=device))
    except (RuntimeError, NotImplementedError, ValueError, AttributeError) as exc:
        raise QuantizationError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {quant} on {device}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    return len(targets)


def _quantized(bnb, linear: nn.Linear, quant: str, device, compute_dtype) -> nn.Module:
    weight = linear.weight.detach()
    bias = linear.bias
    if quant == "int8":
        module = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            has_fp16_weights=False,
            threshold=LLM_INT8_THRESHOLD,
        )
        row_major, row_scales, _ = bnb.functional.int8_vectorwise_quant(
            weight.to(device=device, dtype=torch.float16)
        )
        param = bnb.nn.Int8Params(row_major, requires_grad=False, has_fp16_weights=False)
        param.CB, param.SCB = row_major, row_scales
        module.weight = param
    else:
        module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,  # double quantization
            quant_type="nf4",
        )
        module.weight = bnb.nn.Params4bit(
            weight.to(compute_dtype),
            requires_grad=False,
            compress_statistics=True,
            quant_type="nf4",
            blocksize=NF4_BLOCKSIZE,
            module=module,
        )
    if bias is not None:
        module.bias = nn.Parameter(bias.detach().to(device, compute_dtype), requires_grad=False)
    return module.to(device).eval()
