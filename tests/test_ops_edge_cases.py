"""Inputs at the edge of what the ops take: meta tensors (shape-only), double backward, backend declarations."""

from __future__ import annotations

import pytest
import torch

from flatlora_kernels import flat_lora_linear
from flatlora_kernels.backends import BACKENDS, REGISTRY, resolve

from .conftest import make_layer


def test_meta_tensors_give_shapes_and_dtypes_forward_and_backward():
    W, A, B, bias = (t.to("meta") for t in make_layer(8, 6, 2, dtype=torch.bfloat16))
    A.requires_grad_(True)
    B.requires_grad_(True)
    x = torch.empty(4, 3, 6, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = flat_lora_linear(x, W, A, B, bias, scaling=2.0, sigma=0.1, seed=3)
    assert y.device.type == "meta" and y.shape == (4, 3, 8) and y.dtype == torch.bfloat16
    dx, dA, dB = torch.autograd.grad(y.sum(), (x, A, B))
    assert (dx.shape, dA.shape, dB.shape) == (x.shape, A.shape, B.shape)
    assert dx.device.type == dA.device.type == "meta"


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_double_backward_raises_a_clear_error(backend):
    W, A, B, _ = make_layer(8, 6, 2)
    A.requires_grad_(True)
    x = torch.randn(3, 6, requires_grad=True)
    y = flat_lora_linear(x, W, A, B, scaling=1.0, sigma=0.1, seed=1, backend=backend)
    (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)  # first order still works
    assert dx.shape == x.shape
    with pytest.raises(RuntimeError, match="no double backward"):
        dx.sum().backward()


def test_backend_checks_derive_from_the_declarations():
    for device_type in ("cpu", "cuda", "meta", "xpu"):
        picked = resolve("auto", torch.device(device_type))
        assert picked in BACKENDS
        assert REGISTRY[picked].devices is None or device_type in REGISTRY[picked].devices
    assert resolve("auto", torch.device("meta")) == "reference"
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors only"):
        resolve("triton", torch.device("meta"))
    with pytest.raises(ValueError, match="unknown backend"):
        resolve(3, torch.device("cpu"))


def _block_cpp_extension(monkeypatch):
    """The C++ backends as on a machine without the built extension: importing them raises ImportError."""
    from flatlora_kernels import backends

    for format in ("dense", "4bit"):
        monkeypatch.delitem(backends._MODULES, (format, "cpp"), raising=False)
    for module in ("flatlora_kernels.backends.cpp", "flatlora_kernels.quantized.cpp_backend"):
        monkeypatch.setitem(__import__("sys").modules, module, None)
    for format in ("dense", "4bit"):
        with pytest.raises(ImportError):
            backends.get_backend("cpp", format)


def test_reference_backend_trains_with_the_cpp_extension_blocked(monkeypatch):
    """backend="reference" (what the C++ backend's own error recommends) needs no extension, backward included."""
    W, A, B, bias = make_layer(8, 6, 2)
    leaves = [t.clone().requires_grad_(True) for t in (torch.randn(5, 6), A, B, bias)]
    want = torch.autograd.grad(
        flat_lora_linear(leaves[0], W, *leaves[1:], scaling=2.0, sigma=0.1, seed=3, backend="reference").sum(), leaves
    )
    _block_cpp_extension(monkeypatch)
    y = flat_lora_linear(leaves[0], W, *leaves[1:], scaling=2.0, sigma=0.1, seed=3, backend="reference")
    for got, expected in zip(torch.autograd.grad(y.sum(), leaves), want):
        assert torch.equal(got, expected)
    packed_case = pytest.importorskip("bitsandbytes.functional")
    codes, state = packed_case.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="nf4")
    from flatlora_kernels.quantized import Packed4bit

    x, a, b = (t.requires_grad_(True) for t in (torch.randn(3, 64), torch.randn(2, 64) * 0.1, torch.randn(8, 2)))
    y = flat_lora_linear(x, Packed4bit.from_quant_state(codes, state), a, b, scaling=2.0, sigma=0.1, seed=3,
                         backend="reference")  # fmt: skip
    y.sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (x, a, b))
