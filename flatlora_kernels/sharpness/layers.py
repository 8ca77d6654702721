"""Finding the LoRA layers of a model, by duck typing.

Two layouts are recognised:

* tensor attributes (``FlatLoraLinear`` and any module like it): ``lora_A`` ``[r, in]`` and
  ``lora_B`` ``[out, r]`` are 2-D tensors and ``scaling`` is a number;
* PEFT's LoRA linear layers: ``lora_A`` / ``lora_B`` map adapter names to ``nn.Linear`` modules
  and ``scaling`` maps them to numbers; the single active adapter is used. peft is not imported.

Only layers whose factors are trained are returned: a perturbation of B is pointless when B is
frozen, and the gradient estimate needs the gradients of both A and B.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from .._validation import is_real

__all__ = ["LoraLayerRef", "find_lora_layers"]


@dataclass(frozen=True)
class LoraLayerRef:
    """A handle on one LoRA layer; values are read on access (PEFT may change ``scaling`` later)."""

    name: str
    module: nn.Module
    adapter: str | None = None  # PEFT adapter name; None for the tensor-attribute layout

    @property
    def lora_A(self) -> Tensor:
        if self.adapter is None:
            return self.module.lora_A
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> Tensor:
        if self.adapter is None:
            return self.module.lora_B
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        if self.adapter is None:
            return float(self.module.scaling)
        return float(self.module.scaling[self.adapter])


def _peft_active_adapter(name: str, module: nn.Module) -> str | None:
    """The one active adapter of a PEFT-style layer that has linear factors for it, else None."""
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", None)
    if isinstance(active, str):
        active = [active]
    active = [adapter for adapter in (active or []) if adapter in module.lora_A]
    if not active:
        return None  # e.g. a PEFT embedding layer: its factors live in lora_embedding_A/B
    if len(active) > 1:
        raise ValueError(f"{name}: {len(active)} active LoRA adapters {active}; FMLoRA/EFMLoRA need exactly one")
    adapter = active[0]
    use_dora = getattr(module, "use_dora", {})
    if isinstance(use_dora, Mapping) and use_dora.get(adapter, False):
        raise NotImplementedError(f"{name}: DoRA adapters are not supported (the gradient estimate assumes dW = s*B@A)")
    factor = getattr(module.lora_A[adapter], "weight", None)
    if not isinstance(factor, Tensor) or factor.dim() != 2:
        raise NotImplementedError(
            f"{name}: only linear LoRA layers are supported (adapter {adapter!r} of {type(module).__name__} "
            "has no 2-D lora_A weight)"
        )
    return adapter


def _as_layer_ref(name: str, module: nn.Module) -> LoraLayerRef | None:
    lora_A, lora_B, scaling = (getattr(module, attr, None) for attr in ("lora_A", "lora_B", "scaling"))
    if lora_A is None or lora_B is None or scaling is None:
        return None
    if isinstance(lora_A, Tensor) and isinstance(lora_B, Tensor):
        if not is_real(scaling):
            return None
        ref = LoraLayerRef(name, module)
    elif isinstance(lora_A, Mapping | nn.ModuleDict) and isinstance(scaling, Mapping):
        adapter = _peft_active_adapter(name, module)
        if adapter is None:
            return None
        ref = LoraLayerRef(name, module, adapter)
    else:
        return None
    A, B = ref.lora_A, ref.lora_B
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not [r, in] and [out, r] factors"
        )
    return ref


def find_lora_layers(model: nn.Module) -> list[LoraLayerRef]:
    """The trained LoRA layers of ``model``, in ``named_modules`` order (each parameter once)."""
    layers, seen = [], set()
    for name, module in model.named_modules():
        ref = _as_layer_ref(name or type(module).__name__, module)
        if ref is None or id(ref.lora_B) in seen:
            continue
        trains_A, trains_B = ref.lora_A.requires_grad, ref.lora_B.requires_grad
        if trains_A != trains_B:
            raise ValueError(
                f"{name}: lora_A.requires_grad={trains_A} but lora_B.requires_grad={trains_B}; "
                "FMLoRA/EFMLoRA need the gradients of both factors (train both or freeze both)"
            )
        if trains_B:
            seen.add(id(ref.lora_B))
            layers.append(ref)
    return layers
