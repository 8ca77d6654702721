"""Memory of a training step in the dtype configurations users run: PEFT LoRA / QLoRA vs fused vs naive.

Each model is an ``nn.Sequential`` of bias-free square layers (dense ``nn.Linear`` or a bitsandbytes
NF4 ``Linear4bit``) under ``peft.get_peft_model`` (r=16, alpha=32, no dropout unless asked):

* ``peft``: PEFT's LoRA / QLoRA layers as they are;
* ``fused``: the same PEFT model after ``enable_flat_lora`` (noise on: factor 1);
* ``naive``: ``W + eps`` (``W`` dequantized for a 4-bit base) formed per layer and kept by autograd,
  the LoRA branch in x's dtype (``baselines.naive_randn_flat_lora_linear``).

Configurations (``CONFIGS``), PEFT's default first:

* ``bf16 base, fp32 adapters``: ``get_peft_model`` with its default ``autocast_adapter_dtype=True``;
* ``bf16 base, bf16 adapters``: ``autocast_adapter_dtype=False``;
* ``fp32 under bf16 autocast``: an fp32 model run under ``torch.autocast(bfloat16)`` (Trainer ``bf16=True``);
* ``fp32``.

Two measures of one forward + backward: the bytes autograd saves for backward (``SavedTensorBytes``:
deterministic, each storage once, weights and adapters left out), and the step's peak above its start
(``PeakMemory``: profiler-counted on CPU, chunk workspaces freed first).

    python benchmarks/adapter_dtype_memory.py                     # the table in RESULTS.md
    python benchmarks/adapter_dtype_memory.py --lora-dropout 0.1  # its dropout rows (naive has none)
    python benchmarks/adapter_dtype_memory.py --quick             # tiny shapes (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import warnings

import torch
from torch import nn

RANK, ALPHA, SIGMA = 16, 32, 0.05
#: name -> (model dtype, PEFT's autocast_adapter_dtype, autocast dtype or None)
CONFIGS = {
    "bf16 base, fp32 adapters": (torch.bfloat16, True, None),
    "bf16 base, bf16 adapters": (torch.bfloat16, False, None),
    "fp32 under bf16 autocast": (torch.float32, True, torch.bfloat16),
    "fp32": (torch.float32, True, None),
}
BASES = ("dense", "nf4")
IMPLEMENTATIONS = ("peft", "fused", "naive")
#: (layers, width, tokens): two widths, two token counts
SHAPES = [(8, 1024, 512), (8, 2048, 512), (4, 1024, 2048), (4, 2048, 2048)]
QUICK_SHAPES = [(2, 64, 16), (2, 128, 40)]


def base_layers(base: str, depth: int, width: int, dtype: torch.dtype, seed: int = 0) -> list[nn.Module]:
    """``depth`` bias-free ``width``-square layers: ``nn.Linear`` in ``dtype``, or NF4 (double-quantized,
    compute dtype ``dtype``) quantized from the same weights."""
    torch.manual_seed(seed)
    dense = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    if base == "dense":
        return [layer.to(dtype) for layer in dense]
    import bitsandbytes as bnb

    layers = []
    for layer in dense:
        q = bnb.nn.Linear4bit(width, width, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        q.load_state_dict(layer.state_dict())
        layers.append(q.to("cpu"))  # quantizes
    return layers


def peft_model(layers: list[nn.Module], autocast_adapter_dtype: bool, lora_dropout: float = 0.0) -> nn.Module:
    """PEFT LoRA over ``layers`` with a non-zero ``lora_B`` (so every gradient is in play)."""
    import peft

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[str(i) for i in range(len(layers))],
                             lora_dropout=lora_dropout, init_lora_weights=False)  # fmt: skip
    return peft.get_peft_model(nn.Sequential(*layers), config, autocast_adapter_dtype=autocast_adapter_dtype).train()


def fused_model(layers, autocast_adapter_dtype: bool, lora_dropout: float = 0.0) -> nn.Module:
    from flatlora_kernels import enable_flat_lora
    from flatlora_kernels.peft import patched_layers

    model = enable_flat_lora(peft_model(layers, autocast_adapter_dtype, lora_dropout), sigma=SIGMA)
    for i, (_, layer) in enumerate(patched_layers(model)):
        layer.set_noise(seed=1000 + i, factor=1.0)
    return model


class NaiveLayer(nn.Module):
    """``W + eps`` (dequantized for a 4-bit base) formed in x's dtype and kept by autograd, plus the LoRA branch."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(lora_A.detach().clone())
        self.lora_B = nn.Parameter(lora_B.detach().clone())

    def forward(self, x):
        from flatlora_kernels.baselines import naive_randn_flat_lora_linear

        weight = self.base.weight
        if type(self.base) is not nn.Linear:  # a bitsandbytes Linear4bit
            import bitsandbytes.functional as bnb_functional

            weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        x = x.to(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else x
        return naive_randn_flat_lora_linear(x, weight.to(x.dtype), self.lora_A, self.lora_B, scaling=ALPHA / RANK,
                                            sigma=SIGMA)  # fmt: skip


def naive_model(layers, autocast_adapter_dtype: bool, lora_dropout: float = 0.0) -> nn.Module:
    """Naive Flat-LoRA over ``layers`` with the adapters PEFT would give them."""
    model = peft_model(layers, autocast_adapter_dtype)
    adapters = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.base_model.model]
    return nn.Sequential(*(NaiveLayer(layer, a, b) for layer, (a, b) in zip(layers, adapters))).train()


