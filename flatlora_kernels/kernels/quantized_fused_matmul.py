"""In-register path of a 4-bit layer: GEMMs that decode and perturb each ``W'`` tile inside their K loop.

``fused_matmul.py``'s programs (same grids, splits, strip walk and rounding of ``W'`` to the compute dtype
before its dot), with ``W'`` tiles from ``quantized_tile.quantized_perturbed_strip``: the 4-bit codes
are the only weight bytes read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_matmul import fused_forward_program, fused_input_grad_program
from .quantized_tile import lowrank_operands, quantized_operands


@triton.jit(do_not_specialize=["n_tokens"])
def quantized_fused_forward_kernel(
    codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift, nested_block_shift, nested_offset,
    a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br,
    x_ptr, row_scale_ptr, seed_ptr, bias_ptr, y_ptr,
    n_tokens, out_features, in_features, counters_per_row, counters_per_split,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr, DOTS_IN_FP32: tl.constexpr,
):  # fmt: skip
    """``y = x @ W'^T (+ bias)``. Grid: ``(cdiv(M, BLOCK_TOKENS), cdiv(N, BLOCK_OUT), cdiv(Kq, counters_per_split))``."""
    quant = quantized_operands(codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift,
                               nested_block_shift, nested_offset, in_features)  # fmt: skip
    layer = lowrank_operands(a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br)
    fused_forward_program(
        quant, layer, x_ptr, row_scale_ptr, seed_ptr, bias_ptr, y_ptr, n_tokens, out_features, in_features,
        counters_per_row, counters_per_split, stride_xm, stride_xk, stride_ys, stride_ym, stride_yn, True, NESTED,
        WEIGHT_ROUND, HAS_BIAS, BLOCK_TOKENS, BLOCK_OUT, BLOCK_COUNTERS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32,
        FACTOR_TF32, DOT_TF32, DOTS_IN_FP32,
    )


@triton.jit(do_not_specialize=["n_tokens"])
def quantized_fused_input_grad_kernel(
    codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift, nested_block_shift, nested_offset,
    a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br,
    dy_ptr, row_scale_ptr, seed_ptr, dx_ptr,
    n_tokens, out_features, in_features, counters_per_row, rows_per_split,
    stride_dym, stride_dyn, stride_dxs, stride_dxm, stride_dxk,
    NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr, DOTS_IN_FP32: tl.constexpr,
):  # fmt: skip
    """``dx = dy @ W'``. Grid: ``(cdiv(M, BLOCK_TOKENS), cdiv(Kq, BLOCK_COUNTERS), cdiv(N, rows_per_split))``."""
    quant = quantized_operands(codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift,
                               nested_block_shift, nested_offset, in_features)  # fmt: skip
    layer = lowrank_operands(a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br)
    fused_input_grad_program(
        quant, layer, dy_ptr, row_scale_ptr, seed_ptr, dx_ptr, n_tokens, out_features, in_features, counters_per_row,
        rows_per_split, stride_dym, stride_dyn, stride_dxs, stride_dxm, stride_dxk, True, NESTED, WEIGHT_ROUND,
        BLOCK_TOKENS, BLOCK_OUT, BLOCK_COUNTERS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32,
        DOT_TF32, DOTS_IN_FP32,
    )
