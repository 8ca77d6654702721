"""``torch.library`` ops: the layer ``torch.compile`` and autograd see.

* ``flatlora::forward`` / ``flatlora::backward`` are ``triton_op``s, so Inductor traces into the
  Triton kernels on CUDA (the launchers call them through ``wrap_triton``).
* On CPU tensors those ops call ``flatlora::forward_cpu`` / ``flatlora::backward_cpu``: opaque
  ``custom_op``s backed by the C++ extension, with their own fakes. (A CPU kernel registered on a
  ``triton_op`` is ignored under torch.compile, hence the branch inside the op.)
* Autograd is registered on ``flatlora::forward``; its backward calls ``flatlora::backward``, which
  regenerates eps from the saved seed and row scales.
* ``EagerCpp``: an ``autograd.Function`` over the same C++ kernels that eager CPU calls take instead
  of the ops (``functional.flat_lora_linear`` decides with ``eager_cpp_applies``); compiled code,
  dispatch modes and the other exceptions listed there still see the ops.

All ops take 2-D ``x``; ``flatlora_kernels.functional`` flattens leading dims. The seed and sigma
travel as tensors, so a new seed or sigma every step neither recompiles nor syncs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import get_backend


def _forward_fake(x, weight, lora_A, lora_B, bias, scaling, sigma, seed, *rest):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    row_scale = x.new_empty((weight.shape[0],), dtype=torch.float32)
    return y, row_scale


def _backward_fake(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx, *rest):
    dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


@torch.library.triton_op("flatlora::forward", mutates_args=())
def forward(
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    bias: Optional[Tensor],
    scaling: float,
    sigma: Tensor,
    seed: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    if backend == "cpp":
        return torch.ops.flatlora.forward_cpu(x, weight, lora_A, lora_B, bias, scaling, sigma, seed)
    return get_backend(backend).forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed)


@torch.library.triton_op("flatlora::backward", mutates_args=())
def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    row_scale: Tensor,
    scaling: float,
    seed: Tensor,
    compute_dx: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cpp":
        return torch.ops.flatlora.backward_cpu(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx)
    return get_backend(backend).backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx)


def register_cpu_op(name: str, triton_op, backends, method: str, fake):
    """The opaque CPU ``custom_op`` behind ``triton_op`` (a CPU kernel registered on a triton_op is
    ignored under torch.compile): ``triton_op``'s own schema less its trailing ``str backend``, run by
    ``backends("cpp").<method>`` (the C++ backend, loaded on first call), with ``fake`` for tracing."""
    schema = str(triton_op._opoverload._schema)
    arguments = schema[schema.index("(") :].replace(", str backend)", ")", 1)

    def kernel(*args):
        return getattr(backends("cpp"), method)(*args)

    op = torch.library.custom_op(name, kernel, mutates_args=(), device_types="cpu", schema=arguments)
    op.register_fake(fake)
    return op


forward_cpu = register_cpu_op("flatlora::forward_cpu", forward, get_backend, "forward", _forward_fake)
backward_cpu = register_cpu_op("flatlora::backward_cpu", backward, get_backend, "backward", _backward_fake)


def save_common_context(ctx, row_scale, bias, scaling, backend) -> None:
    """What every fused op's backward keeps besides its tensors (dense and 4-bit alike)."""
    ctx.mark_non_differentiable(row_scale)
    ctx.scaling = scaling
    ctx.backend = backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def lora_input_grads(ctx, backends, backward_op, args):
    """``dx, d_lora_A, d_lora_B`` of a fused op's backward: ``backends("cpp").backward(*args)`` for an
    EagerCpp plain backward (the same kernel without the dispatch layers), else ``backward_op(*args,
    backend)``. The C++ backend is looked up only there: another backend's backward must not need the
    extension. Under create_graph the op runs, so differentiating its gradients raises the op's own error."""
    if getattr(ctx, "eager_cpp", False) and not torch.is_grad_enabled():
        return backends("cpp").backward(*args)
    return backward_op(*args, ctx.backend)


