"""The digits task (the default of ``python -m flatlora_kernels.demo``): pretrain a digits MLP on
upright digits, tune the LoRA recipe (dropout and step) on the validation split, then each method on
top of it (its own knob and step), fine-tune LoRA adapters on the shifted domain with each over many
seeds and report test measures as "recipe + method" vs "recipe" with paired intervals, plus the
interleaved cost table."""

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
        config = FinetuneConfig(steps=args.steps, eval_every=args.eval_every, rank=args.rank, lr=args.lr, noise_draws=args.noise_draws)
        config, choices, reference, results = tuned_runs(args, config, KNOBS, workers.run)
    rows, raw = summarise_with_noise(results, args.methods, MEASURES, choices)
    sigmas = sorted(results[0].loss_under_noise, key=float)
    key = f"loss under noise {config.sigma}" if str(config.sigma) in sigmas else f"loss under noise {sigmas[-1]}"
    print(
        f"\nthe LoRA recipe: lora_dropout {config.lora_dropout:g}, r={config.rank}, cosine LR (peak {config.lr}) over a {config.steps}-step budget, "
        f"stopped at its validation-chosen step; {args.seeds} seeds, {args.train_images} training images. Each other row is the recipe + that "
        f"method, with its own knob and step chosen above. Each cell: mean (paired difference vs the recipe alone [95% t-interval] "
        f"p=paired t-test). Loss under noise: test NLL increase, filter-wise noise at sigma' on every adapted layer, "
        f"{config.noise_draws} shared draws."
    )
    print_table(rows, columns=["method", "knob, step (chosen on validation)", *MEASURES, key])
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
        summary=raw, runs=[asdict(r) for r in results], cost=cost,
    )
    return 0
