"""flatlora_kernels: Flat-LoRA training at the cost of plain LoRA.

Layers, top-down: ``kernels`` (Triton) and ``csrc`` (C++) -> ``backends`` (launchers) -> ``ops``
(torch.library + autograd) -> ``functional`` -> ``step_noise`` (the training forward) -> ``modules``
-> whole models (``layer_support``, ``model_conversion``, ``schedule``, ``peft/``, ``hf``) and the
sharpness-aware methods (``sharpness``).
The noise stream is defined once, in ``flatlora_kernels.noise``.
"""

from . import quantized  # noqa: F401  (registers the 4-bit base kind and weight format, from above)
from .functional import flat_lora_linear
from .layer_support import UnsupportedLayerError
from .model_conversion import apply_flat_lora, flat_lora_layers, merge_and_unload, merge_flat_lora, unmerge_flat_lora
from .modules import FlatLoraLinear
from .noise import filter_noise
from .peft import (
    disable_flat_lora,
    enable_flat_lora,
    from_peft,
    load_adapter,
    load_peft_adapter,
    save_adapter,
    save_peft_adapter,
)
from .schedule import FlatLoraSchedule, cosine_factor, derive_seed
from .sharpness import BiLoRA, EFMLoRA, FMLoRA, RhoSchedule

__all__ = [
    # the op, its noise and the layer
    "flat_lora_linear", "filter_noise", "FlatLoraLinear",
    # whole models (model_conversion): convert, find, merge; the layer check's error
    "apply_flat_lora", "flat_lora_layers", "merge_flat_lora", "unmerge_flat_lora", "merge_and_unload",
    "UnsupportedLayerError",
    # peft/: convert from PEFT, patch its layers in place, adapter files (PEFT's format and ours)
    "from_peft", "enable_flat_lora", "disable_flat_lora", "save_peft_adapter", "load_peft_adapter",
    "save_adapter", "load_adapter",
    # the per-step noise schedule (and its Trainer callback, loaded on first use)
    "FlatLoraSchedule", "cosine_factor", "derive_seed", "FlatLoraCallback",
    # sharpness-aware LoRA
    "FMLoRA", "EFMLoRA", "BiLoRA", "RhoSchedule",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The Trainer callback imports transformers (an optional extra): load it only when asked for.
    if name == "FlatLoraCallback":
        from .hf import FlatLoraCallback

        return FlatLoraCallback
    raise AttributeError(f"module 'flatlora_kernels' has no attribute {name!r}")
