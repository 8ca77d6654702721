"""The language-model task (``python -m flatlora_kernels.demo --task lm``): pretrain a tiny GPT-2 on
the standard library's code, tune the LoRA recipe (dropout and step) on the validation split of a
shifted corpus (the Python documentation's prose), then each method on top of it, fine-tune through
PEFT + Trainer over many seeds and report test NLL, perplexity and loss under weight noise as
"recipe + method" vs "recipe" with paired intervals."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

from .lm_finetune import LM_KNOBS, LmConfig
from .lm_task import TINY, LmSettings, make_lm_task, mean_nll, pretrain_lm
from .job import median_step_ms, print_noise_table, save_results, start_job, summarise_with_noise, tuned_runs
from .report import print_table
from .runner import Workers

MEASURES = {  # name -> (metric, scale, digits)
    "test NLL (nats/byte)": (lambda r: r.test_nll, 1.0, 4),
    "test ppl (per byte)": (lambda r: r.test_ppl, 1.0, 3),
}


def run_lm(args) -> int:
    start = start_job(args)
    settings = TINY if args.lm_tiny else LmSettings()
    if args.train_bytes is not None:
        settings = replace(settings, train_bytes=args.train_bytes)
    task = make_lm_task(settings)
    print(
        f"lm: tiny GPT-2 ({settings.n_layer} layers, width {settings.n_embd}, {settings.block}-byte blocks), pretrained on "
        f"{task.source.numel()} bytes of standard-library code; shifted target (pydoc topics prose): {task.train.numel()} training / "
        f"{task.val.numel()} validation / {task.test.numel()} test bytes; {args.workers} workers x {args.threads} thread(s)",
        flush=True,
    )
    started = time.perf_counter()
    base = pretrain_lm(task, steps=args.pretrain_steps)
    print(
        f"pretrained in {time.perf_counter() - started:.0f} s: held-out code {mean_nll(base, task.source_val):.3f} nats/byte, "
        f"target prose (validation) before fine-tuning {mean_nll(base, task.val):.3f}",
        flush=True,
    )
    payload = (base.state_dict(), settings)
    with Workers(task_name="lm", payload=payload, workers=args.workers, threads=args.threads, progress=not args.no_progress) as workers:
        config = LmConfig(steps=args.steps, eval_every=args.eval_every, rank=args.rank, lr=args.lr, noise_draws=args.noise_draws)
        config, choices, reference, results = tuned_runs(args, config, LM_KNOBS, workers.run)
    rows, raw = summarise_with_noise(results, args.methods, MEASURES, choices)
    print(
        f"\nthe LoRA recipe: PEFT LoRA r={config.rank} on c_attn/c_proj/c_fc, lora_dropout {config.lora_dropout:g}, Trainer (batch {config.batch_size}, "
        f"cosine LR, peak {config.lr}) over a {config.steps}-step budget, stopped at its validation-chosen step; {args.seeds} seeds. Each other row is "
        f"the recipe + that method, with its own knob and step chosen above. Each cell: mean (paired difference vs the recipe alone "
        f"[95% t-interval] p=paired t-test)."
    )
    print_table(rows, columns=["method", "knob, step (chosen on validation)", *MEASURES])
    print_noise_table(rows, f"\nloss under noise (test NLL increase, nats/byte, filter-wise noise at sigma' on every LoRA layer's merged weight, {config.noise_draws} shared draws):")
    timing = median_step_ms(results, args.methods)
    print("Trainer step ms (median of train_runtime / steps, per worker; a tiny model: Python overhead dominates): " + ", ".join(f"{m} {t:.1f}" for m, t in timing.items()))
    checks = {m: [r.method_check for r in results if r.method == m][0] for m in args.methods if m != "lora"}
    print("the methods acted (seed 0): " + "; ".join(f"{m} {c}" for m, c in checks.items()))

    from .plots import save_lm_plots

    paths = save_lm_plots(results, args.methods, start.out)
    save_results(
        start, paths, task="lm", settings={**vars(args), "config": asdict(config), "lm": asdict(settings)}, choices=choices,
        reference=reference, summary=raw, runs=[{**asdict(r), "test_ppl": r.test_ppl if math.isfinite(r.test_nll) else None} for r in results],
    )
    return 0
