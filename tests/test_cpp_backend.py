"""The C++ CPU backend (``csrc/``, ``flatlora_kernels._C``): noise stream, fused op, chunking, errors."""

import functools

import pytest
import torch

from flatlora_kernels import flat_lora_linear, noise
from flatlora_kernels.backends import cpp, cpu_tuning
from flatlora_kernels.noise import counters_per_row, normal_rows, philox4x32_10
from flatlora_kernels.baselines import lora_linear, naive_flat_lora_linear

from .conftest import check_backend_against_reference, make_layer

_C = cpp._C
SEEDS = [0, 1, 16, 12345, 2**40 + 7, 2**63 - 1, -5]


# ---- the noise stream -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_philox_integers_bit_exact(seed):
    # Offsets around 2^32 exercise the counter's high word.
    offsets = torch.cat([torch.arange(300), torch.arange(2**32 - 100, 2**32 + 100), torch.tensor([2**45 + 3])])
    got = _C.philox4x32_10(seed, offsets)
    expected = philox4x32_10(torch.tensor(seed), offsets)
    for lane, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"lane {lane}"


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5, 7, 13, 100, 1027])
@pytest.mark.parametrize("seed", [3, 2**63 - 1])
def test_normals_match_reference(K, seed):
    assert torch.allclose(_C.normal_rows(seed, K, 0, 9), normal_rows(seed, K, 0, 9), rtol=0, atol=1e-6)


@pytest.mark.parametrize("K", [5, 21, 1024, 1027])
def test_normals_across_the_2_pow_32_counter_boundary(K):
    kq = counters_per_row(K)
    # Rows around offset 2^32, where the counter's high word changes (mid-row for K = 21 and 1027).
    first = 2**32 // kq - 2
    assert torch.allclose(_C.normal_rows(9, K, first, first + 5), normal_rows(9, K, first, first + 5), atol=1e-6)
    far = 2**40  # offsets far beyond 2^32
    assert torch.allclose(_C.normal_rows(9, K, far, far + 3), normal_rows(9, K, far, far + 3), atol=1e-6)


def test_normals_statistics_and_bulk_accuracy():
    z = _C.normal_rows(5, 1024, 0, 512)
    assert (z - normal_rows(5, 1024, 0, 512)).abs().max() <= 1e-6
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert z.abs().max() <= 5.68


# ---- the fused op against the plain-PyTorch reference ------------------------------------------

