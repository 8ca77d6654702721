"""Argument checks shared by every entry point: bad input fails here, in Python, with a clear message.

The number checks (``check_integer``, ``check_real``, ``is_integer``, ``is_real``) are the one
place that decides what counts as a number: ``bool`` is an ``int`` subclass, but ``True`` passed as
a rank, a radius or a noise level is a bug, so bools are rejected everywhere; NaN and infinities
are rejected for every real. ``scalar_tensor`` is the one conversion of a scalar argument (sigma,
seed) to the 0-dim tensor the ops and the noise stream take.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_integer(value) -> bool:
    """An integral number that is not a bool (numpy integers count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number that is not a bool (ints and numpy floats count; NaN too: see ``check_real``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_integer(name: str, value, *, minimum: int, optional: bool = False) -> int | None:
    """``int(value)`` if ``value`` is an integer >= ``minimum`` (or None when ``optional``), else ValueError."""
    if optional and value is None:
        return None
    if not is_integer(value) or value < minimum:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {what}{' (or None)' if optional else ''}, got {value!r}")
    return int(value)


def check_real(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> float | None:
    """``float(value)`` if ``value`` is a finite real number within the bounds (each closed unless
    ``*_open``; None: unbounded), or None when ``optional``; else ValueError naming the range."""
    if optional and value is None:
        return None
    inside = is_real(value) and math.isfinite(value)
    inside = inside and (low is None or (value > low if low_open else value >= low))
    inside = inside and (high is None or (value < high if high_open else value <= high))
    if not inside:
        if low is not None and high is not None:
            bounds = f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        elif low is not None:
            bounds = f" {'>' if low_open else '>='} {low}"
        elif high is not None:
            bounds = f" {'<' if high_open else '<='} {high}"
        else:
            bounds = ""
        raise ValueError(f"{name} must be a finite number{bounds}{' (or None)' if optional else ''}, got {value!r}")
    return float(value)


def scalar_tensor(value: float | int | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A checked scalar argument (sigma, seed) as the 0-dim tensor the ops and the noise stream take:
    a tensor is detached and moved without a host sync, a Python number is wrapped."""
    if isinstance(value, Tensor):
        if value.dtype == dtype and value.device == device and value.dim() == 0:
            return value.detach()  # the usual case (module buffers): skip the no-op .to / .reshape
        return value.detach().to(device=device, dtype=dtype).reshape(())
    if device.type == "cpu":  # the same value as torch.tensor's, in half its time (it is on every call)
        return torch.scalar_tensor(value, dtype=dtype, device=device)
    return torch.tensor(value, dtype=dtype, device=device)


def _check_float_tensor(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got dtype {t.dtype}")


def check_weights(weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> None:
    """``weight: [out, in]``, ``lora_A: [r, in]``, ``lora_B: [out, r]``, r >= 1, one device."""
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_float_tensor(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    out_features, in_features = weight.shape
    if out_features == 0 or in_features == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    rank = lora_A.shape[0]
    if rank == 0:
        raise ValueError("LoRA rank r must be >= 1 (lora_A has 0 rows)")
    if lora_A.shape[1] != in_features:
        raise ValueError(
            f"lora_A must have shape [r, in_features] = [r, {in_features}], got {tuple(lora_A.shape)}"
        )
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(
            f"lora_B must have shape [out_features, r] = [{out_features}, {rank}], got {tuple(lora_B.shape)}"
        )
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")


def check_input(x: Tensor, weight: Tensor) -> None:
    _check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x must have shape [..., in_features] = [..., {weight.shape[1]}], got {tuple(x.shape)}"
        )
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")


def check_bias(bias: Tensor | None, weight: Tensor) -> None:
    if bias is None:
        return
    _check_float_tensor("bias", bias)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [out_features] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")


def check_sigma(sigma: float | Tensor) -> None:
    """sigma: a finite number >= 0, or a 1-element float tensor (checked when it is on the CPU)."""
    if isinstance(sigma, Tensor):
        if sigma.numel() != 1 or not sigma.dtype.is_floating_point:
            raise TypeError(f"sigma tensor must hold one floating-point value, got {sigma.numel()} x {sigma.dtype}")
        if sigma.device.type != "cpu" or torch.compiler.is_compiling():
            return  # reading it would sync the device (or break the graph); the schedule keeps it valid
        value = float(sigma)
    elif is_real(sigma):
        value = float(sigma)
    else:
        raise TypeError(f"sigma must be a float or a 1-element tensor, got {type(sigma).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"sigma must be finite and >= 0, got {value}")


def check_scaling(scaling: float) -> None:
    """scaling: a finite real number; a symbolic one (``torch.compile(dynamic=True)``) is checked for type only."""
    if isinstance(scaling, (torch.SymFloat, torch.SymInt)) or torch.compiler.is_compiling():
        return  # may be symbolic while tracing, where math.isfinite breaks the graph; eager calls check it
    check_real("scaling", scaling)


def check_seed(seed: int | Tensor) -> None:
    """seed: a Python int in [0, 2**63), or a 1-element int64 tensor (any 64-bit value)."""
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise TypeError(f"seed tensor must be one int64 value, got {seed.numel()} x {seed.dtype}")
        return
    if not is_integer(seed):
        raise TypeError(f"seed must be an int or a 0-dim int64 tensor, got {type(seed).__name__}")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")


def check_op_arguments(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias, scaling, sigma, seed) -> None:
    """Every check of a fused op's arguments (shapes, devices, dtypes, scalars), in one call."""
    check_weights(weight, lora_A, lora_B)
    check_input(x, weight)
    check_bias(bias, weight)
    check_scaling(scaling)
    check_sigma(sigma)
    check_seed(seed)
