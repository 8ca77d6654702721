"""Row scales of the filter-wise noise: ``sigma * ||W + s*B@A||_row / sqrt(K)`` in fp32.

Each program owns a block of rows and walks K in tiles of ``W + s*B_rows@A_tile`` (the merged
weight is never stored), summing squares in fp32. One read of ``W``: a memory-bound pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .weight_source import source_merged_tile
from .weight_tile import program_range, weight_operands


@triton.jit
def row_scale_kernel(
    w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    sigma_ptr, out_ptr, out_features, in_features, sqrt_in_features,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
):  # fmt: skip
    """Grid: ``(cdiv(N, BLOCK_ROWS),)``; the first eleven arguments are the layer (``weight_operands``)."""
    layer = weight_operands(w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br)
    row_scale_program(layer, layer, sigma_ptr, out_ptr, out_features, in_features, sqrt_in_features, False, False, 0,
                      BLOCK_ROWS, BLOCK_COLUMNS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip


@triton.jit
def row_scale_program(quant, layer, sigma_ptr, out_ptr, out_features, in_features, sqrt_in_features,
                      QUANTIZED: tl.constexpr, NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr,
                      BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr, RANK_BLOCK: tl.constexpr,
                      RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """One program of a row-scale kernel, dense or 4-bit (``weight_source``)."""
    rows, row_mask = program_range(0, BLOCK_ROWS, out_features)
    sum_of_squares = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for column_start in range(0, in_features, BLOCK_COLUMNS):
        columns = column_start + tl.arange(0, BLOCK_COLUMNS)
        merged = source_merged_tile(quant, layer, rows, columns, row_mask, columns < in_features, QUANTIZED, NESTED,
                                    WEIGHT_ROUND, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
        sum_of_squares += tl.sum(merged * merged, axis=1)
    sigma = tl.load(sigma_ptr).to(tl.float32)
    # Correctly rounded sqrt and division: on sm_90 ``tl.sqrt`` and ``/`` compile to approximate forms
    # (sqrt.approx, div.full) that the interpreter's numpy does not show.
    scale = tl.div_rn(sigma * tl.sqrt_rn(sum_of_squares), tl.cast(sqrt_in_features, tl.float32))
    tl.store(out_ptr + rows, scale, mask=row_mask)