SHAPES = [(1, 1, 1, 1), (37, 29, 13, 3), (5, 70, 2, 1), (64, 300, 257, 16), (130, 67, 1027, 3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,r", SHAPES)
def test_matches_reference(M, N, K, r, dtype):
    check_backend_against_reference("cpp", M=M, N=N, K=K, r=r, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_dims_and_no_bias(dtype):
    check_backend_against_reference("cpp", M=7, N=33, K=19, r=4, dtype=dtype, batch_shape=(2, 3), use_bias=False)


def test_fp64_input():
    """fp64 is fp64: merged weight and GEMMs in fp64, only the noise (row scales, z) is fp32."""
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=9, N=21, K=17, r=2, dtype=torch.float64)
    kw = dict(scaling=2.0, sigma=0.1, seed=6)
    got = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    ref = _run(naive_flat_lora_linear, x, weight, lora_A, lora_B, bias, **kw)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float64
        # Row scales agree to fp32 rounding (~1e-7 of eps, and eps ~ 0.1 * |W|); the rest to fp64.
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    kw["sigma"] = 0.0
    got = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    ref = _run(naive_flat_lora_linear, x, weight, lora_A, lora_B, bias, **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fp64_row_scales_are_one_definition():
    """fp64 layers: the row norm is taken of the fp64 merged weight and rounded once to fp32, by the
    reference and the C++ backend alike, so their row scales (hence eps) are equal, not ~1e-7 apart."""
    from flatlora_kernels.backends import get_backend

    for seed in range(3):
        x, weight, lora_A, lora_B, bias = _layer_and_input(M=5, N=37, K=53, r=4, dtype=torch.float64, seed=seed)
        sigma, noise_seed = torch.tensor(0.3), torch.tensor(7)
        _, cpp_scale = get_backend("cpp").forward(x, weight, lora_A, lora_B, bias, 2.0, sigma, noise_seed)
        _, ref_scale = get_backend("reference").forward(x, weight, lora_A, lora_B, bias, 2.0, sigma, noise_seed)
        assert torch.equal(cpp_scale, ref_scale)
        assert torch.equal(ref_scale, noise.perturbation_row_scale(weight, lora_A, lora_B, scaling=2.0, sigma=sigma))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_fp64_gradcheck_at_sigma_zero(backend):
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=4, N=5, K=6, r=2, dtype=torch.float64)
    inputs = [t.detach().clone().requires_grad_() for t in (x, lora_A, lora_B)]

    def fn(x, lora_A, lora_B):
        return flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=2.0, sigma=0.0, seed=1, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


def _box_muller_error(bits1):
    """Largest |z| difference between the C++ Box-Muller and noise.py's float64 definition, for Philox
    words bits1 paired with the scrambled bits1 * 2654435761 mod 2^32."""
    bits2 = (bits1 * 2654435761) % 2**32
    got = _C.box_muller(bits1, bits2)
    want = noise.box_muller(noise.uniform_from_bits(bits1), noise.uniform_from_bits(bits2))
    return max((g - w).abs().max().item() for g, w in zip(got, want))


def test_box_muller_within_one_ulp_of_the_double_definition():
    """The generator's float Box-Muller against the float64 definition: a sweep over the whole word
    range, and every word of the tail (u1 < 3e-5, the largest radii, where an ulp of z is largest).
    4.77e-7 is one ulp at |z| in [4, 8)."""
    assert _box_muller_error(torch.arange(0, 2**32, 8191)) <= 4.8e-7
    assert _box_muller_error(torch.arange(0, 2**16)) <= 4.8e-7
    assert _box_muller_error(torch.arange(2**32 - 2**16, 2**32)) <= 4.8e-7  # negative int32: folded
    with pytest.raises(RuntimeError, match=r"\[0, 2\^32\)"):
        _C.box_muller(torch.tensor([2**32]), torch.tensor([0]))


def _run_with_isa(isa, code):
    """stdout words of `code` run in a fresh process with FLATLORA_CPU_ISA=isa (None: the default)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("FLATLORA_CPU_ISA", None)
    if isa is not None:
        env["FLATLORA_CPU_ISA"] = isa
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if "not supported by this CPU" in run.stderr:
        pytest.skip(f"{isa} not supported here")
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


# The ISA's name and a hash of the bits of normals of a ragged row width, rows whose counters cross
# 2^32, a bulk block, and a perturbed weight W' (x = I: the fold, the row norms and the noise).
_ISA_AND_NORMALS_DIGEST = (
    "import hashlib, torch; from flatlora_kernels.backends import cpp\n"
    "from flatlora_kernels import flat_lora_linear; from flatlora_kernels.baselines import make_layer\n"
    "W, A, B, _ = make_layer(13, 67, 16, dtype=torch.float32, seed=3)\n"
    "with torch.no_grad(): w_eff = flat_lora_linear(torch.eye(67), W, A, B, None, scaling=2.0, sigma=0.3, seed=5)\n"
    "z = torch.cat([cpp._C.normal_rows(7, 1027, 0, 40).flatten(),\n"
    "               cpp._C.normal_rows(9, 21, 2**32 // 6 - 2, 2**32 // 6 + 3).flatten(),\n"
    "               cpp._C.normal_rows(2**63 - 1, 1024, 0, 256).flatten(), w_eff.flatten()])\n"
    "print(cpp.cpu_isa(), hashlib.sha256(z.view(torch.int32).numpy().tobytes()).hexdigest())\n"
)


@functools.cache
def _default_isa_digest():
    return _run_with_isa(None, _ISA_AND_NORMALS_DIGEST)[1]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_forced_isa_runs_the_same_stream(isa):
    """A subprocess per ISA (the choice is made once per process): integers bit-exact, floats within
    1e-6 of the reference; normals and W' bit-identical to the default ISA's (IEEE single-rounding
    operations only, FMA included)."""
    code = (
        "import torch; from flatlora_kernels.backends import cpp; from flatlora_kernels import noise\n"
        "off = torch.cat([torch.arange(100), torch.arange(2**32 - 40, 2**32 + 40)])\n"
        "assert all(torch.equal(a, b) for a, b in zip(cpp._C.philox4x32_10(7, off), noise.philox4x32_10(torch.tensor(7), off)))\n"
        "assert (cpp._C.normal_rows(7, 1027, 0, 5) - noise.normal_rows(7, 1027, 0, 5)).abs().max() <= 1e-6\n"
        "b1 = torch.arange(123, 2**32, 40999); b2 = b1 * 2654435761 % 2**32\n"
        "want = noise.box_muller(noise.uniform_from_bits(b1), noise.uniform_from_bits(b2))\n"
        "assert max((g - w).abs().max().item() for g, w in zip(cpp._C.box_muller(b1, b2), want)) <= 4.8e-7\n"
    ) + _ISA_AND_NORMALS_DIGEST
    got_isa, digest = _run_with_isa(isa, code)
    assert got_isa == isa
    assert digest == _default_isa_digest(), f"{isa} normals or W' differ in bits from the default ISA's"


def test_unknown_isa_override_is_a_clear_error():
    import os
    import subprocess
    import sys

    code = "from flatlora_kernels.backends import cpp; cpp.cpu_isa()"
    env = dict(os.environ, FLATLORA_CPU_ISA="sse9")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "FLATLORA_CPU_ISA must be scalar, avx2 or avx512" in run.stderr


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of a few rows, ending mid-way through N (and a one-row cap where K is wide)."""
    monkeypatch.setattr(cpu_tuning, "CHUNK_BYTES", 3 * 4 * 40)  # bf16 chunks: 6 rows
    monkeypatch.setattr(cpu_tuning, "CHUNK_GROWS_TO_OUTPUT", False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_with_tiny_chunks(tiny_chunks, dtype):
    check_backend_against_reference("cpp", M=23, N=31, K=40, r=3, dtype=dtype)  # 3 rows per chunk
    check_backend_against_reference("cpp", M=11, N=10, K=1000, r=2, dtype=dtype)  # 1 row per chunk


def _run(backend, x, weight, lora_A, lora_B, bias, **kw):
    """[y, dx, dA, dB] with an all-ones output gradient; backend: a name, or a reference function."""
    x, lora_A, lora_B = (t.detach().requires_grad_(True) for t in (x, lora_A, lora_B))
    if callable(backend):
        y = backend(x, weight, lora_A, lora_B, bias, **kw)
    else:
        y = flat_lora_linear(x, weight, lora_A, lora_B, bias, backend=backend, **kw)
    grads = torch.autograd.grad(y, (x, lora_A, lora_B), torch.ones_like(y))
    return [y.detach(), *grads]


def _layer_and_input(M=50, N=45, K=70, r=5, dtype=torch.float32, seed=0):
    weight, lora_A, lora_B, bias = make_layer(N, K, r, dtype=dtype, seed=seed)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return x, weight, lora_A, lora_B, bias


def test_chunk_size_does_not_change_results(monkeypatch):
    x, weight, lora_A, lora_B, bias = _layer_and_input()
    kw = dict(scaling=2.0, sigma=0.3, seed=77)
    whole = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    monkeypatch.setattr(cpu_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    for cap in (1, 4 * 70 * 7):  # one row per chunk; 7 rows (45 = 6*7 + 3: the last chunk is short)
        monkeypatch.setattr(cpu_tuning, "CHUNK_BYTES", cap)
        chunked = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
        for a, b in zip(whole, chunked):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_reused_chunk_workspace_changes_no_bit(monkeypatch, dtype):
    """Chunks under cpu_tuning.WORKSPACE_BYTES live in a per-thread buffer kept across calls: layers of
    different sizes and dtypes built into it one after another give the bits of fresh buffers, and no
    output aliases it."""
    layers = [_layer_and_input(M=m, N=n, K=k, r=3, dtype=dtype, seed=seed) for m, n, k, seed in [(9, 40, 33, 1), (5, 70, 65, 2), (9, 40, 33, 3)]]
    kw = dict(scaling=2.0, sigma=0.3, seed=11)
    monkeypatch.setattr(cpu_tuning, "WORKSPACE_BYTES", 0)
    fresh = [_run("cpp", *layer, **kw) for layer in layers]
    monkeypatch.setattr(cpu_tuning, "WORKSPACE_BYTES", 1 << 20)
    reused = [_run("cpp", *layer, **kw) for layer in layers + layers[:1]]
    for want, got in zip(fresh + fresh[:1], reused):
        for a, b in zip(want, got):
            assert torch.equal(a, b)
    # Outputs are their own memory: the next call's chunk does not overwrite them.
    before = [t.clone() for t in reused[0]]
    _run("cpp", *layers[1], **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, reused[0]))


def test_peak_memory_counts_the_reused_chunk_buffer(monkeypatch):
    """PeakMemory frees the per-thread chunk buffer on entry, so a pass measured after another one
    still counts its chunk (without that the second measurement would drop by the chunk's size)."""
    from flatlora_kernels.memory import PeakMemory

    monkeypatch.setattr(cpu_tuning, "CHUNK_OUTPUT_FRACTION", None)  # the whole weight in one chunk

    x, weight, lora_A, lora_B, bias = _layer_and_input(M=4, N=256, K=512, r=4)
    peaks = []
    for _ in range(2):
        with PeakMemory("cpu") as peak, torch.no_grad():
            flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=2.0, sigma=0.1, seed=1, backend="cpp")
        peaks.append(peak.bytes)
    chunk_bytes = 256 * 512 * 4
    assert peaks[0] == peaks[1] and peaks[0] >= chunk_bytes, peaks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fold", [True, False])
def test_folded_and_unfolded_backward_match_reference(monkeypatch, dtype, fold):
    """Both backward branches (chunks W + s*B@A + eps, or W + eps plus (s*dy@B)@A), one chunk and several."""
    ratios = {} if fold else {str(dtype)[6:]: float("inf")}
    monkeypatch.setattr(cpu_tuning, "BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT", ratios)
    check_backend_against_reference("cpp", M=9, N=40, K=33, r=4, dtype=dtype)  # M < N
    check_backend_against_reference("cpp", M=50, N=21, K=70, r=3, dtype=dtype)  # M > N
    monkeypatch.setattr(cpu_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    monkeypatch.setattr(cpu_tuning, "CHUNK_BYTES", 7 * 33 * 2)  # 40 rows in 6 chunks of at most 7 (bf16) or 3
    check_backend_against_reference("cpp", M=9, N=40, K=33, r=4, dtype=dtype)


def test_unfolded_backward_is_used_below_the_crossover_and_agrees_with_folding(monkeypatch):
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=20, N=45, K=70, dtype=torch.bfloat16)
    kw = dict(scaling=2.0, sigma=0.3, seed=5)
    monkeypatch.setattr(cpu_tuning, "BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT", {"bfloat16": 1.0})
    calls = []
    real_backward = cpp._C.backward
    monkeypatch.setattr(cpp._C, "backward", lambda *args: calls.append(args[9]) or real_backward(*args))
    unfolded = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    monkeypatch.setattr(cpu_tuning, "BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT", {})
    folded = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    assert calls == [False, True]  # M = 20 < N = 45 unfolds under the bf16 rule; an empty rule folds
    for a, b in zip(unfolded, folded):  # the same math; bf16 rounding of W' vs of W + eps apart
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
    # fp64: the same to fp64 rounding.
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=20, N=45, K=70, dtype=torch.float64)
    folded = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    monkeypatch.setattr(cpu_tuning, "BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT", {"float64": 1.0})
    unfolded = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    assert calls[-2:] == [True, False]
    for a, b in zip(unfolded, folded):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_parallel_grain_changes_no_bit(monkeypatch):
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=30, N=45, K=70)
    kw = dict(scaling=2.0, sigma=0.3, seed=11)
    default = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    for grain in (1, 70 * 3 + 1, 10**9):  # one row per task, 3 rows, everything in one task
        monkeypatch.setattr(cpu_tuning, "PARALLEL_GRAIN_ELEMENTS", grain)
        for a, b in zip(default, _run("cpp", x, weight, lora_A, lora_B, bias, **kw)):
            assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="parallel_grain must be positive"):
        _C.forward(x, weight, lora_A, lora_B, None, 2.0, torch.tensor(0.1), torch.tensor(1), cpu_tuning.CHUNK_BYTES, 0)


