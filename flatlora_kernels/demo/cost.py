"""What Flat-LoRA costs at a real size: one training step (forward + backward) of a stack of
1024-wide adapted layers at M tokens, for LoRA, fused Flat-LoRA and naive perturbation (the
weight-sized ``W + eps`` built per layer and kept until backward, eps from ``torch.randn``:
``baselines.naive_randn_flat_lora_linear``), on the current device."""

from __future__ import annotations

import statistics
import time

import torch

from ..functional import flat_lora_linear
from ..memory import PeakMemory
from ..baselines import lora_linear, make_layer, naive_randn_flat_lora_linear

COST_METHODS = ("lora", "flat-lora (fused)", "naive perturbation")


def _stack(width: int, depth: int, rank: int, device) -> list[tuple]:
    layers = []
    for index in range(depth):
        weight, lora_A, lora_B, _ = make_layer(width, width, rank, device=device, seed=index, lora_B_std=0.01)
        layers.append((weight, lora_A.requires_grad_(), lora_B.requires_grad_()))
    return layers


def _step(method: str, x, layers, scaling: float, sigma: float, seed: int):
    h = x
    for index, (weight, lora_A, lora_B) in enumerate(layers):
        if method == "lora":
            h = lora_linear(h, weight, lora_A, lora_B, scaling=scaling)
        elif method == "flat-lora (fused)":
            h = flat_lora_linear(h, weight, lora_A, lora_B, scaling=scaling, sigma=sigma, seed=seed + index)
        else:
            # torch.randn noise: the naive method's own cost, not that of our stream in plain PyTorch.
            generator = torch.Generator(device=h.device).manual_seed(seed + index)
            h = naive_randn_flat_lora_linear(h, weight, lora_A, lora_B, scaling=scaling, sigma=sigma, generator=generator)
    h.square().mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def measure_cost(*, width=1024, tokens=2048, depth=4, rank=16, repeats=5, device="cpu") -> list[dict]:
    """Median step time over ``repeats`` (after one warm-up) and the peak memory of one step."""
    device = torch.device(device)
    layers = _stack(width, depth, rank, device)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(depth)).to(device)
    rows = []
    for method in COST_METHODS:
        _step(method, x, layers, 2.0, 0.1, 0)  # warm-up (allocator, first-call dispatch)
        times = []
        for repeat in range(repeats):
            started = time.perf_counter()
            _step(method, x, layers, 2.0, 0.1, repeat)
            times.append(1000 * (time.perf_counter() - started))
        with PeakMemory(device) as peak:
            _step(method, x, layers, 2.0, 0.1, 99)
        rows.append({"method": method, "step ms": statistics.median(times), "peak MiB": peak.mib})
    lora = rows[0]
    for row in rows:
        row["time vs lora"] = row["step ms"] / lora["step ms"]
        row["memory vs lora"] = row["peak MiB"] / lora["peak MiB"]
    return rows
