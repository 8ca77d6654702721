"""The Triton backend: launchers for ``flatlora_kernels.kernels`` and the choice of strategy.

``forward`` computes the row scales (one read of W), then ``y = x @ W'^T (+ bias)`` with
``W' = W + s*B@A + eps`` by one of two strategies; ``backward`` computes ``dx = dy @ W'`` the same way
(regenerating eps from the seed: nothing weight-sized survives between the passes) and the LoRA
gradients ``dA = s*(dy@B)^T@x``, ``dB = s*dy^T@(x@A^T)`` as small cuBLAS matmuls.

Strategies (both regenerate the same eps, bit for bit: same z tile, same row scales; ``W'`` itself may
differ in the last bit where the kernels contract ``W + s*B@A + eps`` into FMAs differently; see
``choose_strategy``):

* ``"streamed"`` (large M): a kernel regenerates ``W'`` in the compute dtype in bounded chunks (see
  ``triton_tuning.CHUNK_BYTES``) and cuBLAS consumes each chunk at once. Forward chunks are row blocks of ``W'``
  (``y[:, rows] = x @ chunk^T``); backward chunks are counter blocks, i.e. four column strips of
  ``W'`` (``dx[:, strip] = dy @ chunk_strip``), so every output element comes from one GEMM: one
  rounding, and no read-modify-write of ``dx`` per chunk.
* ``"in_register"`` (small M): fused Triton GEMMs that build each ``W'`` tile in registers.

Precision: all noise and ``W + s*B@A`` arithmetic is fp32. fp32 dot products (the main GEMM when
the compute dtype is fp32; ``B@A`` when the factors are fp32 or of mixed dtypes) use TF32 only when
``torch.backends.cuda.matmul.allow_tf32`` is set, as cuBLAS does for the streamed path, except that
``B@A`` feeding a 16-bit compute dtype always uses TF32 (its error stays below the rounding of
``W'`` to that dtype). 16-bit factors of one dtype multiply natively (exact products, fp32 sums).

Under ``TRITON_INTERPRET=1`` (CPU tensors, tests) the launchers pick large tiles, since the
interpreter pays per loop iteration, and upcast bf16 dot operands, since its bf16 ``tl.dot`` is wrong.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch
import triton
from torch import Tensor
from torch.library import wrap_triton

from ..kernels import (
    fused_forward_kernel,
    fused_input_grad_kernel,
    normal_rows_kernel,
    perturbed_weight_kernel,
    philox_words_kernel,
    row_scale_kernel,
)
from ..noise import counters_per_row, merge_dtype, perturbation_row_scale
from . import triton_tuning

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Every tunable and its provenance lives in triton_tuning.py, read at call time (tests and benchmarks patch it there).

STRATEGY_ENV = "FLATLORA_TRITON_STRATEGY"
STRATEGIES = ("auto", "streamed", "in_register")


def traceable_kernel(kernel):
    """``wrap_triton(kernel)`` (so Inductor traces into it), or the kernel itself under the interpreter:
    torch 2.13's ``wrap_triton`` returns an interpreted kernel unchanged, torch 2.11's refuses it."""
    return kernel if INTERPRETING else wrap_triton(kernel)


def _tile_table() -> dict:
    return triton_tuning.INTERPRETER_TILES if INTERPRETING else triton_tuning.GPU_TILES

# ---------------------------------------------------------------------------------------------
# Strategy choice
# ---------------------------------------------------------------------------------------------

_forced_strategy: str | None = None


def _check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise ValueError(f"unknown Triton strategy {name!r}; expected one of {STRATEGIES}")
    return name


@contextlib.contextmanager
def use_strategy(name: str) -> Iterator[None]:
    """Force a strategy (``"auto"``, ``"streamed"`` or ``"in_register"``) inside the block.

    Takes precedence over the ``FLATLORA_TRITON_STRATEGY`` environment variable. Under
    ``torch.compile`` the choice is made when the graph is traced.
    """
    global _forced_strategy
    previous, _forced_strategy = _forced_strategy, _check_strategy(name)
    try:
        yield
    finally:
        _forced_strategy = previous


def in_register_max_tokens(compute_dtype: torch.dtype, kernel: str = "fused_forward") -> int:
    """Largest M the auto rule sends to ``kernel`` (``"fused_forward"`` or ``"fused_input_grad"``)."""
    return min(triton_tuning.IN_REGISTER_MAX_TOKENS, _fused_table_entry(kernel, compute_dtype)["MAX_BLOCK_TOKENS"])


def choose_strategy(n_tokens: int, compute_dtype: torch.dtype, kernel: str = "fused_forward") -> str:
    """``"streamed"`` or ``"in_register"`` for a pass over ``n_tokens`` rows of x (or dy).

    Order: ``use_strategy``, then ``$FLATLORA_TRITON_STRATEGY``, then the auto rule
    (``n_tokens <= in_register_max_tokens(compute_dtype, kernel)``). fp64 always streams (the fused
    GEMMs are 16/32-bit). Under torch.compile the rule is read when the graph is traced; with a
    dynamic M it becomes a guard on M.
    """
    requested = _forced_strategy or _check_strategy(os.environ.get(STRATEGY_ENV, "auto"))
    if compute_dtype == torch.float64:
        return "streamed"
    if requested != "auto":
        return requested
    return "in_register" if n_tokens <= in_register_max_tokens(compute_dtype, kernel) else "streamed"


# ---------------------------------------------------------------------------------------------
# Launch parameters
# ---------------------------------------------------------------------------------------------


def launch_tiles(kernel: str) -> dict:
    """A copy of ``kernel``'s tile entry (block sizes, warps, stages) from the GPU or interpreter table."""
    return dict(_tile_table()[kernel])


