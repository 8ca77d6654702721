"""The dense baselines of flatlora_kernels/baselines.py that the other tests do not already cover."""

import pytest
import torch

from flatlora_kernels.baselines import lora_linear, make_layer, naive_randn_flat_lora_linear
from flatlora_kernels.noise import perturbation_row_scale


def test_make_layer_is_deterministic_and_scales_as_asked():
    first = make_layer(6, 5, 2, seed=3, lora_B_std=0.1)
    again = make_layer(6, 5, 2, seed=3, lora_B_std=0.1, dtype=torch.float64, lora_dtype=torch.float32)
    for a, b in zip(first, again):
        assert torch.equal(a, b.float())  # one draw, whatever the dtypes
    assert again[0].dtype == torch.float64 and again[1].dtype == again[2].dtype == torch.float32
    weight, lora_A, lora_B, bias = make_layer(6, 5, 2, seed=3)  # default lora_B_std = 0.5
    assert torch.equal(weight, first[0]) and torch.allclose(lora_B, first[2] * 5)
    assert lora_B.abs().min() > 0 and not any(t.requires_grad for t in (weight, lora_A, lora_B, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naive_randn_baseline_adds_row_scaled_gaussian_noise(dtype):
    N, K, r, scaling, sigma = 48, 512, 4, 2.0, 0.3
    weight, lora_A, lora_B, bias = make_layer(N, K, r, lora_dtype=torch.float32)
    weight = weight.to(dtype)
    x = torch.eye(K, dtype=dtype)  # y = (W + eps)^T + s*(B@A)^T: eps can be read off y
    generator = torch.Generator().manual_seed(0)
    y = naive_randn_flat_lora_linear(x, weight, lora_A, lora_B, scaling=scaling, sigma=sigma, generator=generator)
    assert y.dtype == dtype
    as64 = [t.to(dtype).double() for t in (x, weight, lora_A, lora_B)]  # the factors as the LoRA branch rounds them
    eps = (y.double() - lora_linear(*as64, scaling=scaling)).t()
    row_scale = perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma).double()
    z = eps / row_scale[:, None]
    # K = 512 draws per row: each row's sample std is within ~10% of 1 (bf16 rounding adds ~1%).
    assert torch.allclose(z.std(dim=1), torch.ones(N, dtype=torch.float64), rtol=0.15)
    assert z.mean().abs() < 0.05
    # Zero noise: exactly the plain-LoRA output; gradients reach x and both factors.
    x = torch.randn(3, K, requires_grad=True)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    weight = weight.float()
    quiet = naive_randn_flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=scaling, sigma=0.0)
    torch.testing.assert_close(quiet, lora_linear(x, weight, lora_A, lora_B, bias, scaling=scaling))
    quiet.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (x, lora_A, lora_B))
