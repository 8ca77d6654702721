"""How much Bi-LoRA's paper-silent choices move its result, on the demo's digits task (validation
split only; the test split is never read).

The paper (arXiv 2508.19564) fixes the update (Eq. 9: plain gradient ascent, eta2 = eta1) and the
clip (Eq. 10) but not the auxiliary module's initialisation; this package also offers an Adam ascent
step (its earlier reading). Each variant runs the demo's own fine-tuning (``demo.finetune``: AdamW at
3e-3, cosine, 400 steps, r=8, 100 target images) over a rho grid and several seeds:

* ``ascent``: ``sgd`` (the paper's Eq. 9) or ``adam`` (Adam ascent at the same rate);
* ``init``: ``zero-B`` (the default: A2 Kaiming-uniform, B2 = 0, so the module starts at zero) or
  ``sphere`` (A2 and B2 Gaussian, scaled so the perturbation starts on its rho-sphere).

Per cell: validation NLL and accuracy (mean over seeds), LoRA's (same seeds, no dropout) beside it,
the perturbation norm after the last step, and the share of steps on which the
clip bound (the ascent had pushed the perturbation past rho).

    python benchmarks/bilora_sensitivity.py            # the numbers in docs/DESIGN.md section 13
    python benchmarks/bilora_sensitivity.py --quick    # 1 seed, 2 rhos, 60 steps (smoke)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from dataclasses import replace

import torch

import flatlora_kernels.sharpness.bilora as bilora_module
from flatlora_kernels.demo.data import make_digits_task
from flatlora_kernels.demo.digits_mlp import pretrain
from flatlora_kernels.demo.finetune import FinetuneConfig, finetune

ASCENTS = ("sgd", "adam")
INITS = ("zero-B", "sphere")


class InitBiLoRA(bilora_module.BiLoRA):
    """BiLoRA with the ``sphere`` initialisation as an alternative to its own ``zero-B``."""

    def __init__(self, *args, init: str = "zero-B", **kwargs):
        super().__init__(*args, **kwargs)
        if init == "sphere":
            generator = torch.Generator().manual_seed(kwargs.get("seed", 0) + 1000)
            with torch.no_grad():
                for A2, B2 in zip(self.aux_A, self.aux_B):
                    A2.copy_(torch.randn(A2.shape, generator=generator))
                    B2.copy_(torch.randn(B2.shape, generator=generator))
                self._clip_to(self.rho_at(1))

    @torch.no_grad()
    def _clip_to(self, rho: float) -> None:
        factor = (rho / float(self.perturbation_norm())) ** 0.5
        for A2, B2 in zip(self.aux_A, self.aux_B):
            A2.mul_(factor)
            B2.mul_(factor)


@contextlib.contextmanager
def bilora_variant(ascent: str, init: str, record: list):
    """``demo.finetune`` imports ``BiLoRA`` from its module at call time: swap in the variant there."""
    original = bilora_module.BiLoRA

    def build(model, optimizer, **kwargs):
        instance = InitBiLoRA(model, optimizer, ascent=ascent, init=init, **kwargs)
        record.append(instance)
        return instance

    bilora_module.BiLoRA = build
    try:
        yield
    finally:
        bilora_module.BiLoRA = original


def digits_runner(quick: bool):
    """The demo's digits fine-tuning (AdamW 3e-3, cosine, 400 steps, r=8, 100 target images)."""
    task = make_digits_task(target_train_size=100)
    base = pretrain(task.source_train, steps=100 if quick else 800, seed=0, device=torch.device("cpu"))
    task = task.without_test()
    config = FinetuneConfig(steps=60 if quick else 400, eval_every=10**9)

    def run(method: str, seed: int, rho: float):
        result = finetune(base, task, method, seed=seed, config=replace(config, bilora_rho=rho), device=torch.device("cpu"))
        return result.val_nll, result.val_accuracy

    return run, f"digits, {config.steps} steps"


def lm_runner(quick: bool):
    """The demo's lm fine-tuning (tiny GPT-2, Trainer AdamW 2e-3, cosine, 120 steps, PEFT LoRA r=8)."""
    from flatlora_kernels.demo.lm_finetune import LmConfig, finetune_lm
    from flatlora_kernels.demo.lm_task import TINY, LmSettings, make_lm_task, pretrain_lm

    task = make_lm_task(TINY if quick else LmSettings())
    base = pretrain_lm(task, steps=50 if quick else 600)
    task = task.without_test()
    config = LmConfig(steps=8 if quick else 120)

    def run(method: str, seed: int, rho: float):
        return finetune_lm(base, task, method, seed=seed, config=replace(config, bilora_rho=rho)).val_nll, None

    return run, f"lm, {config.steps} Trainer steps"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--task", choices=("digits", "lm"), default="digits")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--rhos", default="0.003125,0.0125,0.05,0.1,0.2,0.4,0.8")
    parser.add_argument("--inits", default=",".join(INITS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(1 if args.quick else args.seeds))
    rhos = [float(r) for r in args.rhos.split(",")][: 2 if args.quick else None]
    inits = args.inits.split(",")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.2f} at start")
    started = time.perf_counter()
    run, label = (digits_runner if args.task == "digits" else lm_runner)(args.quick)

    lora = [run("lora", s, 0.0) for s in seeds]
    accuracy = lora[0][1] is not None
    print(f"LoRA (no dropout), {len(seeds)} seeds: val NLL {statistics.mean(n for n, _ in lora):.4f}"
          + (f", val accuracy {100 * statistics.mean(a for _, a in lora):.1f}%" if accuracy else ""))
    print(f"{label}; per cell: val NLL (minus LoRA's: paired mean over seeds, sd)" + (" | val acc %" if accuracy else "")
          + " | final perturbation norm | share of steps the clip bound")
    print("| ascent | init | " + " | ".join(f"rho {r:g}" for r in rhos) + " |")
    print("|---|---|" + "---|" * len(rhos))
    for ascent in ASCENTS:
        for init in inits:
            cells = []
            for rho in rhos:
                record: list = []
                with bilora_variant(ascent, init, record):
                    runs = [run("bilora", s, rho) for s in seeds]
                nll = statistics.mean(n for n, _ in runs)
                deltas = [n - l for (n, _), (l, _) in zip(runs, lora)]
                spread = f" sd {statistics.stdev(deltas):.4f}" if len(deltas) > 1 else ""
                norm = statistics.mean(float(o.perturbation_norm()) for o in record)
                bound = statistics.mean(o.clip_bound_steps / max(1, o.steps_done) for o in record)
                acc = f" \\| {100 * statistics.mean(a for _, a in runs):.1f}" if accuracy else ""
                cells.append(f"{nll:.4f} ({statistics.mean(deltas):+.4f}{spread}){acc} \\| {norm:.3g} \\| {bound:.2f}")
            print(f"| {ascent} | {init} | " + " | ".join(cells) + " |", flush=True)
    print(f"wall {time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
