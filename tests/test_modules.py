"""FlatLoraLinear: same numbers as flat_lora_linear, only LoRA trains, the base weight never moves,
eval is noise-free, dropout and merging behave as documented, bad arguments fail early."""

import math

import pytest
import torch
from torch import nn

from flatlora_kernels import UnsupportedLayerError, filter_noise, flat_lora_linear
from flatlora_kernels.modules import FlatLoraLinear
from flatlora_kernels.baselines import lora_linear
from flatlora_kernels.schedule import FlatLoraSchedule

BACKEND_OF = {True: "auto", False: "reference"}


def make_module(in_features=24, out_features=20, r=4, *, fused=True, dtype=torch.float32, sigma=0.1, **kw):
    """A layer whose B is non-zero, so the adapter and the noise's row norms both matter."""
    torch.manual_seed(0)
    layer = FlatLoraLinear(in_features, out_features, r=r, lora_alpha=8, sigma=sigma, fused=fused, dtype=dtype, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
    return layer


def grads_of(layer, x, grad_out):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    dx, dA, dB = torch.autograd.grad(y, [x, layer.lora_A, layer.lora_B], grad_out)
    return y.detach(), dx, dA, dB


@pytest.mark.parametrize("fused", [True, False])
def test_forward_and_grads_equal_flat_lora_linear(fused):
    layer = make_module(fused=fused)
    layer.set_noise(seed=1234, factor=0.7, rank_key=99)
    x = torch.randn(2, 5, 24)
    grad_out = torch.randn(2, 5, 20)
    got = grads_of(layer, x, grad_out)

    x_ref = x.clone().requires_grad_(True)
    y_ref = flat_lora_linear(
        x_ref, layer.weight, layer.lora_A, layer.lora_B, layer.bias,
        scaling=layer.scaling, sigma=0.7 * 0.1, seed=1234 ^ 99, backend=BACKEND_OF[fused],
    )
    expected = (y_ref.detach(), *torch.autograd.grad(y_ref, [x_ref, layer.lora_A, layer.lora_B], grad_out))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_and_reference_layers_agree():
    x, grad_out = torch.randn(7, 24), torch.randn(7, 20)
    results = []
    for fused in (True, False):
        layer = make_module(fused=fused)
        layer.set_noise(seed=5, factor=1.0)
        results.append(grads_of(layer, x, grad_out))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_noise_is_the_documented_eps():
    layer = make_module()
    layer.set_noise(seed=77, factor=0.5)
    x = torch.randn(6, 24)
    eps = filter_noise(layer.weight, layer.lora_A, layer.lora_B, scaling=layer.scaling, sigma=0.05, seed=77)
    expected = x @ (layer.weight + layer.scaling * layer.lora_B @ layer.lora_A + eps).t() + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_only_lora_tensors_train_and_state_dict_keys():
    layer = make_module()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    layer.set_noise(seed=1, factor=1.0)
    layer(torch.randn(3, 24)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None
    # Noise state is not persistent: checkpoints hold nn.Linear's keys plus the two LoRA tensors.
    assert sorted(layer.state_dict()) == ["bias", "lora_A", "lora_B", "weight"]


def test_initialisation_follows_peft():
    torch.manual_seed(3)
    layer = FlatLoraLinear(64, 32, r=8, lora_alpha=16)
    assert layer.scaling == 2.0
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in=64
    assert 0.8 * bound < layer.lora_A.abs().max() <= bound
    assert FlatLoraLinear(8, 8, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(8 / 4)


def test_from_linear_shares_and_freezes_the_base_weight():
    linear = nn.Linear(12, 10)
    layer = FlatLoraLinear.from_linear(linear, r=2, lora_alpha=4, sigma=0.1)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad and not linear.bias.requires_grad
    assert layer.lora_A.shape == (2, 12) and layer.lora_B.shape == (10, 2)
    no_bias = FlatLoraLinear.from_linear(nn.Linear(12, 10, bias=False), lora_dtype=torch.float64)
    assert no_bias.bias is None and no_bias.lora_A.dtype == torch.float64
    with pytest.raises(UnsupportedLayerError, match="convolution"):
        FlatLoraLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_eval_has_no_noise():
    layer = make_module()
    x = torch.randn(4, 24)
    expected = lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, scaling=layer.scaling)
    layer.eval()
    for seed, factor in [(1, 1.0), (2, 1.0), (3, 0.5)]:
        layer.set_noise(seed=seed, factor=factor)
        torch.testing.assert_close(layer(x), expected)
    layer.train()
    assert not torch.allclose(layer(x), expected, atol=1e-4)


def test_undriven_layer_is_plain_lora_and_warns_once():
    layer = make_module()
    x = torch.randn(4, 24)
    expected = lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, scaling=layer.scaling)
    with pytest.warns(UserWarning, match="no FlatLoraSchedule"):
        y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert float(layer.noise_factor) == 0.0


@pytest.mark.parametrize("fused", [True, False])
def test_base_weight_bit_identical_after_bf16_training(fused):
    """50 bf16 optimizer steps at sigma > 0: the frozen weight is never written (no add/subtract)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        FlatLoraLinear(48, 64, r=4, sigma=0.1, fused=fused, dtype=torch.bfloat16),
        nn.GELU(),
        FlatLoraLinear(64, 8, r=4, sigma=0.1, fused=fused, dtype=torch.bfloat16),
    )
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora_B_before = model[0].lora_B.detach().clone()
    schedule = FlatLoraSchedule(model, total_steps=50, seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(50):
        x = torch.randn(16, 48, dtype=torch.bfloat16)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    for name, before in frozen_before.items():
        assert torch.equal(model.get_parameter(name), before), f"{name} changed"
    assert not torch.equal(model[0].lora_B, lora_B_before)  # the adapter did train


def test_official_in_place_add_subtract_drifts_in_bf16():
    """The contrast: perturbing the weight in place and undoing it after the step is not reversible."""
    torch.manual_seed(0)
    weight = torch.randn(64, 48).bfloat16()
    original = weight.clone()
    A, B = torch.zeros(4, 48, dtype=torch.bfloat16), torch.zeros(64, 4, dtype=torch.bfloat16)
    for step in range(50):
        eps = filter_noise(weight, A, B, scaling=1.0, sigma=0.1, seed=step).bfloat16()
        weight.add_(eps)
        weight.sub_(eps)
    changed = (weight != original).float().mean().item()
    assert changed > 0.05, changed


@pytest.mark.parametrize("fused", [True, False])
def test_lora_dropout_matches_peft_semantics(fused):
    """y = x (W + eps)^T + b + s * B A dropout(x), with eps's row norms still taken from W + s*B@A."""
    layer = make_module(fused=fused, lora_dropout=0.25)
    layer.set_noise(seed=11, factor=1.0)
    x = torch.randn(9, 24)
    torch.manual_seed(42)
    y = layer(x)
    torch.manual_seed(42)
    dropped = nn.functional.dropout(x, 0.25, training=True)
    eps = filter_noise(layer.weight, layer.lora_A, layer.lora_B, scaling=layer.scaling, sigma=0.1, seed=11)
    expected = x @ (layer.weight + eps).t() + layer.bias + layer.scaling * dropped @ layer.lora_A.t() @ layer.lora_B.t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # Gradients of A and B come from the dropped input only, as in PEFT.
    dA, dB = torch.autograd.grad(y.sum(), [layer.lora_A, layer.lora_B])
    eA, eB = torch.autograd.grad(expected.sum(), [layer.lora_A, layer.lora_B])
    torch.testing.assert_close(dA, eA, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dB, eB, rtol=1e-4, atol=1e-5)
    layer.eval()
    plain_lora = lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, scaling=layer.scaling)
    torch.testing.assert_close(layer(x), plain_lora)


