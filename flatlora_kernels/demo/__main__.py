"""``python -m flatlora_kernels.demo``: what Flat-LoRA buys and what it costs.

Pretrains a digits MLP on upright digits, then fine-tunes LoRA adapters on a rotated/shifted domain
with few training images (the data-scarce regime where fine-tuning overfits) with plain LoRA,
Flat-LoRA (fused kernels) and EFMLoRA under the same budget, seeds and cosine LR schedule. Sigma is
chosen from a grid by validation NLL (never the test set). Reports, per method, test accuracy,
corrupted accuracy, test NLL and loss under noise, each as a paired 95% interval of the difference
vs LoRA with a paired t-test's p-value; then the cost of one step at a real layer size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from .data import make_digits_task
from .finetune import METHODS, FinetuneConfig
from .digits_mlp import accuracy, pretrain
from .runner import init_worker, run_indexed
from .stats import paired_difference

MEASURES = {  # name -> (metric, scale, digits)
    "accuracy %": (lambda r: r.accuracy, 100.0, 1),
    "corrupted acc %": (lambda r: r.mean_corrupted_accuracy, 100.0, 1),
    "test NLL": (lambda r: r.test_nll, 1.0, 3),
}


def _parse_args(argv):
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(prog="python -m flatlora_kernels.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning optimizer steps per run")
    parser.add_argument("--pretrain-steps", type=int, default=800, help="source-domain pretraining steps")
    parser.add_argument("--seeds", type=int, default=20, help="fine-tuning runs per method (seeds 0..n-1)")
    parser.add_argument("--train-images", type=int, default=100, help="target training images (data-scarce regime)")
    parser.add_argument("--sigma", type=float, default=None, help="Flat-LoRA sigma (default: chosen on validation)")
    parser.add_argument("--sigma-grid", default="0.05,0.1,0.2,0.4", help="sigmas tried on the validation split")
    parser.add_argument("--select-seeds", type=int, default=4, help="seeds per sigma for the validation choice")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank r")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (cosine decay)")
    parser.add_argument("--noise-draws", type=int, default=defaults.noise_draws, help="noise draws per sigma' for loss under noise")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS} (lora is always run)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (results depend on it)")
    parser.add_argument("--cost-tokens", type=int, default=2048, help="M of the cost table (0 skips it)")
    parser.add_argument("--cost-width", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the cost table")
    parser.add_argument("--out", default="demo_out", help="folder for results.json and the plots")
    parser.add_argument("--no-progress", action="store_true", help="print nothing while runs progress")
    args = parser.parse_args(argv)
    for name in ("steps", "seeds", "pretrain_steps", "workers", "threads", "select_seeds", "noise_draws"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 for paired intervals")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    args.methods = ["lora"] + [m for m in methods if m != "lora"]
    try:
        args.sigma_grid = [float(s) for s in args.sigma_grid.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sigma-grid must be comma-separated numbers, got {args.sigma_grid!r}")
    if not args.sigma_grid or min(args.sigma_grid) <= 0:
        parser.error("--sigma-grid needs at least one sigma > 0")
    return args


def _run_all(jobs, args, state_dict, label):
    """Run jobs in a spawn pool (one torch thread each); results come back in job order."""
    started = time.perf_counter()
    results = [None] * len(jobs)
    interactive = sys.stdout.isatty() and not args.no_progress
    bar = None
    if interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=label, unit="run", file=sys.stdout)
    items = list(enumerate(jobs))
    with contextlib.ExitStack() as stack:
        if args.workers == 1:  # in this process: no worker start-up (tests, debugging)
            init_worker(state_dict, args.train_images, args.threads)
            finished = map(run_indexed, items)
        else:
            context = multiprocessing.get_context("spawn")  # fork after torch's thread pools can hang
            pool = stack.enter_context(context.Pool(min(args.workers, len(jobs)), init_worker, (state_dict, args.train_images, args.threads)))
            finished = pool.imap_unordered(run_indexed, items)
        for done, (index, result) in enumerate(finished, 1):
            results[index] = result
            if bar is not None:
                bar.update(1)
            elif not args.no_progress and (done % max(1, len(jobs) // 5) == 0 or done == len(jobs)):
                print(f"  {label}: {done}/{len(jobs)} runs, {time.perf_counter() - started:.0f} s", flush=True)  # piped: a few plain lines
    if bar is not None:
        bar.close()
    return results


# ---- choice of sigma on the validation split


def choose_sigma(args, config, state_dict):
    seeds = range(1000, 1000 + args.select_seeds)  # disjoint from the reported seeds
    jobs = [("lora", s, config) for s in seeds] + [("flat-lora", s, replace(config, sigma=g)) for g in args.sigma_grid for s in seeds]
    results = _run_all(jobs, args, state_dict, "choosing sigma on validation")
    val = {"lora (sigma 0)": statistics.fmean(r.val_nll for r in results[: len(seeds)])}
    for i, sigma in enumerate(args.sigma_grid):
        chunk = results[len(seeds) * (i + 1) : len(seeds) * (i + 2)]
        val[sigma] = statistics.fmean(r.val_nll for r in chunk)
    best = min(args.sigma_grid, key=lambda s: val[s])
    lora_runs = results[: len(seeds)]
    curve = [statistics.fmean(v) for v in zip(*(r.eval_val_nll for r in lora_runs))]
    return best, {"validation NLL": {str(k): v for k, v in val.items()}, "lora validation NLL by step": dict(zip(lora_runs[0].eval_steps, curve))}


# ---- tables


def summarise(results, methods):
    """One row per method: each measure's mean and the paired 95% interval and p-value vs LoRA."""
    lora = sorted((r for r in results if r.method == "lora"), key=lambda r: r.seed)
    sigmas = sorted(lora[0].loss_under_noise, key=float)
    measures = dict(MEASURES)
    for s in sigmas:
        measures[f"loss under noise {s}"] = ((lambda key: lambda r: r.loss_under_noise[key])(s), 1.0, 4)
    rows, raw = [], {}
    for method in methods:
        runs = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
        if [r.seed for r in runs] != [r.seed for r in lora]:
            raise ValueError(f"{method} and lora ran different seeds; paired differences need the same ones")
        row = {"method": method}
        raw[method] = {}
        for name, (metric, scale, digits) in measures.items():
            values = [scale * metric(r) for r in runs]
            mean = statistics.fmean(values)
            raw[method][name] = {"mean": mean}
            if method == "lora":
                row[name] = f"{mean:.{digits}f}"
            else:
                diff = paired_difference(values, [scale * metric(r) for r in lora])
                raw[method][name]["paired difference"] = asdict(diff)
                row[name] = f"{mean:.{digits}f} ({diff.mean:+.{digits}f} [{diff.low:+.{digits}f}, {diff.high:+.{digits}f}] p={diff.p_value:.2g})"
        rows.append(row)
    return rows, raw