def test_repeated_calls_are_deterministic():
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=33, N=77, K=51)
    kw = dict(scaling=1.5, sigma=0.2, seed=2**50 + 1)
    first = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    # Free NaN-filled blocks of the sizes the extension allocates (y, dx, the chunk, row scales, in
    # fp32): malloc hands such small freed blocks to the next allocations of the same size, so an
    # element the extension forgets to write would come out NaN.
    garbage = [torch.full(shape, float("nan")) for shape in ((33, 77), (33, 51), (77, 51), (77,)) for _ in range(3)]
    del garbage
    second = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_forward_and_backward_use_the_same_eps():
    """dx equals autograd through the materialised weight, and depends on the seed."""
    x, weight, lora_A, lora_B, bias = _layer_and_input()
    kw = dict(scaling=2.0, sigma=0.5, seed=31)
    got = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    x_ = x.detach().requires_grad_(True)
    y_ref = naive_flat_lora_linear(x_, weight, lora_A, lora_B, bias, **kw)
    (dx_ref,) = torch.autograd.grad(y_ref, x_, torch.ones_like(y_ref))
    torch.testing.assert_close(got[0], y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], dx_ref, rtol=1e-5, atol=1e-5)
    other = _run("cpp", x, weight, lora_A, lora_B, bias, **{**kw, "seed": 32})
    assert not torch.allclose(other[1], got[1], atol=1e-3)


