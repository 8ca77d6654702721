"""``FlatLoraLinear``: a frozen ``nn.Linear`` plus a LoRA adapter, trained under Flat-LoRA noise.

In training mode the layer computes ``y = x (W + s*B@A + eps)^T + bias`` with the fused op
(``flatlora_kernels.functional.flat_lora_linear``); eps is regenerated from a seed, never stored,
and the base weight is never written to. In eval mode it is plain LoRA (no noise).

Noise state
-----------
Two non-persistent buffers hold what changes between optimizer steps, so that updating them never
recompiles under ``torch.compile`` and never syncs the device:

* ``noise_seed`` (0-dim int64): the draw of the current optimizer step;
* ``noise_factor`` (0-dim fp32): the schedule's factor; the effective noise level is
  ``sigma * noise_factor``.

A ``FlatLoraSchedule`` writes both once per optimizer step. **Default (no schedule): factor 0 and
seed 0, i.e. plain LoRA.** That is exactly the state the cosine schedule prescribes before the first
optimizer step, and it never silently trains against one frozen perturbation (which a fixed seed
with factor 1 would do). A training forward of an undriven layer with ``sigma > 0`` warns once.
Call ``set_noise(seed, factor)`` to drive a layer by hand.

Data-parallel ranks draw different noise through ``noise_rank_key``, a plain int (not a buffer)
mixed into the seed in forward: DistributedDataParallel broadcasts buffers from rank 0 before every
forward, which would otherwise give every rank rank 0's noise.

LoRA dropout
------------
PEFT applies dropout to the LoRA branch input only: ``y = W x + s*B A dropout(x)``. The fused op
folds the branch into the weight, so it sees the same ``x`` for both terms. With ``lora_dropout > 0``
the layer runs the fused op on ``x`` and adds the correction ``s*B A (dropout(x) - x)``: the result
(and every gradient) is exactly PEFT's, the noise is unchanged (its row norms still come from
``W + s*B@A``), and the price is one LoRA branch, which is what PEFT pays for its branch anyway.
With the default ``lora_dropout=0`` no branch is computed.

Merging
-------
``merge()`` replaces the base weight's data by the noise-free ``W + s*B@A`` (rounded once to W's
dtype) and keeps the original tensor aside; ``unmerge()`` puts that tensor back. Nothing is
subtracted, so unmerge is bit-exact in bf16, at the cost of a second weight copy while merged
(``flatlora_kernels.model_helpers.merge_and_unload`` keeps no copy).
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_integer, check_real
from .functional import flat_lora_linear
from .step_noise import StepNoise

__all__ = ["FlatLoraLinear"]

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


def _is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 family): ``y = x @ W + b`` with ``W: [in, out]``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _check_config(r, lora_alpha, sigma, lora_dropout) -> None:
    check_integer("r", r, minimum=1)
    check_real("lora_alpha", lora_alpha, low=0, low_open=True)
    check_real("sigma", sigma, low=0)
    check_real("lora_dropout", lora_dropout, low=0, high=1, high_open=True)


def dropout_correction(x: Tensor, dropout: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``s*B@A@(dropout(x) - x)``: added to the fused output (which holds ``s*B@A@x``) it gives PEFT's
    branch ``s*B@A@dropout(x)`` exactly, with the same noise (see the module docstring)."""
    xa = x.to(lora_A.dtype)
    return F.linear(F.linear(dropout(xa) - xa, lora_A), lora_B) * scaling


