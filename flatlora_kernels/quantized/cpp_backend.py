"""The quantized ops' C++ CPU backend: wrappers over ``flatlora_kernels._C.forward_4bit`` / ``backward_4bit``
(``csrc/quantized_*.cpp``).

Chunks of ``deq(W) + s*B@A + eps`` are decoded from the packed codes straight into the GEMM's chunk
buffer; the chunking and its tuning are the dense C++ backend's (``backends/cpp.py`` and
``cpu_tuning.py``, read at call time), so a 4-bit layer's chunks equal that backend's chunks of
``deq(W)`` bit for bit.
"""

from __future__ import annotations

from ..backends import cpp as dense_cpp

_C = dense_cpp._C


def _cap(output_elements: int, element_size: int) -> int:
    """The chunk byte cap: the dense backend's settings (it may grow to the pass's output size)."""
    if dense_cpp.chunk_grows_to_output:
        return max(dense_cpp.chunk_bytes, output_elements * element_size)
    return dense_cpp.chunk_bytes


def release_chunk_workspace() -> None:
    """Free this thread's reused 4-bit chunk buffer (call before a memory measurement)."""
    _C.release_4bit_chunk_workspace()


def forward(x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
            weight_dtype, out_features, in_features, lora_A, lora_B, bias, scaling, sigma, seed):
    cap = _cap(x.shape[0] * out_features, x.element_size())
    return _C.forward_4bit(
        x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, float(nested_offset),
        weight_dtype, out_features, in_features, lora_A, lora_B, bias, float(scaling), sigma, seed, cap,
        dense_cpp.parallel_grain, dense_cpp.workspace_bytes,
    )


def backward(dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
             nested_offset, weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, scaling, seed,
             compute_dx):
    cap = _cap(x.shape[0] * in_features, x.element_size())
    ratio = dense_cpp.backward_fold_min_tokens_per_output.get(str(x.dtype).removeprefix("torch."), 0.0)
    fold_lora = x.shape[0] >= ratio * out_features
    return _C.backward_4bit(
        dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
        float(nested_offset), weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, float(scaling), seed,
        bool(compute_dx), fold_lora, cap, dense_cpp.parallel_grain, dense_cpp.workspace_bytes,
    )
