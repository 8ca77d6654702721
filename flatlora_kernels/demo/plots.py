"""The demo's figures (matplotlib, Agg), drawn to show what its tables say:

* loss under noise vs sigma': a log sigma' axis with points only at the measured values, each
  method's mean with its 95% interval, and beside it the paired difference vs the LoRA recipe (the
  table's numbers) with its paired interval; every method trains on the recipe (its dropout) and
  each curve stops at its method's chosen step;
* training loss: each curve is the loss the method trains on (under its own dropout, weight noise or
  perturbation, so not comparable across methods), with its smoothing stated, and beside it the clean
  validation NLL (eval mode: no noise) where the runs measured it;
* accuracy: the paired difference vs the LoRA recipe in percentage points, bars from zero with the
  paired 95% interval, the recipe's own mean in the title.

``python -m flatlora_kernels.demo.plots demo_out/results.json`` redraws them from a saved run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from .selection import LABELS
from .stats import mean_interval, paired_difference

BASELINE = "lora"
# How each method's training loss is taken: under what it trains with, not the clean model.
TRAINING_LOSS_IS = {
    "lora": "with its dropout",
    "flat-lora": "under its weight noise (ramped up from 0)",
    "efmlora": "at its perturbed B",
    "bilora": "with its ascent module",
}


def save_plots(results, methods, out: Path) -> list[Path]:
    """The digits task's figures: loss under noise, training loss and clean validation NLL, accuracy."""
    plt, by_method, paths = _begin_figures(results, methods, "loss under noise (test NLL increase)", "nats", out / "loss_under_noise.png")

    figure, (train_axis, val_axis) = plt.subplots(1, 2, figsize=(11, 4))
    window = 1
    for method, losses in _mean_losses(by_method).items():
        window = max(1, len(losses) // 40)
        smoothed = torch.nn.functional.avg_pool1d(losses[None, None], window, stride=1).flatten()
        train_axis.plot(range(window, len(losses) + 1), smoothed, label=_training_label(method, by_method[method]))
    train_axis.set_yscale("log")
    seeds = len(next(iter(by_method.values())))
    train_axis.set(title=f"training loss, as each method trains\n(mean of {seeds} seeds, trailing mean of {window} steps)",
                   xlabel="optimizer step", ylabel="cross-entropy (log scale)")
    train_axis.set_ylim(top=30 * train_axis.get_ylim()[1])  # room above the curves for the legend
    _legend_and_grid(train_axis, loc="upper right")
    for method, runs in by_method.items():
        steps = runs[0].eval_steps
        stats = [mean_interval([r.eval_val_nll[i] for r in runs]) for i in range(len(steps))]
        val_axis.errorbar(steps, [m for m, _ in stats], yerr=[h for _, h in stats], label=_knob_label(method, runs), marker="o", capsize=3)
    val_axis.set(title="clean validation NLL (eval mode: no noise,\nno dropout, no perturbation; 95% CI)", xlabel="optimizer step", ylabel="NLL (nats)")
    _legend_and_grid(val_axis)
    paths.append(_save(plt, figure, out / "training_loss.png"))

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (name, metric) in zip(axes, [("test accuracy", lambda r: r.accuracy), ("corrupted accuracy", lambda r: r.mean_corrupted_accuracy)]):
        _paired_bars(axis, by_method, lambda r: 100 * metric(r), name, "percentage points", "%")
    paths.append(_save(plt, figure, out / "accuracy.png"))
    return paths


def save_lm_plots(results, methods, out: Path) -> list[Path]:
    """The lm task's figures: loss under noise, training loss, test NLL as paired differences vs LoRA."""
    plt, by_method, paths = _begin_figures(results, methods, "lm: loss under noise (test NLL increase)", "nats/byte", out / "lm_loss_under_noise.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, losses in _mean_losses(by_method).items():
        axis.plot(range(1, len(losses) + 1), losses, label=_training_label(method, by_method[method]), marker=".")
    seeds = len(next(iter(by_method.values())))
    axis.set(title=f"lm: training loss, as each method trains\n(mean of {seeds} seeds, as the Trainer logs it, not smoothed)",
             xlabel="Trainer logging step", ylabel="cross-entropy (nats/byte)")
    _legend_and_grid(axis)
    paths.append(_save(plt, figure, out / "lm_training_loss.png"))

    figure, axis = plt.subplots(figsize=(5.5, 4))
    _paired_bars(axis, by_method, lambda r: r.test_nll, "lm: test NLL", "nats/byte", " nats/byte", digits=4)
    paths.append(_save(plt, figure, out / "lm_test_nll.png"))
    return paths


def _begin_figures(results, methods, title: str, unit: str, path: Path):
    """What every task's figures start from: pyplot (Agg: files only, no display needed), the runs
    grouped by method, and the list of saved paths opened by the loss-under-noise figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = {m: [r for r in results if r.method == m] for m in methods}
    return plt, by_method, [_loss_under_noise_plot(plt, by_method, title, unit, path)]


def _loss_under_noise_plot(plt, by_method, title: str, unit: str, path: Path) -> Path:
    """Left: each method's mean loss under noise with its 95% interval over seeds. Right: the paired
    difference vs LoRA with its paired 95% interval. Points only at the measured sigma' (log axis,
    no lines through the gaps); methods side by side; a symmetric-log y axis, since the values run
    from ~1e-3 at small sigma' to ~1 at large ones and change sign."""
    figure, (value_axis, diff_axis) = plt.subplots(1, 2, figsize=(11, 4))
    sigmas = sorted(next(iter(by_method.values()))[0].loss_under_noise, key=float)
    base = _by_seed(by_method[BASELINE])
    plotted = {value_axis: [], diff_axis: []}  # (mean, low, high) of every point each axis shows
    for index, (method, runs) in enumerate(by_method.items()):
        runs = _by_seed(runs)
        shift = 1.06 ** (index - (len(by_method) - 1) / 2)  # side by side on the log axis
        xs = [float(s) * shift for s in sigmas]
        stats = [mean_interval([r.loss_under_noise[s] for r in runs]) for s in sigmas]
        value_axis.errorbar(xs, [m for m, _ in stats], yerr=[h for _, h in stats], label=_knob_label(method, runs),
                            color=f"C{index}", marker="o", linestyle="none", capsize=3)
        plotted[value_axis] += [(m, m - h, m + h) for m, h in stats]
        if method == BASELINE:
            continue
        diffs = [paired_difference([r.loss_under_noise[s] for r in runs], [r.loss_under_noise[s] for r in base]) for s in sigmas]
        diff_axis.errorbar(xs, [d.mean for d in diffs], yerr=[[d.mean - d.low for d in diffs], [d.high - d.mean for d in diffs]],
                           label=_knob_label(method, runs), color=f"C{index}", marker="o", linestyle="none", capsize=3)
        plotted[diff_axis] += [(d.mean, d.low, d.high) for d in diffs]
    diff_axis.axhline(0.0, color="C0", linewidth=1, label="the LoRA recipe (reference)")
    for axis, name in ((value_axis, f"{title}\nmean of {len(base)} seeds, 95% CI"),
                       (diff_axis, "difference vs the LoRA recipe, same seeds\n(paired 95% CI; below 0: flatter than the recipe)")):
        axis.set_xscale("log")
        axis.set_xticks([float(s) for s in sigmas], labels=sigmas)
        axis.minorticks_off()
        _symlog_around(axis, plotted[axis])
        axis.set(title=name, xlabel="sigma' (filter-wise noise on the adapted layers; log scale)", ylabel=f"{unit} (symmetric log)")
        _legend_and_grid(axis)
    return _save(plt, figure, path)


def _symlog_around(axis, points) -> None:
    """A symmetric-log y axis whose linear part ends at the power of ten below the smallest nonzero
    mean (so tick labels do not crowd around zero), with every interval inside the frame."""
    smallest = min([abs(m) for m, _, _ in points if m] or [1.0])
    axis.set_yscale("symlog", linthresh=max(10.0 ** math.floor(math.log10(smallest)), 1e-6))
    low, high = min(lo for _, lo, _ in points), max(hi for _, _, hi in points)
    axis.set_ylim(2 * low if low < 0 else 0.0, 2 * high if high > 0 else 0.0)  # half a decade of room


def _paired_bars(axis, by_method, metric, name: str, unit: str, suffix: str, digits: int = 1) -> None:
    """Each method's mean paired difference vs LoRA, a bar from zero with its paired 95% interval."""
    base_runs = _by_seed(by_method[BASELINE])
    base = [metric(r) for r in base_runs]
    others = [m for m in by_method if m != BASELINE]
    diffs = [paired_difference([metric(r) for r in _by_seed(by_method[m])], base) for m in others]
    axis.bar([_knob_label(m, by_method[m]).removesuffix(")").replace(" (", "\n").replace(", ", "\n") for m in others], [d.mean for d in diffs],
             yerr=[[d.mean - d.low for d in diffs], [d.high - d.mean for d in diffs]], capsize=5,
             color=[f"C{list(by_method).index(m)}" for m in others])
    axis.axhline(0.0, color="black", linewidth=1)
    mean = sum(base) / len(base)
    recipe = _knob_label(BASELINE, base_runs).removeprefix("lora recipe (").removesuffix(")")
    axis.set(title=f"{name}: difference vs the LoRA recipe\n(the recipe: {mean:.{digits}f}{suffix} at {recipe})\n"
                   f"{len(base)} seeds, paired 95% CI", ylabel=unit)
    axis.grid(alpha=0.3, axis="y")


def _knob_label(method: str, runs) -> str:
    """``lora recipe (dropout 0.889, step 225)`` or ``+ flat-lora (sigma 1.6, step 375)``: each row is the recipe + a method."""
    knob = f"{LABELS[method]} {runs[0].knob:.3g}, " if method in LABELS else ""
    name = "lora recipe" if method == BASELINE else f"+ {method}"
    return f"{name} ({knob}step {runs[0].steps_done})"


def _training_label(method: str, runs) -> str:
    return f"{_knob_label(method, runs)}: {TRAINING_LOSS_IS.get(method, 'as trained')}"


def _by_seed(runs) -> list:
    return sorted(runs, key=lambda r: r.seed)


def _mean_losses(by_method) -> dict:
    """Each method's training-loss curve, the mean over its seeds at every logged step."""
    return {method: torch.tensor([r.losses for r in runs]).mean(0) for method, runs in by_method.items()}


def _legend_and_grid(axis, loc: str = "best") -> None:
    axis.legend(fontsize="small", loc=loc)
    axis.grid(alpha=0.3)


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def replot(results_json: Path) -> list[Path]:
    """Redraws a finished run's figures next to its ``results.json`` (digits or lm)."""
    from .finetune import RunResult
    from .lm_finetune import LmRunResult

    saved = json.loads(Path(results_json).read_text())
    kind, draw = (LmRunResult, save_lm_plots) if saved["task"] == "lm" else (RunResult, save_plots)
    names = {f.name for f in dataclasses.fields(kind)}  # results.json also keeps derived values (lm: test_ppl)
    runs = [kind(**{k: v for k, v in run.items() if k in names}) for run in saved["runs"]]
    return draw(runs, saved["settings"]["methods"], Path(results_json).parent)


if __name__ == "__main__":
    for path in replot(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_out/results.json")):
        print(path)
