"""Row scales of a 4-bit layer: ``sigma * ||deq(W) + s*B@A||_row / sqrt(K)`` in fp32 (``row_scale.py``'s program).

Each program owns a block of rows and walks K in decoded tiles (``quantized_tile.py``); nothing is stored.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quantized_tile import lowrank_operands, quantized_operands
from .row_scale import row_scale_program


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
    row_scale_program(quant, layer, sigma_ptr, out_ptr, out_features, in_features, sqrt_in_features, True, NESTED,
                      WEIGHT_ROUND, BLOCK_ROWS, BLOCK_COLUMNS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
