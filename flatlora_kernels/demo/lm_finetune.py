"""One fine-tuning run of the language-model task, the way a user runs it: PEFT LoRA on a GPT-2,
``transformers.Trainer`` with its own AdamW and cosine schedule, and per method:

* ``lora``: ``LoraConfig(lora_dropout=...)`` (its knob);
* ``flat-lora``: ``enable_flat_lora(model, sigma=...)`` + ``FlatLoraSchedule(total_steps=None)`` +
  ``FlatLoraCallback`` (README's path);
* ``bilora`` / ``efmlora``: the Trainer's AdamW wrapped by ``BiLoRA`` / ``EFMLoRA`` (one pass per step).

Every method gets the same pretrained weights, LoRA initialisation (``seed``), batches (the
Trainer's ``data_seed``), learning rate, schedule over the same step budget and LoRA dropout (the
LoRA recipe's: ``lora_dropout`` is every method's). A callback evaluates the validation split every
``eval_every`` steps (the checkpoints of the early-stopping rule, ``selection.py``) and stops a
reported run at its method's chosen step (``stop_at``; the Trainer's schedule still spans
``steps``). Unless the task has no test split (the validation search), the run then measures the
test split: NLL and loss under weight noise.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .flatness import peft_loss_under_noise
from .lm_task import LmTask, mean_nll

LM_KNOBS = {"lora": "lora_dropout", "flat-lora": "sigma", "efmlora": "efm_rho", "bilora": "bilora_rho"}
TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]  # every linear (Conv1D) layer of GPT-2's blocks


@dataclass
class LmConfig:
    steps: int = 120  # the budget: the Trainer's cosine schedule (and Flat-LoRA's) spans it
    stop_at: int | None = None  # early stopping: a reported run stops here (its method's chosen step)
    eval_every: int = 20
    batch_size: int = 16
    lr: float = 2e-3
    rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # LoRA's knob; every method trains with it (the LoRA recipe's)
    sigma: float = 0.1
    efm_rho: float = 0.05
    bilora_rho: float = 0.05
    noise_sigmas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    noise_draws: int = 4


@dataclass
class LmRunResult:
    method: str
    seed: int
    knob: float
    val_nll: float = 0.0
    test_nll: float = 0.0
    loss_under_noise: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)  # training loss at the Trainer's logging steps
    step_ms: float = 0.0
    steps_done: int = 0
    eval_steps: list[int] = field(default_factory=list)
    eval_val_nll: list[float] = field(default_factory=list)  # validation NLL at eval_steps (eval mode)
    method_check: dict = field(default_factory=dict)  # evidence the method acted: schedule steps, perturbation norm

    @property
    def test_ppl(self) -> float:
        return math.exp(self.test_nll)


def _trainer_class(method: str, config: LmConfig, seed: int):
    from transformers import Trainer

    if method not in ("bilora", "efmlora"):
        return Trainer

    class SharpnessTrainer(Trainer):
        """The Trainer's own AdamW, wrapped; its scheduler then drives the wrapper's shared groups."""

        def create_optimizer(self, *args, **kwargs):
            optimizer = super().create_optimizer(*args, **kwargs)
            if method == "bilora":
                from ..sharpness.bilora import BiLoRA

                self.optimizer = BiLoRA(self.model, optimizer, rho=config.bilora_rho, seed=seed)
            else:
                from .. import EFMLoRA

                self.optimizer = EFMLoRA(self.model, optimizer, rho=config.efm_rho)
            return self.optimizer

    return SharpnessTrainer


def _validation_checkpoints(model, val, config: LmConfig, stop: int):
    """A Trainer callback: validation NLL every ``eval_every`` steps and at ``stop``, where it ends training."""
    from transformers import TrainerCallback

    class ValidationCheckpoints(TrainerCallback):
        def __init__(self):
            self.steps, self.nll = [], []

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            step = state.global_step
            if step % config.eval_every == 0 or step == stop:
                inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
                with inner.unperturbed() if hasattr(inner, "unperturbed") else contextlib.nullcontext():  # EFMLoRA's B + E_hat off
                    self.nll.append(mean_nll(model, val))
                self.steps.append(step)
            if step >= stop:
                control.should_training_stop = True
            return control

    return ValidationCheckpoints()


def finetune_lm(pretrained: nn.Module, task: LmTask, method: str, *, seed: int, config: LmConfig) -> LmRunResult:
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, TrainingArguments, logging as hf_logging

    from .. import FlatLoraCallback, FlatLoraSchedule, enable_flat_lora

    if method not in LM_KNOBS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(LM_KNOBS)}")
    stop = config.steps if config.stop_at is None else config.stop_at
    if not 1 <= stop <= config.steps:
        raise ValueError(f"stop_at must be in [1, steps={config.steps}], got {config.stop_at}")
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # PEFT calls a deprecated name
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(seed)  # the LoRA initialisation
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha, target_modules=TARGET_MODULES, fan_in_fan_out=True,
        lora_dropout=config.lora_dropout, task_type="CAUSAL_LM",
    )
    model = get_peft_model(copy.deepcopy(pretrained).train(), lora)
    callbacks, schedule = [], None
    if method == "flat-lora":
        model = enable_flat_lora(model, sigma=config.sigma)
        schedule = FlatLoraSchedule(model, total_steps=None, seed=seed)  # T comes from the Trainer's max_steps
        callbacks.append(FlatLoraCallback(schedule))
    checkpoints = _validation_checkpoints(model, task.val, config, stop)
    callbacks.append(checkpoints)
    data = [{"input_ids": block, "labels": block} for block in task.train]
    with tempfile.TemporaryDirectory(prefix="flatlora_lm_") as out:
        args = TrainingArguments(
            output_dir=out, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
            logging_steps=max(1, config.steps // 20), report_to=[], save_strategy="no", use_cpu=True,
            disable_tqdm=True, seed=seed, data_seed=seed, dataloader_num_workers=0, label_names=["labels"],
        )
        trainer = _trainer_class(method, config, seed)(model=model, args=args, train_dataset=data, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)  # no log dicts on stdout
        seconds = trainer.train().metrics["train_runtime"]
    result = LmRunResult(method=method, seed=seed, knob=getattr(config, LM_KNOBS[method]))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    if hasattr(optimizer, "restore"):  # EFMLoRA keeps B + E_hat applied between steps
        optimizer.restore()
    if hasattr(optimizer, "perturbation_norm"):
        result.method_check = {"bilora steps": optimizer.steps_done, "perturbation norm": float(optimizer.perturbation_norm())}
    elif hasattr(optimizer, "steps_done"):
        result.method_check = {"efmlora steps": optimizer.steps_done}
    if schedule is not None:
        result.method_check = {"schedule steps": schedule.step_count, "total steps": schedule.total_steps}
    model.eval()
    result.losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result.steps_done = trainer.state.global_step
    result.step_ms = 1000 * seconds / result.steps_done
    result.eval_steps, result.eval_val_nll = checkpoints.steps, checkpoints.nll
    result.val_nll = mean_nll(model, task.val)
    if task.test is None:  # the validation search: the test split is not there to touch
        return result
    result.test_nll = mean_nll(model, task.test)
    sigmas = sorted({*config.noise_sigmas, config.sigma} - {0.0})
    curve = peft_loss_under_noise(model, lambda: mean_nll(model, task.test), sigmas, draws=config.noise_draws)
    result.loss_under_noise = {str(k): v for k, v in curve.items()}
    return result
