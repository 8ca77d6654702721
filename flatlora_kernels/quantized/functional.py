"""``flat_qlora_linear``: ``flat_lora_linear`` that accepts only a 4-bit base weight."""

from __future__ import annotations

from torch import Tensor

from ..functional import flat_lora_linear
from .layout import Packed4bit

__all__ = ["flat_qlora_linear"]


def flat_qlora_linear(x: Tensor, weight: Packed4bit, *args, **kwargs) -> Tensor:
    """``flat_lora_linear(x, weight, ...)`` for a 4-bit ``weight`` (``Packed4bit``) only, the strict
    spelling for code that must not silently run a dense weight: ``y = x @ (deq(W) + s*B@A + eps)^T + bias``,
    decoded chunk by chunk. Arguments and results as ``flat_lora_linear``; any other weight raises TypeError."""
    if not isinstance(weight, Packed4bit):
        raise TypeError(f"flat_qlora_linear: weight must be a Packed4bit, got {type(weight).__name__}")
    return flat_lora_linear(x, weight, *args, **kwargs)
