"""Checks on one PEFT LoRA layer patched by ``enable_flat_lora``, against plain PyTorch with eps
materialised from the same stream (``filter_noise``)."""

import torch

from flatlora_kernels import filter_noise


def dense_weight(layer) -> torch.Tensor:
    """The base weight as ``[out, in]`` (a view for Conv1D's ``[in, out]`` storage)."""
    weight = layer.get_base_layer().weight
    return weight.t() if layer.fan_in_fan_out else weight


def noisy_reference(layer, x: torch.Tensor, adapter: str) -> torch.Tensor:
    """``x (W + s*B@A + eps)^T + b`` for ``adapter``'s factors and scaling at the layer's current draw."""
    weight, base = dense_weight(layer), layer.get_base_layer()
    A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    s = layer.scaling[adapter]
    sigma = float(layer.noise_factor) * layer.sigma
    eps = filter_noise(weight, A, B, scaling=s, sigma=sigma, seed=int(layer.effective_seed()))
    assert eps.abs().max() > 0, "the check needs a draw with noise (drive the schedule first)"
    bias = 0 if base.bias is None else base.bias
    return x @ (weight + s * B @ A + eps).t() + bias


def assert_trains_with_noise(layer, adapter: str, seed: int = 0) -> None:
    """The layer's training forward is ``noisy_reference`` (so the noise is on, for that adapter)."""
    x = torch.randn(3, dense_weight(layer).shape[1], generator=torch.Generator().manual_seed(seed))
    was_training = layer.training
    layer.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), noisy_reference(layer, x, adapter), rtol=1e-4, atol=1e-4)
    layer.train(was_training)
