"""The quantized ops' C++ CPU backend: wrappers over ``flatlora_kernels._C.forward_4bit`` / ``backward_4bit``
(``csrc/quantized_*.cpp``).

Chunks of ``deq(W) + s*B@A + eps`` are decoded from the packed codes straight into the GEMM's chunk
buffer; the chunking and its tuning are the dense C++ backend's (``backends/cpp.py`` and
``cpu_tuning.py``, read at call time), so a 4-bit layer's chunks equal that backend's chunks of
``deq(W)`` bit for bit (under the same caps; a 4-bit layer's chunk may also grow to half of ``deq(W)``,
``cpu_tuning.DEQUANTIZED_4BIT_FRACTION``).
"""

from __future__ import annotations

import torch

from ..backends import cpp as dense_cpp
from ..backends import cpu_tuning

_C = dense_cpp._C


def _cap(x, output_elements: int, out_features: int, in_features: int) -> int:
    """The chunk byte cap: the dense backend's (``cpp.chunk_cap``: at most half the pass's output, in the
    chunk's dtype), or ``cpu_tuning.DEQUANTIZED_4BIT_FRACTION`` of ``deq(W)`` when that is larger (PEFT
    QLoRA holds all of ``deq(W)`` in each pass)."""
    cap = dense_cpp.chunk_cap(output_elements, dense_cpp.chunk_element_size(x), in_features)
    fraction = cpu_tuning.DEQUANTIZED_4BIT_FRACTION
    if fraction is not None:
        cap = max(cap, int(fraction * out_features * in_features * dense_cpp.chunk_element_size(x)))
    return cap


def release_chunk_workspace() -> None:
    """Free this thread's reused 4-bit chunk buffer (call before a memory measurement)."""
    _C.release_4bit_chunk_workspace()


def forward(x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
            weight_dtype, out_features, in_features, lora_A, lora_B, bias, scaling, sigma, seed):
    cap = _cap(x, x.shape[0] * out_features, out_features, in_features)
    return _C.forward_4bit(
        x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, float(nested_offset),
        weight_dtype, out_features, in_features, lora_A, lora_B, bias, float(scaling), sigma, seed, cap,
        cpu_tuning.PARALLEL_GRAIN_ELEMENTS, cpu_tuning.WORKSPACE_BYTES,
    )


def backward(dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
             nested_offset, weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, scaling, seed,
             compute_dx):
    cap = _cap(x, x.shape[0] * in_features, out_features, in_features)
    fold_lora = dense_cpp.fold_lora(x.shape[0], out_features, x.dtype)
    return _C.backward_4bit(
        dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
        float(nested_offset), weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, float(scaling), seed,
        bool(compute_dx), fold_lora, cap, cpu_tuning.PARALLEL_GRAIN_ELEMENTS, cpu_tuning.WORKSPACE_BYTES,
    )