class FlatLoraLinear(StepNoise):
    """A frozen linear layer with a trainable LoRA adapter and Flat-LoRA weight noise.

    Args:
        in_features, out_features: as ``nn.Linear``.
        r: LoRA rank (``lora_A: [r, in]``, Kaiming-uniform; ``lora_B: [out, r]``, zeros).
        lora_alpha: the scale is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
        sigma: the Flat-LoRA noise level (0.05-0.1 in the paper); the schedule's factor multiplies it.
        bias: whether the (frozen) base layer has a bias.
        fused: True runs ``flat_lora_linear(backend="auto")`` (C++ on CPU, Triton on CUDA); False the
            plain-PyTorch ``"reference"`` backend: same math, same noise, more memory and time.
        lora_dropout: dropout on the LoRA branch input (see the module docstring for how).
        device, dtype: of the base weight and bias. ``lora_dtype`` (default: ``dtype``) is the dtype of
            ``lora_A`` / ``lora_B``, e.g. fp32 adapters on a bf16 model.

    Only ``lora_A`` and ``lora_B`` require grad; ``weight`` and ``bias`` are frozen Parameters, so
    ``state_dict`` keys match ``nn.Linear``'s plus the two LoRA tensors. A layer made from GPT-2's
    ``Conv1D`` (``from_linear``) keeps its ``[in, out]`` weight (``fan_in_fan_out=True``) and hands the op
    ``weight.t()``, a view: noise rows are still output features.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 16,
        sigma: float = 0.05,
        bias: bool = True,
        fused: bool = True,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        device=None,
        dtype=None,
        lora_dtype=None,
    ) -> None:
        super().__init__()
        in_features = check_integer("in_features", in_features, minimum=1)
        out_features = check_integer("out_features", out_features, minimum=1)
        self._configure(in_features, out_features, r, lora_alpha, sigma, fused, lora_dropout, use_rslora)
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._init_base_like_nn_linear()
        self._build_adapter(lora_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16,
        sigma: float = 0.05,
        fused: bool = True,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        lora_dtype=None,
    ) -> "FlatLoraLinear":
        """Wrap an ``nn.Linear`` (or transformers' ``Conv1D``): weight and bias are shared (not copied), frozen."""
        conv1d = _is_conv1d(linear)
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise TypeError(f"from_linear expects an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        in_features, out_features = linear.weight.shape if conv1d else (linear.in_features, linear.out_features)
        layer._configure(in_features, out_features, r, lora_alpha, sigma, fused, lora_dropout, use_rslora)
        layer.fan_in_fan_out = conv1d
        layer.weight = linear.weight.requires_grad_(False)
        if linear.bias is not None:
            layer.bias = linear.bias.requires_grad_(False)
        else:
            layer.register_parameter("bias", None)
        layer._build_adapter(lora_dtype)
        return layer

    # --- construction -------------------------------------------------------------------------

    def _configure(self, in_features, out_features, r, lora_alpha, sigma, fused, lora_dropout, use_rslora):
        _check_config(r, lora_alpha, sigma, lora_dropout)
        self.in_features = in_features
        self.out_features = out_features
        self.r = int(r)
        self.lora_alpha = lora_alpha
        self.use_rslora = bool(use_rslora)
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.sigma = float(sigma)
        self.fused = bool(fused)
        self.lora_dropout_p = float(lora_dropout)
        self.fan_in_fan_out = False

    def _init_base_like_nn_linear(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _build_adapter(self, lora_dtype) -> None:
        device, dtype = self.weight.device, lora_dtype or self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, device=device, dtype=dtype))
        self.lora_dropout = nn.Dropout(self.lora_dropout_p) if self.lora_dropout_p > 0 else None
        self._init_step_noise(device)
        # The original base weight while merged (a buffer so that .to() moves it along).
        self.register_buffer("_unmerged_weight", None, persistent=False)
        # Shared by all layers of one apply_flat_lora call, so the no-schedule warning fires once per model.
        self._warn_group = {"warned": False}
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform, B zero, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- noise state --------------------------------------------------------------------------

    # set_noise, effective_seed, effective_sigma: see step_noise.StepNoise.

    @property
    def linear_weight(self) -> Tensor:
        """The base weight as ``[out, in]`` (a transposed view for a Conv1D base)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def backend(self) -> str:
        return "auto" if self.fused else "reference"

    # --- forward ------------------------------------------------------------------------------

    def _lora_branch(self, x: Tensor) -> Tensor:
        """``s * B A x`` computed in the adapter's dtype."""
        return F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scaling

    def _plain_lora(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.linear_weight, self.bias)
        branch_input = x if self.lora_dropout is None else self.lora_dropout(x)
        return y + self._lora_branch(branch_input).to(y.dtype)

    def _warn_if_undriven(self) -> None:
        if self._noise_driven or self._warn_group["warned"] or self.sigma == 0 or torch.compiler.is_compiling():
            return
        self._warn_group["warned"] = True
        warnings.warn(
            "FlatLoraLinear is training with no noise: no FlatLoraSchedule (or set_noise call) drives it, "
            "so its noise factor is 0 and it trains as plain LoRA. Create "
            "flatlora_kernels.FlatLoraSchedule(model, total_steps) and call .step() after each optimizer step.",
            stacklevel=user_stacklevel(),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training:
                raise RuntimeError("FlatLoraLinear is merged: call unmerge() before training")
            return F.linear(x, self.linear_weight, self.bias)
        if not self.training:
            return self._plain_lora(x)  # evaluation: no noise
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # What nn.Linear does (and this layer does in eval), rather than training in a silent cast.
            raise RuntimeError(
                f"FlatLoraLinear: input dtype {x.dtype} differs from the layer's weight dtype {self.weight.dtype} "
                "(cast the input, the model, or run under torch.autocast)"
            )
        self._warn_if_undriven()
        y = flat_lora_linear(
            x,
            self.linear_weight,
            self.lora_A,
            self.lora_B,
            self.bias,
            scaling=self.scaling,
            sigma=self.effective_sigma(),
            seed=self.effective_seed(),
            backend=self.backend,
        )
        if self.lora_dropout is not None:
            y = y + dropout_correction(x, self.lora_dropout, self.lora_A, self.lora_B, self.scaling).to(y.dtype)
        return y

    # --- merging ------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the noise-free adapter into the weight for inference: ``W <- W + s*B@A`` (no-op if merged)."""
        if self.merged:
            return
        original = self.weight.data
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        if self.fan_in_fan_out:
            delta = delta.t()
        self._unmerged_weight = original
        self.weight.data = (original.float() + delta).to(original.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original base weight tensor (bit-exact: it was kept, not recomputed)."""
        if not self.merged:
            return
        self.weight.data = self._unmerged_weight
        self._unmerged_weight = None

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"r={self.r}",
            f"lora_alpha={self.lora_alpha}",
            f"scaling={self.scaling:.4g}",
            f"sigma={self.sigma}",
            f"fused={self.fused}",
        ]
        if self.lora_dropout_p > 0:
            parts.append(f"lora_dropout={self.lora_dropout_p}")
        if self.use_rslora:
            parts.append("use_rslora=True")
        if self.fan_in_fan_out:
            parts.append("fan_in_fan_out=True")
        if self.merged:
            parts.append("merged=True")
        return ", ".join(parts)
