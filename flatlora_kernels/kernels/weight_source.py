"""The base weight as a compile-time choice: a dense ``W`` or bitsandbytes 4-bit codes.

The kernel bodies (``row_scale``, ``perturbed_weight``, ``fused_matmul``) are written once against
these two helpers. ``QUANTIZED`` picks the tile source at compile time: with it, ``quant`` is the
tuple of ``quantized_tile.quantized_operands`` (with ``NESTED`` and ``WEIGHT_ROUND``) and ``layer``
holds only the factors (``lowrank_operands``); without it, ``layer`` is ``weight_operands``' and
``quant`` is unused. Each branch is the very helper its kernel called before, so results do not change.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quantized_tile import quantized_merged_tile, quantized_perturbed_strip
from .weight_tile import merged_weight_tile, perturbed_weight_strip


@triton.jit
def source_merged_tile(quant, layer, rows, columns, row_mask, column_mask, QUANTIZED: tl.constexpr,
                       NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr, RANK_BLOCK: tl.constexpr,
                       RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``(W + s*B@A)[rows, columns]`` in fp32 from the chosen base weight."""
    if QUANTIZED:
        merged = quantized_merged_tile(quant, layer, rows, columns, row_mask, column_mask, NESTED, WEIGHT_ROUND,
                                       RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
    else:
        merged = merged_weight_tile(layer, rows, columns, row_mask, column_mask, RANK_BLOCK, RANK_LOOP,
                                    FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
    return merged


@triton.jit
def source_perturbed_strip(z, strip: tl.constexpr, quant, layer, block, QUANTIZED: tl.constexpr,
                           NESTED: tl.constexpr, WEIGHT_ROUND: tl.constexpr, RANK_BLOCK: tl.constexpr,
                           RANK_LOOP: tl.constexpr, FACTORS_IN_FP32: tl.constexpr, FACTOR_TF32: tl.constexpr):  # fmt: skip
    """``(tile, columns, column_mask)`` of ``W'`` for one strip from the chosen base weight
    (``weight_tile.perturbed_weight_strip``'s contract)."""
    if QUANTIZED:
        tile, columns, column_mask = quantized_perturbed_strip(z, strip, quant, layer, block, NESTED, WEIGHT_ROUND,
                                                               RANK_BLOCK, RANK_LOOP, FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
    else:
        tile, columns, column_mask = perturbed_weight_strip(z, strip, layer, block, RANK_BLOCK, RANK_LOOP,
                                                            FACTORS_IN_FP32, FACTOR_TF32)  # fmt: skip
    return tile, columns, column_mask
