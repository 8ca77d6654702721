"""The z tile: the one Triton implementation of the Flat-LoRA noise stream (``flatlora_kernels.noise``).

A Philox call at counter ``c`` of weight row ``i`` (offset ``i*Kq + c``, ``Kq = ceil(K/4)``) gives
the standard normals of the four columns ``c + t*Kq``, t = 0..3 (the row-quarter layout). So a
block of rows x a block of counters yields four column strips at once, each contiguous in memory,
with no shuffling between lanes. Every kernel that needs noise goes through ``normal_quad_tile``.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
    radius = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
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
    """``(z0, z1, z2, z3)``: fp32 [rows, counters] tiles; ``zt`` holds columns ``counters + t*Kq``.

    ``seed`` is the int64 scalar loaded from the seed tensor (never a Python int, which Triton would
    specialise on and recompile for: docs/DESIGN.md, "seeds as tensors").
    """
    c0, c1, c2, c3 = philox_words(seed, philox_offsets(rows, counters, counters_per_row))
    z0, z1 = _box_muller(_uniform(c0), _uniform(c1))
    z2, z3 = _box_muller(_uniform(c2), _uniform(c3))
    return z0, z1, z2, z3


@triton.jit
def pick_strip(tile0, tile1, tile2, tile3, strip: tl.constexpr):
    """The strip-th of four tiles (e.g. of a ``normal_quad_tile`` result); ``strip`` is a compile-time constant."""
    if strip == 0:
        tile = tile0
    elif strip == 1:
        tile = tile1
    elif strip == 2:
        tile = tile2
    else:
        tile = tile3
    return tile


@triton.jit
def replace_strip(tile0, tile1, tile2, tile3, new, strip: tl.constexpr):
    """The four tiles with the strip-th replaced by ``new`` (the inverse of ``pick_strip``)."""
    if strip == 0:
        tile0 = new
    elif strip == 1:
        tile1 = new
    elif strip == 2:
        tile2 = new
    else:
        tile3 = new
    return tile0, tile1, tile2, tile3


@triton.jit
def _store_normal_strip(z, strip: tl.constexpr, out_rows_ptr, counters, counters_per_row, in_features, in_block):
    columns = strip * counters_per_row + counters
    tl.store(out_rows_ptr + columns[None, :], z, mask=in_block & (columns < in_features)[None, :])


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
    z0, z1, z2, z3 = normal_quad_tile(tl.load(seed_ptr), row_start + local_rows, counters, counters_per_row)
    out_rows_ptr = out_ptr + local_rows.to(tl.int64)[:, None] * stride_out_row
    in_block = (local_rows < n_rows)[:, None] & (counters < counters_per_row)[None, :]
    for strip in tl.static_range(4):
        z = pick_strip(z0, z1, z2, z3, strip).to(out_ptr.dtype.element_ty)
        _store_normal_strip(z, strip, out_rows_ptr, counters, counters_per_row, in_features, in_block)


@triton.jit
def philox_words_kernel(seed_ptr, offset_ptr, out_ptr, n_offsets, BLOCK: tl.constexpr):
    """``out[4*i + t]`` = word t of the Philox call at ``offset[i]`` (int64 holding the uint32; self-checks)."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n_offsets
    c0, c1, c2, c3 = philox_words(tl.load(seed_ptr), tl.load(offset_ptr + idx, mask=mask, other=0))
    tl.store(out_ptr + idx * 4, c0.to(tl.int64), mask=mask)
    tl.store(out_ptr + idx * 4 + 1, c1.to(tl.int64), mask=mask)
    tl.store(out_ptr + idx * 4 + 2, c2.to(tl.int64), mask=mask)
    tl.store(out_ptr + idx * 4 + 3, c3.to(tl.int64), mask=mask)