def bias_grad(dy: Tensor, bias_dtype: torch.dtype) -> Tensor:
    """``dy.sum(0)``: fp32 accumulation for 16-bit dy, the compute dtype's own for fp32/fp64."""
    acc_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.sum(0, dtype=acc_dtype).to(bias_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, scaling, _sigma, seed, backend = inputs
    _y, row_scale = output
    save_common_context(ctx, row_scale, bias, scaling, backend)
    ctx.save_for_backward(x, weight, lora_A, lora_B, row_scale, seed)


def _backward(ctx, dy, _d_row_scale):
    x, weight, lora_A, lora_B, row_scale, seed = ctx.saved_tensors
    need_x, need_A, need_B, need_bias = (ctx.needs_input_grad[i] for i in (0, 2, 3, 4))
    dy = dy.contiguous()
    args = (dy, x, weight, lora_A, lora_B, row_scale, ctx.scaling, seed, need_x)
    dx, d_lora_A, d_lora_B = lora_input_grads(ctx, get_backend, torch.ops.flatlora.backward, args)
    d_bias = bias_grad(dy, ctx.bias_dtype) if need_bias else None
    return (
        dx if need_x else None,
        None,
        d_lora_A if need_A else None,
        d_lora_B if need_B else None,
        d_bias,
        None,
        None,
        None,
        None,
    )


forward.register_autograd(_backward, setup_context=_setup_context)


class EagerCpp(torch.autograd.Function):
    """``flatlora::forward`` with backend ``"cpp"`` for eager calls on plain CPU tensors (the caller,
    ``functional.flat_lora_linear``, checks ``eager_cpp_applies``): the same kernels, saved tensors and
    gradients, without torch.library's Python dispatch (a triton_op wrapping a custom_op, each way),
    which cost more per call than the kernels at small shapes (measured: docs/DESIGN.md, "Eager CPU calls
    bypass torch.library"). Compiled code, dispatch modes, torch.func
    transforms and tensor subclasses keep going through the ops."""

    # ctx-first forward, no setup_context: Function.apply then skips binding the arguments by signature.
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling, sigma, seed, backend):
        inputs = (x, weight, lora_A, lora_B, bias, scaling, sigma, seed, backend)
        output = get_backend("cpp").forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed)
        _setup_context(ctx, inputs, output)
        ctx.eager_cpp = True
        return output

    backward = staticmethod(_backward)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def eager_cpp_applies(tensors) -> bool:
    """Whether ``EagerCpp`` may stand in for the ops: nothing that intercepts them (tracing, modes,
    functorch, forward-mode AD, jit tracing, subclasses) is active; the caller has already resolved the backend to
    ``"cpp"``. (Forward-mode AD takes the ops too: they give no tangent where the Function would raise, and
    the shortcut must not change what a call does.)"""
    return not (
        torch.compiler.is_compiling()
        or torch.autograd.forward_ad._current_level >= 0
        or torch._C._get_tracing_state() is not None  # torch.jit.trace records the op, not the extension
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors if t is not None)
    )


def no_double_backward(entry_point: str, backward_op: str):
    """The double backward of a fused op's backward: an error (its gradients are not differentiable)."""

    def raise_error(ctx, *grads):
        raise RuntimeError(
            f"{entry_point} has no double backward: its gradients are computed by {backward_op}, which is not "
            "differentiable (create_graph=True, then differentiating the gradients, is not supported)"
        )

    return raise_error


backward.register_autograd(no_double_backward("flat_lora_linear", "flatlora::backward"))


def register_meta(op, fake) -> None:
    """Meta tensors (shape-only model construction and tracing) get the exact fake. torch 2.11's
    ``triton_op`` already claims the Meta key with its body as the fake and refuses a second kernel; there
    the body runs on meta tensors instead (the reference backend, shape-exact too: tested)."""
    try:
        op.register_kernel("meta")(fake)
    except RuntimeError as error:
        if "already a kernel registered from python" not in str(error):
            raise


register_meta(forward, _forward_fake)
register_meta(backward, _backward_fake)
