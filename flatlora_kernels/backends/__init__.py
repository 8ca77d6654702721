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
from types import ModuleType

BACKENDS = ("reference", "cpp", "triton")

_MODULES = {"reference": "torch_reference", "cpp": "cpp", "triton": "triton_backend"}


def get_backend(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")
