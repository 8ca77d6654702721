"""flatlora_kernels: Flat-LoRA training at the cost of plain LoRA.

Layers, top-down: ``kernels`` (Triton) and ``csrc`` (C++) -> ``backends`` (launchers) -> ``ops``
(torch.library + autograd) -> ``functional`` -> ``modules`` -> model helpers (``model_helpers``,
``schedule``, ``peft_interop``, ``hf``) and the sharpness-aware methods (``sharpness``).
The noise stream is defined once, in ``flatlora_kernels.noise``.
"""

from .functional import flat_lora_linear
from .model_helpers import (
    apply_flat_lora,
    flat_lora_layers,
    load_adapter,
    merge_and_unload,
    merge_flat_lora,
    save_adapter,
    unmerge_flat_lora,
)
from .modules import FlatLoraLinear
from .noise import filter_noise
from .peft_export import load_peft_adapter, save_peft_adapter
from .peft_interop import from_peft
from .peft_native import disable_flat_lora, enable_flat_lora
from .schedule import FlatLoraSchedule, cosine_factor, derive_seed
from .sharpness import EFMLoRA, FMLoRA, RhoSchedule

__all__ = [
    # the op, its noise and the layer
    "flat_lora_linear", "filter_noise", "FlatLoraLinear",
    # whole models (model_helpers): convert, find, merge, adapter files
    "apply_flat_lora", "flat_lora_layers", "merge_flat_lora", "unmerge_flat_lora", "merge_and_unload",
    "save_adapter", "load_adapter",
    # PEFT: convert from it, patch its layers in place, write/read its adapter format
    "from_peft", "enable_flat_lora", "disable_flat_lora", "save_peft_adapter", "load_peft_adapter",
    # the per-step noise schedule (and its Trainer callback, loaded on first use)
    "FlatLoraSchedule", "cosine_factor", "derive_seed", "FlatLoraCallback",
    # sharpness-aware LoRA
    "FMLoRA", "EFMLoRA", "RhoSchedule",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The Trainer callback imports transformers (an optional extra): load it only when asked for.
    if name == "FlatLoraCallback":
        from .hf import FlatLoraCallback

        return FlatLoraCallback
    raise AttributeError(f"module 'flatlora_kernels' has no attribute {name!r}")
