"""Finding the LoRA layers of a model, by duck typing.

Two layouts are recognised:

* tensor attributes (``FlatLoraLinear`` and any module like it): ``lora_A`` ``[r, in]`` and
  ``lora_B`` ``[out, r]`` are 2-D tensors and ``scaling`` is a number;
* PEFT's LoRA layers: ``lora_A`` / ``lora_B`` map adapter names to ``nn.Linear`` modules and
  ``scaling`` maps them to numbers; the single active adapter is used. Whether such a layer can be
  run is the shared check's decision (``flatlora_kernels.layer_support``: DoRA, embedding LoRA,
  quantized bases, ... are refused, naming the layers, unless ``skip_unsupported=True``).

Only layers whose factors are trained are returned: a perturbation of B is pointless when B is
frozen, and the gradient estimate needs the gradients of both A and B.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from .._validation import is_real
from ..layer_support import peft_lora_layer_problem, refuse_or_skip

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
    """The one active adapter of a PEFT-style layer (any LoRA layer kind), else None."""
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", None)
    if isinstance(active, str):
        active = [active]
    held = getattr(module, "r", None)
    held = held if isinstance(held, Mapping) else module.lora_A
    active = [adapter for adapter in (active or []) if adapter in held]
    if len(active) > 1:
        raise ValueError(f"{name}: {len(active)} active LoRA adapters {active}; FMLoRA/EFMLoRA need exactly one")
    return active[0] if active else None


def _as_layer_ref(name: str, module: nn.Module, problems: dict[str, str]) -> LoraLayerRef | None:
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
        # FMLoRA calls the layer's own forward: only the layer's kind matters, not hooks on its base.
        problem = peft_lora_layer_problem(module, adapter, bypasses_forward=False)
        if problem is not None:
            problems[name] = problem
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


def find_lora_layers(model: nn.Module, skip_unsupported: bool = False) -> list[LoraLayerRef]:
    """The trained LoRA layers of ``model``, in ``named_modules`` order (each parameter once).

    Raises ``UnsupportedLayerError`` naming every PEFT LoRA layer the shared check refuses, unless
    ``skip_unsupported=True`` (those layers then train without the perturbation, with a warning)."""
    layers, seen, problems = [], set(), {}
    for name, module in model.named_modules():
        ref = _as_layer_ref(name or type(module).__name__, module, problems)
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
    refuse_or_skip("FMLoRA/EFMLoRA", problems.items(), skip_unsupported)
    return layers
