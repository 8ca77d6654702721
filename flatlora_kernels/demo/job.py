"""The steps every task's job takes the same way (digits_job.py, lm_job.py): announcing the machine,
the validation search, the reported fine-tuning runs, their summary with loss under noise, and
saving results.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .cost import load_average
from .report import machine, print_choices, print_table, summarise
from .selection import CAPS, LABELS, Knob, validation_search


def announce_machine() -> dict:
    """The machine every timing goes with, printed; the load average is the one at the start."""
    host = machine()
    print(f"machine: {host['cpu']}, {host['cores']} logical CPUs, torch {host['torch']}, load average {host.get('load average at start')} at the start", flush=True)
    return host


def output_folder(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def knobs_for(args, knob_fields: dict[str, str]) -> list[Knob]:
    """Each method's knob (``knob_fields``: method -> its config field) with its grid from the command line."""
    grids = {"lora": args.dropout_grid, "flat-lora": args.sigma_grid, "efmlora": args.efm_rho_grid, "bilora": args.bilora_rho_grid}
    return [Knob(m, knob_fields[m], tuple(grids[m]), *CAPS[m]) for m in args.methods]


def search(args, config, knobs, run):
    """The validation search with its plan printed before and every candidate's score after."""
    print(f"validation search: {len(knobs[0].grid)} candidates x {args.select_seeds} seeds per method; an edge choice extends its grid (x2 per round, at most {args.max_extensions} rounds, caps: "
          + ", ".join(f"{k.method} {k.name} [{k.low_cap:g}, {k.high_cap:g}]" for k in knobs) + ")", flush=True)
    choices, reference = validation_search(knobs, config, select_seeds=args.select_seeds, max_rounds=args.max_extensions, run=run)
    print_choices(choices, reference["val"])
    return choices, reference


def fine_tune(args, config, run):
    """The reported runs: every method with its chosen knob (in ``config``) over ``args.seeds`` seeds."""
    return run([(m, s, config, False) for s in range(args.seeds) for m in args.methods], "fine-tuning")


def summarise_with_noise(results, methods, measures, choices):
    """``summarise`` with loss under noise at each sigma' the runs measured as measures too, and each
    method's row labelled with its chosen knob."""
    measures = dict(measures)
    for s in sorted(results[0].loss_under_noise, key=float):
        measures[f"loss under noise {s}"] = ((lambda key: lambda r: r.loss_under_noise[key])(s), 1.0, 4)
    labels = {m: f"{LABELS[m]} {c.value:g}" for m, c in choices.items()}
    return summarise(results, methods, measures, labels=labels)


def print_noise_table(rows, heading: str) -> None:
    """Loss under noise per method, one column per sigma'."""
    noise_columns = [c for c in rows[0] if c.startswith("loss under noise")]
    print(heading)
    print_table([{"method": r["method"], **{c.removeprefix("loss under noise "): r[c] for c in noise_columns}} for r in rows])


def median_step_ms(results, methods) -> dict[str, float]:
    return {m: statistics.median(r.step_ms for r in results if r.method == m) for m in methods}


def save_results(out: Path, results: dict, plots: list[Path], seconds: float) -> None:
    """results.json, then the load average at the end and what was saved."""
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nload average at the end: {load_average()}")
    print(f"saved {out / 'results.json'} and {', '.join(str(p) for p in plots)} ({seconds:.0f} s)")
