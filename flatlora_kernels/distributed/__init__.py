"""Flat-LoRA past one process: distributed checkpoints (``checkpoint``) and tensor parallelism
(``tensor_parallel``). FSDP2 and DDP need nothing extra; see docs/DISTRIBUTED.md."""

from .checkpoint import load_checkpoint, save_checkpoint, schedule_state_tensors

__all__ = ["save_checkpoint", "load_checkpoint", "schedule_state_tensors"]
