"""GPU-readiness fixes checked in Triton's interpreter: the stream's counter words, strided bias.

Each test here failed before its fix (see the git log) and needs no GPU.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pathlib

import numpy
import pytest
import torch

from flatlora_kernels import noise
from flatlora_kernels.baselines import dense_perturbed_weight

from .conftest import HAS_CUDA, make_layer

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRETING or HAS_CUDA):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)

from flatlora_kernels.backends import triton_backend, triton_tuning  # noqa: E402
from flatlora_kernels.kernels.noise_tile import MAX_ULPS_FROM_DEFINITION  # noqa: E402

DEVICE = "cpu" if INTERPRETING else "cuda"


@pytest.mark.parametrize("seed", [0, 123456789, -(2**62) - 7, 2**63 - 1])
def test_counter_words_match_noise_py_past_2_pow_32(seed):
    """Offsets whose high word is non-zero (row * Kq >= 2**32) give noise.py's integers, bit for bit."""
    offsets = torch.tensor(
        [0, 1, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**32 + 17, 2**40 + 3, 2**62 + 11], dtype=torch.int64, device=DEVICE
    )
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    expected = torch.stack(noise.philox4x32_10(seed_t.cpu(), offsets.cpu()), dim=1) & 0xFFFFFFFF
    assert torch.equal(triton_backend.philox_words(seed_t, offsets).cpu(), expected)


def test_normals_of_rows_past_2_pow_32_match_reference():
    """Whole normals from the Triton z tile at rows whose offsets pass 2**32 (K = 9, Kq = 3)."""
    K, row_start = 9, 2**31 + 3  # row_start * Kq > 2**32
    seed = torch.tensor(77, dtype=torch.int64, device=DEVICE)
    got = triton_backend.normal_rows(seed, K, row_start, row_start + 3)
    expected = noise.normal_rows(77, K, row_start, row_start + 3)
    assert_normals_within_ulp_bound(got, expected)


def assert_normals_within_ulp_bound(got, expected):
    """Normals of the z tile vs ``noise.py``'s, in ulps of the definition's fp32 values (an absolute
    tolerance would be loose near 0 and tight near 5); the bound: ``noise_tile.MAX_ULPS_FROM_DEFINITION``."""
    assert got.dtype == expected.dtype == torch.float32 and got.shape == expected.shape
    numpy.testing.assert_array_max_ulp(got.cpu().numpy(), expected.cpu().numpy(), maxulp=MAX_ULPS_FROM_DEFINITION)


def test_ulp_bound_rejects_a_normal_off_by_more():
    """The check above fails for one normal moved past the bound (and passes at the bound)."""
    expected = noise.normal_rows(5, 40, 0, 3)
    moved = expected.clone()
    for _ in range(MAX_ULPS_FROM_DEFINITION):
        moved[1, 7] = torch.nextafter(moved[1, 7], torch.tensor(10.0))
    assert_normals_within_ulp_bound(moved, expected)
    moved[1, 7] = torch.nextafter(moved[1, 7], torch.tensor(10.0))
    with pytest.raises(AssertionError):
        assert_normals_within_ulp_bound(moved, expected)


@pytest.mark.parametrize("strategy", ["streamed", "in_register"])
def test_strided_bias(strategy):
    """A non-contiguous bias view (``b[::2]``) adds the right entries on both paths."""
    weight, lora_A, lora_B, _ = (t.to(DEVICE) for t in make_layer(20, 24, 4))
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    wide = torch.arange(40, dtype=torch.float32, device=DEVICE) * 0.25
    bias = wide[::2]
    sigma = torch.tensor(0.0, device=DEVICE)
    seed = torch.tensor(3, dtype=torch.int64, device=DEVICE)
    with triton_backend.use_strategy(strategy):
        y, _ = triton_backend.forward(x, weight, lora_A, lora_B, bias, 2.0, sigma, seed)
    expected = x @ dense_perturbed_weight(weight, lora_A, lora_B, scaling=2.0, sigma=0.0, seed=3).t() + bias
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


def test_auto_rule_keeps_each_pass_within_one_token_tile(monkeypatch):
    """With the GPU tile tables, fp32 (token tile 16) streams from M=17; 16-bit stays fused to M=64."""
    monkeypatch.delenv(triton_backend.STRATEGY_ENV, raising=False)
    monkeypatch.setattr(triton_backend, "INTERPRETING", False)
    for kernel in ("fused_forward", "fused_input_grad"):
        fp32_cap = triton_tuning.GPU_TILES[f"{kernel}_fp32"]["MAX_BLOCK_TOKENS"]
        assert triton_backend.choose_strategy(fp32_cap, torch.float32, kernel) == "in_register"
        assert triton_backend.choose_strategy(fp32_cap + 1, torch.float32, kernel) == "streamed"
        assert triton_backend.choose_strategy(64, torch.bfloat16, kernel) == "in_register"
        assert triton_backend.choose_strategy(65, torch.bfloat16, kernel) == "streamed"
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            limit = triton_backend.in_register_max_tokens(dtype, kernel)
            assert limit <= triton_tuning.GPU_TILES[kernel if dtype != torch.float32 else f"{kernel}_fp32"][
                "MAX_BLOCK_TOKENS"
            ]


def gpu_kernels_module():
    """benchmarks/gpu_kernels.py (a standalone script, not a package module), imported by path: a fresh
    module object on each call (tests/test_gpu_script_dry_run.py patches its attributes)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_stream_self_check_passes_here():
    """The first stage of scripts/gpu_check.sh, run in the interpreter: every check reports ok."""
    module = gpu_kernels_module()
    checks = module.stream_self_check(device=DEVICE)
    assert len(checks) == 4 and all(c["ok"] for c in checks), checks


def test_resource_report_records_every_launch_with_full_signatures():
    """``gpu_kernels.py --resources`` compiles what the launchers pass: every recorded kernel call binds
    each kernel parameter exactly once (positional + constexpr keywords), for 16-bit and fp32 layers."""
    module = gpu_kernels_module()
    for dtypes, rank in (((torch.bfloat16, torch.bfloat16, torch.float32), 70), ((torch.float32,) * 3, 16)):
        launches = module.recorded_launches(*dtypes, rank=rank, shape=(40, 96), token_counts=(16,))
        assert [label for label, *_ in launches] == [
            "row_scale", "perturbed_weight", "perturbed_weight dx chunk", "fused_forward M=16", "fused_input_grad M=16",
            "normal_rows",
        ]  # fmt: skip
        for label, kernel, args, kwargs in launches:
            options = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            bound = inspect.signature(kernel.fn).bind(*args, **options)  # raises on a missing/extra argument
            assert len(bound.arguments) == len(inspect.signature(kernel.fn).parameters), label
