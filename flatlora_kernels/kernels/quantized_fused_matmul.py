"""In-register path of a 4-bit layer: GEMMs that decode and perturb each ``W'`` tile inside their K loop.

``fused_matmul.py``'s twins (same grids, splits, strip walk and rounding of ``W'`` to the compute dtype
before its dot), with ``W'`` tiles from ``quantized_tile.quantized_perturbed_strip``: the 4-bit codes
are the only weight bytes read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dot_precision import dot_accumulate
from .noise_tile import normal_quad_tile, replace_strip, strip_columns
from .quantized_tile import lowrank_operands, quantized_operands, quantized_perturbed_strip
from .weight_tile import load_tile, program_range


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
    tokens, token_mask = program_range(0, BLOCK_TOKENS, n_tokens)
    rows, row_mask = program_range(1, BLOCK_OUT, out_features)
    seed = tl.load(seed_ptr)
    row_scales = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    split_start = tl.program_id(2) * counters_per_split
    split_end = tl.minimum(split_start + counters_per_split, counters_per_row)
    acc = tl.zeros((BLOCK_TOKENS, BLOCK_OUT), dtype=tl.float32)
    for counter_start in range(split_start, split_end, BLOCK_COUNTERS):
        counters = counter_start + tl.arange(0, BLOCK_COUNTERS)
        block = (rows, counters, row_mask, counters < counters_per_row, row_scales, counters_per_row, in_features)
        z = normal_quad_tile(seed, rows, counters, counters_per_row)
        for strip in tl.static_range(4):
            weight, columns, column_mask = quantized_perturbed_strip(
                z[strip], strip, quant, layer, block, NESTED, WEIGHT_ROUND, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32,
                FACTOR_TF32,
            )
            x = load_tile(x_ptr, tokens, columns, stride_xm, stride_xk, token_mask, column_mask)
            acc = dot_accumulate(x, tl.trans(weight.to(x.dtype)), acc, DOTS_IN_FP32, DOT_TF32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = (
        y_ptr
        + tl.program_id(2).to(tl.int64) * stride_ys
        + tokens.to(tl.int64)[:, None] * stride_ym
        + rows.to(tl.int64)[None, :] * stride_yn
    )
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=token_mask[:, None] & row_mask[None, :])


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
    tokens, token_mask = program_range(0, BLOCK_TOKENS, n_tokens)
    counters, counter_mask = program_range(1, BLOCK_COUNTERS, counters_per_row)
    seed = tl.load(seed_ptr)
    zero = tl.zeros((BLOCK_TOKENS, BLOCK_COUNTERS), dtype=tl.float32)
    accs = (zero, zero, zero, zero)
    split_start = tl.program_id(2) * rows_per_split
    split_end = tl.minimum(split_start + rows_per_split, out_features)
    for row_start in range(split_start, split_end, BLOCK_OUT):
        rows = row_start + tl.arange(0, BLOCK_OUT)
        row_mask = rows < out_features
        dy = load_tile(dy_ptr, tokens, rows, stride_dym, stride_dyn, token_mask, row_mask)
        row_scales = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
        block = (rows, counters, row_mask, counter_mask, row_scales, counters_per_row, in_features)
        z = normal_quad_tile(seed, rows, counters, counters_per_row)
        for strip in tl.static_range(4):
            weight, _, _ = quantized_perturbed_strip(z[strip], strip, quant, layer, block, NESTED, WEIGHT_ROUND,
                                                     RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
            acc = dot_accumulate(dy, weight.to(dy.dtype), accs[strip], DOTS_IN_FP32, DOT_TF32)
            accs = replace_strip(accs, acc, strip)
    dx_rows_ptr = dx_ptr + tl.program_id(2).to(tl.int64) * stride_dxs + tokens.to(tl.int64)[:, None] * stride_dxm
    for strip in tl.static_range(4):
        columns, column_mask = strip_columns(strip, counters, counter_mask, counters_per_row, in_features)
        tl.store(
            dx_rows_ptr + columns.to(tl.int64)[None, :] * stride_dxk,
            accs[strip].to(dx_ptr.dtype.element_ty),
            mask=token_mask[:, None] & column_mask[None, :],
        )
