"""Shared test helpers: random Flat-LoRA layers (``flatlora_kernels.baselines.make_layer``, shared with
the benchmarks) and the comparison against the plain-PyTorch reference.

The accuracy rule (flash-attention's): against an fp64 "truth", a backend's error may be at most
about twice the error of the plain-PyTorch reference run in the same low precision, plus a small
dtype-dependent floor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. The switch is read
# when triton is imported, so it must be set here, before anything imports torch or triton.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from flatlora_kernels import flat_lora_linear  # noqa: E402
# make_layer is re-exported for the test modules (``from .conftest import make_layer``).
from flatlora_kernels.baselines import make_layer, naive_flat_lora_linear  # noqa: E402

# Relative floor (fraction of the truth's largest magnitude) added to the 2x rule.
RELATIVE_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-9}

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@contextlib.contextmanager
def undriven_warnings():
    """Collects the "no FlatLoraSchedule" warnings raised inside the block (every one, not only the
    first per place) into the yielded list, filled when the block ends. The forwards must run in
    the test itself: the warning points at the caller's line, and tests check it is theirs."""
    ours = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield ours
    ours.extend(w for w in caught if "no FlatLoraSchedule" in str(w.message))


def assert_close_to_truth(name, actual, low_precision_ref, truth):
    """``|actual - truth| <= 2 |ref - truth| + floor``, elementwise max, and no NaN/Inf."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    actual, ref, truth = actual.double(), low_precision_ref.double(), truth.double()
    scale = truth.abs().max().item() + 1e-12
    err = (actual - truth).abs().max().item()
    ref_err = (ref - truth).abs().max().item()
    bound = 2 * ref_err + RELATIVE_FLOOR[low_precision_ref.dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > bound {bound:.3e} (reference error {ref_err:.3e}, scale {scale:.3e})"


def forward_backward(fn, x, weight, lora_A, lora_B, bias, grad_out, **kw):
    """``[y, dx, dA, dB(, dbias)]`` of ``fn(x, weight, lora_A, lora_B, bias, **kw)`` for the upstream gradient ``grad_out``."""
    x = x.detach().requires_grad_(True)
    lora_A = lora_A.detach().requires_grad_(True)
    lora_B = lora_B.detach().requires_grad_(True)
    bias = None if bias is None else bias.detach().requires_grad_(True)
    y = fn(x, weight, lora_A, lora_B, bias, **kw)
    inputs = [x, lora_A, lora_B] + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(y, inputs, grad_out)
    return [y.detach(), *grads]


def check_backend_against_reference(
    backend, *, M, N, K, r, dtype, device="cpu", use_bias=True, scaling=2.0, sigma=0.1, seed=1234, batch_shape=()
):
    """Output and every gradient of ``flat_lora_linear(backend=...)`` vs autograd through the
    materialised ``W + s*B@A + filter_noise(...)``, in ``dtype`` and in fp64."""
    weight, lora_A, lora_B, bias = make_layer(N, K, r, dtype=dtype, device=device, seed=M * 7 + N)
    bias = bias if use_bias else None
    g = torch.Generator().manual_seed(N * 3 + K)
    x = torch.randn(*batch_shape, M, K, generator=g).to(device, dtype)
    grad_out = torch.randn(*batch_shape, M, N, generator=g).to(device, dtype)
    kw = dict(scaling=scaling, sigma=sigma, seed=seed)
    got = forward_backward(flat_lora_linear, x, weight, lora_A, lora_B, bias, grad_out, backend=backend, **kw)
    ref = forward_backward(naive_flat_lora_linear, x, weight, lora_A, lora_B, bias, grad_out, **kw)
    to64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = forward_backward(
        naive_flat_lora_linear, to64(x), weight, to64(lora_A), to64(lora_B), to64(bias), to64(grad_out), **kw
    )
    names = ["y", "dx", "dA", "dB", "dbias"]
    for name, a, b, t in zip(names, got, ref, truth):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert_close_to_truth(name, a, b, t)
    return got


def enable_checkpointing(model, use_reentrant: bool) -> None:
    """Activation checkpointing on a Hugging Face model: transformers 5.25 renamed
    ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable`` (the old name warns there), and
    5.17 (the torch2.11 stack) has only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
