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


REGISTRY = {
    spec.name: spec
    for spec in (
        Backend("reference", "torch_reference", devices=None),
        Backend("cpp", "cpp", devices=("cpu",), auto_for=("cpu",)),
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
_MODULES: dict[str, ModuleType] = {}  # imported on first use: the C++ one raises if it is not built


def get_backend(name: str) -> ModuleType:
    module = _MODULES.get(name) if isinstance(name, str) else None
    if module is not None:
        return module
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")
    module = _MODULES[name] = importlib.import_module(f"{__name__}.{REGISTRY[name].module}")
    return module
