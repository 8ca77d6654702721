"""Tiles of the merged weight ``W + s*B@A`` and of the perturbed weight ``W + s*B@A + eps``, in fp32.

``B@A`` is never formed whole: each tile multiplies the tile's rows of ``B`` by its columns of ``A``
(a rank-r product, padded to a power of two >= 16 for ``tl.dot``; the padding is masked to zero).
Ranks above ``RANK_BLOCK`` (``RANK_LOOP``) run as a loop over rank blocks at run time, not unrolled,
so only one block of each factor is live in registers (an unrolled loop let r=128 spill); a rank
within one block takes no loop at all (docs/DESIGN.md, "GPU code generation").

The layer travels between the helpers as one tuple, ``layer = weight_operands(...)``:
``(w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br)``.
Kernels keep flat arguments (pointers and scalars) because that is what ``torch.library.wrap_triton``
and Inductor trace; only the ``@triton.jit`` helpers take tuples. Constexprs stay separate
arguments: inside a tuple Triton 3.6 turns them into tensors.

Factor precision: ``FACTORS_IN_FP32`` casts both factors to fp32 (they differ in dtype, or are fp32/fp64)
and multiplies them exactly unless ``FACTOR_TF32``; otherwise both factors share one 16-bit dtype,
whose products are exact in the fp32 accumulator.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .dot_precision import dot_accumulate
from .noise_tile import strip_columns


@triton.jit
def weight_operands(w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br):
    """The ``layer`` tuple of a kernel's flat arguments; ``scaling`` in fp32 (Inductor may pass fp64)."""
    scaling = tl.cast(scaling, tl.float32)
    return w_ptr, a_ptr, b_ptr, rank, scaling, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br


@triton.jit
def program_range(axis: tl.constexpr, BLOCK: tl.constexpr, extent):
    """This program's ``BLOCK`` indices along grid axis ``axis`` and their mask ``< extent``."""
    indices = tl.program_id(axis) * BLOCK + tl.arange(0, BLOCK)
    return indices, indices < extent


@triton.jit
def load_tile(ptr, rows, columns, stride_row, stride_column, row_mask, column_mask):
    """``ptr[rows, columns]`` with int64 offsets (``N*K`` can pass 2**31); zero outside the masks."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + columns.to(tl.int64)[None, :] * stride_column
    return tl.load(ptr + offsets, mask=row_mask[:, None] & column_mask[None, :], other=0.0)


@triton.jit
def _add_rank_block(product, layer, rank_start, rows, columns, row_mask, column_mask,
                    RANK_BLOCK: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``product + B[rows, block] @ A[block, columns]`` for the rank block starting at ``rank_start``."""
    _, a_ptr, b_ptr, rank, _, _, _, stride_ar, stride_ak, stride_bn, stride_br = layer
    ranks = rank_start + tl.arange(0, RANK_BLOCK)
    rank_mask = ranks < rank
    b = load_tile(b_ptr, rows, ranks, stride_bn, stride_br, row_mask, rank_mask)
    a = load_tile(a_ptr, ranks, columns, stride_ar, stride_ak, rank_mask, column_mask)
    return dot_accumulate(b, a, product, FACTORS_IN_FP32, FACTOR_TF32)


@triton.jit
def lowrank_tile(layer, rows, columns, row_mask, column_mask, RANK_BLOCK: tl.constexpr,
                 RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``(B @ A)[rows, columns]`` as an fp32 tile; ``RANK_LOOP`` when the rank exceeds one block."""
    product = tl.zeros((rows.shape[0], columns.shape[0]), dtype=tl.float32)
    if RANK_LOOP:  # a run-time loop: one block of factors live at a time
        for rank_start in range(0, layer[3], RANK_BLOCK):
            product = _add_rank_block(product, layer, rank_start, rows, columns, row_mask, column_mask,
                                      RANK_BLOCK, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
    else:  # one block, no loop: fewer barriers and loads than a one-trip loop (docs/DESIGN.md)
        product = _add_rank_block(product, layer, 0, rows, columns, row_mask, column_mask,
                                  RANK_BLOCK, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
    return product


@triton.jit
def merged_weight_tile(layer, rows, columns, row_mask, column_mask, RANK_BLOCK: tl.constexpr,
                       RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``(W + s*B@A)[rows, columns]`` in fp32; zero outside the masks."""
    w_ptr, _, _, _, scaling, stride_wn, stride_wk, _, _, _, _ = layer
    w = load_tile(w_ptr, rows, columns, stride_wn, stride_wk, row_mask, column_mask).to(tl.float32)
    lowrank = lowrank_tile(layer, rows, columns, row_mask, column_mask, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)
    return w + scaling * lowrank


@triton.jit
def perturbed_weight_strip(z, strip: tl.constexpr, layer, block, RANK_BLOCK: tl.constexpr,
                           RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``W'[rows, counters + strip*Kq]`` (fp32) given that strip's normals ``z`` from ``normal_quad_tile``.

    ``block = (rows, counters, row_mask, counter_mask, row_scales, counters_per_row, in_features)``,
    ``row_scales`` being the fp32 scales of ``rows``. Returns ``(tile, columns, column_mask)``; the
    tile is zero outside the masks, so it can feed a dot product without further masking.
    """
    rows, counters, row_mask, counter_mask, row_scales, counters_per_row, in_features = block
    columns, column_mask = strip_columns(strip, counters, counter_mask, counters_per_row, in_features)
    merged = merged_weight_tile(
        layer, rows, columns, row_mask, column_mask, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32
    )
    noise = tl.where(row_mask[:, None] & column_mask[None, :], row_scales[:, None] * z, 0.0)
    return merged + noise, columns, column_mask