BUILDERS = {"peft": peft_model, "fused": fused_model, "naive": naive_model}


def held_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Tensors that exist whether or not a step runs: the 4-bit bases' quantization state."""
    held = []
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            held += [t for t in vars(state).values() if isinstance(t, torch.Tensor)]
            state = getattr(state, "state2", None)
    return held


def build(config: str, base: str, implementation: str, depth: int, width: int, tokens: int, lora_dropout=0.0):
    """``(model, x, dy, autocast context factory)`` of one case; the same base weights and inputs for
    every implementation."""
    dtype, autocast_adapter_dtype, autocast_dtype = CONFIGS[config]
    layers = base_layers(base, depth, width, dtype)
    model = BUILDERS[implementation](layers, autocast_adapter_dtype, lora_dropout)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, width, generator=gen).to(dtype).requires_grad_(True)
    dy = (torch.randn(tokens, width, generator=gen) * 0.01).to(autocast_dtype or dtype)

    def autocast():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=autocast_dtype)

    return model, x, dy, autocast


def step(model, x, dy, autocast) -> None:
    """One forward + backward (``dy`` seeds the backward), gradients cleared after."""
    with autocast():
        y = model(x)
    y.backward(dy.to(y.dtype))
    x.grad = None
    for parameter in model.parameters():
        parameter.grad = None


def saved_bytes(model, x, dy, autocast) -> int:
    """Bytes autograd saves in one forward (each storage once; weights, adapters and quant state left out)."""
    from flatlora_kernels.memory import SavedTensorBytes

    with SavedTensorBytes(model, also_held=held_tensors(model)) as saved:
        with autocast():
            y = model(x)
    y.backward(dy.to(y.dtype))
    return saved.bytes


def peak_bytes(model, x, dy, autocast) -> int:
    """Peak above the step's start (profiler-counted), after one warm-up step."""
    from flatlora_kernels.memory import PeakMemory

    step(model, x, dy, autocast)
    gc.collect()
    with PeakMemory("cpu") as peak:
        step(model, x, dy, autocast)
    return peak.bytes


def measure(config, base, depth, width, tokens, *, peaks: bool, lora_dropout=0.0) -> dict:
    """``{implementation: (saved bytes, peak bytes or None)}`` of one case."""
    results = {}
    for implementation in IMPLEMENTATIONS:
        case = build(config, base, implementation, depth, width, tokens, lora_dropout)
        saved = saved_bytes(*case)
        results[implementation] = (saved, peak_bytes(*case) if peaks else None)
        del case
        gc.collect()
    return results


def main() -> None:
    from qlora_target import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke)")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--no-peaks", action="store_true", help="saved bytes only (deterministic, faster)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average at start {os.getloadavg()[0]:.2f}, lora_dropout {args.lora_dropout}")  # fmt: skip
    mib = 2**-20
    print("\n| configuration | base | layers x width | M | saved MiB: PEFT / fused / naive | fused/PEFT saved "
          "| peak MiB: PEFT / fused / naive | fused/PEFT peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        for base in BASES:
            for depth, width, tokens in QUICK_SHAPES if args.quick else SHAPES:
                r = measure(config, base, depth, width, tokens, peaks=not args.no_peaks, lora_dropout=args.lora_dropout)
                saved = " / ".join(f"{r[i][0] * mib:.2f}" for i in IMPLEMENTATIONS)
                peak = "-" if args.no_peaks else " / ".join(f"{r[i][1] * mib:.1f}" for i in IMPLEMENTATIONS)
                peak_ratio = "-" if args.no_peaks else f"{r['fused'][1] / r['peft'][1]:.3f}"
                print(f"| {config} | {base} | {depth} x {width} | {tokens} | {saved} | "
                      f"{r['fused'][0] / r['peft'][0]:.3f} | {peak} | {peak_ratio} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
