"""``FlatLoraLinear4bit``: a bitsandbytes ``Linear4bit`` base plus a LoRA adapter, trained under Flat-LoRA noise.

The base is held as the submodule ``base_layer`` (PEFT's name) and is never changed, copied or kept
dequantized: training forwards run the 4-bit op (``functional.linear_4bit``) on its packed codes, which decodes rows
chunk by chunk. Evaluation is plain QLoRA (the op at sigma 0: PEFT's forward to rounding).

The class is a ``FlatLoraLinear``: the schedule drives it (``noise_seed`` / ``noise_factor``), the
model helpers find it, and ``lora_A: [r, in]`` / ``lora_B: [out, r]`` are saved by
``save_peft_adapter`` as a plain PEFT adapter (``<layer>.lora_A.weight``), loadable by PEFT over the
same 4-bit base. What needs a float base weight is refused by name: ``merge`` (writing
``W + s*B@A`` back would re-quantize the base) and ``linear_weight``.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

from ..modules import FlatLoraLinear
from ..lora_forward import with_adapter_dtype
from .functional import linear_4bit
from .layout import Packed4bit, is_bnb_4bit

__all__ = ["FlatLoraLinear4bit", "flat_qlora_forward", "flat_qlora_layer_from", "packed_of"]


_PACKED = weakref.WeakKeyDictionary()  # base layer -> {"key", "packed"}: its Packed4bit, kept while it lives


def packed_of(base_layer: nn.Module, name: str | None = None) -> Packed4bit:
    """``Packed4bit`` of a ``Linear4bit`` base (checked; a bad one raises naming ``name``), rebuilt only
    when its tensors move (``.to``) or are replaced. Nothing is stored on the base itself."""
    weight = base_layer.weight
    state = getattr(weight, "quant_state", None)
    key = (weight.data_ptr(), id(state), None if state is None else state.absmax.data_ptr())
    cache = _PACKED.setdefault(base_layer, {})
    if cache.get("key") != key:
        cache["packed"] = Packed4bit.from_linear4bit(base_layer, name=name)
        cache["key"] = key
    return cache["packed"]


def flat_qlora_forward(
    base_layer, x: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float, sigma, seed, backend: str = "auto",
    name: str | None = None,
) -> Tensor:
    """A LoRA adapter over a bitsandbytes ``Linear4bit`` with Flat-LoRA noise: ``base_layer(x) + s * B A x``
    with the noise, computed as ``x (deq(W) + s*B@A + eps)^T + bias`` in the base's ``compute_dtype``
    (x's dtype when it has none) and returned in x's dtype, as bitsandbytes' own forward does. The
    op the training forward (``StepNoise.noisy_linear``) runs for a 4-bit base (``kind.BNB_LINEAR4BIT``); at sigma 0 it
    is plain QLoRA (the layers' evaluation forward). ``lora_A: [r, in]``, ``lora_B: [out, r]`` (a PEFT
    layer's ``lora_A[name].weight``); adapters in another dtype than the compute one follow PEFT's
    rule (``lora_forward.with_adapter_dtype``). Bad input raises naming ``name`` (default: the base's class)."""
    packed = packed_of(base_layer, name)
    compute_dtype = getattr(base_layer, "compute_dtype", None) or x.dtype
    bias = base_layer.bias
    x_c = x.to(compute_dtype)
    bias_c = None if bias is None else bias.to(compute_dtype)
    y = with_adapter_dtype(
        lambda A, B: linear_4bit(x_c, packed, A, B, bias_c, scaling, sigma, seed, backend),
        x_c, lora_A, lora_B, scaling,
    )  # fmt: skip
    return y.to(x.dtype)


class FlatLoraLinear4bit(FlatLoraLinear):
    """A frozen bitsandbytes ``Linear4bit`` (NF4 or FP4, any blocksize, with or without double
    quantization) with a trainable LoRA adapter and Flat-LoRA weight noise.

    Args:
        base_layer: the ``Linear4bit``, already quantized (moved to its device). Shared, frozen, never written.
        r, lora_alpha, sigma, fused, lora_dropout, use_rslora: as ``FlatLoraLinear``.
        lora_dtype: dtype of ``lora_A`` / ``lora_B``; default fp32, as PEFT's adapters over a 4-bit base.
    """

    def __init__(
        self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 16, sigma: float = 0.05, fused: bool = True,
        lora_dropout: float = 0.0, use_rslora: bool = False, lora_dtype=None,
    ) -> None:
        nn.Module.__init__(self)
        if not is_bnb_4bit(base_layer):
            raise TypeError(f"FlatLoraLinear4bit: expected a bitsandbytes Linear4bit base, got {type(base_layer).__name__}")
        packed = packed_of(base_layer)
        self._configure(packed.in_features, packed.out_features, r, lora_alpha, sigma, fused, lora_dropout, use_rslora)
        self.base_layer = base_layer
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)
        self._build_adapter(lora_dtype or torch.float32)

    @classmethod
    def from_linear4bit(cls, linear4bit: nn.Module, **config) -> "FlatLoraLinear4bit":
        """Wrap a bitsandbytes ``Linear4bit`` (shared, not copied); ``config`` as ``FlatLoraLinear.from_linear``."""
        return cls(linear4bit, **config)

    # --- the base, read-only -------------------------------------------------------------------

    @property
    def weight(self) -> Tensor:
        """The base's packed 4-bit weight (``Params4bit``)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def packed(self) -> Packed4bit:
        return packed_of(self.base_layer)

    @property
    def linear_weight(self) -> Tensor:
        raise RuntimeError("FlatLoraLinear4bit: the base weight is 4-bit; there is no float weight to return")

    # --- forward -------------------------------------------------------------------------------

    def fused_op(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, **noise) -> Tensor:
        """The 4-bit base's fused op (``flat_qlora_forward``): what the training forward runs."""
        return flat_qlora_forward(self.base_layer, x, lora_A, lora_B, **noise)

    def _plain_lora(self, x: Tensor) -> Tensor:
        """QLoRA without noise (evaluation): the op at sigma 0, which is exactly LoRA. Not
        ``base_layer(x)``: bitsandbytes' eval forward under no_grad repacks the base in place on CPUs
        with AVX512-BF16 (``packing_format_for_cpu``), which would change the base."""
        return self.fused_op(x, self.lora_A, self.lora_B, scaling=self.scaling, sigma=0.0, seed=0, backend=self.backend)

    # --- merging is refused: the base stays as it was ----------------------------------------

    @property
    def merged(self) -> bool:
        return False

    def merge(self) -> None:
        raise RuntimeError(
            "FlatLoraLinear4bit: merging would write W + s*B@A back into the 4-bit base (re-quantizing it); "
            "save the adapter (save_peft_adapter) and merge into a full-precision copy of the base instead"
        )

    def unmerge(self) -> None:
        return None

    def extra_repr(self) -> str:
        packed = self.packed
        return super().extra_repr() + f", base={packed.quant_type}, blocksize={packed.blocksize}" + (
            ", double_quant=True" if packed.nested else ""
        )


def _scaling_to_alpha(r: int, scaling: float, use_rslora: bool) -> float:
    return scaling * (math.sqrt(r) if use_rslora else r)


def flat_qlora_layer_from(
    base_linear4bit: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float, *, sigma: float = 0.05,
    lora_dropout: float = 0.0, use_rslora: bool = False, fused: bool = True, name: str | None = None,
) -> FlatLoraLinear4bit:
    """A ``FlatLoraLinear4bit`` over ``base_linear4bit`` whose adapter is ``lora_A: [r, in]``,
    ``lora_B: [out, r]`` (new Parameters sharing their storage: no copy) with the given ``scaling``:
    what ``from_peft`` / ``apply_flat_lora`` put in a PEFT QLoRA layer's place. Bad input raises naming
    ``name`` (default: the base's class)."""
    label = name or type(base_linear4bit).__name__
    if not is_bnb_4bit(base_linear4bit):
        raise TypeError(f"{label}: expected a bitsandbytes Linear4bit base, got {type(base_linear4bit).__name__}")
    r = lora_A.shape[0]
    layer = FlatLoraLinear4bit(
        base_linear4bit, r=r, lora_alpha=_scaling_to_alpha(r, scaling, use_rslora), sigma=sigma, fused=fused,
        lora_dropout=lora_dropout, use_rslora=use_rslora, lora_dtype=lora_A.dtype,
    )
    if tuple(lora_A.shape) != (r, layer.in_features) or tuple(lora_B.shape) != (layer.out_features, r):
        raise ValueError(
            f"{label}: lora_A must be [r, {layer.in_features}] and lora_B [{layer.out_features}, r], got "
            f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    layer.lora_A = nn.Parameter(lora_A.detach(), requires_grad=True)
    layer.lora_B = nn.Parameter(lora_B.detach().to(lora_A.dtype) if lora_B.dtype != lora_A.dtype else lora_B.detach(),
                                requires_grad=True)
    layer.scaling = float(scaling)
    return layer