def _fused_table_entry(kernel: str, compute_dtype: torch.dtype) -> dict:
    """An in-register kernel's tile entry: its ``_fp32`` variant for fp32 compute, where the table has one."""
    table = _tile_table()
    return table.get(f"{kernel}_fp32", table[kernel]) if compute_dtype == torch.float32 else table[kernel]


def fused_tiles(kernel: str, n_tokens: int, compute_dtype: torch.dtype, table_entry: dict | None = None) -> dict:
    """Tiles of an in-register kernel, with ``BLOCK_TOKENS`` sized to M (16 at least, for ``tl.dot``);
    ``table_entry`` replaces the kernel's entry in the tile table (the 4-bit backend's overrides)."""
    tiles = dict(table_entry or _fused_table_entry(kernel, compute_dtype))
    cap = tiles.pop("MAX_BLOCK_TOKENS")
    # Plain comparisons: under torch.compile with a dynamic M they become simple guards.
    tiles["BLOCK_TOKENS"] = next((size for size in (16, 32, 64, 128) if n_tokens <= size or size >= cap), cap)
    return tiles


def _tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _main_dot_tf32(compute_dtype: torch.dtype) -> bool:
    """May the fused GEMMs' dots use TF32? (Only read for fp32 operands.)"""
    return compute_dtype != torch.float32 or _tf32_allowed()


def factor_constexprs(lora_A: Tensor, lora_B: Tensor, compute_dtype: torch.dtype) -> dict:
    """Compile-time settings of the ``B@A`` tiles (see ``kernels/weight_tile.py``)."""
    rank = lora_A.shape[0]
    native = (
        lora_A.dtype == lora_B.dtype
        and lora_A.dtype in (torch.float16, torch.bfloat16)
        and not (INTERPRETING and lora_A.dtype == torch.bfloat16)
    )
    exact_fp32 = compute_dtype in (torch.float32, torch.float64) and not _tf32_allowed()
    rank_block = min(triton_tuning.MAX_RANK_BLOCK, max(16, triton.next_power_of_2(rank)))
    return dict(
        RANK_BLOCK=rank_block,
        RANK_LOOP=rank > rank_block or (exact_fp32 and not native),  # see triton_tuning.MAX_RANK_BLOCK
        FACTORS_IN_FP32=not native,
        FACTOR_TF32=native or not exact_fp32,  # 16-bit operands: the flag is moot, keep the default
    )


