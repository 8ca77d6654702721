"""The bitsandbytes 4-bit base kind: ``Linear4bit`` (NF4/FP4), registered with the shared layer check
(``layer_support``) when ``flatlora_kernels.quantized`` is imported (the package imports it on load).

Recognised by class name (``layout.is_bnb_4bit``: bitsandbytes is never imported for it); built as a
``FlatLoraLinear4bit`` by the model entry points; run by ``flat_qlora_forward`` in PEFT's patched
layers, in evaluation too (the op at sigma 0: bitsandbytes' eval forward may repack the base in place).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..layer_support import BaseLayerKind, register_base_layer_kind
from .layout import Packed4bit, is_bnb_4bit
from .modules import FlatLoraLinear4bit, flat_qlora_forward

__all__ = ["BNB_LINEAR4BIT"]


def _problem(module: nn.Module, bypasses_forward: bool) -> str | None:
    linear4bit = next(c for c in type(module).__mro__ if c.__name__ == "Linear4bit")  # bitsandbytes' class
    if bypasses_forward and type(module).forward is not linear4bit.forward:
        return f"it is a {type(module).__name__} with a forward of its own, which the fused op would skip"
    try:
        Packed4bit.from_linear4bit(module, name=f"its {type(module).__name__} weight")
    except (ValueError, TypeError) as error:
        return str(error)
    return None


def _fused_forward(base: nn.Module, x: Tensor, lora_A: Tensor, lora_B: Tensor, *, name: str, **noise) -> Tensor:
    return flat_qlora_forward(base, x, lora_A, lora_B, **noise)  # a bad base is named by its own class


BNB_LINEAR4BIT = BaseLayerKind(
    "bitsandbytes Linear4bit (NF4/FP4, Flat-QLoRA)", is_bnb_4bit, flat_layer=FlatLoraLinear4bit.from_linear4bit,
    problem=_problem, fused_forward=_fused_forward, eval_runs_op=True,
)
register_base_layer_kind(BNB_LINEAR4BIT, first=False)
