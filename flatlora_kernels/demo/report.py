"""The demo's tables: per-method means with paired 95% intervals vs LoRA, plain-text tables, the
machine description that goes with every timing, and the validation search's summary."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .stats import paired_difference


def summarise(results, methods, measures, *, baseline="lora", labels=None):
    """One row per method: each measure's mean and the paired 95% interval and p-value vs ``baseline``.

    ``measures``: name -> (metric(run), scale, digits); runs are paired by seed."""
    base = sorted((r for r in results if r.method == baseline), key=lambda r: r.seed)
    rows, raw = [], {}
    for method in methods:
        runs = sorted((r for r in results if r.method == method), key=lambda r: r.seed)
        if [r.seed for r in runs] != [r.seed for r in base]:
            raise ValueError(f"{method} and {baseline} ran different seeds; paired differences need the same ones")
        row = {"method": method}
        if labels:
            row["knob, step (chosen on validation)"] = labels.get(method, "")
        raw[method] = {}
        for name, (metric, scale, digits) in measures.items():
            values = [scale * metric(r) for r in runs]
            mean = statistics.fmean(values)
            raw[method][name] = {"mean": mean}
            if method == baseline:
                row[name] = f"{mean:.{digits}f}"
            else:
                diff = paired_difference(values, [scale * metric(r) for r in base])
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


def print_choices(choices, reference=None):
    """The validation search: every candidate's score, the choice, whether it is interior, and its step."""
    print("knobs chosen on the validation split (mean validation NLL per candidate at its best checkpoint, lower is better):")
    for choice in choices.values():
        scores = ", ".join(f"{v:g}: {s:.4f}" for v, s in sorted(choice.validation.items()))
        extended = f"; grid extended to {', '.join(f'{v:g}' for v in choice.extensions)}" if choice.extensions else ""
        step = f"; step {choice.step} of {choice.budget} ({choice.step_status})" if choice.budget else ""
        print(f"  {choice.method} {choice.knob} = {choice.value:g} ({choice.status}{extended}{step})  [{scores}]")
    if reference is not None:
        print(f"  (reference, not a candidate: plain LoRA without dropout {reference:.4f})")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        info["load average at start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info
