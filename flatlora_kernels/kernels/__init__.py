"""Triton kernels of Flat-LoRA, one idea per file; read top-down:

* ``noise_tile``: the z tile, the one Triton implementation of the noise stream (row-quarter layout).
* ``dot_precision``: dot products whose operand precision is a compile-time choice.
* ``weight_tile``: fp32 tiles of ``W + s*B@A`` and ``W + s*B@A + eps``, never forming ``B@A`` whole.
* ``quantized_tile``: the same tiles decoded from bitsandbytes 4-bit codes.
* ``weight_source``: the base weight (dense or 4-bit) as a compile-time choice, so each kernel body
  below is written once; the ``quantized_*`` kernels are its 4-bit entry points.
* ``row_scale``: the per-row noise scales ``sigma * ||W + s*B@A||_row / sqrt(K)``.
* ``perturbed_weight``: regenerate a bounded chunk of ``W'`` for cuBLAS (the streamed path, large M).
* ``fused_matmul``: GEMMs that build ``W'`` tiles in registers (the in-register path, small M).

Launchers and the choice between the two paths live in ``flatlora_kernels.backends.triton_backend``.
"""

from .dot_precision import dot_accumulate
from .fused_matmul import fused_forward_kernel, fused_input_grad_kernel
from .noise_tile import normal_quad_tile, normal_rows_kernel, philox_offsets, philox_words_kernel, replace_strip, strip_columns
from .perturbed_weight import perturbed_weight_kernel
from .row_scale import row_scale_kernel
from .weight_tile import (
    load_tile,
    lowrank_tile,
    merged_weight_tile,
    perturbed_weight_strip,
    program_range,
    weight_operands,
)

__all__ = [
    "dot_accumulate",
    "fused_forward_kernel",
    "fused_input_grad_kernel",
    "load_tile",
    "lowrank_tile",
    "merged_weight_tile",
    "normal_quad_tile",
    "normal_rows_kernel",
    "perturbed_weight_kernel",
    "perturbed_weight_strip",
    "philox_offsets",
    "philox_words_kernel",
    "program_range",
    "replace_strip",
    "row_scale_kernel",
    "strip_columns",
    "weight_operands",
]
