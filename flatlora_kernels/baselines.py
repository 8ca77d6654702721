"""Dense baselines shared by tests and benchmarks (not a backend: the plain-PyTorch *backend* is
``backends/torch_reference.py``, which regenerates the weight in backward instead of keeping it).

* ``dense_perturbed_weight``: the whole ``W + s*B@A + eps`` as one tensor, the truth tests compare against.

* ``naive_flat_lora_linear``: autograd through the materialised ``W + s*B@A + eps`` (the "naive
  perturbation" baseline: it keeps a weight-sized tensor alive for backward).
* ``lora_linear``: plain LoRA, PEFT's math: ``F.linear(x, W) + s * (x @ A^T) @ B^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import filter_noise

__all__ = ["dense_perturbed_weight", "naive_flat_lora_linear", "lora_linear"]


def dense_perturbed_weight(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float, sigma: float | Tensor, seed: int | Tensor
) -> Tensor:
    """``W + s*B@A + eps`` in fp32 (fp64 when any of W, A, B is fp64), differentiable in A and B (eps,
    fp32 by definition, is a constant)."""
    eps = filter_noise(weight, lora_A, lora_B, scaling=scaling, sigma=sigma, seed=seed)
    dtype = merge_dtype(weight, lora_A, lora_B)
    return weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype)) + eps.to(dtype)


def merge_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype ``W + s*B@A`` is formed in: fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def naive_flat_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float,
    sigma: float | Tensor,
    seed: int | Tensor,
) -> Tensor:
    """``y = x @ (W + s*B@A + eps)^T + bias`` with the perturbed weight rounded to x's dtype."""
    w_eff = dense_perturbed_weight(weight.to(merge_dtype(weight, x)), lora_A, lora_B, scaling=scaling, sigma=sigma, seed=seed)
    w_eff = w_eff.to(x.dtype)
    return F.linear(x, w_eff, None if bias is None else bias.to(x.dtype))


def lora_linear(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None = None, *, scaling: float
) -> Tensor:
    """Plain LoRA (no noise), as PEFT computes it."""
    return F.linear(x, weight, bias) + scaling * ((x @ lora_A.t()) @ lora_B.t())
