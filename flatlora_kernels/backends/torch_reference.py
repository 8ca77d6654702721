"""The plain-PyTorch backend: same math and noise as the kernels, written for clarity, not speed.

It materialises the perturbed weight once per pass (a weight-sized temporary, freed at once) and
regenerates it in backward from the seed, so, unlike the naive baseline, nothing weight-sized is
kept between forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..noise import merge_dtype, merged_weight, normal_rows, perturbation_row_scale


def perturbed_weight_from_scales(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, scale: Tensor, seed: Tensor, dtype: torch.dtype
) -> Tensor:
    """``W + s*B@A + eps`` in ``dtype`` (fp32, or fp64 for fp64 compute); eps itself is fp32."""
    out_features, in_features = weight.shape
    z = normal_rows(seed, in_features, 0, out_features, device=weight.device)
    eps = scale[:, None] * z
    return merged_weight(weight, lora_A, lora_B, scaling, dtype) + eps.to(dtype)


def forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    with torch.no_grad():
        scale = perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma)
        dtype = merge_dtype(x, weight)
        w_eff = perturbed_weight_from_scales(weight, lora_A, lora_B, scaling, scale, seed, dtype)
        y = x.to(dtype) @ w_eff.t()
        if bias is not None:
            y = y + bias.to(dtype)
        return y.to(x.dtype), scale


def backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx):
    with torch.no_grad():
        dtype = merge_dtype(x, weight)
        dy_c, x_c = dy.to(dtype), x.to(dtype)
        if compute_dx:
            w_eff = perturbed_weight_from_scales(weight, lora_A, lora_B, scaling, row_scale, seed, dtype)
            dx = (dy_c @ w_eff).to(x.dtype)
        else:
            dx = x.new_empty(0)
        d_lora_A = (scaling * (dy_c @ lora_B.to(dtype)).t() @ x_c).to(lora_A.dtype)
        d_lora_B = (scaling * dy_c.t() @ (x_c @ lora_A.to(dtype).t())).to(lora_B.dtype)
        return dx, d_lora_A, d_lora_B
