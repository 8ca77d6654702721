"""``python -m flatlora_kernels.info``: what this install runs on, and a self-check of every backend.

Prints versions (Python, torch, triton, CUDA, transformers/peft/bitsandbytes) and whether CI's matrix
tests that stack (``tested_stacks``; ``--stack`` prints only that line), the CPU model and the
thread count in use, how the installed C++ extension was compiled (its own record) and the CPU ISA it
chose, which backend ``"auto"`` picks per device (and why a backend cannot run here), and checks that
each backend that can run here reproduces the noise stream: ``flat_lora_linear`` against
``x (W + s*B@A + eps)^T`` with eps from ``filter_noise`` (the definition in
``flatlora_kernels/noise.py``). Exit status 1 if a check fails, the extension was built against
another torch, or ``FLATLORA_CPU_ISA`` names an unusable level.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys

import torch

from .tested_stacks import stack_line

_SHAPE = (12, 40, 24, 4)  # tokens, in, out, rank: small, with in not a multiple of the Philox group of 4


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as error:  # noqa: BLE001 - a broken optional install is reported, not raised
        return f"not available ({type(error).__name__})"


def _cpp_build() -> tuple[str, bool]:
    """How the C++ extension that is installed was compiled (its own record, not setup.py's), and whether
    it was built against the torch that runs it."""
    try:
        from . import _C
    except ImportError as error:
        return f"not built ({type(error).__name__}: build it with `pip install --no-build-isolation -e .`)", False
    build = _C.build_info()
    flags = [
        build["compiler"],
        f"C++{str(build['cplusplus'])[2:4]}",
        "optimised" if build["optimized"] else "NOT optimised",
        "no math errno" if not build["math_errno"] else "math errno",
        *(["FAST-MATH (breaks the cross-ISA stream)"] if build["fast_math"] else []),
        f"OpenMP {build['openmp']}" if build["openmp"] else "no OpenMP",
        f"against torch {build['torch']}",
    ]
    running = torch.__version__.split("+")[0]
    matches = running == build["torch"]
    if not matches:
        flags.append(f"MISMATCH: torch {running} runs it; rebuild with `pip install --no-build-isolation -e .`")
    return ", ".join(flags), matches


def _cpu_isa() -> tuple[str, bool]:
    """The ISA the C++ kernels chose, or why none: an unusable ``FLATLORA_CPU_ISA`` is an error here too."""
    try:
        from .backends import cpp
    except ImportError as error:
        return f"none (C++ extension not built: {error.__class__.__name__})", True
    try:
        return cpp.cpu_isa(), True
    except ValueError as error:  # FLATLORA_CPU_ISA names a level that does not exist or this CPU lacks
        return f"ERROR: {error}", False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def thread_line() -> str:
    """The report's thread line: torch's thread count next to the cores this process may use (several
    training processes that each use every core slow each other down, as OpenMP workers spin while they wait)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    return f"threads in use {torch.get_num_threads()} (OMP_NUM_THREADS {omp}) on {cores} usable cores"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def _self_check(backend: str, device: torch.device) -> tuple[bool, str]:
    """One forward of ``backend`` on ``device`` against the materialised-noise definition."""
    from .functional import flat_lora_linear
    from .noise import filter_noise

    m, k, n, r = _SHAPE
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    a, b = torch.randn(r, k, generator=g) * 0.1, torch.randn(n, r, generator=g) * 0.1
    bias = torch.randn(n, generator=g)
    x, w, a, b, bias = (t.to(device) for t in (x, w, a, b, bias))
    scaling, sigma, seed = 2.0, 0.3, 1234
    eps = filter_noise(w.cpu(), a.cpu(), b.cpu(), scaling=scaling, sigma=sigma, seed=seed)
    expected = x.cpu() @ (w.cpu() + scaling * b.cpu() @ a.cpu() + eps).t() + bias.cpu()
    try:
        y = flat_lora_linear(x, w, a, b, bias, scaling=scaling, sigma=sigma, seed=seed, backend=backend)
    except Exception as error:  # noqa: BLE001 - the report says why a backend cannot run
        return False, f"cannot run: {type(error).__name__}: {str(error).splitlines()[0]}"
    err = (y.cpu() - expected).abs().max().item()
    ok = err <= 1e-4 * max(1.0, expected.abs().max().item())
    return ok, f"max |error| {err:.2e} vs the noise definition"


def _why_not_runnable(backend: str, device: torch.device) -> str:
    """Empty when ``backend`` can run on ``device``, else the first line of the reason."""
    from . import backends

    try:
        backends.resolve(backend, device)
    except (ValueError, RuntimeError, ImportError) as error:
        return str(error).splitlines()[0]
    return ""


def report() -> tuple[list[str], bool]:
    """The lines ``main`` prints, and whether every runnable backend passed its self-check."""
    from . import __version__, backends

    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    build, build_ok = _cpp_build()
    isa, isa_ok = _cpu_isa()
    lines = [
        f"flatlora_kernels {__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"CPU: {_cpu_model()}; {thread_line()}",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}, "
        f"CUDA available: {torch.cuda.is_available()})",
        f"triton {_version('triton')}" + (" (TRITON_INTERPRET=1: kernels run in its interpreter on CPU)" if interpreting else ""),
        f"transformers {_version('transformers')}, peft {_version('peft')}, bitsandbytes {_version('bitsandbytes')}",
        stack_line(),
        f"C++ extension: {build}",
        f"C++ CPU ISA: {isa}",
    ]
    all_ok = build_ok and isa_ok
    for device in _devices():
        try:
            auto = backends.resolve("auto", device)
        except Exception as error:  # noqa: BLE001
            auto = f"none ({error})"
        lines.append(f'backend "auto" on {device.type}: {auto}')
        for name in backends.REGISTRY:
            why_not = _why_not_runnable(name, device)
            if why_not:
                lines.append(f"  self-check {name:9s} on {device.type}: skipped ({why_not})")
                continue
            ok, detail = _self_check(name, device)
            all_ok &= ok
            lines.append(f"  self-check {name:9s} on {device.type}: {'ok' if ok else 'FAILED'} ({detail})")
    return lines, all_ok


def main(argv: list[str] = ()) -> int:
    argv = list(argv)
    if argv == ["--stack"]:
        print(stack_line())
        return 0
    if argv:
        print("usage: python -m flatlora_kernels.info [--stack]", file=sys.stderr)
        return 2
    lines, ok = report()
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
