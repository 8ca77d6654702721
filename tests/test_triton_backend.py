"""The Triton backend: the z tile, each kernel, and both strategies against the plain-PyTorch reference.

Runs on a CUDA device, or on CPU tensors in Triton's interpreter. The interpreter is switched on by
``TRITON_INTERPRET=1``, which must be in the environment before triton is imported: conftest.py sets
it on machines without ``nvidia-smi``; CI should export it for the whole run. Shapes are small and
odd and the interpreter's tiles large (it pays per loop iteration), so the file runs in well under a
minute there; tests marked ``gpu`` need real sizes and a CUDA device. (The interpreter rounds
fp32 -> bf16 by truncation where the GPU rounds to nearest, so its bf16 results are a little worse
than the GPU's; they still pass the reference bound.)
"""

from __future__ import annotations

import os

import pytest
import torch

from flatlora_kernels import filter_noise, flat_lora_linear
from flatlora_kernels.noise import counters_per_row, normal_rows, perturbation_row_scale, philox4x32_10
from flatlora_kernels.baselines import dense_perturbed_weight, lora_linear

from .conftest import HAS_CUDA, check_backend_against_reference, make_layer

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRETING or HAS_CUDA):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from flatlora_kernels.backends import torch_reference, triton_backend, triton_tuning  # noqa: E402
from flatlora_kernels.kernels import philox_offsets  # noqa: E402
from flatlora_kernels.kernels.noise_tile import philox_words  # noqa: E402

from .test_gpu_readiness import assert_normals_within_ulp_bound  # noqa: E402

DEVICE = "cpu" if INTERPRETING else "cuda"
STRATEGIES = ["streamed", "in_register"]
LOW_PRECISION = [torch.float16, torch.bfloat16]

# (the interpreter's NumPy deprecation is filtered once, in pyproject.toml)
pytestmark = [pytest.mark.interpret if INTERPRETING else pytest.mark.gpu]
requires_gpu = pytest.mark.skipif(INTERPRETING or not HAS_CUDA, reason="real sizes need a CUDA device")


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 checks assume full-precision fp32 matmuls (the backend follows this flag, as cuBLAS does)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _seed(value):
    return torch.tensor(value, dtype=torch.int64, device=DEVICE)


