"""Fine-tune the pretrained digits model on the shifted domain with one method, under a fixed budget.

Every method gets the same pretrained weights, the same batches (same seed), the same optimizer,
cosine learning-rate schedule over the same step budget, rank and LoRA dropout (the LoRA recipe's);
they differ only in what the method adds, each with its own knob (``KNOBS``): LoRA's
``lora_dropout`` (PEFT's; the recipe's, used by every method), Flat-LoRA's sigma, EFMLoRA's rho,
Bi-LoRA's rho. Every run evaluates the validation split every ``eval_every`` steps (the checkpoints
the early-stopping rule picks from, ``selection.py``). A run on a task without its test split
(``DigitsTask.without_test``, the validation search) measures the validation split only; a reported
run stops at its method's chosen step (``stop_at``, the schedules still span the whole budget) and
ends with its test measures: accuracy, corrupted accuracy, NLL, loss under noise.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import FlatLoraSchedule, apply_flat_lora
from ..memory import PeakMemory
from .data import DigitsTask
from .flatness import loss_under_noise, mean_nll
from .digits_mlp import accuracy

METHODS = ("lora", "flat-lora", "efmlora", "bilora")
KNOBS = {"lora": "lora_dropout", "flat-lora": "sigma", "efmlora": "efm_rho", "bilora": "bilora_rho"}  # method -> its knob
TARGET_MODULES = ["fc1", "fc2", "fc3", "head"]


@dataclass
class FinetuneConfig:
    steps: int = 400  # the budget: the LR and sigma schedules span it
    stop_at: int | None = None  # early stopping: a reported run stops here (its method's chosen step)
    batch_size: int = 32
    lr: float = 3e-3  # peak; cosine decay to 0 over ``steps`` (the paper's recipes)
    rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # LoRA's knob; every method trains with it (the LoRA recipe's)
    sigma: float = 0.1
    efm_rho: float = 0.05
    bilora_rho: float = 0.05
    efm_beta: float = 0.9
    eval_every: int = 25
    noise_sigmas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)  # sigma' of the loss-under-noise curve
    noise_draws: int = 8


@dataclass
class RunResult:
    method: str
    seed: int
    accuracy: float
    corrupted_accuracy: dict[str, float]
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)  # validation accuracy at eval_steps
    knob: float = 0.0  # the value of the method's own knob in this run
    steps_done: int = 0  # optimizer steps taken (the chosen step of a reported run)
    step_ms: float = 0.0
    peak_memory_mib: float | None = None
    test_nll: float = 0.0
    val_nll: float = 0.0
    val_accuracy: float = 0.0
    eval_val_nll: list[float] = field(default_factory=list)
    loss_under_noise: dict[str, float] = field(default_factory=dict)  # str(sigma') -> increase in nats

    @property
    def mean_corrupted_accuracy(self) -> float:
        return sum(self.corrupted_accuracy.values()) / len(self.corrupted_accuracy)


def _build(pretrained: nn.Module, method: str, config: FinetuneConfig) -> nn.Module:
    model = copy.deepcopy(pretrained).train()
    sigma = config.sigma if method == "flat-lora" else 0.0
    return apply_flat_lora(
        model, target_modules=TARGET_MODULES, r=config.rank, lora_alpha=config.lora_alpha, sigma=sigma, fused=True,
        lora_dropout=config.lora_dropout,
    )


def finetune(
    pretrained: nn.Module,
    task: DigitsTask,
    method: str,
    *,
    seed: int,
    config: FinetuneConfig,
    device: torch.device,
    progress=None,
) -> RunResult:
    """One fine-tuning run; ``progress`` (a tqdm bar or None) advances once per optimizer step."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    stop = config.steps if config.stop_at is None else config.stop_at
    if not 1 <= stop <= config.steps:
        raise ValueError(f"stop_at must be in [1, steps={config.steps}], got {config.stop_at}")
    torch.manual_seed(seed)  # the LoRA initialisation
    model = _build(pretrained, method, config).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / config.steps)))
    schedule = FlatLoraSchedule(model, total_steps=config.steps, seed=seed) if method == "flat-lora" else None
    sharpness = None
    if method == "efmlora":
        from ..sharpness import EFMLoRA

        sharpness = EFMLoRA(model, optimizer, rho=config.efm_rho, beta=config.efm_beta)
    elif method == "bilora":
        from ..sharpness.bilora import BiLoRA

        sharpness = BiLoRA(model, optimizer, rho=config.bilora_rho, seed=seed)

    generator = torch.Generator().manual_seed(seed)  # identical batches for every method
    train = task.target_train
    result = RunResult(method=method, seed=seed, accuracy=0.0, corrupted_accuracy={}, knob=getattr(config, KNOBS[method]))

    def train_step(images, labels) -> float:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        (sharpness or optimizer).step()
        lr_schedule.step()
        if schedule is not None:
            schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    step_seconds = 0.0
    for step in range(stop):
        index = torch.randint(0, train.labels.numel(), (config.batch_size,), generator=generator)
        images, labels = train.images[index].to(device), train.labels[index].to(device)
        if step == 0:  # memory is measured on the first step, time on the others (the profiler is slow)
            with PeakMemory(device) as peak:
                loss = train_step(images, labels)
            result.peak_memory_mib = peak.mib
        else:
            started = time.perf_counter()
            loss = train_step(images, labels)
            step_seconds += time.perf_counter() - started
        result.losses.append(loss)
        if (step + 1) % config.eval_every == 0 or step + 1 == stop:
            with _unperturbed(sharpness):
                result.eval_steps.append(step + 1)
                result.eval_accuracy.append(accuracy(model, task.target_val))
                result.eval_val_nll.append(mean_nll(model, task.target_val))
        if progress is not None:
            progress.update(1)
    result.steps_done = stop
    result.step_ms = 1000 * step_seconds / max(1, stop - 1)
    with _unperturbed(sharpness):
        result.val_nll = mean_nll(model, task.target_val)
        result.val_accuracy = accuracy(model, task.target_val)
        if task.target_test is None:  # the validation search: the test split is not there to touch
            return result
        result.accuracy = accuracy(model, task.target_test)
        result.corrupted_accuracy = {name: accuracy(model, split) for name, split in task.target_test_corrupted.items()}
        result.test_nll = mean_nll(model, task.target_test)
        sigmas = sorted({*config.noise_sigmas, config.sigma} - {0.0})
        curve = loss_under_noise(model, task.target_test, sigmas, draws=config.noise_draws)
        result.loss_under_noise = {str(k): v for k, v in curve.items()}
    return result


class _unperturbed:
    """Evaluate EFMLoRA at its unperturbed adapter (it otherwise keeps B + E_hat applied between steps);
    Bi-LoRA's auxiliary module is off in eval mode by itself."""

    def __init__(self, sharpness):
        self.sharpness = sharpness if hasattr(sharpness, "unperturbed") else None

    def __enter__(self):
        if self.sharpness is not None:
            self._context = self.sharpness.unperturbed()
            self._context.__enter__()

    def __exit__(self, *exc):
        if self.sharpness is not None:
            return self._context.__exit__(*exc)
        return False
