"""The fused LoRA forward of one base layer under PEFT's rules for the adapter: its dtype and its dropout.

PEFT runs the LoRA branch in the adapter's dtype (``x`` cast to it: fp32 adapters on a bf16 base by
default) and applies dropout to the branch input only, ``y = W x + s*B A dropout(x)``. The fused op
folds the branch into the weight and runs its GEMMs in ``x``'s dtype, so:

* ``with_adapter_dtype``: factors in another dtype get their gradients from ``AdapterGradients``,
  the branch's in the adapter's dtype, which keeps ``x`` once, in its own dtype;
* ``dropout_correction``: the forward adds ``s*B A (dropout(x) - x)``, so the result and every
  gradient are PEFT's (the price is one LoRA branch, which PEFT pays anyway, run again in the
  backward so that it keeps no activation of its own).

``float_weight_forward`` is the fused forward of a base with a float weight (``nn.Linear``,
``Conv1D``): the base kinds' default (``layer_support.BaseLayerKind.run``); a 4-bit base has its own
(``quantized.modules.flat_qlora_forward``), built from the same rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .functional import flat_lora_linear

__all__ = ["lora_branch", "dropout_correction", "AdapterGradients", "with_adapter_dtype", "float_weight_forward"]


def lora_branch(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s*B@A@x`` as PEFT computes it: x cast to the adapter's dtype."""
    return F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling


def dropout_correction(x: Tensor, dropout, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s*B@A@(dropout(x) - x)`` in the adapter's dtype (PEFT's rule): added to the fused output, which
    holds ``s*B@A@x``, it gives PEFT's branch ``s*B@A@dropout(x)``. The branch is recomputed in the
    backward (``torch.utils.checkpoint``, the RNG state restored, so the same mask): autograd keeps
    only ``x`` for it, which the fused op keeps anyway, where keeping the branch's own inputs (the
    dropout scale and ``dropout(x) - x``, activation-sized) saved 1.25-1.5x PEFT's bytes. The
    recomputation runs the forward's ops on the same values, so every gradient keeps its bits."""
    return checkpoint(_correction_branch, x, dropout, lora_A, lora_B, scaling, use_reentrant=False,
                      preserve_rng_state=True)  # fmt: skip


def _correction_branch(x: Tensor, dropout, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    xa = x.to(lora_A.dtype)
    return lora_branch(dropout(xa) - xa, lora_A, lora_B, scaling)


class AdapterGradients(torch.autograd.Function):
    """``y`` unchanged in the forward; the backward adds the factor gradients of the LoRA branch
    ``s*B@A@x`` in the adapter's dtype (PEFT's rule), the same GEMMs in the same order as autograd runs
    for ``lora_branch(x, lora_A, lora_B, scaling)``, so they match it bit for bit. ``x`` is saved in its
    own dtype (the tensor the fused op saves: nothing new is kept) and cast in the backward: bf16/fp16
    to fp32 is exact. Autograd through ``lora_branch`` would keep ``x``'s fp32 copy as well."""

    @staticmethod
    def forward(ctx, y, x, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B = ctx.saved_tensors
        need_A, need_B = ctx.needs_input_grad[2:4]
        x_2d = x.reshape(-1, x.shape[-1]).to(lora_A.dtype)
        grad = dy.reshape(-1, dy.shape[-1]).to(lora_A.dtype) * ctx.scaling
        d_lora_B = grad.t().mm(F.linear(x_2d, lora_A)) if need_B else None
        if need_A:
            # autograd's mm backward computes a 1x1 input's gradient (a column-major one) transposed
            column_major = grad.shape[0] == 1 and lora_B.shape[1] == 1
            d_hidden = lora_B.t().mm(grad.t()).t() if column_major else grad.mm(lora_B)
            d_lora_A = d_hidden.t().mm(x_2d)
        else:
            d_lora_A = None
        return dy, None, d_lora_A, d_lora_B, None


def with_adapter_dtype(fused_op, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``fused_op(lora_A, lora_B)`` (a fused op whose GEMMs run in ``x``'s dtype) under PEFT's adapter
    dtype rule, where the LoRA branch runs in the adapter's dtype: when the factors' dtype is not
    ``x``'s (fp32 adapters on a bf16 model), the op gets them detached and their gradients come from
    ``AdapterGradients``, the LoRA branch's in the adapter's dtype (exactly zero in the forward)."""
    adapter_apart = lora_A.dtype != x.dtype or lora_B.dtype != x.dtype
    y = fused_op(lora_A.detach() if adapter_apart else lora_A, lora_B.detach() if adapter_apart else lora_B)
    if adapter_apart and torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad):
        y = AdapterGradients.apply(y, x.detach(), lora_A, lora_B, scaling)
    return y


def float_weight_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, *, scaling: float, sigma,
    seed, backend: str, name: str,
) -> Tensor:
    """``x (W + s*B@A + eps)^T + bias`` over a float base weight ``[out, in]`` (a view for ``[in, out]``
    storage), adapters under PEFT's dtype rule. The base is frozen: that was checked on the registered
    Parameter when the layer was made (``layer_support``), so a weight that requires grad here is a
    wrapper's view (FSDP1 hands the forward views of its flat parameter) and is detached. Bad input
    raises naming ``name`` (the layer's class)."""
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        # What nn.Linear (and PEFT's forward) does, rather than training in a silent cast.
        raise RuntimeError(
            f"{name}: input dtype {x.dtype} differs from the layer's weight dtype {weight.dtype} (cast the "
            "input or the model, or run under torch.autocast)"
        )
    weight = weight.detach() if weight.requires_grad else weight
    return with_adapter_dtype(
        lambda A, B: flat_lora_linear(x, weight, A, B, bias, scaling=scaling, sigma=sigma, seed=seed, backend=backend),
        x, lora_A, lora_B, scaling,
    )  # fmt: skip
