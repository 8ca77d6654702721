"""Row scales of a 4-bit layer: ``sigma * ||deq(W) + s*B@A||_row / sqrt(K)`` in fp32 (``row_scale.py``'s twin).

Each program owns a block of rows and walks K in decoded tiles (``quantized_tile.py``); nothing is stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quantized_tile import lowrank_operands, quantized_merged_tile, quantized_operands
from .weight_tile import program_range


@triton.jit
def quantized_row_scale_kernel(
    codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift, nested_block_shift, nested_offset,
    a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br,
    sigma_ptr, out_ptr, out_features, in_features, sqrt_in_features,
    NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
):  # fmt: skip
    """Grid: ``(cdiv(N, BLOCK_ROWS),)``; the first sixteen arguments are the weight and the factors."""
    quant = quantized_operands(codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift,
                               nested_block_shift, nested_offset, in_features)  # fmt: skip
    layer = lowrank_operands(a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br)
    rows, row_mask = program_range(0, BLOCK_ROWS, out_features)
    sum_of_squares = tl.zeros((BLOCK_ROWS,), dtype=tl.float32)
    for column_start in range(0, in_features, BLOCK_COLUMNS):
        columns = column_start + tl.arange(0, BLOCK_COLUMNS)
        merged = quantized_merged_tile(quant, layer, rows, columns, row_mask, columns < in_features, NESTED,
                                       WEIGHT_ROUND, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
        sum_of_squares += tl.sum(merged * merged, axis=1)
    sigma = tl.load(sigma_ptr).to(tl.float32)
    # Correctly rounded, as row_scale.py: on sm_90 ``tl.sqrt`` and ``/`` compile to sqrt.approx / div.full.
    scale = tl.div_rn(sigma * tl.sqrt_rn(sum_of_squares), tl.cast(sqrt_in_features, tl.float32))
    tl.store(out_ptr + rows, scale, mask=row_mask)
