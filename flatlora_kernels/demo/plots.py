"""The demo's figures (matplotlib, Agg): loss under noise vs sigma', training loss (log scale),
accuracy and corrupted accuracy, each with 95% intervals over seeds."""

from __future__ import annotations

from pathlib import Path

import torch

from .stats import mean_interval


def save_plots(results, methods, out: Path) -> list[Path]:
    plt, by_method, paths = _begin_figures(results, methods, "loss under noise (test, 95% CI)", "test NLL increase (nats)", out / "loss_under_noise.png")

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for method, losses in _mean_losses(by_method).items():
        window = max(1, len(losses) // 40)
        smoothed = torch.nn.functional.avg_pool1d(losses[None, None], window, stride=1).flatten()
        axis.plot(range(window, len(losses) + 1), smoothed, label=method)
    axis.set_yscale("log")
    axis.set(title="training loss (mean over seeds)", xlabel="optimizer step", ylabel="cross-entropy (log)")
    paths.append(_finish(plt, figure, axis, out / "training_loss.png"))

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for index, (name, metric) in enumerate([("test accuracy", lambda r: r.accuracy), ("corrupted accuracy", lambda r: r.mean_corrupted_accuracy)]):
        stats = [mean_interval([100 * metric(r) for r in by_method[m]]) for m in methods]
        axes[index].bar(methods, [m for m, _ in stats], yerr=[h for _, h in stats], capsize=5, color="C0")
        low = min(m - h for m, h in stats)
        axes[index].set_ylim(max(0, low - 5), max(m + h for m, h in stats) + 2)
        axes[index].set(title=f"{name} (95% CI)", ylabel="%")
        axes[index].grid(alpha=0.3, axis="y")
    paths.append(_save(plt, figure, out / "accuracy.png"))
    return paths


def _begin_figures(results, methods, title: str, ylabel: str, path: Path):
    """What every task's figures start from: pyplot (Agg: files only, no display needed), the runs
    grouped by method, and the list of saved paths opened by the loss-under-noise figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method = {m: [r for r in results if r.method == m] for m in methods}
    return plt, by_method, [_loss_under_noise_plot(plt, by_method, title, ylabel, path)]


def _loss_under_noise_plot(plt, by_method, title: str, ylabel: str, path: Path) -> Path:
    """Each method's mean loss under noise vs sigma' with its 95% interval over seeds."""
    figure, axis = plt.subplots(figsize=(5.5, 4))
    for method, runs in by_method.items():
        sigmas = sorted(runs[0].loss_under_noise, key=float)
        stats = [mean_interval([r.loss_under_noise[s] for r in runs]) for s in sigmas]
        axis.errorbar([float(s) for s in sigmas], [m for m, _ in stats], yerr=[h for _, h in stats], label=method, capsize=3, marker="o")
    axis.set(title=title, xlabel="sigma' (filter-wise)", ylabel=ylabel)
    return _finish(plt, figure, axis, path)


def _mean_losses(by_method) -> dict:
    """Each method's training-loss curve, the mean over its seeds at every logged step."""
    return {method: torch.tensor([r.losses for r in runs]).mean(0) for method, runs in by_method.items()}


def _finish(plt, figure, axis, path: Path) -> Path:
    axis.legend()
    axis.grid(alpha=0.3)
    return _save(plt, figure, path)


def _save(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def save_lm_plots(results, methods, out: Path) -> list[Path]:
    """The lm task's figures: loss under noise vs sigma', training loss, test NLL per method (95% CIs)."""
    plt, by_method, paths = _begin_figures(results, methods, "lm: loss under noise (test, 95% CI)", "test NLL increase (nats/byte)", out / "lm_loss_under_noise.png")

    figure, axis = plt.subplots(figsize=(5.5, 4))
    for method, losses in _mean_losses(by_method).items():
        axis.plot(range(1, len(losses) + 1), losses, label=method, marker=".")
    axis.set(title="lm: training loss (mean over seeds)", xlabel="Trainer logging step", ylabel="cross-entropy (nats/byte)")
    paths.append(_finish(plt, figure, axis, out / "lm_training_loss.png"))

    figure, axis = plt.subplots(figsize=(5.5, 4))
    stats = [mean_interval([r.test_nll for r in by_method[m]]) for m in methods]
    axis.bar(methods, [m for m, _ in stats], yerr=[h for _, h in stats], capsize=5, color="C0")
    axis.set_ylim(min(m - h for m, h in stats) - 0.02, max(m + h for m, h in stats) + 0.02)
    axis.set(title="lm: test NLL (95% CI)", ylabel="nats/byte")
    axis.grid(alpha=0.3, axis="y")
    paths.append(_save(plt, figure, out / "lm_test_nll.png"))
    return paths
