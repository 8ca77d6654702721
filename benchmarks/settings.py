"""Run settings of the benchmark suite (mode, device, threads, rounds) and the facts recorded with results.

Mode: short by default (tiny shapes, 3 rounds: a CI smoke run of every implementation in well under a
minute on 2 CPU cores); ``--full`` or ``FLATLORA_BENCH_FULL=1`` for real layer shapes.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BenchSettings:
    device: torch.device
    full: bool
    threads: int
    rounds: int
    warmup_rounds: int

    @property
    def mode(self) -> str:
        return "full" if self.full else "short"

    def synchronize(self) -> None:
        """Wait for queued GPU work, so that a timed function measures the work and not its launch."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_settings(full: bool, device_name: str, threads: int | None) -> BenchSettings:
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--bench-device=cuda, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    threads = threads or usable_cores()
    if not full:
        rounds, warmup = 3, 1
    elif device.type == "cpu":
        rounds, warmup = 5, 1
    else:
        rounds, warmup = 25, 5  # GPU steps take milliseconds: more rounds for stable medians
    return BenchSettings(device=device, full=full, threads=threads, rounds=rounds, warmup_rounds=warmup)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment_facts(settings: BenchSettings) -> dict:
    """What a number depends on besides the code: stored with every result."""
    return {
        "mode": settings.mode,
        "device": device_description(settings.device),
        "device_type": settings.device.type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        # Other processes on the machine skew CPU timings: recorded so that a reader can tell.
        "load_average_1min_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
