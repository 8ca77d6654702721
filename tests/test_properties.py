"""Property-based tests (hypothesis, bounded for CI): random layers against the plain-PyTorch truth.

Shapes include 1, primes and more than one chunk; inputs come transposed or with batch dims; dtypes,
scalings, seeds (0 .. 2^63-1), sigma (0, tiny, large), chunk caps and thread counts vary. Every
backend available here is compared for the output and all gradients, and the regenerated perturbed
weight is checked bit-identical across chunk caps and thread counts.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flatlora_kernels import flat_lora_linear  # noqa: E402
from flatlora_kernels.backends import cpu_tuning  # noqa: E402
from flatlora_kernels.baselines import dense_perturbed_weight, naive_flat_lora_linear  # noqa: E402

from .conftest import assert_close_to_truth, forward_backward, make_layer  # noqa: E402

BOUNDED = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

sizes = st.sampled_from([1, 2, 3, 5, 7, 13, 31, 64, 67, 127])
seeds = st.sampled_from([0, 1, 2**32 + 5, 2**63 - 1]) | st.integers(0, 2**63 - 1)
sigmas = st.sampled_from([0.0, 1e-7, 0.05, 2.0])
dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.float64])


@contextlib.contextmanager
def cpu_setting(chunk_rows: int | None, threads: int, in_features: int, element_size: int):
    """cpu_tuning.CHUNK_BYTES for chunks of chunk_rows rows (None: the default cap) and torch's thread count."""
    old = cpu_tuning.CHUNK_BYTES, cpu_tuning.CHUNK_GROWS_TO_OUTPUT, torch.get_num_threads()
    try:
        if chunk_rows is not None:
            cpu_tuning.CHUNK_BYTES, cpu_tuning.CHUNK_GROWS_TO_OUTPUT = chunk_rows * in_features * element_size, False
        torch.set_num_threads(threads)
        yield
    finally:
        cpu_tuning.CHUNK_BYTES, cpu_tuning.CHUNK_GROWS_TO_OUTPUT = old[0], old[1]
        torch.set_num_threads(old[2])


@st.composite
def layer_cases(draw, max_size=127):
    M, N, K = (draw(sizes.filter(lambda v: v <= max_size)) for _ in range(3))
    return dict(
        M=M, N=N, K=K, r=draw(st.sampled_from([1, 2, 4, 16])), dtype=draw(dtypes),
        scaling=draw(st.sampled_from([0.0, 0.5, 2.0, -3.0])), sigma=draw(sigmas), seed=draw(seeds),
        batch=draw(st.sampled_from([(), (2,), (1, 3)])), transposed=draw(st.booleans()),
        use_bias=draw(st.booleans()), chunk_rows=draw(st.sampled_from([None, 1, 3, 8])),
        threads=draw(st.sampled_from([1, 2])),
    )


def _inputs(case):
    weight, lora_A, lora_B, bias = make_layer(case["N"], case["K"], case["r"], dtype=case["dtype"], seed=case["M"])
    g = torch.Generator().manual_seed(case["N"] + 11 * case["K"])
    shape = (*case["batch"], case["M"], case["K"])
    if case["transposed"]:  # a non-contiguous view with the same values' layout transposed
        x = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)
    else:
        x = torch.randn(*shape, generator=g)
    grad_out = torch.randn(*case["batch"], case["M"], case["N"], generator=g).to(case["dtype"])
    return x.to(case["dtype"]), weight, lora_A, lora_B, (bias if case["use_bias"] else None), grad_out


def _check_backend(backend, case):
    x, weight, lora_A, lora_B, bias, grad_out = _inputs(case)
    kw = dict(scaling=case["scaling"], sigma=case["sigma"], seed=case["seed"])
    with cpu_setting(case["chunk_rows"], case["threads"], case["K"], 4):
        got = forward_backward(flat_lora_linear, x, weight, lora_A, lora_B, bias, grad_out, backend=backend, **kw)
    ref = forward_backward(naive_flat_lora_linear, x, weight, lora_A, lora_B, bias, grad_out, **kw)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    truth = forward_backward(naive_flat_lora_linear, d(x), weight, d(lora_A), d(lora_B), d(bias), d(grad_out), **kw)
    for name, a, b, t in zip(["y", "dx", "dA", "dB", "dbias"], got, ref, truth):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if a.dtype == torch.float64 and case["sigma"] > 0:
            # fp64 row scales are fp32 by definition, rounded from an fp64 (cpp) or fp32 (reference)
            # merge, so eps agrees to ~1e-7 of itself. Exact fp64: sigma 0, and dbias always.
            torch.testing.assert_close(a, t, rtol=1e-6, atol=1e-6)
            continue
        assert_close_to_truth(f"{backend} {name} {case}", a, b, t)


@BOUNDED
@given(layer_cases())
def test_cpp_matches_truth(case):
    _check_backend("cpp", case)


@BOUNDED
@given(layer_cases())
def test_reference_backend_matches_truth(case):
    _check_backend("reference", case)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(layer_cases(max_size=13).filter(lambda c: c["dtype"] == torch.float32 and c["batch"] == ()))
def test_triton_interpreter_matches_truth(case):
    pytest.importorskip("triton")
    _check_backend("triton", case)


@BOUNDED
@given(
    K=sizes, N=sizes, r=st.sampled_from([1, 3, 16]), seed=seeds, sigma=sigmas.filter(lambda s: s > 0),
    chunk_rows=st.sampled_from([1, 2, 5]), dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_perturbed_weight_bit_identical_across_chunks_and_threads(K, N, r, seed, sigma, chunk_rows, dtype):
    """With x = I, y = I @ W_eff^T holds the regenerated perturbed weight exactly (one non-zero term
    per sum), so it must not change by a single bit with the chunk cap or the thread count."""
    weight, lora_A, lora_B, _ = make_layer(N, K, r, dtype=dtype, seed=K)
    eye = torch.eye(K, dtype=dtype)
    kw = dict(scaling=2.0, sigma=sigma, seed=seed, backend="cpp")
    outputs = []
    for rows, threads in [(None, 2), (chunk_rows, 1), (chunk_rows, 2)]:
        with cpu_setting(rows, threads, K, 4), torch.no_grad():
            outputs.append(flat_lora_linear(eye, weight, lora_A, lora_B, None, **kw).t())
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    expected = dense_perturbed_weight(weight, lora_A, lora_B, scaling=2.0, sigma=sigma, seed=seed).to(dtype)
    # Row scales agree to fp32 rounding only (the reference takes them from an fp32 merge).
    tolerance = 2e-5 * max(sigma, 1.0)
    torch.testing.assert_close(outputs[0], expected, rtol=tolerance, atol=tolerance)
