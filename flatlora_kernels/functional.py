"""``flat_lora_linear``: the functional entry point, for a dense or any registered weight format
(validation, backend choice, shapes, autocast).

A weight that is not a tensor is run by its format's entry, registered from above with
``register_weight_format`` (``flatlora_kernels.quantized`` registers ``Packed4bit``, the 4-bit base);
every format ends in ``run_fused_op``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import backends
from ._validation import check_op_arguments, scalar_tensor
from .op_family import OpFamily, eager_applies
from .ops import DENSE_OPS

__all__ = ["flat_lora_linear", "register_weight_format", "run_fused_op"]

#: weight class -> ``run(x, weight, lora_A, lora_B, bias, scaling, sigma, seed, backend)``: the weight
#: formats ``flat_lora_linear`` takes besides a tensor.
WEIGHT_FORMATS: dict[type, Callable[..., Tensor]] = {}


def register_weight_format(weight_type: type, run: Callable[..., Tensor]) -> None:
    """Let ``flat_lora_linear`` take a ``weight_type`` weight, run by ``run`` (``flat_lora_linear``'s
    arguments, positionally; it checks them and calls ``run_fused_op``)."""
    WEIGHT_FORMATS[weight_type] = run


def flat_lora_linear(
    x: Tensor,
    weight,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None = None,
    *,
    scaling: float,
    sigma: float | Tensor,
    seed: int | Tensor,
    backend: str = "auto",
) -> Tensor:
    """``y = x @ (W + scaling * B @ A + eps)^T + bias``, with eps regenerated from ``seed``.

    Args:
        x: ``[..., in_features]``; its dtype is the compute dtype (under autocast, the autocast dtype).
        weight: the frozen base weight ``[out_features, in_features]`` (must not require grad), or a 4-bit
            one (``flatlora_kernels.quantized.Packed4bit``): then ``y = x @ (deq(W) + s*B@A + eps)^T + bias``
            with eps from the row norms of ``deq(W) + s*B@A`` (exactly what the dequantized weight gets),
            decoded chunk by chunk (``"cpp"``, ``"triton"``: ``deq(W)`` is never held whole; ``"reference"``
            dequantizes); fp64 compute is refused there.
        lora_A: ``[r, in_features]``; lora_B: ``[out_features, r]``; bias: ``[out_features]`` or None.
        scaling: the LoRA scale ``s`` (``lora_alpha / r``).
        sigma: the noise level (already multiplied by any schedule factor); float or 1-element tensor.
        seed: Python int or 0-dim int64 tensor selecting the noise draw (see ``flatlora_kernels.noise``).
        backend: ``"auto"`` (C++ on CPU, Triton on CUDA), ``"reference"``, ``"cpp"`` or ``"triton"``.

    Differentiable in ``x``, ``lora_A``, ``lora_B`` and ``bias``; eps is a constant (no gradient).
    """
    if not isinstance(weight, Tensor):
        run = WEIGHT_FORMATS.get(type(weight))
        if run is None:
            formats = "".join(f" or a {t.__name__}" for t in WEIGHT_FORMATS)
            raise TypeError(f"flat_lora_linear: weight must be a torch.Tensor{formats}, got {type(weight).__name__}")
        return run(x, weight, lora_A, lora_B, bias, scaling, sigma, seed, backend)
    check_op_arguments(x, weight, lora_A, lora_B, bias, scaling, sigma, seed)
    if weight.requires_grad:
        raise ValueError(
            "flat_lora_linear: the base weight must be frozen (weight.requires_grad is True); "
            "only lora_A, lora_B and bias are trained"
        )
    return run_fused_op(
        x, (weight,), lora_A, lora_B, bias, scaling, sigma, seed, backend,
        out_features=weight.shape[0], family=DENSE_OPS, plain_weight_tensors=(weight,),
    )


def run_fused_op(
    x: Tensor,
    weight_args: tuple,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Tensor | None,
    scaling: float,
    sigma: float | Tensor,
    seed: int | Tensor,
    backend: str,
    *,
    out_features: int,
    family: OpFamily,
    plain_weight_tensors: tuple,
) -> Tensor:
    """One call of a weight format's fused op (``family``: dense, 4-bit, ...) on checked arguments:
    resolves the backend, applies autocast's compute dtype, flattens ``x`` to 2-D, and takes the
    family's eager Function instead of its graph op for an opaque backend where ``op_family.eager_applies``
    (``plain_weight_tensors``: the weight tensors that check covers)."""
    device = x.device
    backend = backends.resolve(backend, device)  # "auto" -> the device's fast path; impossible pairs raise
    # Autocast has no meta device; meta tensors (shape-only tracing) take the ops' fake kernels.
    autocast_device = "cpu" if device.type == "meta" else device.type
    autocast_on = torch.is_autocast_enabled(autocast_device)
    if autocast_on and device.type != "meta":
        x = x.to(torch.get_autocast_dtype(device.type))
    sigma_t = scalar_tensor(sigma, torch.float32, device)
    seed_t = scalar_tensor(seed, torch.int64, device)
    # A 2-D x goes in as is: reshape would add a view node to the autograd graph (for nothing).
    x_2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    args = (x_2d, *weight_args, lora_A, lora_B, bias, float(scaling), sigma_t, seed_t, backend)
    # Eager calls on an opaque backend skip torch.library's dispatch layers (same kernels, same results).
    eager = backend in family.opaque_ops and eager_applies((x, *plain_weight_tensors, lora_A, lora_B, bias))
    op = family.eager.apply if eager else family.graph_forward
    if autocast_on:
        with torch.autocast(autocast_device, enabled=False):
            y, _ = op(*args)
    else:  # nothing to switch off: entering the context would only cost time
        y, _ = op(*args)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_features)
