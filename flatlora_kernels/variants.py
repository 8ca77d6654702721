"""LoRA variants in Flat-LoRA's training forward: the seam PEFT's ``LoraVariant`` is to ``lora.Linear``.

PEFT keeps a layer's variant per adapter (``layer.lora_variant[adapter]``, e.g. DoRA's
``DoraLinearVariant``); plain LoRA has none. A variant runs under Flat-LoRA through a
``FlatLoraVariant`` registered under PEFT's variant class name (``register_variant``): the patched PEFT
layer's training forward (``peft/patched_layer.py``) hands it the layer, the base's fused op (with the
step's noise) and the adapter's factors, scale and dropout; plain LoRA is ``PLAIN``
(``StepNoise.noisy_linear``). The shared layer check (``layer_support``) refuses exactly the variants
with no implementation here, and every variant in ``from_peft`` (its ``FlatLoraLinear`` has no place
for a variant's own parameters). No variant besides plain LoRA is implemented yet.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

__all__ = ["FlatLoraVariant", "PLAIN", "VARIANTS", "register_variant", "variant_of"]


class FlatLoraVariant:
    """How one LoRA variant trains under Flat-LoRA noise: subclass, implement ``training_forward``, register."""

    def training_forward(
        self, layer: nn.Module, adapter: str, x: Tensor, fused_op: Callable[..., Tensor], lora_A: Tensor,
        lora_B: Tensor, scaling: float, dropout: nn.Module | None,
    ) -> Tensor:  # fmt: skip
        """The layer's training output for ``adapter``. ``fused_op(x, lora_A, lora_B, *, scaling, sigma, seed,
        backend)`` runs the base's fused op; ``layer.noisy_linear`` runs it with the step's noise (and
        PEFT's dropout rule); the variant's own parameters are the layer's (PEFT's modules)."""
        raise NotImplementedError


class _PlainLora(FlatLoraVariant):
    def training_forward(self, layer, adapter, x, fused_op, lora_A, lora_B, scaling, dropout):
        return layer.noisy_linear(x, fused_op, lora_A, lora_B, scaling, dropout)


PLAIN: FlatLoraVariant = _PlainLora()
#: PEFT variant class name -> its Flat-LoRA implementation
VARIANTS: dict[str, FlatLoraVariant] = {}


def register_variant(peft_variant_class_name: str, variant: FlatLoraVariant) -> None:
    """Run PEFT's variant ``peft_variant_class_name`` (e.g. ``"DoraLinearVariant"``) by ``variant``."""
    VARIANTS[peft_variant_class_name] = variant


def variant_of(layer: nn.Module, adapter: str) -> FlatLoraVariant | None:
    """The implementation of PEFT layer ``layer``'s variant for ``adapter``: ``PLAIN`` without one, None
    for a variant with no implementation."""
    peft_variant = getattr(layer, "lora_variant", {}).get(adapter)
    if peft_variant is None:
        return PLAIN
    return VARIANTS.get(type(peft_variant).__name__)