def test_sigma_zero_is_plain_lora():
    x, weight, lora_A, lora_B, bias = _layer_and_input()
    got = _run("cpp", x, weight, lora_A, lora_B, bias, scaling=2.0, sigma=0.0, seed=5)
    x_, a_, b_ = (t.detach().requires_grad_(True) for t in (x, lora_A, lora_B))
    y = lora_linear(x_, weight, a_, b_, bias, scaling=2.0)
    expected = [y.detach(), *torch.autograd.grad(y, (x_, a_, b_), torch.ones_like(y))]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_weight_dtype_differs_from_input_dtype():
    x, weight, lora_A, lora_B, bias = _layer_and_input(dtype=torch.float32)
    kw = dict(scaling=2.0, sigma=0.1, seed=8)
    pairs = [(torch.bfloat16, torch.float32), (torch.float64, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16)]
    for w_dtype, x_dtype in pairs:
        w = weight.to(w_dtype)
        got = _run("cpp", x.to(x_dtype), w, lora_A, lora_B, bias, **kw)
        ref = _run("reference", x.to(x_dtype), w, lora_A, lora_B, bias, **kw)
        assert got[0].dtype == x_dtype and got[1].dtype == x_dtype
        # bf16 x: bf16 GEMMs (fp32 accumulation) vs the reference's fp32 ones, so bf16 rounding of
        # outputs and of the [M, r] intermediates, relative to each tensor's scale.
        tol = 1e-5 if x_dtype == torch.float32 else 2e-2
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


