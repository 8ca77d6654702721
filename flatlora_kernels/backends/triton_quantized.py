"""The Triton backend of the 4-bit ops (``flatlora_kernels/quantized``): launchers for the
``kernels/quantized_*.py`` kernels, with the dense backend's strategy choice, tiles, chunking and
precision settings (``triton_backend.py``, imported, not repeated).

* forward: row scales from decoded tiles (one read of the codes), then ``y = x @ W'^T`` by the
  ``"streamed"`` strategy (row chunks of ``W'`` decoded into a compute-dtype buffer for cuBLAS) or the
  ``"in_register"`` one (fused GEMMs that decode each tile in registers);
* backward: ``dx = dy @ W'`` the same way (counter chunks: four column strips per chunk, as the dense
  path), and the LoRA gradients as small matmuls.

Nothing of ``deq(W)`` or eps outlives a chunk (streamed) or a tile (in-register). Under
``TRITON_INTERPRET=1`` it runs on CPU tensors (tests), with the dense backend's interpreter tiles.
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from ..kernels.quantized_fused_matmul import quantized_fused_forward_kernel, quantized_fused_input_grad_kernel
from ..kernels.quantized_perturbed_weight import quantized_perturbed_weight_kernel
from ..kernels.quantized_row_scale import quantized_row_scale_kernel
from ..noise import counters_per_row
from . import triton_backend as dense
from . import triton_tuning

_WEIGHT_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

def _tiles(kernel: str) -> dict:
    """``triton_backend.launch_tiles`` with this module's GPU tile overrides."""
    if not dense.INTERPRETING and kernel in triton_tuning.GPU_TILES_4BIT:
        return dict(triton_tuning.GPU_TILES_4BIT[kernel])
    return dense.launch_tiles(kernel)


def _quantized_launch_plan(kernel, n_tokens, tile_axis, loop_axis, out_width, dtype, device):
    """``triton_backend.fused_launch_plan`` with this module's GPU tile overrides."""
    name = f"{kernel}_fp32" if dtype == torch.float32 else kernel
    override = None if dense.INTERPRETING else triton_tuning.GPU_TILES_4BIT.get(name)
    return dense.fused_launch_plan(kernel, n_tokens, tile_axis, loop_axis, out_width, dtype, device, table_entry=override)


def _log2(blocksize: int) -> int:
    """The kernels shift by a blocksize's log2 (bitsandbytes' blocksizes are powers of two)."""
    if blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"flatlora 4-bit triton backend: blocksize must be a power of two, got {blocksize}")
    return blocksize.bit_length() - 1


def _weight_args(codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
                 lora_A, lora_B, scaling) -> tuple:
    """The kernels' first sixteen arguments (``quantized_operands`` and ``lowrank_operands``); the
    nested pointers stand in for themselves when there is no double quantization (never read then)."""
    nested = nested_absmax is not None
    return (
        codes, absmax, code_table, nested_absmax if nested else absmax, nested_code if nested else code_table,
        _log2(blocksize), _log2(nested_blocksize) if nested else 0, float(nested_offset),
        lora_A, lora_B, lora_A.shape[0], float(scaling), *lora_A.stride(), *lora_B.stride(),
    )


def _weight_constexprs(nested_absmax, weight_dtype) -> dict:
    return dict(NESTED=nested_absmax is not None, WEIGHT_ROUND=_WEIGHT_ROUND[weight_dtype])


class Layer4bit:
    """One 4-bit layer's launch arguments (built per call; holds no tensors beyond the call)."""

    def __init__(self, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
                 nested_offset, weight_dtype, out_features, in_features, lora_A, lora_B, scaling):
        self.args = _weight_args(codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
                                 nested_offset, lora_A, lora_B, scaling)
        self.constexprs = _weight_constexprs(nested_absmax, weight_dtype)
        self.lora_A, self.lora_B, self.scaling = lora_A, lora_B, scaling
        self.out_features, self.in_features = out_features, in_features
        self.device = codes.device


def row_scale(layer: Layer4bit, sigma: Tensor, compute_dtype) -> Tensor:
    """fp32 ``[N]``: ``sigma * ||deq(W) + s*B@A||_row / sqrt(K)``, from decoded tiles (one read of the codes)."""
    scale = torch.empty(layer.out_features, dtype=torch.float32, device=layer.device)
    tiles = _tiles("row_scale")
    grid = (triton.cdiv(layer.out_features, tiles["BLOCK_ROWS"]),)
    dense.traceable_kernel(quantized_row_scale_kernel)[grid](
        *layer.args, sigma, scale, layer.out_features, layer.in_features, math.sqrt(layer.in_features),
        **layer.constexprs, **tiles, **dense.factor_constexprs(layer.lora_A, layer.lora_B, compute_dtype),
    )  # fmt: skip
    return scale


def regenerate_perturbed_weight(out: Tensor, layer: Layer4bit, row_scales, seed, rows, counters, stride_out_row,
                                stride_out_strip) -> None:
    """Write ``W'`` for ``rows x counters`` into ``out`` (layout: ``kernels/quantized_perturbed_weight.py``)."""
    (row_start, row_end), (counter_start, counter_end) = rows, counters
    tiles = _tiles("perturbed_weight")
    grid = (triton.cdiv(row_end - row_start, tiles["BLOCK_ROWS"]),
            triton.cdiv(counter_end - counter_start, tiles["BLOCK_COUNTERS"]))  # fmt: skip
    dense.traceable_kernel(quantized_perturbed_weight_kernel)[grid](
        *layer.args, row_scales, seed, out, row_start, row_end, counter_start, counter_end,
        layer.in_features, counters_per_row(layer.in_features), stride_out_row, stride_out_strip,
        **layer.constexprs, **tiles, **dense.factor_constexprs(layer.lora_A, layer.lora_B, out.dtype),
    )  # fmt: skip


