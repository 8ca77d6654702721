"""How one benchmark runs: skip rules, the untimed sanity check, the timed step, the memory measurement.

Fairness rules applied here:
* every implementation of a case gets the same tensors (``workloads``), seeds and ``dy``;
* the timed function is one whole step (forward, or forward + backward via ``torch.autograd.grad``, so
  no ``.grad`` accumulates between rounds) and ends with a CUDA synchronisation on GPU;
* compilation, first-call set-up and the sanity check happen before the timed rounds;
* peak memory is measured in a separate, untimed run (the CPU measurement uses the profiler, which
  slows the code down).
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Callable

import pytest
import torch

from flatlora_kernels.memory import PeakMemory

from implementations import Implementation, no_perturbation, step
from sanity import SanityError, check_layer
from settings import BenchSettings
from workloads import Workload, dtype_name

PASSES = ("forward", "forward+backward")

# The pure-PyTorch Philox stream needs several int64 temporaries per weight element: ~0.1 s per pass
# for 1024 x 1024 but ~8 s for 4096 x 4096 on 2 CPU cores. Above this many weight elements such CPU
# cases are skipped, to keep the full CPU run within minutes.
PURE_TORCH_PHILOX_CPU_LIMIT = 1 << 20

MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory allocated before the step",
    "cpu": "torch.profiler profile_memory=True: running sum of every CPU allocation/free event during the step",
}

_unavailable: dict[tuple, str] = {}  # (implementation, device type, dtype) -> why it cannot run
_checked: dict[tuple, dict] = {}  # (implementation, case) -> facts found by its sanity check


def check_or_skip(impl: Implementation, workload: Workload, settings: BenchSettings, case) -> dict:
    """Skip what cannot (or should not) run here; otherwise run the sanity check (once per
    implementation and case, shared by its forward and forward+backward timings), which fails loudly."""
    if (impl.name, case) in _checked:
        return _checked[(impl.name, case)]
    dtype = workload.x.dtype
    key = (impl.name, settings.device.type, dtype)
    if key in _unavailable:
        pytest.skip(_unavailable[key])
    biggest = max(layer.weight.numel() for layer in workload.layers)
    if impl.pure_torch_philox and settings.device.type == "cpu" and biggest > PURE_TORCH_PHILOX_CPU_LIMIT:
        pytest.skip(
            f"{impl.name}: regenerates eps with the pure-PyTorch Philox stream, seconds per pass for a "
            f"{biggest / 2**20:.0f} Mi-element weight on CPU (limit {PURE_TORCH_PHILOX_CPU_LIMIT / 2**20:.0f} Mi)"
        )
    try:
        facts = check_layer(impl, workload.layers[0], workload.x, workload.grad_out)
        _checked[(impl.name, case)] = facts
        return facts
    except SanityError:
        raise
    except Exception as error:
        if not impl.may_be_unavailable:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = f"{impl.name} cannot run on {settings.device.type}/{dtype_name(dtype)}: {type(error).__name__}: {message}"
        _unavailable[key] = reason
        pytest.skip(reason)


def own_copy_if_editing(impl: Implementation, workload: Workload) -> Workload:
    """The inplace baseline writes to the frozen weights (and, in bf16, does not restore them exactly):
    it gets its own copy so that the tensors shared with the other implementations stay untouched."""
    if impl.perturbation is no_perturbation:
        return workload
    layers = [dataclasses.replace(layer, weight=layer.weight.clone()) for layer in workload.layers]
    return Workload(layers, workload.x, workload.grad_out)


def training_step(impl: Implementation, workload: Workload, settings: BenchSettings, *, backward: bool):
    """The timed function: ``run()``. ``run(keep_outputs=True)`` (untimed) also returns ``(y, grads)``."""
    grad_out = workload.grad_out if backward else None
    grad_inputs = workload.grad_inputs()

    def run(keep_outputs: bool = False):
        y, grads = step(impl, workload.layers, workload.x, grad_out, grad_inputs)
        settings.synchronize()
        return (y, grads) if keep_outputs else None

    run.implementation = impl
    run.depth = len(workload.layers)
    return run


def check_finite(run, y, grads) -> None:
    names = ["dx"] + ["dA", "dB"] * run.depth  # the order of Workload.grad_inputs()
    for name, value in [("y", y), *zip(names, grads or ())]:
        if not torch.isfinite(value).all():
            raise SanityError(f"{run.implementation.name}: {name} of the {run.depth}-layer step has NaN/Inf")


def time_step(benchmark, run: Callable[[], None], settings: BenchSettings) -> None:
    benchmark.pedantic(run, rounds=settings.rounds, iterations=1, warmup_rounds=settings.warmup_rounds)


def peak_memory_bytes(run, settings: BenchSettings) -> int:
    """Peak memory allocated by one step above what was allocated before it (layers, x, dy).

    The step's outputs are checked for NaN/Inf after the measurement (the check allocates too).
    """
    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(settings.device) as peak:
        y, grads = run(keep_outputs=True)
    check_finite(run, y, grads)
    return int(peak.bytes)


def record(benchmark, facts: dict, group: str, **info) -> None:
    benchmark.group = group
    benchmark.extra_info.update(facts)
    benchmark.extra_info.update(info)


def parametrize_runs(metafunc, fixture: str, smoke_cases, full_cases, names, case_id: Callable) -> None:
    """Parametrize ``fixture`` with every (case, implementation name) pair: ``full_cases`` under ``--full``,
    else ``smoke_cases``; ids ``<case_id(case)>-<name>``."""
    if fixture not in metafunc.fixturenames:
        return
    from conftest import SETTINGS_KEY

    full = metafunc.config.stash[SETTINGS_KEY].full
    runs = [(case, name) for case in (full_cases if full else smoke_cases) for name in names]
    metafunc.parametrize(fixture, runs, ids=[f"{case_id(case)}-{name}" for case, name in runs])


_CASE_STEPS: dict = {}


def steps_of(case, setup: Callable) -> dict:
    """``setup(*case)`` (a dict of steps by implementation), built once per case and shared by its
    implementations; one case's models are alive at a time."""
    if case not in _CASE_STEPS:
        _CASE_STEPS.clear()
        _CASE_STEPS[case] = setup(*case)
    return _CASE_STEPS[case]


def cpu_step_and_peak(run, setup: Callable, settings: BenchSettings, group: str) -> tuple[Callable, float]:
    """The step of ``run = (case, implementation)`` (skipped off the CPU: ``group`` runs there), warmed
    once, and its peak memory in MiB (``PeakMemory``, the C++ chunk workspaces freed first)."""
    if settings.device.type != "cpu":
        pytest.skip(f"{group} runs on the CPU")
    case, name = run
    step = steps_of(case, setup)[name]
    step()  # warm: lazy allocations outside the measurement
    gc.collect()
    with PeakMemory("cpu") as peak:
        step()
    return step, peak.mib
