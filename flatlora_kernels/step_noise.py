"""The per-step noise state and the one training forward, shared by ``FlatLoraLinear`` and patched PEFT layers.

A layer holds ``noise_seed`` (0-dim int64) and ``noise_factor`` (0-dim fp32) as non-persistent
buffers, written in place by the schedule (so compiled graphs keep their inputs), plus
``noise_rank_key``, a plain int mixed into the seed so data-parallel ranks can draw different noise:
DistributedDataParallel broadcasts buffers from rank 0 before every forward, which would otherwise
give every rank rank 0's noise. ``noise_factor`` stays fp32 when the model is cast (``model.to(bf16)``
would round sigma by up to 0.4%).

Default (no schedule): factor 0 and seed 0, i.e. plain LoRA, the state the cosine schedule prescribes
before the first optimizer step; a training forward of such a layer with ``sigma > 0`` warns once
per model (the layers of one conversion share a ``WarnOnce``).

LoRA dropout: PEFT applies dropout to the LoRA branch input only, ``y = W x + s*B A dropout(x)``. The
fused op folds the branch into the weight, so it sees the same ``x`` for both terms; with dropout
the forward adds ``s*B A (dropout(x) - x)`` (``dropout_correction``): the result and every gradient
are PEFT's, the noise is unchanged, and the price is one LoRA branch, which PEFT pays anyway.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import flat_lora_linear

__all__ = ["StepNoise", "WarnOnce", "AdapterGradients", "lora_branch", "dropout_correction", "with_adapter_dtype", "user_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _is_library_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith((_PACKAGE_DIR, _TORCH_DIR)) or any(
        part in path for part in ("site-packages", "dist-packages", "<frozen")
    )


def user_stacklevel() -> int:
    """The ``warnings.warn`` stacklevel of the first caller outside installed libraries and this package
    (the user's ``model(x)`` line rather than torch's or transformers' module plumbing)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _is_library_file(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level


def lora_branch(x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s*B@A@x`` as PEFT computes it: x cast to the adapter's dtype."""
    return F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B) * scaling


def dropout_correction(x: Tensor, dropout, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s*B@A@(dropout(x) - x)`` in the adapter's dtype (PEFT's rule): added to the fused output, which
    holds ``s*B@A@x``, it gives PEFT's branch ``s*B@A@dropout(x)``."""
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


class WarnOnce:
    """A flag shared by the layers of one model, so the no-noise warning fires once per model. A plain
    object: pickling and ``copy.deepcopy`` carry it with the model (a copy warns on its own)."""

    def __init__(self) -> None:
        self.fired = False


_STEP_NOISE_ATTRIBUTES = ("noise_rank_key", "noise_warning", "_noise_driven", "_noise_waits_for_total_steps")


class StepNoise(nn.Module):
    """Mixin: call ``init_step_noise(device)``; needs ``sigma`` (float) and ``fused`` (bool) attributes."""

    sigma: float
    fused: bool

    def init_step_noise(self, device, warn_once: WarnOnce | None = None) -> None:
        """Give the layer its step-noise state: zero seed and factor buffers on ``device``, not yet driven."""
        self.register_buffer("noise_seed", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("noise_factor", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.noise_rank_key = 0
        self.noise_warning = warn_once or WarnOnce()
        self._noise_driven = False
        self._noise_waits_for_total_steps = False

    def remove_step_noise(self) -> None:
        """Delete what ``init_step_noise`` added (``disable_flat_lora`` hands the layer back to PEFT)."""
        for name in ("noise_seed", "noise_factor", *_STEP_NOISE_ATTRIBUTES):
            delattr(self, name)

    @torch.no_grad()
    def set_noise(self, seed: int, factor: float, rank_key: int | None = None, *, total_steps_known: bool = True) -> None:
        """Set this step's draw: written in place, so the buffers keep their identity (and graphs stay valid).
        ``total_steps_known=False``: a schedule without T set it (factor 0 until T is known)."""
        self.noise_seed.fill_(int(seed))
        self.noise_factor.fill_(float(factor))
        if rank_key is not None:
            self.noise_rank_key = int(rank_key)
        self._noise_driven = True
        self._noise_waits_for_total_steps = not total_steps_known

    def effective_seed(self) -> Tensor:
        """The seed the op uses: the step's seed, mixed with this rank's key."""
        if self.noise_rank_key == 0:
            return self.noise_seed
        return torch.bitwise_xor(self.noise_seed, self.noise_rank_key)

    def _op_backend(self) -> str:
        """``"auto"`` (C++ on CPU, Triton on CUDA) when fused, else ``"reference"`` (plain PyTorch)."""
        return "auto" if self.fused else "reference"

    def effective_sigma(self) -> Tensor:
        """``sigma * factor`` as a 0-dim fp32 tensor (no host sync, no recompile when the factor moves)."""
        return self.noise_factor * self.sigma

    def _apply(self, fn, *args, **kwargs):
        factor = self._buffers.get("noise_factor")
        result = super()._apply(fn, *args, **kwargs)
        moved = self._buffers.get("noise_factor")
        if factor is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["noise_factor"] = factor.to(moved.device)  # a dtype cast: keep the fp32 value
        return result

    def _warn_if_undriven(self) -> None:
        undriven = not self._noise_driven or self._noise_waits_for_total_steps
        if not undriven or self.noise_warning.fired or self.sigma == 0 or torch.compiler.is_compiling():
            return
        self.noise_warning.fired = True
        if self._noise_waits_for_total_steps:
            cause = (
                "its FlatLoraSchedule has total_steps=None, which only FlatLoraCallback fills in (from the "
                "Trainer), so the noise factor stays 0. Pass FlatLoraSchedule(model, total_steps=<optimizer steps>) "
                "in a plain training loop, or add callbacks=[FlatLoraCallback(schedule)] to the Trainer."
            )
        else:
            cause = (
                "no FlatLoraSchedule (or set_noise call) drives it, so its noise factor is 0. Create "
                "flatlora_kernels.FlatLoraSchedule(model, total_steps) and call .step() after each optimizer step."
            )
        warnings.warn(
            f"{type(self).__name__} is training with no noise (as plain LoRA): {cause}", stacklevel=user_stacklevel()
        )

    def noisy_linear(
        self,
        x: Tensor,
        weight: Tensor | nn.Module,
        lora_A: Tensor,
        lora_B: Tensor,
        bias: Tensor | None,
        scaling: float,
        dropout: nn.Module | None,
    ) -> Tensor:
        """The training forward: ``x (W + s*B@A + eps)^T + bias`` plus the dropout correction.

        ``weight`` is the base's float weight as ``[out, in]`` (a view for ``[in, out]`` storage), run
        by ``flat_lora_linear``; or, for a bitsandbytes 4-bit base (``layer_support.BNB_LINEAR4BIT``),
        the ``Linear4bit`` itself, run by ``quantized.flat_qlora_forward`` (its packed weight decoded
        chunk by chunk, in its compute dtype; ``bias`` is not used: the base's own is). Either base
        is frozen: that was checked on the registered Parameter when the layer was made
        (``layer_support``), so a weight that requires grad here is a wrapper's view (FSDP1 hands the
        forward views of its flat parameter) and is detached. Adapters in another dtype than the
        op's follow PEFT's rule (``with_adapter_dtype``).
        """
        if isinstance(weight, nn.Module):
            from .quantized.modules import flat_qlora_forward  # imported on first use: no cycle

            self._warn_if_undriven()
            y = flat_qlora_forward(
                weight, x, lora_A, lora_B, scaling=scaling, sigma=self.effective_sigma(), seed=self.effective_seed(),
                backend=self._op_backend(),
            )
        else:
            if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
                # What nn.Linear (and PEFT's forward) does, rather than training in a silent cast.
                raise RuntimeError(
                    f"{type(self).__name__}: input dtype {x.dtype} differs from the layer's weight dtype "
                    f"{weight.dtype} (cast the input or the model, or run under torch.autocast)"
                )
            self._warn_if_undriven()
            weight = weight.detach() if weight.requires_grad else weight
            y = with_adapter_dtype(
                lambda A, B: flat_lora_linear(
                    x, weight, A, B, bias, scaling=scaling, sigma=self.effective_sigma(), seed=self.effective_seed(),
                    backend=self._op_backend(),
                ),
                x, lora_A, lora_B, scaling,
            )
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            y = y + dropout_correction(x, dropout, lora_A, lora_B, scaling).to(y.dtype)
        return y