def test_non_contiguous_input():
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=20, K=70)
    wide = torch.randn(70, 20)  # x as a transposed view: strides (1, 20)
    x_strided = torch.randn(20, 140)[:, ::2]  # column stride 2
    kw = dict(scaling=2.0, sigma=0.1, seed=4)
    for x_nc in (wide.t(), x_strided):
        assert not x_nc.is_contiguous()
        got = _run("cpp", x_nc, weight, lora_A, lora_B, bias, **kw)
        ref = _run("cpp", x_nc.contiguous(), weight, lora_A, lora_B, bias, **kw)
        for a, b in zip(got, ref):  # BLAS may pick another kernel for strided x: fp32 rounding only
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_weight_and_factors(dtype):
    x, weight, lora_A, lora_B, bias = _layer_and_input(dtype=dtype)
    kw = dict(scaling=2.0, sigma=0.1, seed=4)
    weight_t = weight.t().contiguous().t()  # same values, column-major: rows are not contiguous
    lora_A_t, lora_B_t = lora_A.t().contiguous().t(), lora_B.t().contiguous().t()
    assert not weight_t.is_contiguous() and not lora_A_t.is_contiguous()
    got = _run("cpp", x, weight_t, lora_A_t, lora_B_t, bias, **kw)
    ref = _run("cpp", x, weight, lora_A, lora_B, bias, **kw)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)  # the same perturbed weight, bit for bit
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got[1:], ref[1:]):  # BLAS may sum the strided factors in another order
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_empty_batch():
    x, weight, lora_A, lora_B, bias = _layer_and_input(M=0)
    y, dx, d_a, d_b = _run("cpp", x, weight, lora_A, lora_B, bias, scaling=2.0, sigma=0.1, seed=1)
    assert y.shape == (0, 45) and dx.shape == (0, 70)
    assert torch.equal(d_a, torch.zeros_like(lora_A)) and torch.equal(d_b, torch.zeros_like(lora_B))


