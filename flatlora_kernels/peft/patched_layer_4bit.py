"""``FlatLoraPeftLinear4bit``: PEFT's ``lora.bnb.Linear4bit`` (the LoRA layer PEFT puts over the
``Linear4bit`` bases of a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``) with Flat-LoRA's
forward (``patched_layer.FlatLoraPeftForward``). A module of its own because PEFT's class exists only
with bitsandbytes installed: ``enable_flat_lora`` imports it only when it meets such a layer.
"""

from __future__ import annotations

from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit

from .patched_layer import FlatLoraPeftForward

__all__ = ["FlatLoraPeftLinear4bit", "PeftLoraLinear4bit"]


class FlatLoraPeftLinear4bit(FlatLoraPeftForward, PeftLoraLinear4bit):
    """PEFT's ``lora.bnb.Linear4bit`` under Flat-LoRA (``FlatLoraPeftForward``)."""

    peft_class = PeftLoraLinear4bit
