"""Regenerate a block of ``W' = deq(W) + s*B@A + eps`` from 4-bit codes into a buffer (streamed path).

``perturbed_weight.py``'s twin: the same chunk rectangles (rows x Philox counters, four column strips
per counter) and output strides, with each tile decoded from the packed codes in registers, so only
the chunk (in the compute dtype) is ever written; cuBLAS consumes it at once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .noise_tile import normal_quad_tile
from .quantized_tile import lowrank_operands, quantized_operands, quantized_perturbed_strip


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
    local_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    local_counters = tl.program_id(1) * BLOCK_COUNTERS + tl.arange(0, BLOCK_COUNTERS)
    rows = row_start + local_rows
    counters = counter_start + local_counters
    row_mask = rows < row_end
    counter_mask = counters < counter_end
    row_scales = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    block = (rows, counters, row_mask, counter_mask, row_scales, counters_per_row, in_features)
    z = normal_quad_tile(tl.load(seed_ptr), rows, counters, counters_per_row)
    out_rows_ptr = out_ptr + local_rows.to(tl.int64)[:, None] * stride_out_row
    for strip in tl.static_range(4):
        tile, _, column_mask = quantized_perturbed_strip(z[strip], strip, quant, layer, block, NESTED, WEIGHT_ROUND,
                                                         RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
        out_ptrs = out_rows_ptr + strip * stride_out_strip + local_counters[None, :]
        tl.store(out_ptrs, tile.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & column_mask[None, :])
