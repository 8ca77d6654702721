"""Flat-LoRA past one process: distributed checkpoints (``checkpoint``) and tensor parallelism
(``tensor_parallel``). DDP and FSDP2 need nothing extra; see docs/DISTRIBUTED.md."""

from .checkpoint import load_checkpoint, save_checkpoint, schedule_state_tensors
from .tensor_parallel import FlatLoraColwiseParallel, FlatLoraRowwiseParallel, TensorParallelFlatLoraLinear

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "schedule_state_tensors",
    "FlatLoraColwiseParallel",
    "FlatLoraRowwiseParallel",
    "TensorParallelFlatLoraLinear",
]
