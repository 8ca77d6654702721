"""``FlatLoraLinear``: a frozen ``nn.Linear`` plus a LoRA adapter, trained under Flat-LoRA noise.

In training mode the layer computes ``y = x (W + s*B@A + eps)^T + bias`` with the fused op
(``flatlora_kernels.functional.flat_lora_linear``); eps is regenerated from a seed, never stored,
and the base weight is never written to. In eval mode it is plain LoRA (no noise).

Noise state, dropout and the training forward: ``flatlora_kernels.step_noise`` (shared with patched
PEFT layers). Without a schedule the noise factor is 0 (plain LoRA) and a training forward warns once.

Merging
-------
``merge()`` replaces the base weight's data by the noise-free ``W + s*B@A`` (rounded once to W's
dtype) and keeps the original tensor aside; ``unmerge()`` puts that tensor back. Nothing is
subtracted, so unmerge is bit-exact in bf16, at the cost of a second weight copy while merged
(``flatlora_kernels.model_conversion.merge_and_unload`` keeps no copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_integer, check_real
from .layer_support import UnsupportedLayerError, check_base_layer
from . import noise
from .lora_forward import float_weight_forward, lora_branch
from .step_noise import StepNoise

__all__ = ["FlatLoraLinear"]


def _check_config(r, lora_alpha, sigma, lora_dropout) -> None:
    check_integer("r", r, minimum=1)
    check_real("lora_alpha", lora_alpha, low=0, low_open=True)
    check_real("sigma", sigma, low=0)
    check_real("lora_dropout", lora_dropout, low=0, high=1, high_open=True)


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
        """Wrap an ``nn.Linear`` (or transformers' ``Conv1D``): weight and bias are shared (not copied), frozen.
        A base kind with a layer of its own (``layer_support``: a bitsandbytes ``Linear4bit`` gives a
        ``FlatLoraLinear4bit``) gets that layer. Any other layer raises ``UnsupportedLayerError``."""
        kind = check_base_layer("FlatLoraLinear.from_linear", type(linear).__name__, linear)
        if kind.flat_layer is not None:
            config = dict(r=r, lora_alpha=lora_alpha, sigma=sigma, fused=fused, lora_dropout=lora_dropout,
                          use_rslora=use_rslora, lora_dtype=lora_dtype)  # fmt: skip
            layer = kind.flat_layer(linear, **config)
            if not isinstance(layer, cls):
                raise UnsupportedLayerError(
                    f"{cls.__name__}.from_linear: a {kind.name} base is run by {type(layer).__name__}, not "
                    f"{cls.__name__} (call FlatLoraLinear.from_linear)"
                )
            return layer
        conv1d = kind.fan_in_fan_out
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
        self.init_step_noise(device)
        # The original base weight while merged (a buffer so that .to() moves it along).
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's initialisation: A Kaiming-uniform, B zero, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # --- noise state: set_noise, effective_seed, effective_sigma (step_noise.StepNoise) ---------

    @property
    def linear_weight(self) -> Tensor:
        """The base weight as ``[out, in]`` (a transposed view for a Conv1D base)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def backend(self) -> str:
        return "auto" if self.fused else "reference"

    # --- forward ------------------------------------------------------------------------------

    def _plain_lora(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.linear_weight, self.bias)
        branch_input = x if self.lora_dropout is None else self.lora_dropout(x)
        return y + lora_branch(branch_input, self.lora_A, self.lora_B, self.scaling).to(y.dtype)

    def fused_op(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, **noise) -> Tensor:
        """The base's fused op, ``x (W + s*B@A + eps)^T + bias`` (``noise``: scaling, sigma, seed,
        backend): what the training forward runs. A subclass over another base format overrides it."""
        return float_weight_forward(x, self.linear_weight, self.bias, lora_A, lora_B, name=type(self).__name__, **noise)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            if self.training:
                raise RuntimeError("FlatLoraLinear is merged: call unmerge() before training")
            return F.linear(x, self.linear_weight, self.bias)
        if not self.training:
            return self._plain_lora(x)  # evaluation: no noise
        return self.noisy_linear(x, self.fused_op, self.lora_A, self.lora_B, self.scaling, self.lora_dropout)

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
        self._unmerged_weight = original
        self.weight.data = self.merged_weight().to(original.dtype)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The noise-free ``W + s*B@A`` in the weight's storage layout (fp32; fp64 for fp64 layers)."""
        merged = noise.merged_weight(self.linear_weight, self.lora_A, self.lora_B, self.scaling)
        return merged.t() if self.fan_in_fan_out else merged

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
