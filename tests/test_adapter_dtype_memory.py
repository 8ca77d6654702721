"""What a training step keeps for backward in PEFT's dtype configurations, and the adapter gradients'
bits: fp32 adapters on a 16-bit base get their gradients from ``lora_forward.AdapterGradients``, which
saves ``x`` in its own dtype (the tensor the fused op saves) instead of autograd's fp32 copy of it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from flatlora_kernels import flat_lora_linear
from flatlora_kernels.memory import SavedTensorBytes
from flatlora_kernels.lora_forward import lora_branch, with_adapter_dtype

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
pytest.importorskip("peft")

_BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"


def _load_benchmark():
    sys.path.insert(0, str(_BENCH_DIR))  # it imports its sibling qlora_target in main() only
    path = _BENCH_DIR / "adapter_dtype_memory.py"
    spec = importlib.util.spec_from_file_location("flatlora_adapter_dtype_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _autograd_branch_formula(fused_op, x, lora_A, lora_B, scaling):
    """The factor gradients by autograd through the adapter-dtype branch (what ``with_adapter_dtype``
    did before ``AdapterGradients``): the bits to match."""
    y = fused_op(lora_A.detach(), lora_B.detach())
    branch = lora_branch(x.detach(), lora_A, lora_B, scaling)
    return y + (branch - branch.detach()).to(y.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,r", [((7, 24), 4), ((2, 5, 24), 4), ((1, 24), 1), ((3, 1, 24), 1), ((1, 24), 3)])
def test_adapter_gradients_match_autograd_bit_for_bit(dtype, shape, r):
    weight = torch.randn(17, 24, generator=torch.Generator().manual_seed(r)).to(dtype)
    results = []
    for combine in (_autograd_branch_formula, with_adapter_dtype):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
        lora_A = (torch.randn(r, 24, generator=torch.Generator().manual_seed(4)) * 0.3).requires_grad_()
        lora_B = (torch.randn(17, r, generator=torch.Generator().manual_seed(5)) * 0.3).requires_grad_()
        saved = SavedTensorBytes(also_held=(weight, lora_A, lora_B))
        with saved:
            y = combine(lambda A, B: flat_lora_linear(x, weight, A, B, scaling=1.7, sigma=0.1, seed=3),
                        x, lora_A, lora_B, 1.7)  # fmt: skip
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(dtype))
        results.append((saved.tensors, y, x.grad, lora_A.grad, lora_B.grad))
    (old_saved, *old), (new_saved, *new) = results
    for got, want in zip(new, old):
        assert got.dtype == want.dtype and torch.equal(got, want)
    x_numel = torch.Size(shape).numel()

    def fp32_copies_of_x(saved):
        return sum(dtype_ == torch.float32 and torch.Size(s).numel() == x_numel and s[-1] == 24 for dtype_, s in saved)

    assert fp32_copies_of_x(old_saved) == 1 and fp32_copies_of_x(new_saved) == 0, (old_saved, new_saved)


def test_adapter_gradients_only_for_factors_that_need_them():
    x = torch.randn(5, 8).to(torch.bfloat16)
    weight = torch.randn(6, 8).to(torch.bfloat16)
    lora_A, lora_B = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2)
    y = with_adapter_dtype(lambda A, B: flat_lora_linear(x, weight, A, B, scaling=1.0, sigma=0.0, seed=0),
                           x, lora_A, lora_B, 1.0)  # fmt: skip
    y.float().sum().backward()
    assert lora_A.grad is not None and lora_A.grad.dtype == torch.float32 and lora_B.grad is None


@pytest.mark.parametrize("base", bench.BASES)
@pytest.mark.parametrize("config", list(bench.CONFIGS))
def test_fused_saves_no_more_than_peft(config, base):
    """In every dtype configuration and both bases, the fused step keeps at most what PEFT's keeps
    (deterministic: saved-tensor bytes, each storage once); with PEFT's default fp32 adapters on a
    bf16 base, less (no fp32 copy of x); naive keeps more than either."""
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    for depth, width, tokens in bench.QUICK_SHAPES:
        results = bench.measure(config, base, depth, width, tokens, peaks=False)
        saved = {name: saved for name, (saved, _) in results.items()}
        assert saved["fused"] <= saved["peft"], (config, base, width, tokens, saved)
        if config == "bf16 base, fp32 adapters":
            assert saved["fused"] < saved["peft"], saved
        assert saved["naive"] > saved["fused"], saved