def _layer(N, K, r, dtype=torch.float32, **kw):
    return [t.to(DEVICE) for t in make_layer(N, K, r, dtype=dtype, **kw)]


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _assert_close_relative_to_max(name, actual, expected, relative):
    """``max |actual - expected| <= relative * max |expected|`` (outputs of GEMMs with differing roundings)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    err = (actual.double() - expected.double()).abs().max().item()
    bound = relative * expected.double().abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def _run_protocol(x, weight, lora_A, lora_B, bias, dy, *, scaling=2.0, sigma=0.1, seed=5):
    sigma_t = torch.tensor(sigma, device=DEVICE)
    y, scale = triton_backend.forward(x, weight, lora_A, lora_B, bias, scaling, sigma_t, _seed(seed))
    grads = triton_backend.backward(dy, x, weight, lora_A, lora_B, scale, scaling, _seed(seed), True)
    return (y, scale, *grads)


def _reference_protocol(x, weight, lora_A, lora_B, bias, dy, *, scaling=2.0, sigma=0.1, seed=5):
    """The same five outputs from the plain-PyTorch backend."""
    sigma_t = torch.tensor(sigma, device=DEVICE)
    y, scale = torch_reference.forward(x, weight, lora_A, lora_B, bias, scaling, sigma_t, _seed(seed))
    grads = torch_reference.backward(dy, x, weight, lora_A, lora_B, scale, scaling, _seed(seed), True)
    return (y, scale, *grads)


OUTPUTS = ["y", "row_scale", "dx", "dA", "dB"]


def _fixed_problem(M=23, N=45, K=51, r=3, dtype=torch.float32):
    weight, lora_A, lora_B, bias = _layer(N, K, r, dtype=dtype)
    x, dy = _randn(M, K, dtype=dtype, seed=1), _randn(M, N, dtype=dtype, seed=2)
    return x, weight, lora_A, lora_B, bias, dy


def _reference_perturbed_weight(weight, lora_A, lora_B, scaling, sigma, seed):
    return dense_perturbed_weight(weight, lora_A, lora_B, scaling=scaling, sigma=sigma, seed=seed)


# ---- the z tile -------------------------------------------------------------------------------


@triton.jit
def _tile_integers_kernel(seed_ptr, out_ptr, row_start, n_rows, counters_per_row, BLOCK: tl.constexpr):
    """The four Philox words behind the z tile of rows ``row_start + [0, n_rows)``, as int64."""
    local_rows = tl.arange(0, BLOCK)
    counters = tl.arange(0, BLOCK)
    words = philox_words(tl.load(seed_ptr), philox_offsets(row_start + local_rows, counters, counters_per_row))
    out = out_ptr + (local_rows.to(tl.int64)[:, None] * counters_per_row + counters[None, :]) * 4
    mask = (local_rows < n_rows)[:, None] & (counters < counters_per_row)[None, :]
    for lane in tl.static_range(4):
        word = words[lane]
        tl.store(out + lane, word.to(tl.int64) & 0xFFFFFFFF, mask=mask)


# Rows whose offsets pass 2**31 (int32 overflow) and 2**32 (the counter's high word).
ROW_STARTS = [0, 2**31 // 7 - 3, 2**40]


@pytest.mark.parametrize("row_start", ROW_STARTS)
@pytest.mark.parametrize("seed", [0, 16, 2**63 - 1, -5])
def test_z_tile_integers_are_the_reference_philox(seed, row_start):
    K, n_rows = 27, 5  # Kq = 7
    kq = counters_per_row(K)
    out = torch.empty(n_rows * kq * 4, dtype=torch.int64, device=DEVICE)
    _tile_integers_kernel[(1,)](_seed(seed), out, row_start, n_rows, kq, BLOCK=16)
    rows = torch.arange(row_start, row_start + n_rows, dtype=torch.int64)
    offsets = rows[:, None] * kq + torch.arange(kq)
    expected = torch.stack(philox4x32_10(torch.tensor(seed), offsets), dim=-1).reshape(-1)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("K", [1, 2, 5, 13, 130])
@pytest.mark.parametrize("row_start", ROW_STARTS)
def test_z_tile_normals_match_noise_normal_rows(K, row_start):
    seed = _seed(2**40 + 7)
    got = triton_backend.normal_rows(seed, K, row_start, row_start + 9)
    expected = normal_rows(seed, K, row_start, row_start + 9, device=DEVICE)
    assert_normals_within_ulp_bound(got, expected)


def test_noise_definition_is_what_the_kernels_scale():
    """Sanity: filter_noise = row_scale * z, with the Triton row scale and the Triton z tile."""
    N, K, r = 12, 40, 2
    weight, lora_A, lora_B, _ = _layer(N, K, r)
    sigma = torch.tensor(0.2, device=DEVICE)
    scale = triton_backend.row_scale(weight, lora_A, lora_B, 2.0, sigma, torch.float32)
    z = triton_backend.normal_rows(_seed(8), K, 0, N)
    eps = filter_noise(weight, lora_A, lora_B, scaling=2.0, sigma=0.2, seed=8)
    torch.testing.assert_close(scale[:, None] * z, eps, rtol=1e-5, atol=1e-7)


# ---- row scales and the perturbed-weight chunks ----------------------------------------------


@pytest.mark.parametrize(
    "w_dtype,factor_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
@pytest.mark.parametrize("N,K,r", [(45, 51, 3), (20, 300, 70)])  # r = 70: two rank blocks of 64
def test_row_scale_kernel_matches_reference(N, K, r, w_dtype, factor_dtype):
    weight, lora_A, lora_B, _ = _layer(N, K, r, dtype=w_dtype, lora_dtype=factor_dtype)
    sigma = torch.tensor(0.1, device=DEVICE)
    got = triton_backend.row_scale(weight, lora_A, lora_B, 2.0, sigma, torch.float32)
    expected = perturbation_row_scale(weight, lora_A, lora_B, scaling=2.0, sigma=sigma)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=0)


def test_row_scale_kernel_any_strides():
    weight, lora_A, lora_B, _ = _layer(33, 40, 5)
    weight_t = weight.t().contiguous().t()  # column-major storage
    lora_A_t, lora_B_t = lora_A.t().contiguous().t(), lora_B.t().contiguous().t()
    sigma = torch.tensor(0.3, device=DEVICE)
    got = triton_backend.row_scale(weight_t, lora_A_t, lora_B_t, 0.5, sigma, torch.float32)
    torch.testing.assert_close(got, perturbation_row_scale(weight, lora_A, lora_B, scaling=0.5, sigma=0.3), rtol=2e-6, atol=0)


@pytest.mark.parametrize("rows", [(0, 45), (7, 30)])
def test_perturbed_weight_rows_match_reference(rows):
    N, K, r, scaling, sigma, seed = 45, 51, 3, 2.0, 0.2, _seed(9)
    weight, lora_A, lora_B, _ = _layer(N, K, r)
    scale = perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma)
    got = triton_backend.perturbed_weight_rows(weight, lora_A, lora_B, scale, scaling, seed, *rows, torch.float32)
    expected = _reference_perturbed_weight(weight, lora_A, lora_B, scaling, sigma, seed)[rows[0] : rows[1]]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_counter_chunks_hold_four_column_strips():
    """A backward chunk (counters [c0, c1) of every row) holds the strips c0 + t*Kq .. c1 + t*Kq."""
    N, K, r, scaling, sigma, seed = 9, 27, 2, 2.0, 0.2, _seed(4)
    kq = counters_per_row(K)  # 7; K = 4*Kq - 1: strip 3 is one column short
    weight, lora_A, lora_B, _ = _layer(N, K, r)
    scale = perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma)
    expected = _reference_perturbed_weight(weight, lora_A, lora_B, scaling, sigma, seed)
    c0, c1 = 2, 7
    chunk = torch.full((N, 4, c1 - c0), float("nan"), device=DEVICE)
    triton_backend.regenerate_perturbed_weight(
        chunk, weight, lora_A, lora_B, scale, scaling, seed,
        rows=(0, N), counters=(c0, c1), stride_out_row=4 * (c1 - c0), stride_out_strip=c1 - c0,
    )  # fmt: skip
    for strip in range(4):
        columns = torch.arange(strip * kq + c0, strip * kq + c1)
        valid = columns < K
        torch.testing.assert_close(chunk[:, strip, valid], expected[:, columns[valid]], rtol=1e-5, atol=1e-6)
    assert chunk[:, 3, -1].isnan().all()  # column 28 does not exist: left untouched


# ---- the backend against the reference, both strategies ---------------------------------------


@pytest.fixture(params=STRATEGIES)
def strategy(request):
    with triton_backend.use_strategy(request.param):
        yield request.param


SHAPES = [(1, 1, 1, 1), (37, 45, 51, 3), (70, 33, 130, 16), (5, 70, 2, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("M,N,K,r", SHAPES)
def test_matches_reference(strategy, M, N, K, r, dtype):
    check_backend_against_reference("triton", M=M, N=N, K=K, r=r, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_dims_no_bias(strategy, dtype):
    check_backend_against_reference(
        "triton", M=7, N=33, K=19, r=4, dtype=dtype, device=DEVICE, batch_shape=(2, 3), use_bias=False
    )


def test_sigma_zero_is_lora(strategy):
    weight, lora_A, lora_B, bias = _layer(21, 30, 4)
    x = _randn(9, 30)
    y = flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=2.0, sigma=0.0, seed=3, backend="triton")
    torch.testing.assert_close(y, lora_linear(x, weight, lora_A, lora_B, bias, scaling=2.0), rtol=1e-5, atol=1e-5)


def test_no_tokens(strategy):
    weight, lora_A, lora_B, bias = _layer(21, 30, 4)
    x = torch.randn(0, 30, device=DEVICE, requires_grad=True)
    A, B = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)
    y = flat_lora_linear(x, weight, A, B, bias, scaling=2.0, sigma=0.1, seed=3, backend="triton")
    assert y.shape == (0, 21)
    y.sum().backward()
    assert x.grad.shape == (0, 30)
    assert torch.count_nonzero(A.grad) == 0 and torch.count_nonzero(B.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_dtypes_and_strides(strategy, dtype):
    """x in the compute dtype; W, A, B in other dtypes and non-contiguous; x and dy strided views."""
    M, N, K, r = 13, 29, 35, 5
    weight, lora_A, lora_B, bias = _layer(N, K, r)
    weight_mixed = weight.to(torch.bfloat16).t().contiguous().t()
    lora_A_mixed, lora_B_mixed = lora_A.t().contiguous().t(), lora_B.double()
    x = _randn(M, 2 * K, dtype=dtype, seed=1)[:, ::2]
    dy = _randn(N, M, dtype=dtype, seed=2).t()
    problem = (x, weight_mixed, lora_A_mixed, lora_B_mixed, bias.half(), dy)
    for name, a, b in zip(OUTPUTS, _run_protocol(*problem), _reference_protocol(*problem)):
        _assert_close_relative_to_max(name, a, b, 1e-5 if dtype == torch.float32 else 2e-3)


def test_fp64_input_streams():
    """fp64 x runs fp64 GEMMs on an fp32 perturbed weight (fp32 by definition), whichever strategy is asked for."""
    problem = _fixed_problem(dtype=torch.float64)
    with triton_backend.use_strategy("in_register"):
        got = _run_protocol(*problem)
    for name, a, b in zip(OUTPUTS, got, _reference_protocol(*problem)):
        _assert_close_relative_to_max(name, a, b, 1e-6)


def test_fp32_with_tf32_allowed(strategy):
    """``allow_tf32`` switches the fp32 dots to TF32 (as cuBLAS): results stay within TF32 accuracy."""
    problem = _fixed_problem(M=20, N=40, K=300, r=8)
    torch.backends.cuda.matmul.allow_tf32 = True  # restored by the _no_tf32 fixture
    for name, a, b in zip(OUTPUTS, _run_protocol(*problem), _reference_protocol(*problem)):
        _assert_close_relative_to_max(name, a, b, 1e-2)


# ---- both strategies see the same eps; chunking and tiling change nothing ----------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strategies_regenerate_identical_perturbed_weights(dtype):
    """With x = I, y = W'^T exactly (and with dy = I, dx = W'): each strategy's W' is exposed bit for bit.

    eps itself is the same in both (same z tile, same row scales)."""
    N, K, r = 45, 51, 3
    weight, lora_A, lora_B, _ = _layer(N, K, r)
    eye_x = torch.eye(K, device=DEVICE, dtype=dtype)
    eye_dy = torch.eye(N, device=DEVICE, dtype=dtype)
    seen = {}
    for name in STRATEGIES:
        with triton_backend.use_strategy(name):
            y, scale, _, _, _ = _run_protocol(eye_x, weight, lora_A, lora_B, None, torch.zeros(K, N, device=DEVICE, dtype=dtype))
            _, _, dx, _, _ = _run_protocol(torch.zeros(N, K, device=DEVICE, dtype=dtype), weight, lora_A, lora_B, None, eye_dy)
        seen[name] = (y.t(), dx)
    expected = _reference_perturbed_weight(weight, lora_A, lora_B, 2.0, 0.1, 5).to(dtype)
    (y_streamed, dx_streamed), (y_fused, dx_fused) = seen["streamed"], seen["in_register"]
    assert torch.equal(y_streamed, dx_streamed)  # same kernel, row chunks vs counter chunks
    if INTERPRETING:
        assert torch.equal(y_streamed, y_fused) and torch.equal(dx_streamed, dx_fused)
    else:  # the two kernels may contract W + s*B@A + eps into FMAs differently: last-bit differences
        tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-6)
        torch.testing.assert_close(y_fused, y_streamed, **tol)
        torch.testing.assert_close(dx_fused, dx_streamed, **tol)
    torch.testing.assert_close(y_streamed.float(), expected.float(), rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-6)


def test_chunks_grow_to_the_output_size(monkeypatch):
    """With a tiny cap, chunks still grow to the pass's output: y (23 x 45 fp32) holds 20 rows of W'
    (51 wide); dx (23 x 51) holds 6 counters' worth of strips (4 strips x 45 rows)."""
    sizes = []
    regenerate = triton_backend.regenerate_perturbed_weight

    def recording(out, *args, rows, counters, **kw):
        sizes.append((rows[1] - rows[0], counters[1] - counters[0]))
        return regenerate(out, *args, rows=rows, counters=counters, **kw)

    monkeypatch.setattr(triton_backend, "regenerate_perturbed_weight", recording)
    monkeypatch.setattr(triton_tuning, "CHUNK_BYTES", 1)
    with triton_backend.use_strategy("streamed"):
        _run_protocol(*_fixed_problem(M=23, N=45, K=51))
    kq = counters_per_row(51)
    assert sizes[:3] == [(20, kq), (20, kq), (5, kq)]  # forward: 23*45 // 51 = 20 rows per chunk
    assert sizes[3:] == [(45, 6), (45, 6), (45, 1)]  # backward: 23*51 // (4*45) = 6 counters per chunk


