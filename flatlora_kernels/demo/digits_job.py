"""The digits task (the default of ``python -m flatlora_kernels.demo``): pretrain a digits MLP on
upright digits, choose every method's knob on the validation split, then fine-tune LoRA adapters on
the shifted domain with each method over many seeds and report test measures with paired intervals
against LoRA (with its own tuned dropout), plus the interleaved cost table."""

from __future__ import annotations

import os
from dataclasses import asdict

import torch

from .cost import measure_cost, print_cost
from .data import make_digits_task
from .digits_mlp import accuracy, pretrain
from .finetune import KNOBS, FinetuneConfig
from .job import median_step_ms, print_noise_table, save_results, start_job, summarise_with_noise, tuned_runs
from .report import print_table
from .runner import Workers

MEASURES = {  # name -> (metric, scale, digits)
    "accuracy %": (lambda r: r.accuracy, 100.0, 1),
    "corrupted acc %": (lambda r: r.mean_corrupted_accuracy, 100.0, 1),
    "test NLL": (lambda r: r.test_nll, 1.0, 3),
}


def run_digits(args) -> int:
    start = start_job(args)
    task = make_digits_task(target_train_size=args.train_images)
    print(
        f"digits: {task.source_train.labels.numel()} source training images; shifted target: {task.target_train.labels.numel()} "
        f"training / {task.target_val.labels.numel()} validation / {task.target_test.labels.numel()} test images, "
        f"{len(task.target_test_corrupted)} corrupted test sets; {args.workers} workers x {args.threads} thread(s)",
        flush=True,
    )
    base = pretrain(task.source_train, steps=args.pretrain_steps, seed=0, device=torch.device("cpu"))
    print(f"pretrained: source test accuracy {100 * accuracy(base, task.source_test):.1f}%, shifted target (validation) before fine-tuning {100 * accuracy(base, task.target_val):.1f}%", flush=True)
    payload = (base.state_dict(), args.train_images)
    with Workers(task_name="digits", payload=payload, workers=args.workers, threads=args.threads, progress=not args.no_progress) as workers:
        config = FinetuneConfig(steps=args.steps, rank=args.rank, lr=args.lr, noise_draws=args.noise_draws)
        config, choices, reference, results = tuned_runs(args, config, KNOBS, workers.run)
    rows, raw = summarise_with_noise(results, args.methods, MEASURES, choices)
    sigmas = sorted(results[0].loss_under_noise, key=float)
    key = f"loss under noise {config.sigma}" if str(config.sigma) in sigmas else f"loss under noise {sigmas[-1]}"
    print(
        f"\n{config.steps} steps (cosine LR, peak {config.lr}) x {args.seeds} seeds, {args.train_images} training images, r={config.rank}; "
        f"each method with its own knob as chosen above. Each cell: mean (paired difference vs LoRA with its tuned dropout "
        f"[95% t-interval] p=paired t-test). Loss under noise: test NLL increase, filter-wise noise at sigma' on every adapted layer, "
        f"{config.noise_draws} shared draws."
    )
    print_table(rows, columns=["method", "knob (chosen on validation)", *MEASURES, key])
    print_noise_table(rows, "\nloss under noise (nats) at each sigma' (negative at small sigma' for an overfit model: small noise can lower its test NLL):")
    timing = median_step_ms(results, args.methods)
    print("digits MLP step ms (median, per worker, too small to show the kernels' cost): " + ", ".join(f"{m} {t:.2f}" for m, t in timing.items()))

    cost = None
    if args.cost_tokens > 0:
        torch.set_num_threads(os.cpu_count() or 1)
        cost = measure_cost(width=args.cost_width, tokens=args.cost_tokens, device=args.device)
        print_cost(cost, print_table, args.device)

    from .plots import save_plots

    paths = save_plots(results, args.methods, start.out)
    save_results(
        start, paths, task="digits", settings={**vars(args), "config": asdict(config)}, choices=choices, reference=reference,
        summary=raw, runs=[asdict(r) for r in results], cost=cost, **{"plain lora validation NLL by step": reference["curve"]},
    )
    return 0
