"""One family of ``torch.library`` ops per weight format: the layer ``torch.compile`` and autograd see.

``OpFamily(namespace, weight_schema, ...)`` declares, for a weight that travels as the arguments
``weight_schema`` (the dense weight: ``Tensor weight``; the 4-bit one: its codes, scales and shape):

* ``<namespace>::forward`` / ``<namespace>::backward``: ``triton_op``s, so Inductor traces into the
  Triton kernels on CUDA (the launchers call them through ``wrap_triton``);
* for each backend that is opaque to torch.library (``backends.Backend.opaque``: the C++ one), the
  ``custom_op``s ``<namespace>::forward_<device>`` / ``backward_<device>`` that the triton_ops call for it,
  with fakes (a kernel registered on a ``triton_op`` itself is ignored under torch.compile);
* autograd on the forward, whose backward calls ``<namespace>::backward`` (eps regenerated from the
  saved seed and row scales); an error for a double backward; meta kernels (the fakes);
* ``eager``: an ``autograd.Function`` over an opaque backend's kernels for eager calls on plain
  tensors, which skip torch.library's Python dispatch (``eager_applies`` decides; same kernels, saved
  tensors and gradients; measured: docs/DESIGN.md, "Eager CPU calls bypass torch.library").

Every op takes 2-D ``x``; ``functional.run_fused_op`` flattens leading dims. The seed and sigma travel
as tensors, so a new seed or sigma every step neither recompiles nor syncs.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
from torch import Tensor

from . import backends

__all__ = ["OpFamily", "eager_applies", "bias_grad"]

_FORWARD = "(Tensor x, {weight}, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, Tensor sigma, Tensor seed"
_BACKWARD = ("(Tensor dy, Tensor x, {weight}, Tensor lora_A, Tensor lora_B, Tensor row_scale, float scaling, "
             "Tensor seed, bool compute_dx")  # fmt: skip
_FORWARD_OUT = " -> (Tensor, Tensor)"
_BACKWARD_OUT = " -> (Tensor, Tensor, Tensor)"


class OpFamily:
    """The ops of one weight format (module docstring). ``weight_schema``: the weight's arguments in
    torch.library's schema syntax; ``format``: its name in ``backends`` (``get_backend(name, format)``
    gives each backend's module for it); ``out_features(*weight_args)``: the output width (for the
    fakes); ``entry_point``: the public function named by the double-backward error; ``eager_name``:
    the eager Function's class name (its autograd node is ``<eager_name>Backward``)."""

    def __init__(self, namespace: str, weight_schema: str, *, format: str, out_features: Callable[..., int],
                 entry_point: str, eager_name: str) -> None:  # fmt: skip
        self.namespace = namespace
        self.format = format
        self.weights = weight_schema.count(",") + 1  #: how many arguments the weight takes
        self._out_features = out_features
        forward_args, backward_args = _FORWARD.format(weight=weight_schema), _BACKWARD.format(weight=weight_schema)
        self.forward = torch.library.triton_op(
            f"{namespace}::forward", _with_signature(self._forward, forward_args + ", str backend", 2), mutates_args=()
        )
        self.backward = torch.library.triton_op(
            f"{namespace}::backward", _with_signature(self._backward, backward_args + ", str backend", 3),
            mutates_args=(),
        )
        #: backend name -> (forward, backward) custom_ops, for the backends opaque to torch.library
        self.opaque_ops = {
            spec.name: self._opaque_ops(spec, forward_args + ")" + _FORWARD_OUT, backward_args + ")" + _BACKWARD_OUT)
            for spec in backends.REGISTRY.values() if spec.opaque
        }  # fmt: skip
        ops = getattr(torch.ops, namespace)
        self.graph_forward, self._graph_backward = ops.forward, ops.backward  # what traced code calls
        self.forward.register_autograd(self._autograd_backward, setup_context=self._setup_context)
        self.backward.register_autograd(_no_double_backward(entry_point, f"{namespace}::backward"))
        _register_meta(self.forward, self._forward_fake)
        _register_meta(self.backward, self._backward_fake)
        self.eager = self._eager_function(eager_name)

    # --- the ops' bodies and fakes ---------------------------------------------------------------

    def _forward(self, *args):
        *op_args, backend = args
        opaque = self.opaque_ops.get(backend)
        if opaque is not None:
            return opaque[0](*op_args)
        return backends.get_backend(backend, self.format).forward(*op_args)

    def _backward(self, *args):
        *op_args, backend = args
        opaque = self.opaque_ops.get(backend)
        if opaque is not None:
            return opaque[1](*op_args)
        return backends.get_backend(backend, self.format).backward(*op_args)

    def _forward_fake(self, x, *rest):
        out_features = self._out_features(*rest[: self.weights])
        return x.new_empty((x.shape[0], out_features)), x.new_empty((out_features,), dtype=torch.float32)

    def _backward_fake(self, dy, x, *rest):
        lora_A, lora_B, _row_scale, _scaling, _seed, compute_dx = rest[self.weights : self.weights + 6]
        dx = torch.empty_like(x) if compute_dx else x.new_empty((0,))
        return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)

    def _opaque_ops(self, spec, forward_schema: str, backward_schema: str):
        """The custom_ops running opaque backend ``spec`` (loaded on first call), each with its fake."""
        device = spec.devices[0]
        ops = []
        for name, schema, method, fake in (("forward", forward_schema, "forward", self._forward_fake),
                                           ("backward", backward_schema, "backward", self._backward_fake)):  # fmt: skip
            def kernel(*args, method=method):
                return getattr(backends.get_backend(spec.name, self.format), method)(*args)

            op = torch.library.custom_op(f"{self.namespace}::{name}_{device}", kernel, mutates_args=(),
                                         device_types=spec.devices, schema=schema)  # fmt: skip
            op.register_fake(fake)
            ops.append(op)
        return tuple(ops)

    # --- autograd --------------------------------------------------------------------------------

    def _setup_context(self, ctx, inputs, output):
        x = inputs[0]
        weight_args = inputs[1 : 1 + self.weights]
        lora_A, lora_B, bias, scaling, _sigma, seed, backend = inputs[1 + self.weights :]
        _y, row_scale = output
        ctx.mark_non_differentiable(row_scale)
        ctx.scaling = scaling
        ctx.backend = backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        # The weight's tensors are the base layer's own: saving them keeps nothing new alive.
        tensor_positions = [i for i, a in enumerate(weight_args) if isinstance(a, Tensor)]
        ctx.weight_args = [None if i in tensor_positions else a for i, a in enumerate(weight_args)]
        ctx.tensor_positions = tensor_positions
        ctx.save_for_backward(x, lora_A, lora_B, row_scale, seed, *(weight_args[i] for i in tensor_positions))

    def _autograd_backward(self, ctx, dy, _d_row_scale):
        x, lora_A, lora_B, row_scale, seed, *weight_tensors = ctx.saved_tensors
        weight_args = list(ctx.weight_args)
        for position, tensor in zip(ctx.tensor_positions, weight_tensors):
            weight_args[position] = tensor
        n = self.weights
        need_x, need_A, need_B, need_bias = (ctx.needs_input_grad[i] for i in (0, 1 + n, 2 + n, 3 + n))
        dy = dy.contiguous()
        args = (dy, x, *weight_args, lora_A, lora_B, row_scale, ctx.scaling, seed, need_x)
        if getattr(ctx, "eager", False) and not torch.is_grad_enabled():
            # the eager Function's plain backward: the backend's kernel without the dispatch layers. Under
            # create_graph the op runs, so differentiating its gradients raises the op's own error.
            dx, d_lora_A, d_lora_B = backends.get_backend(ctx.backend, self.format).backward(*args)
        else:
            dx, d_lora_A, d_lora_B = self._graph_backward(*args, ctx.backend)
        d_bias = bias_grad(dy, ctx.bias_dtype) if need_bias else None
        return (dx if need_x else None, *([None] * n), d_lora_A if need_A else None, d_lora_B if need_B else None,
                d_bias, None, None, None, None)  # fmt: skip

    def _eager_function(self, name: str) -> type:
        """The ``autograd.Function`` ``name`` (made by ``type``: its autograd node class, ``<name>Backward``,
        is named when the class is created)."""
        family = self

        # ctx-first forward, no setup_context: Function.apply then skips binding the arguments by signature.
        def forward(ctx, *inputs):
            output = backends.get_backend(inputs[-1], family.format).forward(*inputs[:-1])
            family._setup_context(ctx, inputs, output)
            ctx.eager = True
            return output

        def backward(ctx, dy, d_row_scale):
            return family._autograd_backward(ctx, dy, d_row_scale)

        doc = (f"``{self.namespace}::forward`` on an opaque backend for eager calls on plain tensors: the same "
               "kernels, saved tensors and gradients, without torch.library's Python dispatch.")  # fmt: skip
        return type(name, (torch.autograd.Function,), dict(
            forward=staticmethod(forward), backward=staticmethod(backward), __doc__=doc, __module__=__name__,
        ))  # fmt: skip


