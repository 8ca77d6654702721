"""The z tile: the one Triton implementation of the Flat-LoRA noise stream (``flatlora_kernels.noise``).

A Philox call at counter ``c`` of weight row ``i`` (offset ``i*Kq + c``, ``Kq = ceil(K/4)``) gives
the standard normals of the four columns ``c + t*Kq``, t = 0..3 (the row-quarter layout). So a
block of rows x a block of counters yields four column strips at once, each contiguous in memory,
with no shuffling between lanes. Every kernel that needs noise goes through ``normal_quad_tile``.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Largest distance of a normal of this tile from ``flatlora_kernels.noise`` (its float64 Box-Muller
#: rounded once to fp32), in units in the last place of the definition's fp32 value. The documented
#: CUDA errors add up to 4 ulps (logf 1 ulp, halved by the square root; sqrt_rn 0.5; sinf/cosf 2; the
#: product 0.5; the reference's own rounding 0.5); the bound doubles that, so a check against it
#: cannot fail by chance. The interpreter (numpy's fp32 log/cos/sin) measured at most 4 ulps on 2**20
#: normals (AMD EPYC). The Philox integers themselves are bit-exact.
MAX_ULPS_FROM_DEFINITION = 8


@triton.jit
def philox_offsets(rows, counters, counters_per_row):
    """Philox offsets ``row * Kq + c`` of a [rows, counters] tile, in int64 (``N*Kq`` can pass 2**31)."""
    return rows.to(tl.int64)[:, None] * counters_per_row + counters.to(tl.int64)[None, :]


@triton.jit
def _uniform(bits):
    """``u(x)`` of ``flatlora_kernels.noise``: a uint32 word as int32, folded to [0, 2**31), times 2**-31."""
    word = bits.to(tl.int32, bitcast=True)
    return tl.where(word < 0, -word - 1, word).to(tl.float32) * 4.6566127342e-10


@triton.jit
def _box_muller(u1, u2):
    # sqrt_rn, not tl.sqrt: on NVIDIA GPUs tl.sqrt lowers to an approximate square root
    # (sqrt.approx.ftz.f32), which the interpreter (numpy's exact sqrt) cannot show.
    radius = tl.sqrt_rn(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
    theta = 6.283185307179586 * u2
    return radius * tl.cos(theta), radius * tl.sin(theta)


@triton.jit
def philox_words(seed, offsets):
    """The four Philox4x32-10 words at counter ``(lo32(offset), hi32(offset), 0, 0)``, key = seed's halves.

    The counter words are built here, as uint32, rather than left to ``tl.randint4x``: Triton
    releases differ in how that splits an int64 offset (some run Philox4x64 instead), and the
    stream must not depend on the installed version (docs/DESIGN.md, "noise stream").
    """
    low = (offsets & 0xFFFFFFFF).to(tl.uint32)
    high = ((offsets >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = low * 0
    return tl.philox(seed, low, high, zero, zero, 10)


@triton.jit
def normal_quad_tile(seed, rows, counters, counters_per_row):
    """The tuple ``(z0, z1, z2, z3)`` of fp32 [rows, counters] tiles; ``zt`` holds columns ``counters + t*Kq``.

    ``seed`` is the int64 scalar loaded from the seed tensor (never a Python int, which Triton would
    specialise on and recompile for: docs/DESIGN.md, "seeds as tensors").
    """
    c0, c1, c2, c3 = philox_words(seed, philox_offsets(rows, counters, counters_per_row))
    z0, z1 = _box_muller(_uniform(c0), _uniform(c1))
    z2, z3 = _box_muller(_uniform(c2), _uniform(c3))
    return (z0, z1, z2, z3)


@triton.jit
def replace_strip(tiles, new, strip: tl.constexpr):
    """The tuple of four tiles with the strip-th replaced by ``new`` (Triton tuples are immutable)."""
    if strip == 0:
        tiles = (new, tiles[1], tiles[2], tiles[3])
    elif strip == 1:
        tiles = (tiles[0], new, tiles[2], tiles[3])
    elif strip == 2:
        tiles = (tiles[0], tiles[1], new, tiles[3])
    else:
        tiles = (tiles[0], tiles[1], tiles[2], new)
    return tiles


@triton.jit
def strip_columns(strip: tl.constexpr, counters, counter_mask, counters_per_row, in_features):
    """Columns ``strip*Kq + counters`` of the strip-th tile and their mask (strip 3 ends early when K < 4*Kq)."""
    columns = strip * counters_per_row + counters
    return columns, counter_mask & (columns < in_features)


@triton.jit(do_not_specialize=["row_start", "n_rows"])
def normal_rows_kernel(
    seed_ptr,
    out_ptr,
    row_start,
    n_rows,
    in_features,
    counters_per_row,
    stride_out_row,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COUNTERS: tl.constexpr,
):
    """``out[i, j] = z(seed, row_start + i, j)`` for ``n_rows`` rows (tests and the RNG-rate benchmark)."""
    local_rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    counters = tl.program_id(1) * BLOCK_COUNTERS + tl.arange(0, BLOCK_COUNTERS)
    z = normal_quad_tile(tl.load(seed_ptr), row_start + local_rows, counters, counters_per_row)
    out_rows_ptr = out_ptr + local_rows.to(tl.int64)[:, None] * stride_out_row
    row_mask = local_rows < n_rows
    for strip in tl.static_range(4):
        columns, column_mask = strip_columns(strip, counters, counters < counters_per_row, counters_per_row, in_features)
        tl.store(out_rows_ptr + columns[None, :], z[strip].to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & column_mask[None, :])  # fmt: skip


@triton.jit
def philox_words_kernel(seed_ptr, offset_ptr, out_ptr, n_offsets, BLOCK: tl.constexpr):
    """``out[4*i + t]`` = word t of the Philox call at ``offset[i]`` (int64 holding the uint32; self-checks)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_offsets
    words = philox_words(tl.load(seed_ptr), tl.load(offset_ptr + idx, mask=mask, other=0))
    for word in tl.static_range(4):
        tl.store(out_ptr + idx * 4 + word, words[word].to(tl.int64), mask=mask)
