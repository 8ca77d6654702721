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

The counter bounds are left to Triton's integer specialisation (unlike the row bounds): the launcher
aligns chunks to 64 counters, so they are usually multiples of 16, which lets the compiler prove the
mask constant over 16 counters and vectorise the stores (and loads of ``W``) along a strip
(docs/DESIGN.md, "GPU code generation"); at most a few variants compile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .noise_tile import normal_quad_tile
from .weight_source import source_perturbed_strip
from .weight_tile import weight_operands


@triton.jit(do_not_specialize=["row_start", "row_end"])
def perturbed_weight_kernel(
    w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    row_scale_ptr, seed_ptr, out_ptr, row_start, row_end, counter_start, counter_end,
    in_features, counters_per_row, stride_out_row, stride_out_strip,
    BLOCK_ROWS: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
):  # fmt: skip
    """Grid: ``(cdiv(row_end - row_start, BLOCK_ROWS), cdiv(counter_end - counter_start, BLOCK_COUNTERS))``."""
    layer = weight_operands(w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br)
    perturbed_weight_program(layer, layer, row_scale_ptr, seed_ptr, out_ptr, row_start, row_end, counter_start,
                             counter_end, in_features, counters_per_row, stride_out_row, stride_out_strip, False, False,
                             0, BLOCK_ROWS, BLOCK_COUNTERS, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip


@triton.jit
def perturbed_weight_program(
    quant, layer, row_scale_ptr, seed_ptr, out_ptr, row_start, row_end, counter_start, counter_end,
    in_features, counters_per_row, stride_out_row, stride_out_strip,
    QUANTIZED: tl.constexpr, NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COUNTERS: tl.constexpr,
    RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr,
):  # fmt: skip
    """One program of a perturbed-weight kernel, dense or 4-bit (``weight_source``)."""
    local_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    local_counters = tl.program_id(1) * BLOCK_COUNTERS + tl.arange(0, BLOCK_COUNTERS)
    rows = row_start + local_rows
    counters = counter_start + local_counters
    row_mask = rows < row_end
    counter_mask = counters < counter_end
    row_scales = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0)
    block = (rows, counters, row_mask, counter_mask, row_scales, counters_per_row, in_features)
    z = normal_quad_tile(tl.load(seed_ptr), rows, counters, counters_per_row)
    out_rows_ptr = out_ptr + local_rows.to(tl.int64)[:, None] * stride_out_row
    for strip in tl.static_range(4):
        tile, _, column_mask = source_perturbed_strip(z[strip], strip, quant, layer, block, QUANTIZED, NESTED,
                                                      WEIGHT_ROUND, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
        out_ptrs = out_rows_ptr + strip * stride_out_strip + local_counters[None, :]
        tl.store(out_ptrs, tile.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & column_mask[None, :])
