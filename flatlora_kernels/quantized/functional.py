"""``flat_qlora_linear``: the functional entry point of a 4-bit layer (checks, backend, shapes, autocast)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .._validation import check_bias, check_input, check_scaling, check_seed, check_sigma, check_weights, scalar_tensor
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
    shape = _shape_stand_in(weight)
    check_weights(shape, lora_A, lora_B)
    check_input(x, shape)
    check_bias(bias, shape)
    check_scaling(scaling)
    check_sigma(sigma)
    check_seed(seed)
    if x.dtype == torch.float64:
        raise TypeError("flat_qlora_linear: fp64 compute is not supported on a 4-bit base (use fp32, bf16 or fp16)")
    device = x.device
    backend = backends.resolve(backend, device)
    autocast_device = "cpu" if device.type == "meta" else device.type
    autocast_on = torch.is_autocast_enabled(autocast_device)
    if autocast_on and device.type != "meta":
        x = x.to(torch.get_autocast_dtype(device.type))
    sigma_t = scalar_tensor(sigma, torch.float32, device)
    seed_t = scalar_tensor(seed, torch.int64, device)
    x_2d = x if x.dim() == 2 else x.reshape(-1, weight.in_features)
    args = (x_2d, *weight.op_args(), lora_A, lora_B, bias, float(scaling), sigma_t, seed_t, backend)
    eager_cpp = backend == "cpp" and ops.eager_cpp_applies((x, lora_A, lora_B, bias))
    op = ops.EagerCpp4bit.apply if eager_cpp else torch.ops.flatlora_q4.forward
    if autocast_on:
        with torch.autocast(autocast_device, enabled=False):
            y, _ = op(*args)
    else:
        y, _ = op(*args)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.out_features)
