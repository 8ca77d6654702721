"""Training-step time of LoRA, Flat-LoRA, EFMLoRA and FMLoRA on one model.

The model is an MLP of ``depth`` square LoRA layers (ReLU between) on ``tokens`` rows; one step is
zero_grad + forward + backward + AdamW step (FMLoRA: its two passes; EFMLoRA: one pass plus the
perturbation update). Variants:

* ``lora``: plain LoRA, PEFT's math (``reference.lora_linear``) on ``FlatLoraLinear`` parameters;
* ``flat_lora``: ``FlatLoraLinear(fused=True)`` (C++ on CPU, Triton on CUDA) with sigma = 0.05 and
  the noise at full strength (``FlatLoraSchedule`` past its ramp), one fresh draw per step;
* ``efmlora`` / ``fmlora``: the plain-LoRA model under ``EFMLoRA`` / ``FMLoRA`` (rho = 0.05).

Shapes: full mode (``--full`` / ``FLATLORA_BENCH_FULL=1``) runs 4 x 1024-wide layers, r = 16,
M = 2048 tokens; the default short mode (CI) a 128-wide model on 256 tokens.

Ratios to LoRA are paired: every round of a variant is preceded, in pytest-benchmark's untimed
``setup``, by one timed plain-LoRA step, so load drift on a shared machine hits both sides alike.
``extra_info`` records ``lora_median_s`` and ``ratio_vs_lora`` (medians); the paper's targets are
EFMLoRA <= 1.2x and FMLoRA ~2x LoRA.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from flatlora_kernels.modules import FlatLoraLinear
from flatlora_kernels.baselines import lora_linear
from flatlora_kernels.schedule import FlatLoraSchedule
from flatlora_kernels.sharpness import EFMLoRA, FMLoRA

VARIANTS = ("lora", "flat_lora", "efmlora", "fmlora")
PAPER_TARGET = {"efmlora": "<= 1.2x LoRA", "fmlora": "~2x LoRA"}
RHO, BETA, SIGMA = 0.05, 0.9, 0.05


@dataclass(frozen=True)
class ModelShape:
    width: int
    tokens: int
    depth: int
    rank: int


FULL_SHAPE = ModelShape(width=1024, tokens=2048, depth=4, rank=16)
SHORT_SHAPE = ModelShape(width=128, tokens=256, depth=4, rank=16)


class PlainLoraLinear(FlatLoraLinear):
    """The same parameters as FlatLoraLinear, computed as PEFT does: ``W x + s * B (A x)``, no noise."""

    def forward(self, x):
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias, scaling=self.scaling)


def cpp_backend_available() -> bool:
    try:
        from flatlora_kernels.backends import cpp  # noqa: F401
    except ImportError:
        return False
    return True


def build_model(shape: ModelShape, device: torch.device, *, flat: bool, fused: bool) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(shape.depth):
        if flat:
            layer = FlatLoraLinear(
                shape.width, shape.width, r=shape.rank, lora_alpha=2 * shape.rank, sigma=SIGMA, fused=fused
            )
        else:
            layer = PlainLoraLinear(shape.width, shape.width, r=shape.rank, lora_alpha=2 * shape.rank, sigma=0.0)
        with torch.no_grad():  # mid-training: a non-zero B, so both terms of the gradient estimate work
            layer.lora_B.normal_(0.0, 0.01)
        layers += [layer, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).to(device)


def make_step(variant: str, shape: ModelShape, device: torch.device, fused: bool) -> Callable[[], None]:
    """A closure running one full training step of ``variant``."""
    model = build_model(shape, device, flat=variant == "flat_lora", fused=fused)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape.tokens, shape.width, generator=generator).to(device)
    target = torch.randn(shape.tokens, shape.width, generator=generator).to(device)
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def forward_backward():
        loss = (model(x) - target).pow(2).mean()
        loss.backward()
        return loss

    if variant == "fmlora":
        optimizer = FMLoRA(model, adamw, rho=RHO)

        def step():
            optimizer.step(forward_backward)

        return step

    optimizer = EFMLoRA(model, adamw, rho=RHO, beta=BETA) if variant == "efmlora" else adamw
    schedule = FlatLoraSchedule(model, total_steps=1) if variant == "flat_lora" else None
    if schedule is not None:
        schedule.step()  # past the cosine ramp: the noise at full strength from the first timed step

    def step():
        optimizer.zero_grad(set_to_none=True)
        forward_backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()

    return step


def synchronized(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return step

    def run():
        step()
        torch.cuda.synchronize(device)

    return run


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_time(benchmark, variant, bench_settings, bench_facts):
    device = bench_settings.device
    shape = FULL_SHAPE if bench_settings.full else SHORT_SHAPE
    fused = device.type != "cpu" or cpp_backend_available()
    step = synchronized(make_step(variant, shape, device, fused), device)
    lora_step = synchronized(make_step("lora", shape, device, fused), device)
    lora_times: list[float] = []

    def time_one_lora_step():  # pytest-benchmark's untimed setup: the paired baseline
        start = time.perf_counter()
        lora_step()
        lora_times.append(time.perf_counter() - start)

    benchmark.group = f"fmlora step {'full' if bench_settings.full else 'short'}"
    benchmark.extra_info.update(bench_facts)
    benchmark.extra_info.update(
        suite="fmlora",
        variant=variant,
        width=shape.width,
        tokens=shape.tokens,
        depth=shape.depth,
        r=shape.rank,
        dtype="float32",
        rho=RHO if variant in ("efmlora", "fmlora") else None,
        sigma=SIGMA if variant == "flat_lora" else 0.0,
        flat_lora_fused=fused if variant == "flat_lora" else None,
        paper_target=PAPER_TARGET.get(variant),
    )
    benchmark.pedantic(
        step,
        setup=time_one_lora_step,
        rounds=bench_settings.rounds,
        warmup_rounds=bench_settings.warmup_rounds,
        iterations=1,
    )
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing was timed
        return
    timed_lora = lora_times[bench_settings.warmup_rounds :]
    lora_median = statistics.median(timed_lora)
    benchmark.extra_info["lora_median_s"] = lora_median
    benchmark.extra_info["ratio_vs_lora"] = benchmark.stats.stats.median / lora_median
