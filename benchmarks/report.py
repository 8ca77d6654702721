"""Turn pytest-benchmark JSON files of this suite into plots and markdown tables.

    python benchmarks/report.py out/bench.json [more.json ...] --out benchmarks/results/

Writes into ``--out``:

* ``time_ratio_<device>_<shape>_<dtype>.png``: step time relative to ``lora`` vs tokens, one line per
  implementation, forward and forward+backward side by side (shapes measured at >= 2 token counts);
* ``memory_vs_depth_<device>_<width>_<dtype>.png``: peak memory of a training step vs number of layers;
* ``summary.md``: every timing (median, and ratio to ``lora`` of the same run) and every peak memory.

Ratios always pair results of the same JSON file, so they compare numbers measured in one run.
Only the standard library and matplotlib are needed (no torch).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

BASELINE = "lora"
# Column order of the tables and legend order of the plots; anything else follows, sorted.
IMPLEMENTATION_ORDER = ("lora", "fused", "fused+compile", "inplace", "naive", "reference")
PASS_ORDER = ("forward", "forward+backward")


@dataclass(frozen=True)
class Result:
    source: int  # index of the JSON file: ratios never mix runs
    device: str
    threads: int | None
    suite: str  # "linear", "memory_layer" or "memory_stack"
    implementation: str
    pass_kind: str
    shape: str
    M: int
    N: int
    K: int
    r: int
    dtype: str
    depth: int
    median_s: float
    iqr_s: float
    rounds: int
    peak_memory_bytes: int | None

    def case_key(self) -> tuple:
        """Everything but the implementation: results with equal keys are directly comparable."""
        return (self.source, self.device, self.suite, self.pass_kind, self.shape, self.M, self.N, self.K,
                self.r, self.dtype, self.depth)


@dataclass
class Run:
    path: str
    datetime: str
    facts: dict


def load(paths: list[str]) -> tuple[list[Result], list[Run]]:
    results, runs = [], []
    for source, path in enumerate(paths):
        data = json.loads(Path(path).read_text())
        facts = data.get("machine_info", {}).get("flatlora", {})
        runs.append(Run(path=str(path), datetime=data.get("datetime", ""), facts=facts))
        for bench in data.get("benchmarks", []):
            info = bench.get("extra_info", {})
            if info.get("suite") not in ("linear", "memory_layer", "memory_stack"):
                continue  # another suite's benchmark in the same run (e.g. FMLoRA): not ours to plot
            stats = bench["stats"]
            results.append(
                Result(
                    source=source,
                    device=info.get("device", facts.get("device", "?")),
                    threads=info.get("threads"),
                    suite=info["suite"],
                    implementation=info["implementation"],
                    pass_kind=info.get("pass_kind", "forward+backward"),
                    shape=info["shape"],
                    M=int(info["M"]),
                    N=int(info["N"]),
                    K=int(info["K"]),
                    r=int(info["r"]),
                    dtype=info["dtype"],
                    depth=int(info.get("depth", 1)),
                    median_s=float(stats["median"]),
                    iqr_s=float(stats.get("iqr", 0.0)),
                    rounds=int(stats.get("rounds", 0)),
                    peak_memory_bytes=info.get("peak_memory_bytes"),
                )
            )
    return results, runs


def implementation_order(names) -> list[str]:
    known = [n for n in IMPLEMENTATION_ORDER if n in names]
    return known + sorted(set(names) - set(known))


def baselines(results: list[Result]) -> dict[tuple, Result]:
    return {res.case_key(): res for res in results if res.implementation == BASELINE}


def time_ratio(res: Result, base: dict[tuple, Result]) -> float | None:
    ref = base.get(res.case_key())
    return None if ref is None or ref.median_s <= 0 else res.median_s / ref.median_s


def memory_ratio(res: Result, base: dict[tuple, Result]) -> float | None:
    ref = base.get(res.case_key())
    if ref is None or not ref.peak_memory_bytes or res.peak_memory_bytes is None:
        return None
    return res.peak_memory_bytes / ref.peak_memory_bytes


# ---- markdown --------------------------------------------------------------------------------------


def _pivot(results: list[Result], row_key, cell) -> tuple[list[str], list[tuple[tuple, dict[str, str]]]]:
    """Rows keyed by ``row_key(result)`` (in first-seen order), one column per implementation."""
    rows: dict[tuple, dict[str, str]] = {}
    for res in results:
        rows.setdefault(row_key(res), {})[res.implementation] = cell(res)
    columns = implementation_order({res.implementation for res in results})
    return columns, list(rows.items())


def _table(header: list[str], columns: list[str], rows: list[tuple[tuple, dict[str, str]]]) -> list[str]:
    lines = ["| " + " | ".join(header + columns) + " |", "|" + "---|" * (len(header) + len(columns))]
    for key, cells in rows:
        lines.append("| " + " | ".join([str(k) for k in key] + [cells.get(c, "skipped") for c in columns]) + " |")
    return lines


def _ratio_text(ratio: float | None) -> str:
    return "" if ratio is None else f" ({ratio:.2f}x)"


def markdown_summary(results: list[Result], runs: list[Run]) -> str:
    base = baselines(results)
    lines = ["# Benchmark summary", ""]
    for i, run in enumerate(runs):
        f = run.facts
        lines.append(
            f"- run {i}: `{run.path}` ({run.datetime}): {f.get('device', '?')} ({f.get('device_type', '?')}), "
            f"{f.get('threads', '?')} threads, torch {f.get('torch', '?')}, triton {f.get('triton', '?')}, "
            f"mode {f.get('mode', '?')}"
        )
    lines += ["", f"Times are medians in ms; `(Nx)` is the ratio to `{BASELINE}` measured in the same run.", ""]

    linear = [res for res in results if res.suite == "linear"]
    if linear:
        lines += ["## Time of one layer", ""]
        columns, rows = _pivot(
            linear,
            lambda r: (r.source, r.shape, r.M, f"{r.N}x{r.K}", r.r, r.dtype, r.pass_kind),
            lambda r: f"{r.median_s * 1e3:.3f}{_ratio_text(time_ratio(r, base))}",
        )
        lines += _table(["run", "shape", "M", "N x K", "r", "dtype", "pass"], columns, rows) + [""]

    memory = [res for res in results if res.suite in ("memory_layer", "memory_stack")]
    if memory:
        lines += [
            "## Peak memory of a training step (forward + backward)",
            "",
            "Peak above what was allocated before the step (weights, x, dy), in MiB; `(Nx)` is the ratio to "
            f"`{BASELINE}`. Step time (median ms) in the second table.",
            "",
        ]
        row_key = lambda r: (r.source, r.shape, r.M, f"{r.N}x{r.K}", r.depth, r.dtype)  # noqa: E731
        mib = lambda r: "n/a" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**20:.2f}{_ratio_text(memory_ratio(r, base))}"  # noqa: E731
        columns, rows = _pivot(memory, row_key, mib)
        lines += _table(["run", "shape", "M", "N x K", "layers", "dtype"], columns, rows) + [""]
        columns, rows = _pivot(memory, row_key, lambda r: f"{r.median_s * 1e3:.2f}{_ratio_text(time_ratio(r, base))}")
        lines += _table(["run", "shape", "M", "N x K", "layers", "dtype"], columns, rows) + [""]
    return "\n".join(lines)


# ---- plots -----------------------------------------------------------------------------------------


def _slug(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]+", "-", str(p)).strip("-") for p in parts)


def _save(fig, path: Path) -> Path:
    """Write one figure and free it (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_time_ratios(results: list[Result], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    base = baselines(results)
    groups = defaultdict(list)
    for res in results:
        if res.suite == "linear":
            groups[(res.source, res.device, res.shape, res.N, res.K, res.r, res.dtype)].append(res)
    written = []
    for (source, device, shape, n, k, r, dtype), members in groups.items():
        if len({m.M for m in members}) < 2:
            continue  # one token count: a table row, not a curve
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, kind in zip(axes, PASS_ORDER):
            for name in implementation_order({m.implementation for m in members}):
                points = sorted(
                    (m.M, time_ratio(m, base)) for m in members
                    if m.implementation == name and m.pass_kind == kind and time_ratio(m, base) is not None
                )
                if points:
                    ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if name == BASELINE else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(kind)
            ax.set_xlabel("tokens M")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(f"time / time of {BASELINE}")
        axes[-1].legend(fontsize=8)
        threads = members[0].threads
        fig.suptitle(f"{shape} (out {n} x in {k}, r={r}, {dtype}) on {device}" + (f", {threads} threads" if threads else ""))
        written.append(_save(fig, out / f"time_ratio_{_slug(source, device, shape, dtype)}.png"))
    return written


def plot_memory_vs_depth(results: list[Result], out: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for res in results:
        if res.suite == "memory_stack" and res.peak_memory_bytes is not None:
            groups[(res.source, res.device, res.N, res.M, res.r, res.dtype)].append(res)
    written = []
    for (source, device, width, tokens, r, dtype), members in groups.items():
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name in implementation_order({m.implementation for m in members}):
            points = sorted((m.depth, m.peak_memory_bytes / 2**20) for m in members if m.implementation == name)
            ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if name == BASELINE else "-")
        ax.set_xticks(sorted({m.depth for m in members}))  # linear axis: per-layer memory is a straight line
        ax.set_xlabel("layers in the stack")
        ax.set_ylabel("peak memory of one training step (MiB)")
        ax.set_title(f"{width}x{width} layers, M={tokens}, r={r}, {dtype}\n{device}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(fig, out / f"memory_vs_depth_{_slug(source, device, width, dtype)}.png"))
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json=...)")
    parser.add_argument("--out", required=True, help="folder for the PNG plots and summary.md")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, runs = load(args.json)
    if not results:
        raise SystemExit(f"no results of the flatlora linear/memory suites in {args.json}")
    written = plot_time_ratios(results, out) + plot_memory_vs_depth(results, out)
    summary = out / "summary.md"
    summary.write_text(markdown_summary(results, runs) + "\n")
    written.append(summary)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
