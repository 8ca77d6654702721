"""PEFT interoperability: convert a PEFT LoRA model (``convert``), patch its layers in place
(``patch``, ``patched_layer``), and read/write adapter files (``adapter_files``). peft itself is
imported only when a function that needs it runs."""

from .adapter_files import load_adapter, load_peft_adapter, save_adapter, save_peft_adapter
from .convert import from_peft
from .patch import disable_flat_lora, enable_flat_lora, patched_layers

__all__ = [
    "from_peft",
    "enable_flat_lora",
    "disable_flat_lora",
    "patched_layers",
    "save_peft_adapter",
    "load_peft_adapter",
    "save_adapter",
    "load_adapter",
]
