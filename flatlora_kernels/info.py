"""``python -m flatlora_kernels.info``: what this install runs on, and a self-check of every backend.

Prints versions (Python, torch, triton, CUDA, transformers/peft), the C++ extension's build flags and
CPU ISA, which backend ``"auto"`` picks per device, and checks that each backend that can run here
reproduces the noise stream: ``flat_lora_linear`` against ``x (W + s*B@A + eps)^T`` with eps from
``filter_noise`` (the definition in ``flatlora_kernels/noise.py``). Exit status 1 if a check fails.
"""

from __future__ import annotations

import ast
import importlib
import os
import platform
import sys

import torch

_SHAPE = (12, 40, 24, 4)  # tokens, in, out, rank: small, with in not a multiple of the Philox group of 4


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as error:  # noqa: BLE001 - a broken optional install is reported, not raised
        return f"not available ({type(error).__name__})"


def _cpp_build_flags() -> str:
    """The flags setup.py passes the compiler (read from the source tree when it is there)."""
    setup_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")
    try:
        tree = ast.parse(open(setup_py).read())
    except OSError:
        return "unknown (no setup.py next to the package)"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_compile_args":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Return) and isinstance(inner.value, ast.List):
                    return " ".join(str(ast.literal_eval(item)) for item in inner.value.elts)
    return "unknown"


def _cpu_isa() -> str:
    try:
        from .backends import cpp
    except ImportError as error:
        return f"C++ extension not built ({error.__class__.__name__})"
    isa = getattr(cpp, "cpu_isa", None)
    if isa is not None:
        return isa() if callable(isa) else str(isa)
    try:  # an older extension without ISA dispatch: show what the CPU offers
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        return "CPU flags: " + " ".join(f for f in flags if f.startswith(("avx", "fma", "amx")))
    except (OSError, StopIteration):
        return "unknown"


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


def _runnable(backend: str, device: torch.device) -> bool:
    from . import backends

    try:
        backends.resolve(backend, device)
    except (ValueError, RuntimeError, ImportError):
        return False
    return True


def report() -> tuple[list[str], bool]:
    """The lines ``main`` prints, and whether every runnable backend passed its self-check."""
    from . import __version__, backends

    lines = [
        f"flatlora_kernels {__version__}",
        f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
        f"torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}, "
        f"CUDA available: {torch.cuda.is_available()})",
        f"triton {_version('triton')}" + (" (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        f"transformers {_version('transformers')}, peft {_version('peft')}",
        f"C++ extension: flags {_cpp_build_flags()}; CPU ISA {_cpu_isa()}; threads {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)})")
    all_ok = True
    for device in _devices():
        try:
            auto = backends.resolve("auto", device)
        except Exception as error:  # noqa: BLE001
            auto = f"none ({error})"
        lines.append(f'backend "auto" on {device.type}: {auto}')
        for name in backends.REGISTRY:
            if not _runnable(name, device):
                lines.append(f"  self-check {name:9s} on {device.type}: skipped (cannot run here)")
                continue
            ok, detail = _self_check(name, device)
            all_ok &= ok
            lines.append(f"  self-check {name:9s} on {device.type}: {'ok' if ok else 'FAILED'} ({detail})")
    return lines, all_ok


def main() -> int:
    lines, ok = report()
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
