"""Flatness as Flat-LoRA defines it: the expected loss increase when every adapted layer's merged
weight ``W + s*B@A`` is perturbed by filter-wise noise ``sigma' * ||row|| / sqrt(in) * z``.

The draws are fixed (seed ``draw * 1000 + layer index``) so every method is measured against the
same noise; only the row scales differ, because they follow each model's own merged weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import filter_noise, flat_lora_layers
from .data import Split


@torch.no_grad()
def mean_nll(model: nn.Module, split: Split) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss = F.cross_entropy(model(split.images.to(device)), split.labels.to(device)).item()
    model.train(was_training)
    return loss


@torch.no_grad()
def loss_under_noise(model: nn.Module, split: Split, sigmas, *, draws: int = 8) -> dict[float, float]:
    """``E_eps[L(W + s*B@A + eps)] - L(W + s*B@A)`` on ``split`` for each sigma', mean over ``draws``."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    layers = [layer for _, layer in flat_lora_layers(model)]
    if not layers:
        raise ValueError("loss_under_noise needs a model with FlatLoraLinear layers")
    clean = mean_nll(model, split)
    originals = [layer.weight.detach().clone() for layer in layers]
    increase = {}
    try:
        for sigma in sigmas:
            total = 0.0
            for draw in range(draws):
                for index, (layer, weight) in enumerate(zip(layers, originals)):
                    eps = filter_noise(
                        weight, layer.lora_A, layer.lora_B, scaling=layer.scaling, sigma=float(sigma), seed=draw * 1000 + index
                    )
                    layer.weight.copy_(weight + eps.to(weight.dtype))  # eval forward adds s*B@A itself
                total += mean_nll(model, split)
            increase[float(sigma)] = total / draws - clean
    finally:
        for layer, weight in zip(layers, originals):
            layer.weight.copy_(weight)
    return increase


@torch.no_grad()
def peft_loss_under_noise(model: nn.Module, evaluate, sigmas, *, draws: int = 4) -> dict[float, float]:
    """``loss_under_noise`` for a PEFT LoRA model: ``evaluate()`` returns the eval loss; each LoRA layer's
    merged weight ``W + s*B@A`` gets the same filter-wise noise (seed ``draw * 1000 + layer index``),
    added to the base layer's weight (transposed for GPT-2's ``Conv1D``, which stores ``[in, out]``)."""
    from peft.tuners.lora import LoraLayer

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters and module.active_adapters[0] in module.lora_A:
            adapter = module.active_adapters[0]
            base = module.get_base_layer()
            layers.append((base, module.lora_A[adapter].weight, module.lora_B[adapter].weight, module.scaling[adapter], bool(module.fan_in_fan_out)))
    if not layers:
        raise ValueError("peft_loss_under_noise needs a model with PEFT LoRA linear layers")
    clean = evaluate()
    originals = [base.weight.detach().clone() for base, *_ in layers]
    increase = {}
    try:
        for sigma in sigmas:
            total = 0.0
            for draw in range(draws):
                for index, ((base, A, B, scaling, transposed), weight) in enumerate(zip(layers, originals)):
                    w = weight.t() if transposed else weight  # [out, in]
                    eps = filter_noise(w, A, B, scaling=scaling, sigma=float(sigma), seed=draw * 1000 + index).to(weight.dtype)
                    base.weight.copy_(weight + (eps.t() if transposed else eps))  # eval forward adds s*B@A itself
                total += evaluate()
            increase[float(sigma)] = total / draws - clean
    finally:
        for (base, *_), weight in zip(layers, originals):
            base.weight.copy_(weight)
    return increase
