"""Tiles of the merged weight ``W + s*B@A`` and of the perturbed weight ``W + s*B@A + eps``, in fp32.

``B@A`` is never formed whole: each tile multiplies the tile's rows of ``B`` by its columns of ``A``
(a rank-r product, padded to a power of two >= 16 for ``tl.dot``; the padding is masked to zero).
Large ranks run in unrolled blocks of ``RANK_BLOCK`` so that the factor tiles stay in registers.

Factor precision: ``FACTORS_IN_FP32`` casts both factors to fp32 (they differ in dtype, or are fp32/fp64)
and multiplies them exactly unless ``FACTOR_TF32``; otherwise both factors share one 16-bit dtype,
whose products are exact in the fp32 accumulator.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dot_precision import dot_accumulate


@triton.jit
def lowrank_tile(
    a_ptr,
    b_ptr,
    rows,
    columns,
    row_mask,
    column_mask,
    rank,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    RANK_BLOCK: tl.constexpr,
    RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr,
    FACTOR_TF32: tl.constexpr,
):
    """``(B @ A)[rows, columns]`` as an fp32 tile."""
    product = tl.zeros((rows.shape[0], columns.shape[0]), dtype=tl.float32)
    rows = rows.to(tl.int64)
    columns = columns.to(tl.int64)
    for block in tl.static_range(RANK_BLOCKS):
        ranks = block * RANK_BLOCK + tl.arange(0, RANK_BLOCK)
        rank_mask = ranks < rank
        b = tl.load(
            b_ptr + rows[:, None] * stride_bn + ranks[None, :] * stride_br,
            mask=row_mask[:, None] & rank_mask[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + ranks[:, None] * stride_ar + columns[None, :] * stride_ak,
            mask=rank_mask[:, None] & column_mask[None, :],
            other=0.0,
        )
        product = dot_accumulate(b, a, product, FACTORS_IN_FP32, FACTOR_TF32)
    return product


@triton.jit
def merged_weight_tile(
    w_ptr,
    a_ptr,
    b_ptr,
    rows,
    columns,
    row_mask,
    column_mask,
    rank,
    scaling,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    RANK_BLOCK: tl.constexpr,
    RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr,
    FACTOR_TF32: tl.constexpr,
):
    """``(W + s*B@A)[rows, columns]`` in fp32; zero outside the masks."""
    w = tl.load(
        w_ptr + rows.to(tl.int64)[:, None] * stride_wn + columns.to(tl.int64)[None, :] * stride_wk,
        mask=row_mask[:, None] & column_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    lowrank = lowrank_tile(
        a_ptr, b_ptr, rows, columns, row_mask, column_mask, rank,
        stride_ar, stride_ak, stride_bn, stride_br,
        RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32,
    )  # fmt: skip
    return w + scaling * lowrank


@triton.jit
def perturbed_weight_strip(
    z,
    strip: tl.constexpr,
    w_ptr,
    a_ptr,
    b_ptr,
    row_scale,
    rows,
    counters,
    row_mask,
    counter_mask,
    in_features,
    counters_per_row,
    rank,
    scaling,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    RANK_BLOCK: tl.constexpr,
    RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr,
    FACTOR_TF32: tl.constexpr,
):
    """``W'[rows, counters + strip*Kq]`` (fp32) given that strip's normals ``z`` from ``normal_quad_tile``.

    Returns ``(tile, columns, column_mask)``; the tile is zero outside the masks, so it can feed a
    dot product without further masking.
    """
    columns = strip * counters_per_row + counters
    column_mask = counter_mask & (columns < in_features)
    merged = merged_weight_tile(
        w_ptr, a_ptr, b_ptr, rows, columns, row_mask, column_mask, rank, scaling,
        stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32,
    )  # fmt: skip
    noise = tl.where(row_mask[:, None] & column_mask[None, :], row_scale[:, None] * z, 0.0)
    return merged + noise, columns, column_mask
