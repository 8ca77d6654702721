"""flat_lora_linear: the reference backend's math, what backward keeps, and every bad input."""

import math

import pytest
import torch

from flatlora_kernels import filter_noise, flat_lora_linear
from flatlora_kernels.backends import resolve as resolve_backend
from flatlora_kernels.baselines import lora_linear

from .conftest import check_backend_against_reference, make_layer

KW = dict(scaling=2.0, sigma=0.1, seed=7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,r", [(5, 7, 3, 1), (33, 17, 29, 3), (64, 40, 130, 16)])
def test_reference_backend_matches_materialised_noise(dtype, M, N, K, r):
    check_backend_against_reference("reference", M=M, N=N, K=K, r=r, dtype=dtype)


def test_reference_backend_batch_dims_and_no_bias():
    check_backend_against_reference("reference", M=6, N=9, K=11, r=2, dtype=torch.float32, batch_shape=(2, 3), use_bias=False)


def test_output_is_x_times_perturbed_weight():
    """The definition, spelled out: y = x (W + s B A + eps)^T + bias."""
    W, A, B, bias = make_layer(12, 20, 4)
    x = torch.randn(8, 20)
    eps = filter_noise(W, A, B, **KW)
    expected = x @ (W + 2.0 * B @ A + eps).t() + bias
    torch.testing.assert_close(flat_lora_linear(x, W, A, B, bias, backend="reference", **KW), expected)


def test_sigma_zero_equals_plain_lora():
    W, A, B, bias = make_layer(12, 20, 4)
    x = torch.randn(3, 8, 20)
    got = flat_lora_linear(x, W, A, B, bias, scaling=2.0, sigma=0.0, seed=3, backend="reference")
    torch.testing.assert_close(got, lora_linear(x, W, A, B, bias, scaling=2.0), rtol=1e-5, atol=1e-5)


def test_seed_changes_output_and_tensor_seed_equals_int_seed():
    W, A, B, bias = make_layer(12, 20, 4)
    x = torch.randn(8, 20)
    a = flat_lora_linear(x, W, A, B, bias, backend="reference", **KW)
    b = flat_lora_linear(x, W, A, B, bias, backend="reference", **{**KW, "seed": torch.tensor(7)})
    c = flat_lora_linear(x, W, A, B, bias, backend="reference", **{**KW, "seed": 8})
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_backward_keeps_nothing_weight_sized():
    """Regenerate, never store: the only weight-sized tensor saved for backward is W itself."""
    W, A, B, bias = make_layer(32, 48, 4)
    A.requires_grad_(True)
    B.requires_grad_(True)
    x = torch.randn(5, 48, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = flat_lora_linear(x, W, A, B, bias, backend="reference", **KW)
    weight_sized = [t for t in saved if t.numel() >= W.numel()]
    assert all(t.data_ptr() == W.data_ptr() for t in weight_sized), [tuple(t.shape) for t in weight_sized]
    y.sum().backward()
    assert A.grad is not None and B.grad is not None and x.grad is not None


# ---------------------------------------------------------------- bad input


def _good():
    W, A, B, bias = make_layer(6, 5, 2)
    return dict(x=torch.randn(3, 5), weight=W, lora_A=A, lora_B=B, bias=bias)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(x=torch.randn(3, 4)), ValueError, "x must have shape"),
        (dict(lora_A=torch.randn(2, 4)), ValueError, "lora_A must have shape"),
        (dict(lora_B=torch.randn(5, 2)), ValueError, "lora_B must have shape"),
        (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B must have shape"),
        (dict(lora_A=torch.randn(0, 5), lora_B=torch.randn(6, 0)), ValueError, "rank r must be >= 1"),
        (dict(weight=torch.randn(6, 5, 1)), ValueError, "weight must be 2-D"),
        (dict(bias=torch.randn(5)), ValueError, "bias must have shape"),
        (dict(x=torch.ones(3, 5, dtype=torch.int64)), TypeError, "x must be a floating-point"),
        (dict(weight=torch.ones(6, 5, dtype=torch.int32)), TypeError, "weight must be a floating-point"),
        (dict(x=torch.randn(3, 5, device="meta")), ValueError, "x is on meta"),
        (dict(lora_B=torch.randn(6, 2, device="meta")), ValueError, "lora_B is on meta"),
        (dict(sigma=-0.1), ValueError, "sigma must be finite and >= 0"),
        (dict(sigma=math.nan), ValueError, "sigma must be finite"),
        (dict(sigma=math.inf), ValueError, "sigma must be finite"),
        (dict(sigma="0.1"), TypeError, "sigma must be a float"),
        (dict(sigma=torch.tensor([0.1, 0.2])), TypeError, "sigma tensor must hold one"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=True), TypeError, "seed must be an int"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
        (dict(seed=torch.tensor(1.0)), TypeError, "seed tensor must be one int64"),
        (dict(scaling=math.nan), ValueError, "scaling must be a finite"),
        (dict(backend="cuda"), ValueError, "unknown backend"),
    ],
)
def test_bad_input_raises_clear_error(change, error, match):
    args = {**_good(), "scaling": 2.0, "sigma": 0.1, "seed": 0, "backend": "reference", **change}
    with pytest.raises(error, match=match):
        flat_lora_linear(
            args.pop("x"), args.pop("weight"), args.pop("lora_A"), args.pop("lora_B"), args.pop("bias"), **args
        )


def test_trainable_base_weight_is_rejected():
    args = _good()
    args["weight"].requires_grad_(True)
    with pytest.raises(ValueError, match="base weight must be frozen"):
        flat_lora_linear(*args.values(), backend="reference", **KW)


def test_backend_device_combinations():
    assert resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors only"):
        resolve_backend("cpp", torch.device("cuda"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


def test_filter_noise_validates_too():
    W, A, B, _ = make_layer(6, 5, 2)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        filter_noise(W, A, B, scaling=1.0, sigma=-1.0, seed=0)
    with pytest.raises(ValueError, match="lora_A must have shape"):
        filter_noise(W, A[:, :4], B, scaling=1.0, sigma=0.1, seed=0)
