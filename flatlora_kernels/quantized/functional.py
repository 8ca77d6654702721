"""``flat_qlora_linear``: the functional entry point of a 4-bit layer (checks, backend, shapes, autocast)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_op_arguments
from ..functional import run_fused_op
from . import ops
from .layout import Packed4bit

__all__ = ["flat_qlora_linear"]


def _shape_stand_in(packed: Packed4bit) -> Tensor:
    """A one-element fp32 tensor viewed as ``[N, K]`` on the weight's device: lets the dense layer's
    shape and device checks (``_validation``) check a 4-bit weight too, allocating nothing weight-sized."""
    return torch.empty((1, 1), device=packed.device).expand(packed.out_features, packed.in_features)


def flat_qlora_linear(
    x: Tensor,
    weight: Packed4bit,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float,
    sigma: float | Tensor,
    seed: int | Tensor,
    backend: str = "auto",
) -> Tensor:
    """``y = x @ (deq(W) + scaling * B @ A + eps)^T + bias`` for a 4-bit ``W`` (``Packed4bit``).

    eps is the package's noise stream with row norms of ``deq(W) + s*B@A``
    (``flatlora_kernels.noise``): exactly what ``flat_lora_linear`` gives the dequantized weight.
    The backends decode the 4-bit rows chunk by chunk (``"cpp"``, ``"triton"``) and never hold
    ``deq(W)`` whole; ``"reference"`` dequantizes. Arguments otherwise as ``flat_lora_linear``.
    """
    if not isinstance(weight, Packed4bit):
        raise TypeError(f"flat_qlora_linear: weight must be a Packed4bit, got {type(weight).__name__}")
    check_op_arguments(x, _shape_stand_in(weight), lora_A, lora_B, bias, scaling, sigma, seed)
    if x.dtype == torch.float64:
        raise TypeError("flat_qlora_linear: fp64 compute is not supported on a 4-bit base (use fp32, bf16 or fp16)")
    return run_fused_op(
        x, weight.op_args(), lora_A, lora_B, bias, scaling, sigma, seed, backend,
        out_features=weight.out_features, graph_op=torch.ops.flatlora_q4.forward, eager_cpp_op=ops.EagerCpp4bit.apply,
        plain_weight_tensors=(),
    )
