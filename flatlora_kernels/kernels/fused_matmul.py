"""In-register path: GEMMs that build each tile of ``W' = W + s*B@A + eps`` inside their K loop.

Every program regenerates the ``W'`` tiles it needs, so a pass generates each noise element once
per block of tokens: ``ceil(M / BLOCK_TOKENS)`` times in all. That only pays when M is a few tiles
(docs/DESIGN.md, "why regeneration inside the GEMM loses"); the dispatcher sends larger M to the streamed path.

Both kernels walk Philox counters ``c`` of the row-quarter layout, so each ``randn4x`` call feeds
four column strips ``c + t*Kq`` (t = 0..3):

* ``fused_forward_kernel``: ``y = x @ W'^T (+ bias)``; a program owns [tokens, output rows] and
  accumulates the four strips of each counter block into one accumulator.
* ``fused_input_grad_kernel``: ``dx = dy @ W'``; a program owns [tokens, counters], i.e. four column
  strips of ``dx``, one accumulator each, and loops over the output rows.

Small M means few output tiles, too few programs to fill the GPU, so the reduction loop can be split
over a third grid axis: split ``s`` writes its partial result to ``out[s]`` (fp32) and the launcher
sums the partials (deterministically). With one split the kernels write the final result directly.

``W'`` is rounded to the compute dtype before its dot, as the streamed path's buffer is. The first
eleven kernel arguments are the layer (``weight_operands`` in ``weight_tile.py``).
``DOTS_IN_FP32`` upcasts both dot operands (after that rounding): the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dot_precision import dot_accumulate
from .noise_tile import normal_quad_tile, replace_strip, strip_columns
from .weight_source import source_perturbed_strip
from .weight_tile import load_tile, program_range, weight_operands


@triton.jit(do_not_specialize=["n_tokens"])
def fused_forward_kernel(
    w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    x_ptr, row_scale_ptr, seed_ptr, bias_ptr, y_ptr,
    n_tokens, out_features, in_features, counters_per_row, counters_per_split,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr, DOTS_IN_FP32: tl.constexpr,
):  # fmt: skip
    """Grid: ``(cdiv(M, BLOCK_TOKENS), cdiv(N, BLOCK_OUT), cdiv(Kq, counters_per_split))``.

    ``counters_per_split`` is a multiple of ``BLOCK_COUNTERS``; ``bias`` is in the compute dtype.
    """
    layer = weight_operands(w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br)
    fused_forward_program(
        layer, layer, x_ptr, row_scale_ptr, seed_ptr, bias_ptr, y_ptr, n_tokens, out_features, in_features,
        counters_per_row, counters_per_split, stride_xm, stride_xk, stride_ys, stride_ym, stride_yn, False, False, 0,
        HAS_BIAS, BLOCK_TOKENS, BLOCK_OUT, BLOCK_COUNTERS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32,
        DOT_TF32, DOTS_IN_FP32,
    )


@triton.jit
def fused_forward_program(
    quant, layer, x_ptr, row_scale_ptr, seed_ptr, bias_ptr, y_ptr,
    n_tokens, out_features, in_features, counters_per_row, counters_per_split,
    stride_xm, stride_xk, stride_ys, stride_ym, stride_yn,
    QUANTIZED: tl.constexpr, NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_TOKENS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr, DOTS_IN_FP32: tl.constexpr,
):  # fmt: skip
    """One program of a fused forward kernel, dense or 4-bit (``weight_source``)."""
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
        for strip in tl.static_range(4):  # the four strips of each counter block feed one accumulator
            weight, columns, column_mask = source_perturbed_strip(
                z[strip], strip, quant, layer, block, QUANTIZED, NESTED, WEIGHT_ROUND, RANK_BLOCK, RANK_LOOP,
                FACTORS_IN_FP32, FACTOR_TF32,
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
def fused_input_grad_kernel(
    w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    dy_ptr, row_scale_ptr, seed_ptr, dx_ptr,
    n_tokens, out_features, in_features, counters_per_row, rows_per_split,
    stride_dym, stride_dyn, stride_dxs, stride_dxm, stride_dxk,
    BLOCK_TOKENS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr, DOTS_IN_FP32: tl.constexpr,
):  # fmt: skip
    """Grid: ``(cdiv(M, BLOCK_TOKENS), cdiv(Kq, BLOCK_COUNTERS), cdiv(N, rows_per_split))``.

    ``rows_per_split`` is a multiple of ``BLOCK_OUT``.
    """
    layer = weight_operands(w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br)
    fused_input_grad_program(
        layer, layer, dy_ptr, row_scale_ptr, seed_ptr, dx_ptr, n_tokens, out_features, in_features, counters_per_row,
        rows_per_split, stride_dym, stride_dyn, stride_dxs, stride_dxm, stride_dxk, False, False, 0,
        BLOCK_TOKENS, BLOCK_OUT, BLOCK_COUNTERS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32,
        DOT_TF32, DOTS_IN_FP32,
    )


@triton.jit
def fused_input_grad_program(
    quant, layer, dy_ptr, row_scale_ptr, seed_ptr, dx_ptr,
    n_tokens, out_features, in_features, counters_per_row, rows_per_split,
    stride_dym, stride_dyn, stride_dxs, stride_dxm, stride_dxk,
    QUANTIZED: tl.constexpr, NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr, DOTS_IN_FP32: tl.constexpr,
):  # fmt: skip
    """One program of a fused input-grad kernel, dense or 4-bit (``weight_source``)."""
    tokens, token_mask = program_range(0, BLOCK_TOKENS, n_tokens)
    counters, counter_mask = program_range(1, BLOCK_COUNTERS, counters_per_row)
    seed = tl.load(seed_ptr)
    zero = tl.zeros((BLOCK_TOKENS, BLOCK_COUNTERS), dtype=tl.float32)
    accs = (zero, zero, zero, zero)  # one accumulator per column strip of dx
    split_start = tl.program_id(2) * rows_per_split
    split_end = tl.minimum(split_start + rows_per_split, out_features)
    for row_start in range(split_start, split_end, BLOCK_OUT):
        rows = row_start + tl.arange(0, BLOCK_OUT)
        row_mask = rows < out_features
        dy = load_tile(dy_ptr, tokens, rows, stride_dym, stride_dyn, token_mask, row_mask)
        row_scales = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
        block = (rows, counters, row_mask, counter_mask, row_scales, counters_per_row, in_features)
        z = normal_quad_tile(seed, rows, counters, counters_per_row)
        for strip in tl.static_range(4):  # unrolled: each strip's accumulator stays in registers
            weight, _, _ = source_perturbed_strip(z[strip], strip, quant, layer, block, QUANTIZED, NESTED, WEIGHT_ROUND,
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
