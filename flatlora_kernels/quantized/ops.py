"""``torch.library`` ops of the 4-bit layer: ``flatlora_q4::forward`` / ``flatlora_q4::backward``.

Built like ``flatlora_kernels/ops.py`` (the dense ops): ``triton_op``s that Inductor traces into on
CUDA; on CPU tensors they call opaque ``custom_op``s backed by the C++ extension
(``flatlora_q4::forward_cpu`` / ``backward_cpu``), each with a fake; autograd is registered on the
forward, whose backward regenerates ``deq(W)`` rows and eps from the seed and the saved row scales.
``EagerCpp4bit`` runs the same C++ kernels for eager CPU calls without the dispatch layers, under
the same conditions as the dense ``EagerCpp`` (``ops.eager_cpp_applies``).

The weight travels as ``Packed4bit.op_args()``: the packed codes, the absmax (fp32, or uint8 codes
with their nested scales, code table and offset), the 4-bit code table, the blocksize, the dtype
bitsandbytes dequantizes to and the shape. Nothing is expanded or copied before the kernels.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from ..ops import (
    bias_grad,
    eager_cpp_applies,
    lora_input_grads,
    no_double_backward,
    register_cpu_op,
    register_meta,
    save_common_context,
)

__all__ = ["get_backend", "EagerCpp4bit", "eager_cpp_applies"]

_BACKEND_MODULES = {
    "reference": "flatlora_kernels.quantized.reference",
    "cpp": "flatlora_kernels.quantized.cpp_backend",
    "triton": "flatlora_kernels.backends.triton_quantized",
}
_LOADED: dict = {}
_WEIGHT_ARGS = 11  # len(Packed4bit.op_args())


def get_backend(name: str):
    module = _LOADED.get(name)
    if module is None:
        if name not in _BACKEND_MODULES:
            raise ValueError(f"unknown backend {name!r} for a 4-bit layer; expected one of {tuple(_BACKEND_MODULES)}")
        module = _LOADED[name] = importlib.import_module(_BACKEND_MODULES[name])
    return module


def _forward_fake(x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
                  nested_offset, weight_dtype, out_features, in_features, *rest):
    return x.new_empty((x.shape[0], out_features)), x.new_empty((out_features,), dtype=torch.float32)


def _backward_fake(dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize,
                   nested_offset, weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, scaling, seed,
                   compute_dx, *rest):
    dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.triton_op("flatlora_q4::forward", mutates_args=())
def forward(
    x: Tensor, codes: Tensor, absmax: Tensor, code_table: Tensor, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], blocksize: int, nested_blocksize: int, nested_offset: float,
    weight_dtype: torch.dtype, out_features: int, in_features: int, lora_A: Tensor, lora_B: Tensor,
    bias: Optional[Tensor], scaling: float, sigma: Tensor, seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    args = (x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
            weight_dtype, out_features, in_features, lora_A, lora_B, bias, scaling, sigma, seed)
    if backend == "cpp":
        return torch.ops.flatlora_q4.forward_cpu(*args)
    return get_backend(backend).forward(*args)


@torch.library.triton_op("flatlora_q4::backward", mutates_args=())
def backward(
    dy: Tensor, x: Tensor, codes: Tensor, absmax: Tensor, code_table: Tensor, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], blocksize: int, nested_blocksize: int, nested_offset: float,
    weight_dtype: torch.dtype, out_features: int, in_features: int, lora_A: Tensor, lora_B: Tensor,
    row_scale: Tensor, scaling: float, seed: Tensor, compute_dx: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    args = (dy, x, codes, absmax, code_table, nested_absmax, nested_code, blocksize, nested_blocksize, nested_offset,
            weight_dtype, out_features, in_features, lora_A, lora_B, row_scale, scaling, seed, compute_dx)
    if backend == "cpp":
        return torch.ops.flatlora_q4.backward_cpu(*args)
    return get_backend(backend).backward(*args)


forward_cpu = register_cpu_op("flatlora_q4::forward_cpu", forward, get_backend, "forward", _forward_fake)
backward_cpu = register_cpu_op("flatlora_q4::backward_cpu", backward, get_backend, "backward", _backward_fake)


def _setup_context(ctx, inputs, output):
    x = inputs[0]
    weight_args = inputs[1 : 1 + _WEIGHT_ARGS]
    lora_A, lora_B, bias, scaling, _sigma, seed, backend = inputs[1 + _WEIGHT_ARGS :]
    _y, row_scale = output
    save_common_context(ctx, row_scale, bias, scaling, backend)
    # The weight's tensors are the base layer's own: saving them keeps nothing new alive.
    tensor_positions = [i for i, a in enumerate(weight_args) if isinstance(a, Tensor)]
    ctx.weight_args = [None if i in tensor_positions else a for i, a in enumerate(weight_args)]
    ctx.tensor_positions = tensor_positions
    ctx.save_for_backward(x, lora_A, lora_B, row_scale, seed, *(weight_args[i] for i in tensor_positions))


def _backward(ctx, dy, _d_row_scale):
    x, lora_A, lora_B, row_scale, seed, *weight_tensors = ctx.saved_tensors
    weight_args = list(ctx.weight_args)
    for position, tensor in zip(ctx.tensor_positions, weight_tensors):
        weight_args[position] = tensor
    need_x, need_A, need_B, need_bias = (ctx.needs_input_grad[i] for i in (0, 1 + _WEIGHT_ARGS, 2 + _WEIGHT_ARGS,
                                                                             3 + _WEIGHT_ARGS))
    dy = dy.contiguous()
    args = (dy, x, *weight_args, lora_A, lora_B, row_scale, ctx.scaling, seed, need_x)
    dx, d_lora_A, d_lora_B = lora_input_grads(ctx, get_backend, torch.ops.flatlora_q4.backward, args)
    d_bias = bias_grad(dy, ctx.bias_dtype) if need_bias else None
    return (
        dx if need_x else None, *([None] * _WEIGHT_ARGS), d_lora_A if need_A else None,
        d_lora_B if need_B else None, d_bias, None, None, None, None,
    )


forward.register_autograd(_backward, setup_context=_setup_context)


class EagerCpp4bit(torch.autograd.Function):
    """``flatlora_q4::forward`` with backend ``"cpp"`` for eager calls on plain CPU tensors: the same
    kernels and gradients without torch.library's Python dispatch (see the dense ``ops.EagerCpp``)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = get_backend("cpp").forward(*inputs[:-1])
        _setup_context(ctx, inputs, output)
        ctx.eager_cpp = True
        return output

    backward = staticmethod(_backward)


backward.register_autograd(no_double_backward("flat_qlora_linear", "flatlora_q4::backward"))
register_meta(forward, _forward_fake)
register_meta(backward, _backward_fake)