def _layer_args(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> tuple:
    """Every kernel's first eleven arguments: the layer, as ``weight_operands`` (kernels/weight_tile.py) bundles it."""
    return (weight, lora_A, lora_B, lora_A.shape[0], float(scaling), *weight.stride(), *lora_A.stride(), *lora_B.stride())


def fused_constexprs(lora_A: Tensor, lora_B: Tensor, compute_dtype: torch.dtype) -> dict:
    """Compile-time settings of an in-register kernel: its ``B@A`` tiles and its main dots."""
    return dict(
        **factor_constexprs(lora_A, lora_B, compute_dtype),
        DOT_TF32=_main_dot_tf32(compute_dtype),
        DOTS_IN_FP32=INTERPRETING and compute_dtype == torch.bfloat16,  # the interpreter's bf16 dot is wrong
    )


def _split_reduction(base_programs: int, loop_blocks: int, device: torch.device) -> tuple[int, int]:
    """``(splits, blocks_per_split)`` for an in-register kernel whose reduction loop has ``loop_blocks``
    iterations and whose output tiles make ``base_programs`` programs; no split is left empty."""
    if triton_tuning.IN_REGISTER_SPLITS is not None:
        wanted = triton_tuning.IN_REGISTER_SPLITS
    elif device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(triton_tuning.IN_REGISTER_PROGRAMS_PER_SM * sm_count, base_programs)
    else:
        wanted = 1
    blocks_per_split = triton.cdiv(loop_blocks, max(1, min(wanted, loop_blocks)))
    return triton.cdiv(loop_blocks, blocks_per_split), blocks_per_split


def _split_outputs(splits: int, shape: tuple[int, int], dtype: torch.dtype, device) -> tuple[Tensor, tuple]:
    """The in-register kernels' output and its (split, row, column) strides: the result itself
    for one split, else fp32 partials ``[splits, *shape]``."""
    if splits == 1:
        out = torch.empty(shape, dtype=dtype, device=device)
        return out, (0, *out.stride())
    out = torch.empty((splits, *shape), dtype=torch.float32, device=device)
    return out, out.stride()


def _chunk_length(total: int, bytes_per_unit: int, output_bytes: int) -> int:
    """How many rows (or counters) of ``W'`` one chunk holds: at least one, at most what fits under
    ``triton_tuning.CHUNK_BYTES`` (or under ``output_bytes`` when that is larger and ``CHUNK_GROWS_TO_OUTPUT``)."""
    cap = triton_tuning.CHUNK_BYTES
    cap = max(cap, output_bytes) if triton_tuning.CHUNK_GROWS_TO_OUTPUT else cap
    fit = max(1, cap // bytes_per_unit)
    if fit >= total:
        return total
    align = triton_tuning.CHUNK_ALIGN
    return fit // align * align if fit >= align else fit


# ---------------------------------------------------------------------------------------------
# Launchers (every kernel goes through wrap_triton so that Inductor can trace into it)
# ---------------------------------------------------------------------------------------------


def row_scale(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, sigma: Tensor, compute_dtype) -> Tensor:
    """fp32 ``[N]``: ``sigma * ||W + s*B@A||_row / sqrt(K)``."""
    if merge_dtype(weight, lora_A, lora_B) == torch.float64:  # the definition's fp64 norm; the kernel sums in fp32
        return perturbation_row_scale(weight, lora_A, lora_B, scaling=scaling, sigma=sigma)
    out_features, in_features = weight.shape
    scale = torch.empty(out_features, dtype=torch.float32, device=weight.device)
    tiles = launch_tiles("row_scale")
    grid = (triton.cdiv(out_features, tiles["BLOCK_ROWS"]),)
    traceable_kernel(row_scale_kernel)[grid](
        *_layer_args(weight, lora_A, lora_B, scaling), sigma, scale, out_features, in_features, math.sqrt(in_features),
        **tiles, **factor_constexprs(lora_A, lora_B, compute_dtype),
    )  # fmt: skip
    return scale


def regenerate_perturbed_weight(
    out: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    row_scales: Tensor,
    scaling: float,
    seed: Tensor,
    rows: tuple[int, int],
    counters: tuple[int, int],
    stride_out_row: int,
    stride_out_strip: int,
) -> None:
    """Write ``W'`` for ``rows x counters`` into ``out`` (layout: see ``kernels/perturbed_weight.py``)."""
    (row_start, row_end), (counter_start, counter_end) = rows, counters
    in_features = weight.shape[1]
    tiles = launch_tiles("perturbed_weight")
    grid = (
        triton.cdiv(row_end - row_start, tiles["BLOCK_ROWS"]),
        triton.cdiv(counter_end - counter_start, tiles["BLOCK_COUNTERS"]),
    )
    traceable_kernel(perturbed_weight_kernel)[grid](
        *_layer_args(weight, lora_A, lora_B, scaling), row_scales, seed, out, row_start, row_end, counter_start, counter_end,
        in_features, counters_per_row(in_features), stride_out_row, stride_out_strip,
        **tiles, **factor_constexprs(lora_A, lora_B, out.dtype),
    )  # fmt: skip


def perturbed_weight_rows(weight, lora_A, lora_B, row_scales, scaling, seed, row_start, row_end, dtype) -> Tensor:
    """``W'[row_start:row_end]`` as a new ``[rows, K]`` tensor of ``dtype``."""
    in_features = weight.shape[1]
    out = torch.empty((row_end - row_start, in_features), dtype=dtype, device=weight.device)
    regenerate_perturbed_weight(
        out, weight, lora_A, lora_B, row_scales, scaling, seed,
        rows=(row_start, row_end), counters=(0, counters_per_row(in_features)),
        stride_out_row=in_features, stride_out_strip=counters_per_row(in_features),
    )  # fmt: skip
    return out


def normal_rows(seed: Tensor, in_features: int, row_start: int, row_end: int, dtype=torch.float32) -> Tensor:
    """``z(seed, i, j)`` for rows ``[row_start, row_end)``, from the Triton z tile (tests, RNG benchmark)."""
    kq = counters_per_row(in_features)
    out = torch.empty((row_end - row_start, in_features), dtype=dtype, device=seed.device)
    tiles = launch_tiles("normal_rows")
    grid = (triton.cdiv(row_end - row_start, tiles["BLOCK_ROWS"]), triton.cdiv(kq, tiles["BLOCK_COUNTERS"]))
    traceable_kernel(normal_rows_kernel)[grid](seed, out, row_start, row_end - row_start, in_features, kq, in_features, **tiles)
    return out


def philox_words(seed: Tensor, offsets: Tensor) -> Tensor:
    """``[n, 4]`` int64: the Philox words the kernels draw at int64 ``offsets`` (self-checks vs noise.py)."""
    out = torch.empty((offsets.numel(), 4), dtype=torch.int64, device=offsets.device)
    philox_words_kernel[(triton.cdiv(offsets.numel(), 64),)](seed, offsets.contiguous(), out, offsets.numel(), BLOCK=64)
    return out


# --- streamed path ---------------------------------------------------------------------------


def forward_by_row_chunks(x: Tensor, bias: Tensor | None, out_features: int, regenerate_rows) -> Tensor:
    """``y = x @ W'^T (+ bias)`` with ``W'`` regenerated in row chunks by ``regenerate_rows(start, end)``
    (in ``x.dtype``), each handed to cuBLAS at once: one chunk alive at a time."""
    n_tokens, in_features = x.shape
    rows_per_chunk = _chunk_length(
        out_features, in_features * x.element_size(), output_bytes=n_tokens * out_features * x.element_size()
    )
    if rows_per_chunk == out_features:
        w_perturbed = regenerate_rows(0, out_features)
        return torch.mm(x, w_perturbed.t()) if bias is None else torch.addmm(bias, x, w_perturbed.t())
    y = x.new_empty((n_tokens, out_features))
    for row_start in range(0, out_features, rows_per_chunk):
        row_end = min(out_features, row_start + rows_per_chunk)
        chunk = regenerate_rows(row_start, row_end)
        y_rows = y[:, row_start:row_end]
        if bias is None:
            torch.mm(x, chunk.t(), out=y_rows)
        else:
            torch.addmm(bias[row_start:row_end], x, chunk.t(), out=y_rows)
        del chunk  # free it before the next one is allocated: one chunk alive at a time
    return y


def input_grad_by_counter_chunks(dy: Tensor, out_features: int, in_features: int, regenerate_rows, fill_counters) -> Tensor:
    """``dx = dy @ W'``, ``W'`` regenerated whole by ``regenerate_rows(0, N)`` when it fits, else in
    counter chunks: ``fill_counters(chunk, counter_start, width)`` writes the four column strips of every
    row into ``chunk`` (``[N, 4, width]``, in ``dy.dtype``)."""
    n_tokens = dy.shape[0]
    kq = counters_per_row(in_features)
    # A counter chunk holds four column strips of every row of W'.
    counters_per_chunk = _chunk_length(
        kq, 4 * out_features * dy.element_size(), output_bytes=n_tokens * in_features * dy.element_size()
    )
    whole_weight_fits = out_features * in_features * dy.element_size() <= triton_tuning.WHOLE_WEIGHT_INPUT_GRAD_BYTES
    if counters_per_chunk == kq or whole_weight_fits:  # one full-width GEMM
        return torch.mm(dy, regenerate_rows(0, out_features))
    dx = dy.new_empty((n_tokens, in_features))
    for counter_start in range(0, kq, counters_per_chunk):
        width = min(kq, counter_start + counters_per_chunk) - counter_start
        chunk = dy.new_empty((out_features, 4, width))
        fill_counters(chunk, counter_start, width)
        if triton_tuning.BATCHED_STRIP_GEMM and in_features == 4 * kq:
            # dx as [M, 4, Kq]: strip t of this chunk is dx_strips[t], a [M, width] view with row stride K.
            dx_strips = dx.view(n_tokens, 4, kq)[:, :, counter_start : counter_start + width].transpose(0, 1)
            torch.bmm(dy.unsqueeze(0).expand(4, -1, -1), chunk.transpose(0, 1), out=dx_strips)
        else:
            for strip in range(4):
                column_start = strip * kq + counter_start
                n_columns = min(width, in_features - column_start)
                if n_columns <= 0:  # strips past K (only when K < 4 * Kq): so are the later ones
                    break
                torch.mm(dy, chunk[:, strip, :n_columns], out=dx[:, column_start : column_start + n_columns])
        del chunk
    return dx


def forward_streamed(x, weight, lora_A, lora_B, bias, scaling, row_scales, seed) -> Tensor:
    """``y = x @ W'^T (+ bias)`` by the streamed strategy (``W'`` regenerated in row chunks)."""
    regenerate_rows = lambda start, end: perturbed_weight_rows(  # noqa: E731
        weight, lora_A, lora_B, row_scales, scaling, seed, start, end, x.dtype
    )
    return forward_by_row_chunks(x, bias, weight.shape[0], regenerate_rows)


def input_grad_streamed(dy, weight, lora_A, lora_B, row_scales, scaling, seed) -> Tensor:
    """``dx = dy @ W'`` by the streamed strategy (``W'`` regenerated whole or in counter chunks)."""
    out_features, in_features = weight.shape
    regenerate_rows = lambda start, end: perturbed_weight_rows(  # noqa: E731
        weight, lora_A, lora_B, row_scales, scaling, seed, start, end, dy.dtype
    )
    fill_counters = lambda chunk, counter_start, width: regenerate_perturbed_weight(  # noqa: E731
        chunk, weight, lora_A, lora_B, row_scales, scaling, seed,
        rows=(0, out_features), counters=(counter_start, counter_start + width),
        stride_out_row=4 * width, stride_out_strip=width,
    )  # fmt: skip
    return input_grad_by_counter_chunks(dy, out_features, in_features, regenerate_rows, fill_counters)


# --- in-register path ------------------------------------------------------------------------


def fused_launch_plan(kernel: str, n_tokens: int, tile_axis: tuple[int, str], loop_axis: tuple[int, str], out_width,
                      dtype, device, table_entry: dict | None = None):
    """Tiles, grid, split size and output of an in-register kernel whose output tiles are
    ``[BLOCK_TOKENS, tile_axis]`` and whose reduction loop walks ``loop_axis`` (each: extent, tile key);
    ``table_entry``: as in ``fused_tiles``."""
    tiles = fused_tiles(kernel, n_tokens, dtype, table_entry)
    output_tiles = (triton.cdiv(n_tokens, tiles["BLOCK_TOKENS"]), triton.cdiv(tile_axis[0], tiles[tile_axis[1]]))
    loop_extent, loop_tile = loop_axis[0], tiles[loop_axis[1]]
    splits, blocks_per_split = _split_reduction(output_tiles[0] * output_tiles[1], triton.cdiv(loop_extent, loop_tile), device)
    out, out_strides = _split_outputs(splits, (n_tokens, out_width), dtype, device)
    return tiles, (*output_tiles, splits), blocks_per_split * loop_tile, out, out_strides


def sum_split_outputs(out: Tensor, splits: int, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """An in-register kernel's result: ``out`` itself with one split, else the fp32 partials summed
    (deterministically), plus ``bias``, in ``dtype``."""
    if splits == 1:
        return out
    y = out.sum(0)
    if bias is not None:
        y += bias
    return y.to(dtype)


def forward_in_register(x, weight, lora_A, lora_B, bias, scaling, row_scales, seed) -> Tensor:
    """``y = x @ W'^T (+ bias)`` by the in-register strategy (one fused GEMM launch, split over K)."""
    n_tokens, in_features = x.shape
    out_features = weight.shape[0]
    kq = counters_per_row(in_features)
    tiles, grid, counters_per_split, out, out_strides = fused_launch_plan(
        "fused_forward", n_tokens, (out_features, "BLOCK_OUT"), (kq, "BLOCK_COUNTERS"), out_features, x.dtype, x.device
    )
    splits = grid[2]
    traceable_kernel(fused_forward_kernel)[grid](
        *_layer_args(weight, lora_A, lora_B, scaling), x, row_scales, seed, row_scales if bias is None else bias, out,
        n_tokens, out_features, in_features, kq, counters_per_split, *x.stride(), *out_strides,
        HAS_BIAS=bias is not None and splits == 1, **tiles, **fused_constexprs(lora_A, lora_B, x.dtype),
    )  # fmt: skip
    return sum_split_outputs(out, splits, bias, x.dtype)


def input_grad_in_register(dy, weight, lora_A, lora_B, row_scales, scaling, seed) -> Tensor:
    """``dx = dy @ W'`` by the in-register strategy (one fused GEMM launch, split over N)."""
    n_tokens = dy.shape[0]
    out_features, in_features = weight.shape
    kq = counters_per_row(in_features)
    tiles, grid, rows_per_split, out, out_strides = fused_launch_plan(
        "fused_input_grad", n_tokens, (kq, "BLOCK_COUNTERS"), (out_features, "BLOCK_OUT"), in_features, dy.dtype, dy.device
    )
    traceable_kernel(fused_input_grad_kernel)[grid](
        *_layer_args(weight, lora_A, lora_B, scaling), dy, row_scales, seed, out,
        n_tokens, out_features, in_features, kq, rows_per_split, *dy.stride(), *out_strides,
        **tiles, **fused_constexprs(lora_A, lora_B, dy.dtype),
    )  # fmt: skip
    return sum_split_outputs(out, grid[2], None, dy.dtype)


# --- LoRA factor gradients -------------------------------------------------------------------


def lora_grads(dy: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """``dA = s*(dy@B)^T@x``, ``dB = s*dy^T@(x@A^T)``: skinny cuBLAS matmuls (fp32 accumulation) in
    the compute dtype, with ``s`` folded into the small factor copies."""
    dtype = x.dtype
    scaled_B = (lora_B.float() * scaling).to(dtype)  # [N, r]
    scaled_A = (lora_A.float() * scaling).to(dtype)  # [r, K]
    d_lora_A = torch.mm(torch.mm(dy, scaled_B).t(), x)  # [r, K]
    d_lora_B = torch.mm(dy.t(), torch.mm(x, scaled_A.t()))  # [N, r]
    return d_lora_A.to(lora_A.dtype), d_lora_B.to(lora_B.dtype)


# ---------------------------------------------------------------------------------------------
# The backend protocol (see flatlora_kernels/backends/__init__.py)
# ---------------------------------------------------------------------------------------------


def on_device(device: torch.device):
    """Launch under the tensors' device, not the current one (e.g. layers on cuda:1 under ``device_map``)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    with on_device(x.device):
        return _forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed)


def backward(dy, x, weight, lora_A, lora_B, row_scales, scaling, seed, compute_dx):
    with on_device(x.device):
        return _backward(dy, x, weight, lora_A, lora_B, row_scales, scaling, seed, compute_dx)


def forward_by_strategy(x: Tensor, bias: Tensor | None, out_features: int, in_register, streamed) -> Tensor:
    """``y`` by the path the tuning picks for M: ``in_register(bias)`` or ``streamed(bias)``, with
    ``bias`` cast to the compute dtype (as F.linear adds it) and contiguous, because the in-register
    kernel indexes it by row with unit stride (a [N] copy at most). No tokens: an empty ``y``."""
    n_tokens = x.shape[0]
    if n_tokens == 0:
        return x.new_empty((0, out_features))
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    return (in_register if choose_strategy(n_tokens, x.dtype) == "in_register" else streamed)(bias)


def input_grad_by_strategy(x: Tensor, in_features: int, compute_dx: bool, in_register, streamed) -> Tensor:
    """``dx`` by the path the tuning picks for M: ``in_register()`` or ``streamed()``; empty when not
    wanted (``compute_dx`` False) or with no tokens."""
    n_tokens = x.shape[0]
    if not compute_dx:
        return x.new_empty(0)
    if n_tokens == 0:
        return x.new_empty((0, in_features))
    return (in_register if choose_strategy(n_tokens, x.dtype, "fused_input_grad") == "in_register" else streamed)()


def _forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    scale = row_scale(weight, lora_A, lora_B, scaling, sigma, x.dtype)
    y = forward_by_strategy(
        x, bias, weight.shape[0],
        lambda bias: forward_in_register(x, weight, lora_A, lora_B, bias, scaling, scale, seed),
        lambda bias: forward_streamed(x, weight, lora_A, lora_B, bias, scaling, scale, seed),
    )  # fmt: skip
    return y, scale


def _backward(dy, x, weight, lora_A, lora_B, row_scales, scaling, seed, compute_dx):
    dy = dy.to(x.dtype)
    row_scales = row_scales.contiguous()
    dx = input_grad_by_strategy(
        x, weight.shape[1], compute_dx,
        lambda: input_grad_in_register(dy, weight, lora_A, lora_B, row_scales, scaling, seed),
        lambda: input_grad_streamed(dy, weight, lora_A, lora_B, row_scales, scaling, seed),
    )  # fmt: skip
    d_lora_A, d_lora_B = lora_grads(dy, x, lora_A, lora_B, scaling)
    return dx, d_lora_A, d_lora_B
