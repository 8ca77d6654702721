"""Backends: each module implements the same two functions on 2-D inputs.

``forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed) -> (y, row_scale)``
    ``x: [M, K]`` (compute dtype), ``weight: [N, K]``, ``lora_A: [r, K]``, ``lora_B: [N, r]`` (any float
    dtypes), ``bias: [N] | None``, ``scaling: float``, ``sigma``: 0-dim fp32 tensor, ``seed``: 0-dim int64
    tensor, both on x's device. Returns ``y: [M, N]`` in x's dtype and the fp32 ``row_scale: [N]``
    (``sigma * ||W + s*B@A||_row / sqrt(K)``, see ``flatlora_kernels.noise``).

``backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx) -> (dx, dA, dB)``
    ``dx = dy @ (W + s*B@A + eps)`` (an empty tensor when ``compute_dx`` is False), ``dA = s*(dy@B)^T@x``
    and ``dB = s*dy^T@(x@A^T)`` in the dtypes of ``lora_A`` / ``lora_B``. eps is regenerated from
    ``seed`` and ``row_scale``; nothing weight-sized is kept between the passes.

Those are the dense weight's (format ``"dense"``: the modules named in ``REGISTRY``). Another weight
format registers its own module per backend with ``register_format`` (``flatlora_kernels.quantized``:
``"4bit"``), taking its weight's arguments in place of ``weight``; ``get_backend(name, format)``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Optional

import torch


def _triton_on_cpu_needs_interpreter(device: torch.device) -> Optional[str]:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "backend='triton' on CPU tensors runs the kernels in Triton's interpreter: set "
            "TRITON_INTERPRET=1 in the environment before importing triton (or use backend='cpp')"
        )
    return None


@dataclass(frozen=True)
class Backend:
    """One backend, declared once: every check on backend names and devices derives from this."""

    name: str
    module: str  #: module under ``flatlora_kernels.backends``
    devices: Optional[tuple[str, ...]]  #: device types it runs on (None: any)
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None  #: why it cannot run, or None
    auto_for: tuple[str, ...] = ()  #: device types on which ``"auto"`` picks it
    #: torch.library cannot see into its kernels (compiled C++): the ops call it through custom_ops of
    #: its own, with fakes, and eager calls may skip the dispatch layers (``op_family``)
    opaque: bool = False


REGISTRY = {
    spec.name: spec
    for spec in (
        Backend("reference", "torch_reference", devices=None),
        Backend("cpp", "cpp", devices=("cpu",), auto_for=("cpu",), opaque=True),
        Backend("triton", "triton_backend", devices=("cuda", "cpu"), unavailable=_triton_on_cpu_needs_interpreter,
                auto_for=("cuda",)),
    )
}
BACKENDS = tuple(REGISTRY)
_DEVICE_WORDS = {"cpu": "CPU", "cuda": "CUDA"}


def resolve(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to the fast path for ``device`` (the reference elsewhere); reject what cannot run."""
    if backend == "auto":
        return _AUTO.get(device.type, "reference")
    spec = REGISTRY.get(backend) if isinstance(backend, str) else None
    if spec is None:
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    if spec.devices is not None and device.type not in spec.devices:
        words = " or ".join(_DEVICE_WORDS.get(d, d) for d in spec.devices if d != "cpu" or len(spec.devices) == 1)
        raise ValueError(f"backend={backend!r} runs on {words} tensors only, got tensors on {device}")
    reason = spec.unavailable(device)
    if reason is not None:
        raise RuntimeError(reason)
    return backend


# Looked up on every call, so derived once from REGISTRY (the first declaration for a device wins).
_AUTO: dict[str, str] = {}
for _spec in REGISTRY.values():
    for _device_type in _spec.auto_for:
        _AUTO.setdefault(_device_type, _spec.name)
#: weight format -> backend name -> module implementing it for that format
FORMATS: dict[str, dict[str, str]] = {"dense": {name: f"{__name__}.{spec.module}" for name, spec in REGISTRY.items()}}
_MODULES: dict[tuple[str, str], ModuleType] = {}  # imported on first use: the C++ one raises if it is not built


def register_format(format: str, modules: dict[str, str]) -> None:
    """Declare weight format ``format``'s backend modules (backend name -> module path, imported on first use)."""
    unknown = set(modules) - set(REGISTRY)
    if unknown:
        raise ValueError(
            f"register_format({format!r}): unknown backends {sorted(unknown)}; expected some of {BACKENDS}"
        )
    FORMATS[format] = dict(modules)


def get_backend(name: str, format: str = "dense") -> ModuleType:
    """Backend ``name``'s module for weight format ``format``."""
    module = _MODULES.get((format, name)) if isinstance(name, str) else None
    if module is not None:
        return module
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")
    path = FORMATS[format].get(name)
    if path is None:
        raise ValueError(f"backend {name!r} has no implementation for the {format} weight format")
    module = _MODULES[(format, name)] = importlib.import_module(path)
    return module
