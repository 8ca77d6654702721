"""Flat-QLoRA on the CPU: fused vs PEFT QLoRA vs naive Flat-QLoRA, time and peak memory.

All three run the same bitsandbytes NF4 bases (double-quantized, ``compute_dtype`` = the compute
dtype) and the same adapter (r=16, alpha=32, factors in the compute dtype), forward + backward of a
fixed ``dy``:

* ``peft``: PEFT's LoRA layer over the ``Linear4bit`` (bitsandbytes dequantizes W in each pass);
* ``fused``: ``FlatLoraLinear4bit`` (C++ backend: 4-bit rows decoded into bounded chunks, noise
  regenerated from a seed), noise on (factor 1);
* ``naive``: dequantize W (bitsandbytes), add ``s*B@A`` and ``torch.randn`` noise scaled by the row
  norms, and let autograd keep the perturbed weight for backward.

Time: every round runs each implementation once, in an order rotated per round (interleaved A/B in
one process); medians, spread (min-max) and the fused/PEFT ratio of medians. Memory: peak above the
step's start (``flatlora_kernels.memory.PeakMemory``, profiler-counted), chunk workspaces freed first.

    python benchmarks/qlora_target.py                 # the targets: 1 layer and 16 layers, see TARGETS
    python benchmarks/qlora_target.py --quick         # tiny shapes (smoke)
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

RANK, ALPHA, SIGMA = 16, 32, 0.05
#: (what, depth, M, N=K, compute dtype): the issue's memory target is the 16-layer 2048 stack at M=512 bf16;
#: its time targets are one layer at M in {512, 2048}, N=K in {1024, 4096}, fp32 and bf16.
MEMORY_TARGETS = [(16, 512, 2048, torch.bfloat16), (1, 512, 2048, torch.bfloat16)]
TIME_TARGETS = [(1, m, n, dtype) for n in (1024, 4096) for m in (512, 2048) for dtype in (torch.float32, torch.bfloat16)]
IMPLEMENTATIONS = ("peft", "fused", "naive")


def make_bases(depth, n, compute_dtype, seed=0):
    import bitsandbytes as bnb

    torch.manual_seed(seed)
    bases = []
    for _ in range(depth):
        dense = torch.nn.Linear(n, n, bias=False)
        base = bnb.nn.Linear4bit(n, n, bias=False, compute_dtype=compute_dtype, quant_type="nf4",
                                 compress_statistics=True)  # fmt: skip
        base.load_state_dict(dense.state_dict())
        bases.append(base.to("cpu"))  # quantizes
    return bases


def make_adapters(depth, n, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [((torch.randn(RANK, n, generator=gen) / n**0.5).to(dtype), (torch.randn(n, RANK, generator=gen) * 0.01).to(dtype))
            for _ in range(depth)]  # fmt: skip


def peft_model(bases, adapters):
    import peft

    model = torch.nn.Sequential(*bases)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[str(i) for i in range(len(bases))],
                             lora_dropout=0.0)  # fmt: skip
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    with torch.no_grad():
        for i, (lora_A, lora_B) in enumerate(adapters):
            layer = model.base_model.model[i]
            layer.lora_A["default"].weight = torch.nn.Parameter(lora_A.clone())
            layer.lora_B["default"].weight = torch.nn.Parameter(lora_B.clone())
    return model.train()


def fused_model(bases, adapters):
    from flatlora_kernels.quantized import flat_qlora_layer_from

    layers = []
    for i, (base, (lora_A, lora_B)) in enumerate(zip(bases, adapters)):
        layer = flat_qlora_layer_from(base, lora_A.clone(), lora_B.clone(), ALPHA / RANK, sigma=SIGMA)
        layer.set_noise(seed=1000 + i, factor=1.0)
        layers.append(layer)
    return torch.nn.Sequential(*layers).train()


class NaiveFlatQLoRA(torch.nn.Module):
    """Dequantize, add s*B@A and torch.randn noise (row-norm scaled), keep the result for backward."""

    def __init__(self, base, lora_A, lora_B):
        super().__init__()
        self.base = base
        self.lora_A = torch.nn.Parameter(lora_A.clone())
        self.lora_B = torch.nn.Parameter(lora_B.clone())

    def forward(self, x):
        import bitsandbytes.functional as bnb_functional

        with torch.no_grad():
            weight = bnb_functional.dequantize_4bit(self.base.weight.data, self.base.weight.quant_state).to(x.dtype)
        merged = weight + (ALPHA / RANK) * (self.lora_B @ self.lora_A)
        with torch.no_grad():
            scale = SIGMA * torch.linalg.vector_norm(merged.float(), dim=1) / merged.shape[1] ** 0.5
            noise = (scale[:, None] * torch.randn(merged.shape)).to(x.dtype)
        return F.linear(x, merged + noise)


def naive_model(bases, adapters):
    return torch.nn.Sequential(*(NaiveFlatQLoRA(b, a, bb) for b, (a, bb) in zip(bases, adapters))).train()


BUILDERS = {"peft": peft_model, "fused": fused_model, "naive": naive_model}


def make_step(model, x, dy):
    def step():
        y = model(x)
        y.backward(dy)
        x.grad = None
        for parameter in model.parameters():
            parameter.grad = None

    return step


def release_workspaces():
    from flatlora_kernels.backends import cpp
    from flatlora_kernels.quantized import cpp_backend

    cpp._C.release_chunk_workspace()
    cpp_backend.release_chunk_workspace()


def peak_memory_mib(step):
    from flatlora_kernels.memory import PeakMemory

    gc.collect()
    release_workspaces()
    with PeakMemory("cpu") as peak:
        step()
    return peak.mib


def setup(depth, m, n, dtype, names=IMPLEMENTATIONS):
    bases = make_bases(depth, n, dtype)
    adapters = make_adapters(depth, n, dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(m, n, generator=gen).to(dtype).requires_grad_(True)
    dy = (torch.randn(m, n, generator=gen) * 0.01).to(dtype)
    return {name: make_step(BUILDERS[name](bases, adapters), x, dy) for name in names}


def interleaved_times(steps: dict, rounds: int, warmup: int = 1) -> dict:
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (smoke)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    memory_targets, time_targets, rounds = MEMORY_TARGETS, TIME_TARGETS, args.rounds
    if args.quick:
        memory_targets = [(4, 64, 256, torch.bfloat16)]
        time_targets = [(1, 64, 256, torch.float32), (1, 64, 256, torch.bfloat16)]
        rounds = 3
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
    if not args.skip_memory:
        print("\n| layers | M | N=K | dtype | PEFT QLoRA MiB | fused MiB | naive MiB | fused/PEFT |")
        print("|---|---|---|---|---|---|---|---|")
        for depth, m, n, dtype in memory_targets:
            steps = setup(depth, m, n, dtype)
            for step in steps.values():  # warm: lazy allocations (e.g. a first chunk) outside the measurement
                step()
            peaks = {name: peak_memory_mib(step) for name, step in steps.items()}
            print(f"| {depth} | {m} | {n} | {str(dtype)[6:]} | {peaks['peft']:.1f} | {peaks['fused']:.1f} | "
                  f"{peaks['naive']:.1f} | {peaks['fused'] / peaks['peft']:.3f} |", flush=True)  # fmt: skip
            del steps
            gc.collect()
    if not args.skip_time:
        print(f"\n| layers | M | N=K | dtype | PEFT QLoRA ms | fused ms | naive ms | fused/PEFT | load |  ({rounds} rounds, "
              "median [min-max])")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for depth, m, n, dtype in time_targets:
            steps = setup(depth, m, n, dtype)
            times = interleaved_times(steps, rounds)
            cells = {name: f"{statistics.median(t) * 1e3:.1f} [{min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}]"
                     for name, t in times.items()}  # fmt: skip
            ratio = statistics.median(times["fused"]) / statistics.median(times["peft"])
            print(f"| {depth} | {m} | {n} | {str(dtype)[6:]} | {cells['peft']} | {cells['fused']} | {cells['naive']} | "
                  f"{ratio:.3f} | {os.getloadavg()[0]:.1f} |", flush=True)  # fmt: skip
            del steps
            gc.collect()


if __name__ == "__main__":
    main()
