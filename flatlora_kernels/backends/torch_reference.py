"""The plain-PyTorch backend: same math and noise as the kernels, written for clarity, not speed.

It materialises the perturbed weight once per pass (a weight-sized temporary, freed at once) and
regenerates it in backward from the seed, so, unlike the naive baseline, nothing weight-sized is
kept between forward and backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..noise import normal_rows, perturbation_row_scale


def perturbed_weight(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, scale: Tensor, seed: Tensor
) -> Tensor:
    out_features, in_features = weight.shape
    z = normal_rows(seed, in_features, 0, out_features, device=weight.device)
    return weight.float() + scaling * (lora_B.float() @ lora_A.float()) + scale[:, None] * z


def forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    with torch.no_grad():
        scale = perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma)
        w_eff = perturbed_weight(weight, lora_A, lora_B, scaling, scale, seed)
        y = (x.float() @ w_eff.t())
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype), scale


def backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx):
    with torch.no_grad():
        dy32, x32 = dy.float(), x.float()
        if compute_dx:
            w_eff = perturbed_weight(weight, lora_A, lora_B, scaling, row_scale, seed)
            dx = (dy32 @ w_eff).to(x.dtype)
        else:
            dx = x.new_empty(0)
        d_lora_A = (scaling * (dy32 @ lora_B.float()).t() @ x32).to(lora_A.dtype)
        d_lora_B = (scaling * dy32.t() @ (x32 @ lora_A.float().t())).to(lora_B.dtype)
        return dx, d_lora_A, d_lora_B
