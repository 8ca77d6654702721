"""Dense baselines, and the random layers they run on, shared by tests and benchmarks (not a backend:
the plain-PyTorch *backend* is ``backends/torch_reference.py``, which regenerates the weight in
backward instead of keeping it).

* ``make_layer``: a random adapted layer ``(weight, lora_A, lora_B, bias)`` with a non-zero B.
* ``dense_perturbed_weight``: the whole ``W + s*B@A + eps`` as one tensor, the truth tests compare against.

Two "naive perturbation" baselines: both run autograd through a materialised weight-sized
``W + eps`` that stays alive until backward; they differ in the noise, on purpose:

* ``naive_flat_lora_linear``: eps is the package's stream (``flatlora_kernels.noise``), so its output
  is ``flat_lora_linear``'s to rounding: the correctness reference of the tests. Not for timings:
  drawing the stream in plain PyTorch is slow (docs/DESIGN.md, section 7).
* ``naive_randn_flat_lora_linear``: eps from ``torch.randn``, the cheapest generator, so a timing
  measures what keeping ``W + eps`` costs and not our stream (docs/DESIGN.md, "Baselines"): the
  ``naive`` of the benchmarks (``benchmarks/implementations.py``, ``benchmarks/gpu_kernels.py``) and
  of the demo's cost table. Same distribution, not the same draw: never compare its values with
  the fused op's.

* ``lora_linear``: plain LoRA, PEFT's math: ``F.linear(x, W) + s * (x @ A^T) @ B^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .noise import filter_noise, merge_dtype, merged_weight, perturbation_row_scale

__all__ = [
    "make_layer",
    "dense_perturbed_weight",
    "naive_flat_lora_linear",
    "naive_randn_flat_lora_linear",
    "lora_linear",
]


def make_layer(
    out_features: int,
    in_features: int,
    rank: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    lora_dtype: torch.dtype | None = None,
    lora_B_std: float = 0.5,
    bias_std: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(weight, lora_A, lora_B, bias)``: W and A with rows of unit expected norm, B non-zero (at a fresh
    adapter's B = 0, B@A would drop out of every check), all plain tensors (no grad).

    Drawn on the CPU from ``seed``, then moved, so a seed gives the same values on every device;
    ``lora_dtype`` (default ``dtype``) is the dtype of A and B.
    """
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(device, dtype)
    lora_A = (torch.randn(rank, in_features, generator=g) / in_features**0.5).to(device, lora_dtype)
    lora_B = (torch.randn(out_features, rank, generator=g) * lora_B_std).to(device, lora_dtype)
    bias = (torch.randn(out_features, generator=g) * bias_std).to(device, dtype)
    return weight, lora_A, lora_B, bias


def dense_perturbed_weight(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float, sigma: float | Tensor, seed: int | Tensor
) -> Tensor:
    """``W + s*B@A + eps`` in fp32 (fp64 when any of W, A, B is fp64), differentiable in A and B (eps,
    fp32 by definition, is a constant)."""
    eps = filter_noise(weight, lora_A, lora_B, scaling=scaling, sigma=sigma, seed=seed)
    merged = merged_weight(weight, lora_A, lora_B, scaling)
    return merged + eps.to(merged.dtype)


def naive_flat_lora_linear(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None = None, *,
    scaling: float, sigma: float | Tensor, seed: int | Tensor,
) -> Tensor:
    """``flat_lora_linear`` (its arguments, less ``backend``) by autograd through the dense perturbed
    weight, rounded to x's dtype: ``y = x @ (W + s*B@A + eps)^T + bias``."""
    noise = dict(scaling=scaling, sigma=sigma, seed=seed)
    w_eff = dense_perturbed_weight(weight.to(merge_dtype(weight, x)), lora_A, lora_B, **noise).to(x.dtype)
    return F.linear(x, w_eff, None if bias is None else bias.to(x.dtype))


def naive_randn_flat_lora_linear(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None = None, *,
    scaling: float, sigma: float | Tensor, generator: torch.Generator | None = None,
) -> Tensor:
    """The naive perturbation with ``torch.randn`` noise (``generator``, default the global one):
    ``W + eps`` is formed without grad in x's dtype and kept by ``F.linear`` for backward; the LoRA
    branch runs under autograd in x's dtype (the factors may be fp32, as PEFT keeps them)."""
    row_scale = perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma)
    with torch.no_grad():
        z = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=torch.float32)
        w_noisy = (weight.float() + row_scale[:, None] * z).to(x.dtype)
    return lora_linear(x, w_noisy, lora_A.to(x.dtype), lora_B.to(x.dtype), bias, scaling=scaling)


def lora_linear(
    x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None = None, *, scaling: float
) -> Tensor:
    """Plain LoRA (no noise), as PEFT computes it."""
    return F.linear(x, weight, bias) + scaling * ((x @ lora_A.t()) @ lora_B.t())