def perturbed_weight_rows(layer: Layer4bit, row_scales, seed, row_start, row_end, dtype) -> Tensor:
    """``W'[row_start:row_end]`` as a new ``[rows, K]`` tensor of ``dtype`` (also: tests)."""
    k = layer.in_features
    out = torch.empty((row_end - row_start, k), dtype=dtype, device=layer.device)
    regenerate_perturbed_weight(out, layer, row_scales, seed, (row_start, row_end), (0, counters_per_row(k)), k,
                                counters_per_row(k))  # fmt: skip
    return out


def forward_streamed(x, layer: Layer4bit, bias, row_scales, seed) -> Tensor:
    """``y = x @ W'^T (+ bias)`` by the streamed strategy (``W'`` decoded in row chunks)."""
    regenerate_rows = lambda start, end: perturbed_weight_rows(layer, row_scales, seed, start, end, x.dtype)  # noqa: E731
    return dense.forward_by_row_chunks(x, bias, layer.out_features, regenerate_rows)


def input_grad_streamed(dy, layer: Layer4bit, row_scales, seed) -> Tensor:
    """``dx = dy @ W'`` by the streamed strategy (``W'`` decoded whole or in counter chunks)."""
    n = layer.out_features
    regenerate_rows = lambda start, end: perturbed_weight_rows(layer, row_scales, seed, start, end, dy.dtype)  # noqa: E731
    fill_counters = lambda chunk, counter_start, width: regenerate_perturbed_weight(  # noqa: E731
        chunk, layer, row_scales, seed, (0, n), (counter_start, counter_start + width), 4 * width, width
    )
    return dense.input_grad_by_counter_chunks(dy, n, layer.in_features, regenerate_rows, fill_counters)


def forward_in_register(x, layer: Layer4bit, bias, row_scales, seed) -> Tensor:
    """``y = x @ W'^T (+ bias)`` by the in-register strategy (one fused GEMM launch decoding each tile)."""
    n_tokens, n, k = x.shape[0], layer.out_features, layer.in_features
    kq = counters_per_row(k)
    tiles, grid, counters_per_split, out, out_strides = _quantized_launch_plan(
        "fused_forward", n_tokens, (n, "BLOCK_OUT"), (kq, "BLOCK_COUNTERS"), n, x.dtype, x.device
    )
    splits = grid[2]
    dense.traceable_kernel(quantized_fused_forward_kernel)[grid](
        *layer.args, x, row_scales, seed, row_scales if bias is None else bias, out,
        n_tokens, n, k, kq, counters_per_split, *x.stride(), *out_strides, **layer.constexprs,
        HAS_BIAS=bias is not None and splits == 1, **tiles,
        **dense.fused_constexprs(layer.lora_A, layer.lora_B, x.dtype),
    )  # fmt: skip
    return dense.sum_split_outputs(out, splits, bias, x.dtype)


def input_grad_in_register(dy, layer: Layer4bit, row_scales, seed) -> Tensor:
    """``dx = dy @ W'`` by the in-register strategy (one fused GEMM launch decoding each tile)."""
    n_tokens, n, k = dy.shape[0], layer.out_features, layer.in_features
    kq = counters_per_row(k)
    tiles, grid, rows_per_split, out, out_strides = _quantized_launch_plan(
        "fused_input_grad", n_tokens, (kq, "BLOCK_COUNTERS"), (n, "BLOCK_OUT"), k, dy.dtype, dy.device
    )
    dense.traceable_kernel(quantized_fused_input_grad_kernel)[grid](
        *layer.args, dy, row_scales, seed, out, n_tokens, n, k, kq, rows_per_split, *dy.stride(), *out_strides,
        **layer.constexprs, **tiles, **dense.fused_constexprs(layer.lora_A, layer.lora_B, dy.dtype),
    )  # fmt: skip
    return dense.sum_split_outputs(out, grid[2], None, dy.dtype)


# --- the quantized backend protocol (flatlora_kernels/quantized/reference.py) -----------------


def forward(x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
            weight_dtype, out_features, in_features, lora_A, lora_B, bias, scaling, sigma, seed):
    layer = Layer4bit(codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
                   weight_dtype, out_features, in_features, lora_A, lora_B, scaling)
    with dense.on_device(x.device):
        scale = row_scale(layer, sigma, x.dtype)
        y = dense.forward_by_strategy(
            x, bias, out_features,
            lambda bias: forward_in_register(x, layer, bias, scale, seed),
            lambda bias: forward_streamed(x, layer, bias, scale, seed),
        )  # fmt: skip
        return y, scale


def backward(dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
             nested_offset, weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, scaling, seed,
             compute_dx):
    layer = Layer4bit(codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
                   weight_dtype, out_features, in_features, lora_A, lora_B, scaling)
    with dense.on_device(x.device):
        dy = dy.to(x.dtype)
        row_scale = row_scale.contiguous()
        dx = dense.input_grad_by_strategy(
            x, in_features, compute_dx,
            lambda: input_grad_in_register(dy, layer, row_scale, seed),
            lambda: input_grad_streamed(dy, layer, row_scale, seed),
        )  # fmt: skip
        d_lora_A, d_lora_B = dense.lora_grads(dy, x, lora_A, lora_B, scaling)
        return dx, d_lora_A, d_lora_B


__all__ = [
    "Layer4bit", "forward", "backward", "forward_in_register", "input_grad_in_register", "perturbed_weight_rows",
    "row_scale", "triton_tuning",
]  # fmt: skip
