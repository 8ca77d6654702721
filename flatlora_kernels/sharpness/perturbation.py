"""One step's B-perturbations ``E_B`` for every LoRA layer, from the gradients now in ``.grad``.

Layers of the same shape (q/k/v/o projections of every block, say) are stacked and go through the
r x r math of ``lowrank.py`` together, so a step costs a few batched calls per distinct shape
instead of a few dozen small calls per layer (and one batched eigendecomposition per shape).

Normalisation of ``E_W = rho * g / ||g||``:

* ``"layer"`` (default): each layer's ``E_W`` has Frobenius norm rho, as in the public FMLoRA
  port, whose ``rho = 0.05`` was tuned that way. The radius per layer then does not shrink as the
  model gets deeper, and no reduction across layers (or devices) is needed.
* ``"global"``: one norm over all layers (SAM's convention); the whole perturbation has norm rho,
  so rho must grow roughly like sqrt(number of layers) to perturb each layer as much.

The math runs in fp32 (fp64 for fp64 parameters) and under ``autocast(enabled=False)``. A missing
gradient counts as zero. A layer whose ``||g||`` is zero or not finite (an fp16 overflow, say)
gets ``E_B = 0``, decided on the device without a host sync.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack

import torch
from torch import Tensor

from .layers import LoraLayerRef
from .lowrank import default_pinv_rtol, estimate_full_gradient, transfer_to_B

__all__ = ["NORMALIZATIONS", "compute_b_perturbations"]

NORMALIZATIONS = ("layer", "global")


def _math_dtype(tensor: Tensor) -> torch.dtype:
    return torch.promote_types(tensor.dtype, torch.float32)


def _grad_or_zeros(param: Tensor, dtype: torch.dtype) -> Tensor:
    grad = param.grad
    return torch.zeros_like(param, dtype=dtype) if grad is None else grad.to(dtype)


def _group_by_shape(layers: list[LoraLayerRef]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, layer in enumerate(layers):
        A, B = layer.lora_A, layer.lora_B
        groups[(A.device, _math_dtype(B), tuple(A.shape), tuple(B.shape))].append(index)
    return groups


def _autocast_disabled(layers: list[LoraLayerRef]) -> ExitStack:
    """Full-precision matmuls even when ``step()`` is called inside an autocast region."""
    stack = ExitStack()
    for device_type in sorted({layer.lora_A.device.type for layer in layers}):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _coefficient(norm: Tensor, rho: float) -> Tensor:
    """``rho / norm``, or 0 where the norm is zero or not finite (no perturbation)."""
    usable = torch.isfinite(norm) & (norm > 0)
    return torch.where(usable, rho / torch.where(usable, norm, 1.0), 0.0)


@torch.no_grad()
def compute_b_perturbations(
    layers: list[LoraLayerRef],
    rho: float,
    *,
    normalization: str = "layer",
    pinv_rtol: float | None = None,
) -> list[Tensor]:
    """``E_B`` of each layer (same order), in fp32 (fp64 for fp64 factors), shape of its ``lora_B``.

    Uses the current values of ``lora_A``/``lora_B`` and their ``.grad``; ``pinv_rtol`` defaults to
    ``default_pinv_rtol`` of the math dtype.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    estimates = []
    with _autocast_disabled(layers):
        for (device, dtype, _, _), indices in _group_by_shape(layers).items():
            refs = [layers[i] for i in indices]
            A = torch.stack([ref.lora_A.detach().to(dtype) for ref in refs])
            B = torch.stack([ref.lora_B.detach().to(dtype) for ref in refs])
            grad_A = torch.stack([_grad_or_zeros(ref.lora_A, dtype) for ref in refs])
            grad_B = torch.stack([_grad_or_zeros(ref.lora_B, dtype) for ref in refs])
            scaling = torch.tensor([ref.scaling for ref in refs], dtype=dtype, device=device).view(-1, 1, 1)
            rtol = default_pinv_rtol(dtype) if pinv_rtol is None else pinv_rtol
            estimates.append((indices, scaling, estimate_full_gradient(A, B, grad_A, grad_B, scaling, rtol)))

        if normalization == "global":
            anchor = estimates[0][2].sq_norm.device
            total = sum(est.sq_norm.sum().to(anchor) for _, _, est in estimates)
            global_coefficient = _coefficient(total.sqrt(), rho)

        perturbations: list[Tensor | None] = [None] * len(layers)
        for indices, scaling, est in estimates:
            if normalization == "layer":
                coefficient = _coefficient(est.sq_norm.sqrt(), rho)
            else:
                coefficient = global_coefficient.to(est.sq_norm.device).expand_as(est.sq_norm)
            E_B = transfer_to_B(est, coefficient, scaling)
            # 0 * Inf = NaN: zero the layers whose coefficient was zeroed for a non-finite norm.
            E_B = torch.where((coefficient != 0)[:, None, None], E_B, 0.0)
            for position, index in enumerate(indices):
                perturbations[index] = E_B[position]
    return perturbations
