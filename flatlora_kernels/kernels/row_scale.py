"""Row scales of the filter-wise noise: ``sigma * ||W + s*B@A||_row / sqrt(K)`` in fp32.

Each program owns a block of rows and walks K in tiles of ``W + s*B_rows@A_tile`` (the merged
weight is never stored), summing squares in fp32. One read of ``W``: a memory-bound pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .weight_tile import merged_weight_tile


@triton.jit
def row_scale_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    sigma_ptr,
    out_ptr,
    out_features,
    in_features,
    rank,
    scaling,
    sqrt_in_features,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLUMNS: tl.constexpr,
    RANK_BLOCK: tl.constexpr,
    RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr,
    FACTOR_TF32: tl.constexpr,
):
    scaling = tl.cast(scaling, tl.float32)  # Inductor may pass Python floats as fp64
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < out_features
    sum_of_squares = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for column_start in range(0, in_features, BLOCK_COLUMNS):
        columns = column_start + tl.arange(0, BLOCK_COLUMNS)
        merged = merged_weight_tile(
            w_ptr, a_ptr, b_ptr, rows, columns, row_mask, columns < in_features, rank, scaling,
            stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
            RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32,
        )  # fmt: skip
        sum_of_squares += tl.sum(merged * merged, axis=1)
    sigma = tl.load(sigma_ptr).to(tl.float32)
    scale = sigma * tl.sqrt(sum_of_squares) / tl.cast(sqrt_in_features, tl.float32)
    tl.store(out_ptr + rows, scale, mask=row_mask)
