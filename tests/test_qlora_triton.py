"""Flat-QLoRA's Triton kernels (decoding 4-bit tiles) in both strategies, against the dense reference on
deq(W): in Triton's interpreter on CPU (fp32 and fp16 compute; the interpreter's bf16 dot is wrong), on
CUDA where there is one."""

from __future__ import annotations

import os

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)

from flatlora_kernels import flat_lora_linear  # noqa: E402
from flatlora_kernels.backends import triton_backend  # noqa: E402
from flatlora_kernels.backends import triton_quantized  # noqa: E402
from flatlora_kernels.noise import perturbation_row_scale  # noqa: E402
from flatlora_kernels.quantized import Packed4bit, dequantize, flat_qlora_linear  # noqa: E402

pytestmark = pytest.mark.interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NOISE = dict(scaling=0.5, sigma=0.1, seed=31)


def _layer(n, k, *, dtype, quant_type, blocksize, nested, r=4):
    torch.manual_seed(0)
    codes, state = bnb_functional.quantize_4bit(torch.randn(n, k, dtype=dtype), blocksize=blocksize,
                                                quant_type=quant_type, compress_statistics=nested)
    packed = Packed4bit.from_quant_state(codes, state)
    lora_A, lora_B, bias = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1, torch.randn(n)
    return packed, lora_A, lora_B, bias


def _grads(fn, x, weight, lora_A, lora_B, bias, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B, bias)]
    y = fn(leaves[0], weight, leaves[1], leaves[2], leaves[3], backend=backend, **NOISE)
    y.float().square().sum().backward()
    return [y.detach().float()] + [t.grad.float() for t in leaves]


CASES = [  # n, k, weight dtype, quant type, blocksize, double quantization
    (24, 128, torch.float32, "nf4", 64, True),
    (13, 67, torch.bfloat16, "fp4", 32, False),  # odd K, blocks straddling rows, bf16 rounding of deq(W)
]


@pytest.mark.parametrize("strategy,m", [("in_register", 5), ("streamed", 40)])
@pytest.mark.parametrize("compute_dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 4e-3)])
@pytest.mark.parametrize("n,k,dtype,quant_type,blocksize,nested", CASES)
def test_triton_matches_dense_reference(strategy, m, compute_dtype, rtol, n, k, dtype, quant_type, blocksize, nested):
    packed, lora_A, lora_B, bias = _layer(n, k, dtype=dtype, quant_type=quant_type, blocksize=blocksize, nested=nested)
    dense = dequantize(*packed.op_args())
    x = torch.randn(m, k).to(compute_dtype)
    with triton_backend.use_strategy(strategy):
        got = _grads(flat_qlora_linear, x, packed, lora_A, lora_B, bias, "triton")
    want = _grads(flat_lora_linear, x, dense, lora_A, lora_B, bias, "reference")
    for name, g, w in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
        assert (g - w).abs().max().item() <= rtol * w.abs().max().item(), name


def test_triton_row_scales_and_chunk_equal_the_dense_definition():
    """Row scales from decoded tiles, and a streamed chunk of W' at sigma = 0, against deq(W) + s*B@A."""
    packed, lora_A, lora_B, _ = _layer(16, 96, dtype=torch.bfloat16, quant_type="nf4", blocksize=64, nested=True)
    dense = dequantize(*packed.op_args())
    args = (*packed.op_args()[:8], lora_A, lora_B, 0.5)
    layer = triton_quantized.Layer4bit(*packed.op_args(), lora_A, lora_B, 0.5)
    sigma = torch.tensor(0.2)
    scale = triton_quantized.row_scale(layer, sigma, torch.float32)
    want = perturbation_row_scale(dense, lora_A, lora_B, scaling=0.5, sigma=sigma)
    torch.testing.assert_close(scale, want, rtol=1e-6, atol=0)
    chunk = triton_quantized.perturbed_weight_rows(layer, torch.zeros(16), torch.tensor(3), 4, 12, torch.float32)
    torch.testing.assert_close(chunk, (dense.float() + 0.5 * lora_B @ lora_A)[4:12], rtol=1e-6, atol=1e-6)
    assert len(args) == 11
