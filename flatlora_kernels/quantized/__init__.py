"""Flat-QLoRA: Flat-LoRA on bitsandbytes 4-bit (NF4/FP4) base weights, fused (docs/DESIGN.md, "Flat-QLoRA").

* ``layout``: the 4-bit layout (``Packed4bit``, read from a ``Linear4bit`` without importing
  bitsandbytes) and its torch decoder (``dequantize``, reference and tests only);
* ``ops``: ``torch.ops.flatlora_q4.forward`` / ``backward`` with autograd and fakes; backends
  ``reference`` (dequantizes), ``cpp`` (``csrc/quantized_*.cpp``), ``triton``
  (``backends/triton_quantized.py``);
* ``functional.flat_qlora_linear``: the strict 4-bit spelling of ``flat_lora_linear`` (which runs these
  ops for a ``Packed4bit`` weight): any other weight is a TypeError;
* ``modules.FlatLoraLinear4bit``: the layer; ``flat_qlora_layer_from`` / ``flat_qlora_forward``: what
  the model entry points call for a PEFT QLoRA layer (replace it, or patch its forward);
* ``kind.BNB_LINEAR4BIT``: the base kind, registered with the shared layer check on import (the
  package imports this subpackage on load), as ``functional`` registers the ``Packed4bit`` format:
  the dense modules never import this subpackage.

torchao's ``NF4Tensor`` (torchtune's QLoRA) maps onto the same ops: ``packed_from_torchao_nf4``.
bitsandbytes itself is needed only to build or load a 4-bit model (the ``qlora`` extra).
"""

from .functional import flat_qlora_linear
from .kind import BNB_LINEAR4BIT
from .layout import Packed4bit, dequantize, is_bnb_4bit, is_torchao_nf4, packed_from_torchao_nf4
from .modules import FlatLoraLinear4bit, flat_qlora_forward, flat_qlora_layer_from

__all__ = [
    "flat_qlora_linear", "Packed4bit", "dequantize", "is_bnb_4bit", "FlatLoraLinear4bit", "flat_qlora_forward",
    "flat_qlora_layer_from", "bnb_4bit_layer_kind", "is_torchao_nf4", "packed_from_torchao_nf4",
]


def bnb_4bit_layer_kind():
    """The bitsandbytes ``Linear4bit`` kind of the shared layer check (``kind.BNB_LINEAR4BIT``, registered
    on import): ``apply_flat_lora`` / ``from_peft`` / ``FlatLoraLinear.from_linear`` build a
    ``FlatLoraLinear4bit``; ``enable_flat_lora`` patches PEFT's layer in place (``flat_qlora_forward``)."""
    return BNB_LINEAR4BIT