def print_table(rows, file=None, columns=None):
    file = file or sys.stdout  # looked up at call time, so redirected output (and capsys) sees it
    headers = columns or list(rows[0])
    widths = [max(len(h), *(len(str(row[h])) for row in rows)) for h in headers]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for row in rows:
        print(line([row[h] for h in headers]), file=file)


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    args = _parse_args(argv)
    wall = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)  # pretraining too, so the same thread count gives the same numbers
    task = make_digits_task(target_train_size=args.train_images)
    print(
        f"digits: {task.source_train.labels.numel()} source training images; shifted target: {task.target_train.labels.numel()} "
        f"training / {task.target_val.labels.numel()} validation / {task.target_test.labels.numel()} test images, "
        f"{len(task.target_test_corrupted)} corrupted test sets; {args.workers} workers x {args.threads} thread(s)",
        flush=True,
    )
    base = pretrain(task.source_train, steps=args.pretrain_steps, seed=0, device=torch.device("cpu"))
    print(f"pretrained: source test accuracy {100 * accuracy(base, task.source_test):.1f}%, shifted target before fine-tuning {100 * accuracy(base, task.target_test):.1f}%", flush=True)
    state_dict = base.state_dict()
    config = FinetuneConfig(steps=args.steps, rank=args.rank, lr=args.lr, noise_draws=args.noise_draws, sigma=args.sigma or 0.1)

    selection = None
    if args.sigma is None and "flat-lora" in args.methods:
        sigma, selection = choose_sigma(args, config, state_dict)
        config = replace(config, sigma=sigma)
        choices = ", ".join(f"{k}: {v:.4f}" for k, v in selection["validation NLL"].items())
        print(f"sigma chosen on validation NLL ({args.select_seeds} seeds each): {sigma}  [{choices}]")
        overfit = selection["lora validation NLL by step"]
        print("LoRA validation NLL by step (overfitting shows as a rise): " + ", ".join(f"{k}: {v:.3f}" for k, v in overfit.items()))

    jobs = [(m, s, config) for s in range(args.seeds) for m in args.methods]
    results = _run_all(jobs, args, state_dict, "fine-tuning")
    rows, raw = summarise(results, args.methods)
    print(
        f"\n{config.steps} steps (cosine LR, peak {config.lr}) x {args.seeds} seeds, {args.train_images} training images, r={config.rank}, "
        f"Flat-LoRA sigma={config.sigma}. Each cell: mean (paired difference vs LoRA [95% t-interval] p=paired t-test). "
        f"Loss under noise: test NLL increase, filter-wise noise at sigma' on every adapted layer, {config.noise_draws} shared draws."
    )
    key = f"loss under noise {config.sigma}"
    print_table(rows, columns=["method", *MEASURES, key])
    noise_columns = [c for c in rows[0] if c.startswith("loss under noise")]
    print("\nloss under noise (nats) at each sigma':")
    print_table([{"method": r["method"], **{c.removeprefix("loss under noise "): r[c] for c in noise_columns}} for r in rows])
    timing = {m: statistics.median(r.step_ms for r in results if r.method == m) for m in args.methods}
    print("digits MLP step ms (median, per worker, too small to show the kernels' cost): " + ", ".join(f"{m} {t:.2f}" for m, t in timing.items()))

    cost = None
    if args.cost_tokens > 0:
        from .cost import measure_cost

        torch.set_num_threads(os.cpu_count() or 1)
        width = args.cost_width
        cost = measure_cost(width=width, tokens=args.cost_tokens, device=args.device)
        print(f"\ncost of one training step at real size ({args.device}, {torch.get_num_threads()} threads): 4 layers {width}x{width}, M={args.cost_tokens}, r=16, fp32")
        print_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in row.items()} for row in cost])

    from .plots import save_plots

    paths = save_plots(results, args.methods, out)
    seconds = time.perf_counter() - wall
    (out / "results.json").write_text(
        json.dumps(
            {
                "machine": _machine(),
                "settings": {**vars(args), "config": asdict(config)},
                "sigma selection": selection,
                "summary": raw,
                "cost": cost,
                "wall seconds": seconds,
                "runs": [asdict(r) for r in results],
            },
            indent=1,
        )
    )
    print(f"\nsaved {out / 'results.json'} and {', '.join(str(p) for p in paths)} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