def test_row_scale_and_compute_dx_false():
    x, weight, lora_A, lora_B, bias = _layer_and_input()
    sigma, seed = torch.tensor(0.25), torch.tensor(3)
    caps = (cpu_tuning.CHUNK_BYTES, cpu_tuning.PARALLEL_GRAIN_ELEMENTS)
    _, row_scale = _C.forward(x, weight, lora_A, lora_B, None, 2.0, sigma, seed, *caps)
    from flatlora_kernels.noise import perturbation_row_scale

    expected = perturbation_row_scale(weight, lora_A, lora_B, scaling=2.0, sigma=0.25)
    torch.testing.assert_close(row_scale, expected, rtol=1e-5, atol=0)
    dx, d_a, d_b = _C.backward(
        torch.ones(50, 45), x, weight, lora_A, lora_B, row_scale, 2.0, seed, False, True, *caps
    )
    assert dx.numel() == 0 and d_a.shape == lora_A.shape and d_b.shape == lora_B.shape


# ---- bad direct calls fail cleanly --------------------------------------------------------------


def test_direct_calls_reject_bad_inputs():
    x, weight, lora_A, lora_B, bias = _layer_and_input()
    sigma, seed = torch.tensor(0.1), torch.tensor(1)
    bad_calls = {
        "x must be [M": (x[:, :-1], weight, lora_A, lora_B, None, 2.0, sigma, seed),
        "x must be 2-D": (x[None], weight, lora_A, lora_B, None, 2.0, sigma, seed),
        "x must be fp32/bf16/fp16/fp64": (x.int(), weight, lora_A, lora_B, None, 2.0, sigma, seed),
        "lora_B must be": (x, weight, lora_A, lora_B[:, :-1], None, 2.0, sigma, seed),
        "bias must be": (x, weight, lora_A, lora_B, bias[:-1], 2.0, sigma, seed),
        "seed must be": (x, weight, lora_A, lora_B, None, 2.0, sigma, seed.int()),
        "sigma must be": (x, weight, lora_A, lora_B, None, 2.0, torch.tensor([0.1, 0.2]), seed),
    }
    for message, args in bad_calls.items():
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[")):
            _C.forward(*args, cpu_tuning.CHUNK_BYTES, cpu_tuning.PARALLEL_GRAIN_ELEMENTS)


def test_missing_extension_message_says_how_to_build(monkeypatch):
    import importlib
    import sys

    import flatlora_kernels

    monkeypatch.setitem(sys.modules, "flatlora_kernels._C", None)  # makes the import fail
    monkeypatch.delattr(flatlora_kernels, "_C")
    monkeypatch.delitem(sys.modules, "flatlora_kernels.backends.cpp")
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        importlib.import_module("flatlora_kernels.backends.cpp")
