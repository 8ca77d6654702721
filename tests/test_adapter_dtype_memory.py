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
from flatlora_kernels.lora_forward import dropout_correction, lora_branch, with_adapter_dtype

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


@pytest.mark.parametrize("base", bench.BASES)
@pytest.mark.parametrize("config", list(bench.CONFIGS))
def test_fused_saves_no_more_than_peft_with_dropout(config, base):
    """With LoRA dropout the fused step keeps at most what PEFT's keeps too: the dropout correction is
    recomputed in the backward, so it keeps only ``x``, which the fused op keeps anyway (it kept the
    dropout scale and ``dropout(x) - x`` as well: 1.25-1.5x PEFT's bytes)."""
    if base == "nf4":
        pytest.importorskip("bitsandbytes")
    for depth, width, tokens in bench.QUICK_SHAPES:
        results = bench.measure(config, base, depth, width, tokens, peaks=False, lora_dropout=0.1)
        saved = {name: saved for name, (saved, _) in results.items()}
        assert saved["fused"] <= saved["peft"], (config, base, width, tokens, saved)


def _old_dropout_correction(x, dropout, lora_A, lora_B, scaling):
    """The correction as autograd ran it before the recomputation: the bits to match."""
    xa = x.to(lora_A.dtype)
    return lora_branch(dropout(xa) - xa, lora_A, lora_B, scaling)


def _base_weight(base, dtype, generator):
    """A dense [17, 64] weight, or the NF4 packing of one (the 4-bit op)."""
    weight = torch.randn(17, 64, generator=generator).to(dtype)
    if base == "dense":
        return weight
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    from flatlora_kernels.quantized import Packed4bit

    return Packed4bit.from_quant_state(*bnb_functional.quantize_4bit(weight, quant_type="nf4"))


@pytest.mark.parametrize("dtype,adapter_dtype,autocast", [
    (torch.bfloat16, torch.float32, False), (torch.bfloat16, torch.bfloat16, False), (torch.float16, torch.float32, False),
    (torch.float32, torch.float32, False), (torch.float32, torch.float32, True),
])  # fmt: skip
@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64), (1, 64)])
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_recomputed_dropout_correction_changes_no_bit(dtype, adapter_dtype, autocast, shape, base):
    """The output, every gradient and the RNG state after the step are those of the correction that
    autograd kept: the same mask (RNG state restored) and the same ops on the same values, over the
    dense and the 4-bit op, under autocast too."""
    results = []
    for correction in (_old_dropout_correction, dropout_correction):
        g = torch.Generator().manual_seed(0)
        weight = _base_weight(base, dtype, g)
        x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
        lora_A = (torch.randn(4, 64, generator=g) * 0.3).to(adapter_dtype).requires_grad_()
        lora_B = (torch.randn(17, 4, generator=g) * 0.3).to(adapter_dtype).requires_grad_()
        dropout = torch.nn.Dropout(0.3)
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = with_adapter_dtype(lambda A, B: flat_lora_linear(x, weight, A, B, scaling=1.7, sigma=0.1, seed=3),
                                   x, lora_A, lora_B, 1.7)  # fmt: skip
            branch = correction(x, dropout, lora_A, lora_B, 1.7)
            y = y + branch.to(y.dtype)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(y.dtype))
        results.append((y, x.grad, lora_A.grad, lora_B.grad, torch.rand(3)))
        assert branch.abs().sum() > 0  # some elements dropped: the correction is in play
    for got, want in zip(*reversed(results)):
        assert got.dtype == want.dtype and torch.equal(got, want)
