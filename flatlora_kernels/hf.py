"""``FlatLoraCallback``: drives a ``FlatLoraSchedule`` from a transformers ``Trainer``.

Importing this module needs transformers; the rest of the package does not. Usage::

    apply_flat_lora(model, "all-linear", r=8, sigma=0.05)
    schedule = FlatLoraSchedule(model, total_steps=None, seed=args.seed)  # T taken from the Trainer
    trainer = Trainer(model=model, args=args, ..., callbacks=[FlatLoraCallback(schedule)])

The same works for a ``PeftModel`` patched by ``enable_flat_lora`` (the schedule finds its layers);
``examples/hf_peft_trainer.py`` is the tested end-to-end example.
"""

from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError("flatlora_kernels.hf needs transformers: pip install transformers") from error

from .schedule import FlatLoraSchedule

__all__ = ["FlatLoraCallback"]


class FlatLoraCallback(TrainerCallback):
    """Steps the schedule once per optimizer step (the Trainer's ``on_step_end``, which fires after
    the optimizer step, once per gradient-accumulation cycle).

    At ``on_train_begin`` it fills ``total_steps`` from ``TrainerState.max_steps`` when the schedule
    has none, and moves the schedule to ``TrainerState.global_step``, so a run resumed from a Trainer
    checkpoint continues the same noise stream.
    """

    def __init__(self, schedule: FlatLoraSchedule) -> None:
        if not isinstance(schedule, FlatLoraSchedule):
            raise TypeError(f"FlatLoraCallback expects a FlatLoraSchedule, got {type(schedule).__name__}")
        self.schedule = schedule

    def on_train_begin(self, args, state, control, **kwargs):
        if self.schedule.total_steps is None:
            self.schedule.total_steps = state.max_steps
        self.schedule.set_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.schedule.step()
