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

``W'`` is rounded to the compute dtype before its dot, as the streamed path's buffer is.
``DOTS_IN_FP32`` upcasts both dot operands (after that rounding): the interpreter's bf16 dot is wrong.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dot_precision import dot_accumulate
from .noise_tile import normal_quad_tile, pick_strip, replace_strip
from .weight_tile import perturbed_weight_strip


@triton.jit
def _accumulate_strip(
    acc, z, strip: tl.constexpr, dy, x_ptr, tokens, token_mask, stride_xm, stride_xk,
    w_ptr, a_ptr, b_ptr, row_scale, rows, counters, row_mask, counter_mask,
    in_features, counters_per_row, rank, scaling,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    RANK_BLOCK: tl.constexpr, RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr, DOTS_IN_FP32: tl.constexpr, FORWARD: tl.constexpr,
):  # fmt: skip
    """Forward: ``acc += x[tokens, strip columns] @ W'[rows, strip columns]^T`` (x loaded here; ``dy``
    unused). Input grad: ``acc += dy[tokens, rows] @ W'[rows, strip columns]`` (``x_ptr`` unused)."""
    weight, columns, column_mask = perturbed_weight_strip(
        z, strip, w_ptr, a_ptr, b_ptr, row_scale, rows, counters, row_mask, counter_mask,
        in_features, counters_per_row, rank, scaling,
        stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32,
    )  # fmt: skip
    if FORWARD:
        x = tl.load(
            x_ptr + tokens.to(tl.int64)[:, None] * stride_xm + columns.to(tl.int64)[None, :] * stride_xk,
            mask=token_mask[:, None] & column_mask[None, :],
            other=0.0,
        )
        acc = dot_accumulate(x, tl.trans(weight.to(x.dtype)), acc, DOTS_IN_FP32, DOT_TF32)
    else:
        acc = dot_accumulate(dy, weight.to(dy.dtype), acc, DOTS_IN_FP32, DOT_TF32)
    return acc


@triton.jit(do_not_specialize=["n_tokens"])
def fused_forward_kernel(
    x_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    row_scale_ptr,
    seed_ptr,
    bias_ptr,
    y_ptr,
    n_tokens,
    out_features,
    in_features,
    counters_per_row,
    counters_per_split,
    rank,
    scaling,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ys,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr,
    RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr,
    FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr,
    DOTS_IN_FP32: tl.constexpr,
):
    """Grid: ``(cdiv(M, BLOCK_TOKENS), cdiv(N, BLOCK_OUT), cdiv(Kq, counters_per_split))``.

    ``counters_per_split`` is a multiple of ``BLOCK_COUNTERS``; ``bias`` is in the compute dtype.
    """
    scaling = tl.cast(scaling, tl.float32)  # Inductor may pass Python floats as fp64
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    rows = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    token_mask = tokens < n_tokens
    row_mask = rows < out_features
    seed = tl.load(seed_ptr)
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    split_start = tl.program_id(2) * counters_per_split
    split_end = tl.minimum(split_start + counters_per_split, counters_per_row)
    acc = tl.zeros((BLOCK_TOKENS, BLOCK_OUT), dtype=tl.float32)
    for counter_start in range(split_start, split_end, BLOCK_COUNTERS):
        counters = counter_start + tl.arange(0, BLOCK_COUNTERS)
        counter_mask = counters < counters_per_row
        z0, z1, z2, z3 = normal_quad_tile(seed, rows, counters, counters_per_row)
        for strip in tl.static_range(4):
            acc = _accumulate_strip(
                acc, pick_strip(z0, z1, z2, z3, strip), strip, acc, x_ptr, tokens, token_mask, stride_xm, stride_xk,
                w_ptr, a_ptr, b_ptr, row_scale, rows, counters, row_mask, counter_mask,
                in_features, counters_per_row, rank, scaling,
                stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32, DOT_TF32, DOTS_IN_FP32, True,
            )  # fmt: skip
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
    dy_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    row_scale_ptr,
    seed_ptr,
    dx_ptr,
    n_tokens,
    out_features,
    in_features,
    counters_per_row,
    rows_per_split,
    rank,
    scaling,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_dxs,
    stride_dxm,
    stride_dxk,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr,
    RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr,
    FACTOR_TF32: tl.constexpr,
    DOT_TF32: tl.constexpr,
    DOTS_IN_FP32: tl.constexpr,
):
    """Grid: ``(cdiv(M, BLOCK_TOKENS), cdiv(Kq, BLOCK_COUNTERS), cdiv(N, rows_per_split))``.

    ``rows_per_split`` is a multiple of ``BLOCK_OUT``.
    """
    scaling = tl.cast(scaling, tl.float32)  # Inductor may pass Python floats as fp64
    tokens = tl.program_id(0) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    counters = tl.program_id(1) * BLOCK_COUNTERS + tl.arange(0, BLOCK_COUNTERS)
    token_mask = tokens < n_tokens
    counter_mask = counters < counters_per_row
    seed = tl.load(seed_ptr)
    acc0 = tl.zeros((BLOCK_TOKENS, BLOCK_COUNTERS), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_TOKENS, BLOCK_COUNTERS), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_TOKENS, BLOCK_COUNTERS), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_TOKENS, BLOCK_COUNTERS), dtype=tl.float32)
    split_start = tl.program_id(2) * rows_per_split
    split_end = tl.minimum(split_start + rows_per_split, out_features)
    for row_start in range(split_start, split_end, BLOCK_OUT):
        rows = row_start + tl.arange(0, BLOCK_OUT)
        row_mask = rows < out_features
        dy = tl.load(
            dy_ptr + tokens.to(tl.int64)[:, None] * stride_dym + rows.to(tl.int64)[None, :] * stride_dyn,
            mask=token_mask[:, None] & row_mask[None, :],
            other=0.0,
        )
        row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
        z0, z1, z2, z3 = normal_quad_tile(seed, rows, counters, counters_per_row)
        for strip in tl.static_range(4):  # unrolled: each strip's accumulator stays in registers
            acc = _accumulate_strip(
                pick_strip(acc0, acc1, acc2, acc3, strip), pick_strip(z0, z1, z2, z3, strip), strip, dy,
                dy_ptr, tokens, token_mask, stride_dym, stride_dyn,
                w_ptr, a_ptr, b_ptr, row_scale, rows, counters, row_mask, counter_mask,
                in_features, counters_per_row, rank, scaling,
                stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
                RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32, DOT_TF32, DOTS_IN_FP32, False,
            )  # fmt: skip
            acc0, acc1, acc2, acc3 = replace_strip(acc0, acc1, acc2, acc3, acc, strip)
    dx_rows_ptr = dx_ptr + tl.program_id(2).to(tl.int64) * stride_dxs + tokens.to(tl.int64)[:, None] * stride_dxm
    for strip in tl.static_range(4):
        columns = strip * counters_per_row + counters
        column_mask = counter_mask & (columns < in_features)
        tl.store(
            dx_rows_ptr + columns.to(tl.int64)[None, :] * stride_dxk,
            pick_strip(acc0, acc1, acc2, acc3, strip).to(dx_ptr.dtype.element_ty),
            mask=token_mask[:, None] & column_mask[None, :],
        )
