"""Regenerate a block of the perturbed weight ``W' = W + s*B@A + eps`` into a buffer (streamed path).

For large M the noise must cost about one generation per weight element per pass (docs/DESIGN.md, "why
regeneration inside the GEMM loses"), so the launcher regenerates ``W'`` in bounded chunks, in the compute dtype, and hands each
chunk to cuBLAS at once. A chunk is a rectangle ``rows [row_start, row_end) x counters
[counter_start, counter_end)``, i.e. four column strips per row (row-quarter layout). Each program
makes one ``randn4x`` call per (row, counter) of its block and writes the four strips, each a
contiguous run of columns: no interleaving, no shuffles.

Where a strip lands is up to the caller, through two strides: element (row i, strip t, counter c)
goes to ``out[(i - row_start)*stride_out_row + t*stride_out_strip + (c - counter_start)]``.
With ``stride_out_strip = Kq`` and ``counter_start = 0`` that is the plain ``[rows, K]`` weight layout.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .noise_tile import normal_quad_tile, pick_strip
from .weight_tile import perturbed_weight_strip


@triton.jit
def _store_strip(
    z, strip: tl.constexpr, out_rows_ptr, stride_out_strip, local_counters,
    w_ptr, a_ptr, b_ptr, row_scale, rows, counters, row_mask, counter_mask,
    in_features, counters_per_row, rank, scaling,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    RANK_BLOCK: tl.constexpr, RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
):  # fmt: skip
    tile, _, column_mask = perturbed_weight_strip(
        z, strip, w_ptr, a_ptr, b_ptr, row_scale, rows, counters, row_mask, counter_mask,
        in_features, counters_per_row, rank, scaling,
        stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
        RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32,
    )  # fmt: skip
    out_ptrs = out_rows_ptr + strip * stride_out_strip + local_counters[None, :]
    tl.store(out_ptrs, tile.to(out_rows_ptr.dtype.element_ty), mask=row_mask[:, None] & column_mask[None, :])


@triton.jit(do_not_specialize=["row_start", "row_end", "counter_start", "counter_end"])
def perturbed_weight_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    row_scale_ptr,
    seed_ptr,
    out_ptr,
    row_start,
    row_end,
    counter_start,
    counter_end,
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
    stride_out_row,
    stride_out_strip,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr,
    RANK_BLOCKS: tl.constexpr,
    FACTORS_IN_FP32: tl.constexpr,
    FACTOR_TF32: tl.constexpr,
):
    """Grid: ``(cdiv(row_end - row_start, BLOCK_ROWS), cdiv(counter_end - counter_start, BLOCK_COUNTERS))``."""
    scaling = tl.cast(scaling, tl.float32)  # Inductor may pass Python floats as fp64
    local_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    local_counters = tl.program_id(1) * BLOCK_COUNTERS + tl.arange(0, BLOCK_COUNTERS)
    rows = row_start + local_rows
    counters = counter_start + local_counters
    row_mask = rows < row_end
    counter_mask = counters < counter_end
    row_scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    z0, z1, z2, z3 = normal_quad_tile(tl.load(seed_ptr), rows, counters, counters_per_row)
    out_rows_ptr = out_ptr + local_rows.to(tl.int64)[:, None] * stride_out_row
    for strip in tl.static_range(4):
        _store_strip(
            pick_strip(z0, z1, z2, z3, strip), strip, out_rows_ptr, stride_out_strip, local_counters,
            w_ptr, a_ptr, b_ptr, row_scale, rows, counters, row_mask, counter_mask,
            in_features, counters_per_row, rank, scaling,
            stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
            RANK_BLOCK, RANK_BLOCKS, FACTORS_IN_FP32, FACTOR_TF32,
        )  # fmt: skip