def test_merge_unmerge_is_exact_in_bf16():
    layer = make_module(dtype=torch.bfloat16)
    layer.eval()
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    original = layer.weight.detach().clone()
    storage = layer.weight.data_ptr()
    unmerged_out = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert not torch.equal(layer.weight, original)
    torch.testing.assert_close(layer(x), unmerged_out, rtol=2e-2, atol=2e-2)
    layer.merge()  # idempotent
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.train()(x)
    layer.eval().unmerge()
    assert not layer.merged
    assert torch.equal(layer.weight, original) and layer.weight.data_ptr() == storage
    assert torch.equal(layer(x), unmerged_out)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must be"),
        (dict(r=-2), "r must be"),
        (dict(r=2.5), "r must be"),
        (dict(lora_alpha=0), "lora_alpha"),
        (dict(lora_alpha=-1.0), "lora_alpha"),
        (dict(lora_alpha=float("nan")), "lora_alpha"),
        (dict(sigma=-0.1), "sigma"),
        (dict(sigma=float("inf")), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(lora_dropout=1.0), "lora_dropout"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(in_features=0), "in_features"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(in_features=8, out_features=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FlatLoraLinear(**args)
    if "in_features" not in kwargs:
        with pytest.raises(ValueError, match=match):
            FlatLoraLinear.from_linear(nn.Linear(8, 4), **kwargs)


def test_extra_repr():
    text = repr(FlatLoraLinear(8, 4, r=2, lora_alpha=4, sigma=0.1, lora_dropout=0.1, use_rslora=True, fused=False))
    for part in ("in_features=8", "out_features=4", "r=2", "lora_alpha=4", "sigma=0.1", "fused=False",
                 "lora_dropout=0.1", "use_rslora=True"):
        assert part in text