@pytest.mark.parametrize("cap_bytes", [1, 3 * 51 * 4, 6 * 45 * 4 * 4 + 7])
def test_tiny_chunks_give_the_same_results(monkeypatch, cap_bytes):
    """Chunk boundaries mid-matrix (1 row/counter per chunk, 3 rows, 6 counters) change nothing."""
    problem = _fixed_problem()
    with triton_backend.use_strategy("streamed"):
        whole = _run_protocol(*problem)
        monkeypatch.setattr(triton_tuning, "CHUNK_BYTES", cap_bytes)
        monkeypatch.setattr(triton_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
        chunked = _run_protocol(*problem)
    for name, a, b in zip(OUTPUTS, whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_each_pass_regenerates_the_weight_once(monkeypatch):
    """Streamed: forward covers every row once, backward every counter once (per row), under tiny caps."""
    N, K = 45, 51
    covered = []
    regenerate = triton_backend.regenerate_perturbed_weight

    def counting(out, *args, rows, counters, **kw):
        covered.append((rows[1] - rows[0]) * (counters[1] - counters[0]))
        return regenerate(out, *args, rows=rows, counters=counters, **kw)

    monkeypatch.setattr(triton_backend, "regenerate_perturbed_weight", counting)
    monkeypatch.setattr(triton_tuning, "CHUNK_BYTES", 5 * K * 4)
    monkeypatch.setattr(triton_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    with triton_backend.use_strategy("streamed"):
        _run_protocol(*_fixed_problem(N=N, K=K))
    calls = N * counters_per_row(K)
    assert sum(covered) == 2 * calls and len(covered) > 2


def test_small_tiles_many_programs_and_rank_blocks(monkeypatch):
    """16-wide tiles: several programs per axis, several loop iterations, ragged edges; r = 70: two rank blocks."""
    small = {
        "row_scale": dict(BLOCK_ROWS=16, BLOCK_COLUMNS=32),
        "perturbed_weight": dict(BLOCK_ROWS=16, BLOCK_COUNTERS=16),
        "fused_forward": dict(MAX_BLOCK_TOKENS=16, BLOCK_OUT=16, BLOCK_COUNTERS=16),
        "fused_input_grad": dict(MAX_BLOCK_TOKENS=16, BLOCK_OUT=16, BLOCK_COUNTERS=16),
        "normal_rows": dict(BLOCK_ROWS=16, BLOCK_COUNTERS=16),
    }
    monkeypatch.setattr(triton_tuning, "INTERPRETER_TILES" if INTERPRETING else "GPU_TILES", small)
    for name in STRATEGIES:
        with triton_backend.use_strategy(name):
            check_backend_against_reference("triton", M=20, N=37, K=70, r=70, dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_register_split_reductions(monkeypatch, dtype):
    """Reduction loops split over programs (2 counter splits forward, 3 row splits backward), bias after the sum."""
    forward_tiles = dict(MAX_BLOCK_TOKENS=16, BLOCK_OUT=64, BLOCK_COUNTERS=16)
    input_grad_tiles = dict(MAX_BLOCK_TOKENS=16, BLOCK_OUT=16, BLOCK_COUNTERS=64)
    for table in (triton_tuning.INTERPRETER_TILES, triton_tuning.GPU_TILES):
        for suffix in ("", "_fp32"):
            monkeypatch.setitem(table, f"fused_forward{suffix}", forward_tiles)
            monkeypatch.setitem(table, f"fused_input_grad{suffix}", input_grad_tiles)
    monkeypatch.setattr(triton_tuning, "IN_REGISTER_SPLITS", 3)
    with triton_backend.use_strategy("in_register"):
        check_backend_against_reference("triton", M=11, N=37, K=70, r=4, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunked", [False, True])
def test_every_output_element_is_written(monkeypatch, strategy, chunked):
    """Every buffer the backend allocates starts as NaN: an element a kernel or a chunk forgets shows up."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    poisoned_count = []

    def poison(tensor):
        if tensor.is_floating_point() and tensor.numel():
            poisoned_count.append(tensor.numel())
            tensor.fill_(float("nan"))
        return tensor

    if chunked:  # chunk edges mid-matrix: 7 rows forward, 2 counters backward
        monkeypatch.setattr(triton_tuning, "CHUNK_BYTES", 7 * 51 * 4)
        monkeypatch.setattr(triton_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    problem = _fixed_problem()
    with triton_backend.use_strategy(strategy):
        clean = _run_protocol(*problem)
        with monkeypatch.context() as poisoned:
            poisoned.setattr(triton_backend.torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
            poisoned.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: poison(real_new_empty(self, *a, **kw)))
            got = _run_protocol(*problem)
    assert len(poisoned_count) >= 3, "the backend's allocations were not intercepted"
    for name, a, b in zip(OUTPUTS, got, clean):
        assert not a.isnan().any(), f"{name}: elements left unwritten"
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# ---- the dispatcher ---------------------------------------------------------------------------


def test_strategy_choice(monkeypatch):
    monkeypatch.delenv(triton_backend.STRATEGY_ENV, raising=False)
    limit = triton_tuning.IN_REGISTER_MAX_TOKENS
    assert triton_backend.choose_strategy(limit, torch.bfloat16) == "in_register"
    assert triton_backend.choose_strategy(limit + 1, torch.bfloat16) == "streamed"
    assert triton_backend.choose_strategy(1, torch.float64) == "streamed"
    monkeypatch.setenv(triton_backend.STRATEGY_ENV, "in_register")
    assert triton_backend.choose_strategy(10**6, torch.float32) == "in_register"
    with triton_backend.use_strategy("streamed"):  # the context manager wins over the environment
        assert triton_backend.choose_strategy(1, torch.float32) == "streamed"
    assert triton_backend.choose_strategy(1, torch.float32) == "in_register"
    monkeypatch.setenv(triton_backend.STRATEGY_ENV, "fastest")
    with pytest.raises(ValueError, match="fastest"):
        triton_backend.choose_strategy(1, torch.float32)
    with pytest.raises(ValueError, match="unknown Triton strategy"):
        with triton_backend.use_strategy("fused"):
            pass


# ---- GPU only: real sizes, compile, memory -----------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [16, 1000])
def test_gpu_both_strategies_mid_sizes(strategy, dtype, M):
    check_backend_against_reference("triton", M=M, N=1000, K=1030, r=8, dtype=dtype, device="cuda")


@requires_gpu
def test_gpu_fp32_factors_with_bf16_compute():
    """The usual mixed setup: frozen bf16 W, fp32 LoRA factors, bf16 activations (autocast)."""
    x, weight, lora_A, lora_B, bias, dy = _fixed_problem(M=300, N=1024, K=1024, r=16, dtype=torch.float32)
    problem = (x.bfloat16(), weight.bfloat16(), lora_A, lora_B, bias.bfloat16(), dy.bfloat16())
    expected = _reference_protocol(*problem)
    for name in STRATEGIES:
        with triton_backend.use_strategy(name):
            got = _run_protocol(*problem)
        for label, a, b in zip(OUTPUTS, got, expected):
            _assert_close_relative_to_max(f"{name} {label}", a, b, 1e-2)


@requires_gpu
def test_gpu_compiles_fullgraph_without_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend

    weight, lora_A, lora_B, bias = _layer(512, 256, 8, dtype=torch.bfloat16)
    lora_A.requires_grad_(True)
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True)
    def step(x, seed, sigma):
        return flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=2.0, sigma=sigma, seed=seed, backend="triton")

    x = _randn(300, 256, dtype=torch.bfloat16)
    for seed, sigma in ((1, 0.05), (16, 0.1), (12345, 0.0)):
        seed_t, sigma_t = _seed(seed), torch.tensor(sigma, device="cuda")
        y = step(x, seed_t, sigma_t)
        y.float().square().sum().backward()
        eager = flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=2.0, sigma=sigma_t, seed=seed_t, backend="triton")
        torch.testing.assert_close(y, eager, rtol=2e-2, atol=2e-2)
    assert counter.frame_count == 1


@requires_gpu
def test_gpu_opcheck_triton_ops(strategy):
    from torch.library import opcheck

    weight, lora_A, lora_B, bias = _layer(96, 80, 4, dtype=torch.bfloat16)
    x, dy = _randn(33, 80, dtype=torch.bfloat16, seed=1), _randn(33, 96, dtype=torch.bfloat16, seed=2)
    sigma, seed = torch.tensor(0.1, device="cuda"), _seed(3)
    ops = torch.ops.flatlora
    opcheck(ops.forward.default, (x.requires_grad_(True), weight, lora_A, lora_B, bias, 2.0, sigma, seed, "triton"))
    _, row_scale = ops.forward(x, weight, lora_A, lora_B, bias, 2.0, sigma, seed, "triton")
    for compute_dx in (True, False):
        opcheck(ops.backward.default, (dy, x, weight, lora_A, lora_B, row_scale, 2.0, seed, compute_dx, "triton"))


@requires_gpu
def test_gpu_peak_memory_within_lora_plus_one_percent():
    """Streamed fwd+bwd at M=8192 on a 4096x4096 bf16 layer: peak at most LoRA's + 1% (the target)."""
    M, N, K, r = 8192, 4096, 4096, 16
    weight, lora_A, lora_B, bias = _layer(N, K, r, dtype=torch.bfloat16)
    x = _randn(M, K, dtype=torch.bfloat16)

    def peak(fn):
        A, B = lora_A.clone().requires_grad_(True), lora_B.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(xr, A, B).float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    lora = peak(lambda xr, A, B: lora_linear(xr, weight, A, B, bias, scaling=2.0))
    with triton_backend.use_strategy("streamed"):
        ours = peak(
            lambda xr, A, B: flat_lora_linear(xr, weight, A, B, bias, scaling=2.0, sigma=0.05, seed=1, backend="triton")
        )
    assert ours <= 1.01 * lora, (ours / 2**20, lora / 2**20)


@requires_gpu
@pytest.mark.parametrize("M", [1, 64, 2048, 16384])
@pytest.mark.parametrize("N,K", [(4096, 4096), (11008, 4096)])
def test_gpu_real_sizes_bf16(M, N, K):
    """Every output and gradient at real sizes. Last of this file's GPU tests: the largest draw their inputs
    on the CPU for seconds, and gpu_check.sh's test stage has a time limit."""
    check_backend_against_reference("triton", M=M, N=N, K=K, r=16, dtype=torch.bfloat16, device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_strip_gemm_matches_four_strip_gemms(monkeypatch, dtype):
    """Streamed backward with K = 4*Kq and 3 counters per chunk: one strided-batched GEMM per chunk gives
    the four-GEMM loop's dx (every element written, within the reference bound)."""
    monkeypatch.setattr(triton_tuning, "CHUNK_BYTES", 3 * 4 * 45 * torch.finfo(dtype).bits // 8)
    monkeypatch.setattr(triton_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    problem = _fixed_problem(K=52, dtype=dtype)  # Kq = 13: chunks of 3 counters, the last one short
    with triton_backend.use_strategy("streamed"):
        loop = _run_protocol(*problem)
        monkeypatch.setattr(triton_tuning, "BATCHED_STRIP_GEMM", True)
        real_new_empty = torch.Tensor.new_empty

        def nan_new_empty(self, *args, **kwargs):  # dx starts as NaN: an element the GEMM misses shows up
            out = real_new_empty(self, *args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out

        with monkeypatch.context() as poisoned:
            poisoned.setattr(torch.Tensor, "new_empty", nan_new_empty)
            batched = _run_protocol(*problem)
        check_backend_against_reference("triton", M=23, N=45, K=52, r=3, dtype=dtype, device=DEVICE)
    assert not batched[2].isnan().any()
    torch.testing.assert_close(batched[2], loop[2], rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_weight_input_grad_flag(monkeypatch, dtype):
    """``WHOLE_WEIGHT_INPUT_GRAD_BYTES``: with W' within the limit, the streamed backward regenerates it
    once, whole, for one dx GEMM, where the chunk cap alone gives several counter chunks; outputs and
    every gradient match the reference; one byte under W's size, the chunks come back."""
    M, N, K, r = 23, 45, 52, 3  # Kq = 13: chunks of 3 counters without the flag
    element = torch.finfo(dtype).bits // 8
    monkeypatch.setattr(triton_tuning, "CHUNK_BYTES", 3 * 4 * N * element)
    monkeypatch.setattr(triton_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    regenerated = []
    real = triton_backend.regenerate_perturbed_weight

    def recording(out, *args, rows, counters, **kwargs):
        regenerated.append((rows, counters))
        return real(out, *args, rows=rows, counters=counters, **kwargs)

    monkeypatch.setattr(triton_backend, "regenerate_perturbed_weight", recording)
    backward_chunks = lambda: [counters for rows, counters in regenerated if rows == (0, N)]  # noqa: E731 (forward: row chunks)
    with triton_backend.use_strategy("streamed"):
        monkeypatch.setattr(triton_tuning, "WHOLE_WEIGHT_INPUT_GRAD_BYTES", N * K * element)
        check_backend_against_reference("triton", M=M, N=N, K=K, r=r, dtype=dtype, device=DEVICE)
        assert backward_chunks() == [(0, counters_per_row(K))]
        regenerated.clear()
        monkeypatch.setattr(triton_tuning, "WHOLE_WEIGHT_INPUT_GRAD_BYTES", N * K * element - 1)
        check_backend_against_reference("triton", M=M, N=N, K=K, r=r, dtype=dtype, device=DEVICE)
        assert backward_chunks() == [(c, min(c + 3, 13)) for c in range(0, 13, 3)]
