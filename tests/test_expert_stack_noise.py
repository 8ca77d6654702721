"""An expert stack's eps (``flatlora_kernels.noise``, "Expert stacks") from each generator against the
plain-PyTorch definition (``expert_filter_noise``): the C++ one, the Triton z tile (on CUDA, or in the
interpreter: conftest.py sets ``TRITON_INTERPRET=1`` without a GPU) and the reference; both stored
layouts, odd shapes, fp32/bf16/fp16/fp64; the result does not depend on the chunk size."""

from __future__ import annotations

import os

import pytest
import torch

from flatlora_kernels.experts import ExpertLayout, add_stack_noise_
from flatlora_kernels.backends import cpu_tuning
from flatlora_kernels.noise import expert_filter_noise, normal_rows

from .conftest import HAS_CUDA

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
E, N, K, R, SCALING = 3, 7, 13, 2, 1.5  # K not a multiple of 4: the row-quarter layout's ragged last strip


def make_stack(transposed: bool, dtype: torch.dtype, device="cpu", seed=0):
    """A stored stack, its out x in view, and per-expert factors (fp32, as PEFT keeps adapters)."""
    g = torch.Generator().manual_seed(seed)
    stored = torch.randn((E, K, N) if transposed else (E, N, K), generator=g).to(dtype).to(device)
    layout = ExpertLayout(E, N, K, transposed)
    lora_A = (torch.randn(E, R, K, generator=g) * 0.3).to(device)
    lora_B = (torch.randn(E, N, R, generator=g) * 0.3).to(device)
    return stored, layout, lora_A, lora_B


def noisy(stored, layout, lora_A, lora_B, sigma, seed, backend):
    """``W + s*B@A`` in W's dtype and stored layout, then the stack's eps added in place."""
    merged = (layout.out_in(stored).float() + SCALING * torch.bmm(lora_B, lora_A)).to(stored.dtype)
    merged = merged.transpose(1, 2).contiguous() if layout.transposed else merged  # stored layout again
    before = layout.out_in(merged).clone()
    add_stack_noise_(
        layout.out_in(merged), layout.out_in(stored), lora_A, lora_B, scaling=SCALING,
        sigma=torch.tensor(sigma, device=stored.device), seed=torch.tensor(seed, device=stored.device),
        backend=backend,
    )  # fmt: skip
    return before, layout.out_in(merged)


BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.skipif(
    not (INTERPRETING or HAS_CUDA), reason="needs a CUDA device or TRITON_INTERPRET=1"))]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_stack_noise_is_the_definition(monkeypatch, backend, transposed, dtype):
    monkeypatch.setattr(cpu_tuning, "CHUNK_BYTES", 3 * K * 4)  # chunks of 3 rows: stream rows past expert 0's
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    stored, layout, lora_A, lora_B = make_stack(transposed, dtype, device)
    before, after = noisy(stored, layout, lora_A, lora_B, 0.3, 2**40 + 5, backend)
    eps = expert_filter_noise(layout.out_in(stored), lora_A, lora_B, scaling=SCALING, sigma=0.3, seed=2**40 + 5)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    want = (before.to(wide) + eps.to(wide)).to(dtype)  # eps (fp32) added and rounded once to the stack's dtype
    ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(after.to(wide), want.to(wide), rtol=ulp, atol=ulp)
    assert not torch.equal(after, before)


def test_each_expert_and_row_draws_its_own_stream_rows():
    stored, layout, lora_A, lora_B = make_stack(False, torch.float32)
    stored[1] = stored[0]  # two identical experts with identical factors still get different noise
    lora_A[1], lora_B[1] = lora_A[0], lora_B[0]
    eps = expert_filter_noise(stored, lora_A, lora_B, scaling=SCALING, sigma=1.0, seed=9)
    assert not torch.allclose(eps[0], eps[1])
    z = normal_rows(9, K, 0, E * N).view(E, N, K)
    torch.testing.assert_close(eps / eps.norm(dim=2, keepdim=True), z / z.norm(dim=2, keepdim=True))


@pytest.mark.parametrize("cap_rows", [1, 3, N, 2 * N])  # rows of one expert, one expert, several experts
def test_stack_noise_does_not_depend_on_the_chunk(monkeypatch, cap_rows):
    stored, layout, lora_A, lora_B = make_stack(True, torch.bfloat16)
    _, whole = noisy(stored, layout, lora_A, lora_B, 0.2, 11, "cpp")
    monkeypatch.setattr(cpu_tuning, "CHUNK_BYTES", cap_rows * K * 4)
    _, chunked = noisy(stored, layout, lora_A, lora_B, 0.2, 11, "cpp")
    assert torch.equal(whole, chunked)


def test_sigma_zero_leaves_the_merged_stack_bit_identical():
    stored, layout, lora_A, lora_B = make_stack(False, torch.bfloat16)
    before, after = noisy(stored, layout, lora_A, lora_B, 0.0, 3, "cpp")
    assert torch.equal(before, after)
