"""Tiles of ``deq(W)``, ``deq(W) + s*B@A`` and ``deq(W) + s*B@A + eps`` for a bitsandbytes 4-bit ``W``, in fp32.

The 4-bit twins of ``weight_tile.py``'s helpers: a tile decodes its elements from the packed codes
(``flatlora_kernels/quantized/layout.py``: flat element ``e = row*K + column``, byte ``e // 2``, high
nibble for even ``e``), looks the code up in the 16-entry table, multiplies by its block's absmax (read
nested when double-quantized: ``code2[u] * absmax2[b // blocksize2] + offset``, each an fp32 op) and
rounds through the dtype bitsandbytes dequantizes to, so a tile equals the dense tile of ``deq(W)``.
The low-rank term is the dense ``lowrank_tile`` itself.

The weight travels as one tuple, ``quant = quantized_operands(...)``:
``(codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift, nested_block_shift,
nested_offset, in_features)``, the blocksizes as their log2 (bitsandbytes' are powers of two): a shift
where an int64 division by a run-time value cost registers (sm_90: spills in two kernels); ``NESTED`` and ``WEIGHT_ROUND`` (0: fp32, 1: bf16, 2: fp16) are
constexprs beside it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .noise_tile import strip_columns
from .weight_tile import lowrank_tile


@triton.jit
def quantized_operands(codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift,
                       nested_block_shift, nested_offset, in_features):  # fmt: skip
    """The ``quant`` tuple of a kernel's flat arguments (the offset in fp32: Inductor may pass fp64)."""
    nested_offset = tl.cast(nested_offset, tl.float32)
    return (codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift, nested_block_shift,
            nested_offset, in_features)  # fmt: skip


@triton.jit
def lowrank_operands(a_ptr, b_ptr, rank, scaling, stride_ar, stride_ak, stride_bn, stride_br):
    """The dense ``layer`` tuple (``weight_tile.weight_operands``) with no weight: what ``lowrank_tile`` reads."""
    scaling = tl.cast(scaling, tl.float32)
    return a_ptr, a_ptr, b_ptr, rank, scaling, 0, 0, stride_ar, stride_ak, stride_bn, stride_br


@triton.jit
def _round_through_bfloat16(tile):
    """fp32 -> bf16 -> fp32, round to nearest even, by integer ops: the interpreter's cast truncates, and
    the decoded values are finite, so no NaN case is needed."""
    bits = tile.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def dequantized_tile(quant, rows, columns, row_mask, column_mask, NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr):
    """``deq(W)[rows, columns]`` in fp32 (rounded through the dequantized dtype); zero outside the masks."""
    codes_ptr, absmax_ptr, table_ptr, nested_absmax_ptr, nested_code_ptr, block_shift, nested_block_shift, \
        nested_offset, in_features = quant  # fmt: skip
    mask = row_mask[:, None] & column_mask[None, :]
    element = rows.to(tl.int64)[:, None] * in_features + columns.to(tl.int64)[None, :]
    byte = tl.load(codes_ptr + (element >> 1), mask=mask, other=0).to(tl.int32)
    code = tl.where((element & 1) == 0, byte >> 4, byte & 15)
    value = tl.load(table_ptr + code, mask=mask, other=0.0)
    block = element >> block_shift
    if NESTED:
        absmax_code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + absmax_code, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + (block >> nested_block_shift), mask=mask, other=0.0
        )
        scale = scale + nested_offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    tile = value * scale
    if WEIGHT_ROUND == 1:
        tile = _round_through_bfloat16(tile)
    elif WEIGHT_ROUND == 2:
        tile = tile.to(tl.float16).to(tl.float32)
    return tl.where(mask, tile, 0.0)


@triton.jit
def quantized_merged_tile(quant, layer, rows, columns, row_mask, column_mask, NESTED: tl.constexpr,
                          WEIGHT_ROUND: tl.constexpr, RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr,
                          FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``(deq(W) + s*B@A)[rows, columns]`` in fp32; ``layer`` from ``lowrank_operands``."""
    weight = dequantized_tile(quant, rows, columns, row_mask, column_mask, NESTED, WEIGHT_ROUND)
    lowrank = lowrank_tile(layer, rows, columns, row_mask, column_mask, RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)
    return weight + layer[4] * lowrank


@triton.jit
def quantized_perturbed_strip(z, strip: tl.constexpr, quant, layer, block, NESTED: tl.constexpr,
                              WEIGHT_ROUND: tl.constexpr, RANK_BLOCK: tl.constexpr, RANK_LOOP: tl.constexpr,
                              FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``W'[rows, counters + strip*Kq]`` (fp32) from that strip's normals ``z``; ``block`` as
    ``weight_tile.perturbed_weight_strip``'s. Returns ``(tile, columns, column_mask)``, zero outside the masks."""
    rows, counters, row_mask, counter_mask, row_scales, counters_per_row, in_features = block
    columns, column_mask = strip_columns(strip, counters, counter_mask, counters_per_row, in_features)
    merged = quantized_merged_tile(quant, layer, rows, columns, row_mask, column_mask, NESTED, WEIGHT_ROUND,
                                   RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
    noise = tl.where(row_mask[:, None] & column_mask[None, :], row_scales[:, None] * z, 0.0)
    return merged + noise, columns, column_mask
