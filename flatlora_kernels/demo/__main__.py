"""``python -m flatlora_kernels.demo``: what Flat-LoRA buys, end to end, on an embedded default.

Pretrains a digits MLP on upright digits, then fine-tunes LoRA adapters on a rotated/shifted domain
with plain LoRA, Flat-LoRA (fused kernels) and EFMLoRA under the same budget and seeds, and reports
test accuracy, accuracy on corrupted test sets, step time and peak memory (mean +- std over seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .data import make_digits_task
from .finetune import METHODS, FinetuneConfig, finetune
from .model import accuracy, pretrain


def _parse_args(argv):
    defaults = FinetuneConfig()
    parser = argparse.ArgumentParser(prog="python -m flatlora_kernels.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=defaults.steps, help="fine-tuning optimizer steps per run")
    parser.add_argument("--pretrain-steps", type=int, default=800, help="source-domain pretraining steps")
    parser.add_argument("--seeds", type=int, default=10, help="fine-tuning runs per method (seeds 0..n-1)")
    parser.add_argument("--sigma", type=float, default=defaults.sigma, help="Flat-LoRA noise level")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank r")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default="demo_out", help="folder for results.json and curves.png")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or args.pretrain_steps < 1:
        parser.error("--steps, --seeds and --pretrain-steps must be >= 1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    args.methods = methods
    return args


def _mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _format(values, scale=100.0, digits=1):
    mean, std = _mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def _paired_gain(runs, baseline_runs, metric):
    """Mean +- std over seeds of (method - LoRA) for the same seed: the same initialisation and data
    order, so seed-to-seed spread cancels and small gains become visible."""
    baseline = {r.seed: metric(r) for r in baseline_runs}
    diffs = [metric(r) - baseline[r.seed] for r in runs if r.seed in baseline]
    return _format(diffs) if diffs else "n/a"


def summarise(results, methods):
    """One row per method: accuracy, corrupted accuracy (mean over corruptions), their paired gain
    over LoRA, step time, memory."""
    rows = []
    lora_runs = [r for r in results if r.method == "lora"]
    for method in methods:
        runs = [r for r in results if r.method == method]
        memory = [r.peak_memory_mib for r in runs if r.peak_memory_mib is not None]
        rows.append(
            {
                "method": method,
                "accuracy": _format([r.accuracy for r in runs]),
                "gain vs lora": _paired_gain(runs, lora_runs, lambda r: r.accuracy),
                "corrupted accuracy": _format([r.mean_corrupted_accuracy for r in runs]),
                "corrupted gain": _paired_gain(runs, lora_runs, lambda r: r.mean_corrupted_accuracy),
                "step ms": f"{statistics.median(r.step_ms for r in runs):.2f}",
                "peak MiB": f"{statistics.median(memory):.2f}" if memory else "n/a",
            }
        )
    return rows


def print_table(rows, file=None):
    file = file or sys.stdout  # looked up at call time, so redirected output (and capsys) sees it
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(row[h])) for row in rows)) for h in headers]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for row in rows:
        print(line(row.values()), file=file)


def save_plot(results, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for method in methods:
        runs = [r for r in results if r.method == method]
        losses = torch.tensor([r.losses for r in runs]).mean(0)
        window = max(1, len(losses) // 40)
        smoothed = torch.nn.functional.avg_pool1d(losses[None, None], window, stride=1).flatten()
        loss_axis.plot(range(window, len(losses) + 1), smoothed, label=method)
        accuracy_curve = torch.tensor([r.eval_accuracy for r in runs]) * 100
        accuracy_axis.errorbar(runs[0].eval_steps, accuracy_curve.mean(0), yerr=accuracy_curve.std(0) if len(runs) > 1 else None, label=method, capsize=3)
    loss_axis.set(title="training loss (mean over seeds)", xlabel="optimizer step", ylabel="cross-entropy")
    accuracy_axis.set(title="shifted-domain test accuracy", xlabel="optimizer step", ylabel="accuracy (%)")
    for axis in (loss_axis, accuracy_axis):
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from tqdm.auto import tqdm

    config = FinetuneConfig(steps=args.steps, sigma=args.sigma, rank=args.rank, lr=args.lr)
    task = make_digits_task()
    print(
        f"digits: {task.source_train.labels.numel()} source training images; shifted target: "
        f"{task.target_train.labels.numel()} training / {task.target_test.labels.numel()} test images, "
        f"{len(task.target_test_corrupted)} corrupted test sets; device {device}, {torch.get_num_threads()} threads"
    )
    base = pretrain(task.source_train, steps=args.pretrain_steps, seed=0, device=device)
    print(
        f"pretrained: source test accuracy {100 * accuracy(base, task.source_test):.1f}%, "
        f"shifted target before fine-tuning {100 * accuracy(base, task.target_test):.1f}%"
    )
    results = []
    total = len(args.methods) * args.seeds * args.steps
    with tqdm(total=total, desc="fine-tuning", unit="step", disable=args.no_progress, file=sys.stdout) as bar:
        for seed in range(args.seeds):
            for method in args.methods:
                bar.set_postfix_str(f"{method} seed {seed}")
                results.append(finetune(base, task, method, seed=seed, config=config, device=device, progress=bar))

    rows = summarise(results, args.methods)
    print(f"\n{config.steps} steps x {args.seeds} seeds, r={config.rank}, sigma={config.sigma} (Flat-LoRA); accuracy in %; gains are paired by seed (method - LoRA)")
    print_table(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "runs": [asdict(r) for r in results]}, indent=1))
    save_plot(results, args.methods, out / "curves.png")
    print(f"\nsaved {out / 'results.json'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