_SCHEMA_TYPES = {"Tensor": Tensor, "Tensor?": Optional[Tensor], "SymInt": int, "float": float,
                 "ScalarType": torch.dtype, "str": str, "bool": bool}  # fmt: skip


def _with_signature(body: Callable, arguments: str, outputs: int) -> Callable:
    """``body(*args)`` with the typed signature of ``arguments`` (``"(Tensor x, float scaling, ..."``)
    returning ``outputs`` tensors: ``triton_op`` infers the op's schema from its function's signature."""
    parameters = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_SCHEMA_TYPES[kind])
        for kind, name in (argument.rsplit(" ", 1) for argument in arguments.strip("(").split(", "))
    ]

    def op(*args):
        return body(*args)

    op.__signature__ = inspect.Signature(parameters, return_annotation=tuple[(Tensor,) * outputs])
    op.__annotations__ = {p.name: p.annotation for p in parameters}
    return op


def bias_grad(dy: Tensor, bias_dtype: torch.dtype) -> Tensor:
    """``dy.sum(0)``: fp32 accumulation for 16-bit dy, the compute dtype's own for fp32/fp64."""
    acc_dtype = torch.float64 if dy.dtype == torch.float64 else torch.float32
    return dy.sum(0, dtype=acc_dtype).to(bias_dtype)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def eager_applies(tensors) -> bool:
    """Whether an ``OpFamily.eager`` Function may stand in for the ops: nothing that intercepts them
    (tracing, modes, functorch, forward-mode AD, jit tracing, subclasses) is active; the caller has
    already resolved the backend to an opaque one. (Forward-mode AD takes the ops too: they give no
    tangent where the Function would raise, and the shortcut must not change what a call does.)"""
    return not (
        torch.compiler.is_compiling()
        or torch.autograd.forward_ad._current_level >= 0
        or torch._C._get_tracing_state() is not None  # torch.jit.trace records the op, not the extension
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or any(type(t) not in _PLAIN_TENSOR_TYPES for t in tensors if t is not None)
    )


def _no_double_backward(entry_point: str, backward_op: str):
    """The double backward of a fused op's backward: an error (its gradients are not differentiable)."""

    def raise_error(ctx, *grads):
        raise RuntimeError(
            f"{entry_point} has no double backward: its gradients are computed by {backward_op}, which is not "
            "differentiable (create_graph=True, then differentiating the gradients, is not supported)"
        )

    return raise_error


def _register_meta(op, fake) -> None:
    """Meta tensors (shape-only model construction and tracing) get the exact fake. torch 2.11's
    ``triton_op`` already claims the Meta key with its body as the fake and refuses a second kernel; there
    the body runs on meta tensors instead (the reference backend, shape-exact too: tested)."""
    try:
        op.register_kernel("meta")(fake)
    except RuntimeError as error:
        if "already a kernel registered from python" not in str(error):
            raise
