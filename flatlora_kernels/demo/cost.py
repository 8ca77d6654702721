"""What each method costs at a real size: one training step (forward + backward) of a stack of
1024-wide adapted layers at M tokens, on the current device, for LoRA, fused Flat-LoRA, naive
perturbation (the weight-sized ``W + eps`` built per layer and kept until backward, eps from
``torch.randn``: ``baselines.naive_randn_flat_lora_linear``) and Bi-LoRA (LoRA plus the auxiliary
branch ``s * (x @ A2^T) @ B2^T`` in the same backward, and its global clip from r x r Grams).
Optimizer steps are left out for every method.

Timing is interleaved, as ``benchmarks/cpu_target.py`` does: each repetition runs every method once,
in an order that alternates between repetitions (forward, then reversed), and keeps each method's
time relative to LoRA's *in the same repetition*; a row reports the median of those ratios and their
min-max spread, so a machine whose speed drifts (other jobs) shows up as spread instead of bias.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from ..baselines import lora_linear, make_layer, naive_randn_flat_lora_linear
from .. import flat_lora_linear
from ..memory import PeakMemory

COST_METHODS = ("lora", "flat-lora (fused)", "naive perturbation", "bi-lora")
WIDE_SPREAD = 0.25  # (max - min) / median of a ratio above this: the ratio does not mean much


def _stack(width: int, depth: int, rank: int, device) -> list[tuple]:
    layers = []
    for index in range(depth):
        weight, lora_A, lora_B, _ = make_layer(width, width, rank, device=device, seed=index, lora_B_std=0.01)
        generator = torch.Generator().manual_seed(100 + index)
        aux_A = (torch.randn(rank, width, generator=generator) / width**0.5).to(device)
        aux_B = (torch.randn(width, rank, generator=generator) * 0.01).to(device)
        layers.append((weight, lora_A.requires_grad_(), lora_B.requires_grad_(), aux_A.requires_grad_(), aux_B.requires_grad_()))
    return layers


def _step(method: str, x, layers, scaling: float, sigma: float, seed: int):
    h = x
    for index, (weight, lora_A, lora_B, aux_A, aux_B) in enumerate(layers):
        if method == "lora":
            h = lora_linear(h, weight, lora_A, lora_B, scaling=scaling)
        elif method == "flat-lora (fused)":
            h = flat_lora_linear(h, weight, lora_A, lora_B, scaling=scaling, sigma=sigma, seed=seed + index)
        elif method == "bi-lora":
            h = lora_linear(h, weight, lora_A, lora_B, scaling=scaling) + scaling * ((h @ aux_A.T) @ aux_B.T)
        else:
            # torch.randn noise: the naive method's own cost, not that of our stream in plain PyTorch.
            generator = torch.Generator(device=h.device).manual_seed(seed + index)
            h = naive_randn_flat_lora_linear(h, weight, lora_A, lora_B, scaling=scaling, sigma=sigma, generator=generator)
    h.square().mean().backward()
    if method == "bi-lora":  # the global clip's norm, from r x r Grams (Bi-LoRA's only other per-step work)
        with torch.no_grad():
            norm = sum(((B.T @ B) * (A @ A.T)).sum() for _, _, _, A, B in layers).sqrt()
            factor = torch.where(norm > 0.05, torch.sqrt(0.05 / norm), 1.0)
            for _, _, _, A, B in layers:
                A.mul_(factor)
                B.mul_(factor)
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def measure_cost(*, width=1024, tokens=2048, depth=4, rank=16, repeats=7, device="cpu") -> dict:
    """Interleaved step times (median ratio vs LoRA in the same repetition, min-max) and the peak memory of one step."""
    device = torch.device(device)
    layers = _stack(width, depth, rank, device)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(depth)).to(device)
    load_before = load_average()
    for method in COST_METHODS:
        _step(method, x, layers, 2.0, 0.1, 0)  # warm-up (allocator, first-call dispatch)
    times = {m: [] for m in COST_METHODS}
    for repeat in range(repeats):
        order = COST_METHODS if repeat % 2 == 0 else COST_METHODS[::-1]
        for method in order:
            started = time.perf_counter()
            _step(method, x, layers, 2.0, 0.1, repeat)
            times[method].append(1000 * (time.perf_counter() - started))
    rows = []
    for method in COST_METHODS:
        with PeakMemory(device) as peak:
            _step(method, x, layers, 2.0, 0.1, 99)
        ratios = [t / base for t, base in zip(times[method], times["lora"])]
        median = statistics.median(ratios)
        rows.append({
            "method": method, "step ms": statistics.median(times[method]), "time vs lora": median,
            "ratio min": min(ratios), "ratio max": max(ratios), "relative spread": (max(ratios) - min(ratios)) / median,
            "peak MiB": peak.mib,
        })
    for row in rows:
        row["memory vs lora"] = row["peak MiB"] / rows[0]["peak MiB"]
    return {
        "rows": rows, "repeats": repeats, "load average before": load_before, "load average after": load_average(),
        "threads": torch.get_num_threads(), "shape": {"width": width, "tokens": tokens, "depth": depth, "rank": rank},
        "wide spread": [r["method"] for r in rows if r["relative spread"] > WIDE_SPREAD],
    }


def print_cost(cost: dict, print_table, device: str) -> None:
    shape = cost["shape"]
    print(
        f"\ncost of one training step (forward + backward) at real size ({device}, {cost['threads']} threads): {shape['depth']} layers "
        f"{shape['width']}x{shape['width']}, M={shape['tokens']}, r={shape['rank']}, fp32; {cost['repeats']} interleaved repetitions, "
        f"load average {cost['load average before']} before, {cost['load average after']} after"
    )
    table = []
    for row in cost["rows"]:
        table.append({
            "method": row["method"], "step ms (median)": f"{row['step ms']:.1f}",
            "time vs lora [min-max]": f"{row['time vs lora']:.2f}x [{row['ratio min']:.2f}-{row['ratio max']:.2f}]",
            "peak MiB": f"{row['peak MiB']:.1f}", "memory vs lora": f"{row['memory vs lora']:.2f}x",
        })
    print_table(table)
    if cost["wide spread"]:
        print(
            f"  the time ratio's spread is wider than {WIDE_SPREAD:.0%} of its median for {', '.join(cost['wide spread'])}: "
            "the machine's speed moved during the measurement, and those ratios do not mean much (rerun on an idle machine)"
        )
