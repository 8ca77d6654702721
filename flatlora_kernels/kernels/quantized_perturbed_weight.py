"""Regenerate a block of ``W' = deq(W) + s*B@A + eps`` from 4-bit codes into a buffer (streamed path).

``perturbed_weight.py``'s program: the same chunk rectangles (rows x Philox counters, four column strips
per counter) and output strides, with each tile decoded from the packed codes in registers, so only
the chunk (in the compute dtype) is ever written; cuBLAS consumes it at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .perturbed_weight import perturbed_weight_program
from .quantized_tile import lowrank_operands, quantized_operands


@triton.jit(do_not_specialize=["row_start", "row_end"])
def quantized_perturbed_weight_kernel(
    codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift, nested_block_shift, nested_offset,
    a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br,
    row_scale_ptr, seed_ptr, out_ptr, row_start, row_end, counter_start, counter_end,
    in_features, counters_per_row, stride_out_row, stride_out_strip,
    NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
):  # fmt: skip
    """Grid: ``(cdiv(row_end - row_start, BLOCK_ROWS), cdiv(counter_end - counter_start, BLOCK_COUNTERS))``."""
    quant = quantized_operands(codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift,
                               nested_block_shift, nested_offset, in_features)  # fmt: skip
    layer = lowrank_operands(a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br)
    perturbed_weight_program(quant, layer, row_scale_ptr, seed_ptr, out_ptr, row_start, row_end, counter_start,
                             counter_end, in_features, counters_per_row, stride_out_row, stride_out_strip, True, NESTED,
                             WEIGHT_ROUND, BLOCK_ROWS, BLOCK_COUNTERS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32,
                             FACTOR_TF32)  # fmt: skip
