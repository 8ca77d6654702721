"""The 4-bit weight format of ``flat_lora_linear`` (registered for ``Packed4bit`` on import), and
``flat_qlora_linear``, its strict spelling."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_op_arguments
from ..functional import flat_lora_linear, register_weight_format, run_fused_op
from .ops import QUANTIZED_OPS
from .layout import Packed4bit

__all__ = ["flat_qlora_linear", "linear_4bit"]


def linear_4bit(x, weight: Packed4bit, lora_A, lora_B, bias, scaling, sigma, seed, backend) -> Tensor:
    """``flat_lora_linear`` for a ``Packed4bit`` weight (positional arguments): the dense checks on its
    shape, then the 4-bit ops."""
    check_op_arguments(x, _shape_stand_in(weight), lora_A, lora_B, bias, scaling, sigma, seed)
    if x.dtype == torch.float64:
        raise TypeError("flat_lora_linear: fp64 compute is not supported on a 4-bit base (use fp32, bf16 or fp16)")
    return run_fused_op(
        x, weight.op_args(), lora_A, lora_B, bias, scaling, sigma, seed, backend,
        out_features=weight.out_features, family=QUANTIZED_OPS, plain_weight_tensors=(),
    )  # fmt: skip


def _shape_stand_in(packed: Packed4bit) -> Tensor:
    """A one-element fp32 tensor viewed as ``[N, K]`` on the weight's device: lets the dense layer's
    shape and device checks (``_validation``) check a 4-bit weight too, allocating nothing weight-sized."""
    return torch.empty((1, 1), device=packed.device).expand(packed.out_features, packed.in_features)


register_weight_format(Packed4bit, linear_4bit)


def flat_qlora_linear(x: Tensor, weight: Packed4bit, *args, **kwargs) -> Tensor:
    """``flat_lora_linear(x, weight, ...)`` for a 4-bit ``weight`` (``Packed4bit``) only, the strict
    spelling for code that must not silently run a dense weight: ``y = x @ (deq(W) + s*B@A + eps)^T + bias``,
    decoded chunk by chunk. Arguments and results as ``flat_lora_linear``; any other weight raises TypeError."""
    if not isinstance(weight, Packed4bit):
        raise TypeError(f"flat_qlora_linear: weight must be a Packed4bit, got {type(weight).__name__}")
    return flat_lora_linear(x, weight, *args, **kwargs)
