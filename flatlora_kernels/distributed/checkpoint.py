"""Save and resume a Flat-LoRA run with ``torch.distributed.checkpoint`` (DCP).

What is saved: the model and optimizer state from ``get_state_dict`` (sharded under FSDP2, each rank
writing its own shards; plain tensors in one process) and the ``FlatLoraSchedule`` state. The
schedule is stored as int64 tensors, so it goes through DCP's tensor path like everything else and
needs no pickled objects. Its state (step, total steps, seed, per-rank flag) is everything the noise
depends on: after ``load_checkpoint`` the next forward draws exactly the eps the uninterrupted run
draws at that step. The data order and any other RNG (dropout) are the caller's to restore.

The same calls work in one process without a process group (DCP then reads and writes locally), and
a checkpoint written by N ranks can be read by a different number of ranks, or by one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..schedule import FlatLoraSchedule

__all__ = ["save_checkpoint", "load_checkpoint", "schedule_state_tensors"]

_NO_TOTAL = -1  # total_steps=None, as an int64


def schedule_state_tensors(schedule: FlatLoraSchedule) -> dict[str, torch.Tensor]:
    """The schedule's ``state_dict`` as 0-dim int64 tensors (seeds are below 2**63, so they fit)."""
    state = schedule.state_dict()
    total = _NO_TOTAL if state["total_steps"] is None else state["total_steps"]
    return {
        "step": torch.tensor(state["step"], dtype=torch.int64),
        "total_steps": torch.tensor(total, dtype=torch.int64),
        "seed": torch.tensor(state["seed"], dtype=torch.int64),
        "per_rank_seeds": torch.tensor(int(state["per_rank_seeds"]), dtype=torch.int64),
    }


def _schedule_state_from_tensors(tensors: dict[str, torch.Tensor]) -> dict:
    total = int(tensors["total_steps"])
    return {
        "step": int(tensors["step"]),
        "total_steps": None if total == _NO_TOTAL else total,
        "seed": int(tensors["seed"]),
        "per_rank_seeds": bool(int(tensors["per_rank_seeds"])),
    }


def _check_args(model, optimizer, schedule) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    if not isinstance(schedule, FlatLoraSchedule):
        raise TypeError(f"schedule must be a FlatLoraSchedule, got {type(schedule).__name__}")


def _state(model, optimizer, schedule, adapter_only: bool) -> tuple[StateDictOptions, dict]:
    """The checked arguments' DCP state (model, schedule, optimizer if any) and the options it was read with."""
    _check_args(model, optimizer, schedule)
    # Adapter-only: the frozen base weights are neither saved nor expected back on load.
    options = StateDictOptions(ignore_frozen_params=adapter_only, strict=not adapter_only)
    if optimizer is None:
        model_state, optim_state = get_model_state_dict(model, options=options), None
    else:
        model_state, optim_state = get_state_dict(model, optimizers=optimizer, options=options)
    state = {"model": model_state, "schedule": schedule_state_tensors(schedule)}
    if optim_state is not None:
        state["optimizer"] = optim_state
    return options, state


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, schedule: FlatLoraSchedule,
    *, adapter_only: bool = False,
) -> None:
    """Write model, optimizer and schedule state to the directory ``path`` (call on every rank).

    ``adapter_only=True`` stores only the parameters that require grad (the LoRA factors): the frozen
    base weights are then expected to be rebuilt from the base model on resume.
    """
    _, state = _state(model, optimizer, schedule, adapter_only)
    dcp.save(state, checkpoint_id=os.fspath(path))


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None, schedule: FlatLoraSchedule,
    *, adapter_only: bool = False,
) -> None:
    """Restore what ``save_checkpoint`` wrote, in place (call on every rank, after sharding the model).

    Pass the same ``adapter_only`` as when saving. The schedule is set to the saved step, so the
    layers' noise is the saved run's from the next forward on.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint directory at {os.fspath(path)!r}")
    options, state = _state(model, optimizer, schedule, adapter_only)
    dcp.load(state, checkpoint_id=os.fspath(path))
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(
            model, optimizers=optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
            options=options,
        )
    schedule.load_state_dict(_schedule_state_from_tensors(state["schedule"]))
