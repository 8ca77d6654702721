"""The quantized ops' reference backend: ``deq(W)`` formed whole, then the dense reference backend.

By construction a 4-bit layer here gets exactly what the same layer dequantized gets from
``flatlora_kernels.backends.torch_reference`` (same row norms of ``deq(W) + s*B@A``, same eps). It
materialises ``deq(W)`` and the perturbed weight for the length of one pass (tests, debugging).

Backend protocol (also ``quantized/cpp_backend.py`` and ``backends/triton_quantized.py``):
``forward(x, *weight_args, lora_A, lora_B, bias, scaling, sigma, seed) -> (y, row_scale)`` and
``backward(dy, x, *weight_args, lora_A, lora_B, row_scale, scaling, seed, compute_dx) -> (dx, dA, dB)``,
``weight_args`` being ``Packed4bit.op_args()``; otherwise as ``flatlora_kernels.backends``.
"""

from __future__ import annotations

from ..backends import torch_reference
from .layout import dequantize


def forward(x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
            weight_dtype, out_features, in_features, lora_A, lora_B, bias, scaling, sigma, seed):
    weight = dequantize(codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
                        nested_offset, weight_dtype, out_features, in_features)
    return torch_reference.forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed)


def backward(dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
             nested_offset, weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, scaling, seed,
             compute_dx):
    weight = dequantize(codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
                        nested_offset, weight_dtype, out_features, in_features)
    return torch_reference.backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx)
