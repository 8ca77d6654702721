"""flatlora_kernels: Flat-LoRA training at the cost of plain LoRA.

Layers, top-down: ``kernels`` (Triton) and ``csrc`` (C++) -> ``backends`` (launchers) -> ``ops``
(torch.library + autograd) -> ``functional`` -> modules and model helpers.
The noise stream is defined once, in ``flatlora_kernels.noise``.
"""

from .functional import flat_lora_linear
from .noise import filter_noise

__all__ = ["flat_lora_linear", "filter_noise"]
__version__ = "0.1.0"
