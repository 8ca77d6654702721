"""Flat-LoRA on MoE experts (CPU): peak memory and time of one training step vs PEFT's target_parameters LoRA.

A config-built Qwen3-MoE (random weights) with ``LoraConfig(target_parameters=["gate_up_proj",
"down_proj"])`` LoRA on every layer's experts (r=16, alpha=32), the same weights and adapter for both:

* ``peft``: PEFT's own ``ParamWrapper`` forward (``W + delta`` by a parametrization);
* ``flat``: the same model after ``enable_flat_lora`` (noise on, factor 1: ``W + delta + eps``, eps
  added in place chunk by chunk, ``flatlora_kernels.experts``).

One step = forward of a fixed batch, ``loss.backward()``, gradients dropped. Memory: peak above the
step's start (``flatlora_kernels.memory.PeakMemory``, profiler-counted, chunk workspaces freed first),
after one warm step. The target: flat <= peft + one expert stack (the largest, ``gate_up_proj``).
Time: interleaved rounds (``qlora_target.interleaved_times``), median [min-max].

    python benchmarks/experts_memory.py            # the table (a few seconds per case on 2 cores)
    python benchmarks/experts_memory.py --quick    # tiny shapes (smoke)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from qlora_target import cpu_model, interleaved_times, peak_memory_mib

RANK, ALPHA, SIGMA = 16, 32, 0.05
#: (layers, experts, hidden, expert intermediate size, tokens, dtype)
CASES = [(2, 16, 512, 512, 512, torch.float32), (2, 16, 512, 512, 512, torch.bfloat16)]
QUICK_CASES = [(1, 4, 64, 64, 32, torch.float32)]
IMPLEMENTATIONS = ("peft", "flat")


def case_id(case) -> str:
    layers, experts, hidden, intermediate, tokens, dtype = case
    return f"{layers}x{experts}e-{hidden}x{intermediate}-T{tokens}-{str(dtype)[6:]}"


def build(layers, experts, hidden, intermediate, dtype, seed=0):
    """A PEFT Qwen3-MoE with target_parameters LoRA on its experts (non-zero B: the adapter is live)."""
    import peft
    import transformers

    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden, moe_intermediate_size=intermediate,
        num_experts=experts, num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=1024,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(config).to(dtype)
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    return model.train()


def setup(layers, experts, hidden, intermediate, tokens, dtype):
    from flatlora_kernels import FlatLoraSchedule, enable_flat_lora

    models = {"peft": build(layers, experts, hidden, intermediate, dtype)}
    models["flat"] = enable_flat_lora(copy.deepcopy(models["peft"]), sigma=SIGMA)
    FlatLoraSchedule(models["flat"], total_steps=1).set_step(1)  # full noise
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(1))

    def step_of(model):
        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            for p in model.parameters():
                p.grad = None

        return step

    return {name: step_of(model) for name, model in models.items()}


def stack_mib(experts, hidden, intermediate, dtype) -> float:
    """The largest expert stack, ``gate_up_proj: [E, 2I, H]``, in MiB."""
    return experts * 2 * intermediate * hidden * dtype.itemsize / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 rounds (smoke)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases, rounds = (QUICK_CASES, 3) if args.quick else (CASES, args.rounds)
    print(f"CPU: {cpu_model()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average at start {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("\n| layers | experts | hidden | expert inter. | tokens | dtype | stack MiB | PEFT MiB | Flat-LoRA MiB "
          "| extra MiB | extra/stack | PEFT ms | Flat-LoRA ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for layers, experts, hidden, intermediate, tokens, dtype in cases:
        steps = setup(layers, experts, hidden, intermediate, tokens, dtype)
        for step in steps.values():  # warm: lazy allocations outside the measurement
            step()
        peaks = {name: peak_memory_mib(step) for name, step in steps.items()}
        times = interleaved_times(steps, rounds)
        stack = stack_mib(experts, hidden, intermediate, dtype)
        extra = peaks["flat"] - peaks["peft"]
        spread = {n: f"{statistics.median(t) * 1e3:.0f} [{min(t) * 1e3:.0f}-{max(t) * 1e3:.0f}]"
                  for n, t in times.items()}  # fmt: skip
        print(f"| {layers} | {experts} | {hidden} | {intermediate} | {tokens} | {str(dtype)[6:]} | {stack:.1f} | "
              f"{peaks['peft']:.1f} | {peaks['flat']:.1f} | {extra:.1f} | {extra / stack:.2f} | {spread['peft']} | "
              f"{spread['flat']} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
