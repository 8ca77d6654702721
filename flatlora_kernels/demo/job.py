"""The steps every task's job takes the same way (digits_job.py, lm_job.py): starting (machine,
output folder, threads), the validation search, the reported fine-tuning runs, their summary with
loss under noise, and saving results.json."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from .cost import load_average
from .report import machine, print_choices, print_table, summarise
from .selection import CAPS, LABELS, Knob, validation_search


class JobStart(NamedTuple):
    wall: float  # perf_counter at the start
    host: dict  # the machine, with the load average at the start
    out: Path  # the output folder


def start_job(args) -> JobStart:
    """Prints the machine every timing goes with, makes the output folder and sets the thread count
    (for pretraining too, so the same thread count gives the same numbers)."""
    wall = time.perf_counter()
    host = machine()
    print(f"machine: {host['cpu']}, {host['cores']} logical CPUs, torch {host['torch']}, load average {host.get('load average at start')} at the start", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    return JobStart(wall, host, out)


def knobs_for(args, knob_fields: dict[str, str]) -> list[Knob]:
    """Each method's knob (``knob_fields``: method -> its config field) with its grid from the command line."""
    grids = {"lora": args.dropout_grid, "flat-lora": args.sigma_grid, "efmlora": args.efm_rho_grid, "bilora": args.bilora_rho_grid}
    return [Knob(m, knob_fields[m], tuple(grids[m]), *CAPS[m], probability=(m == "lora")) for m in args.methods]


def search(args, config, knobs, run, *, stage: str, reference_run: bool = True):
    """One stage of the validation search with its plan printed before and every candidate's score after."""
    print(f"\nvalidation search, {stage}: {len(knobs[0].grid)} candidates x {args.select_seeds} seeds per method, each run "
          f"{config.steps} steps with validation checkpoints every {config.eval_every}; an edge choice extends its grid "
          f"(x2 per round, a dropout x2 in its odds p/(1-p); at most {args.max_extensions} rounds; caps: "
          + ", ".join(f"{k.method} {k.name} [{k.low_cap:g}, {k.high_cap:g}]" for k in knobs) + ")", flush=True)
    choices, reference = validation_search(knobs, config, select_seeds=args.select_seeds, max_rounds=args.max_extensions, run=run,
                                           reference_run=reference_run)
    print_choices(choices, reference.get("val"))
    if "curve" in reference:
        print("plain LoRA (no dropout) validation NLL by step (overfitting shows as a rise): " + ", ".join(f"{k}: {v:.3f}" for k, v in reference["curve"].items()))
    return choices, reference


def tuned_runs(args, config, knob_fields: dict[str, str], run):
    """The LoRA recipe, then each method on top of it, then the reported runs.

    1. LoRA's own knobs on validation: its dropout (bracketed grid) and its step (early stopping).
    2. Every other method with the recipe's dropout, tuning only its own knob, with the same step rule.
    3. The reported runs: every method with its chosen knob over ``args.seeds`` seeds, each stopped at
       its method's chosen step. Returns (config with the chosen knobs, choices, LoRA's reference, results)."""
    knobs = knobs_for(args, knob_fields)
    choices, reference = search(args, config, [k for k in knobs if k.method == "lora"], run, stage="1. the LoRA recipe (dropout and step)")
    config = replace(config, lora_dropout=choices["lora"].value)
    others = [k for k in knobs if k.method != "lora"]
    if others:
        more, _ = search(args, config, others, run, reference_run=False,
                         stage=f"2. each method on the recipe (dropout {config.lora_dropout:g}): its own knob and step")
        choices.update(more)
    config = replace(config, **{knob_fields[m]: c.value for m, c in choices.items()})
    jobs = [(m, s, replace(config, stop_at=choices[m].step), False) for s in range(args.seeds) for m in args.methods]
    return config, choices, reference, run(jobs, "fine-tuning")


def summarise_with_noise(results, methods, measures, choices):
    """``summarise`` with loss under noise at each sigma' the runs measured as measures too, and each
    method's row labelled with its chosen knob."""
    measures = dict(measures)
    for s in sorted(results[0].loss_under_noise, key=float):
        measures[f"loss under noise {s}"] = ((lambda key: lambda r: r.loss_under_noise[key])(s), 1.0, 4)
    labels = {m: f"{LABELS[m]} {c.value:g}, step {c.step}" for m, c in choices.items()}
    rows, raw = summarise(results, methods, measures, labels=labels)
    for row in rows:
        row["method"] = row_name(row["method"])
    return rows, raw


def row_name(method: str) -> str:
    """A table row's name: the LoRA recipe alone, or the recipe + a method."""
    return "lora (the recipe)" if method == "lora" else f"recipe + {method}"


def print_noise_table(rows, heading: str) -> None:
    """Loss under noise per method, one column per sigma'."""
    noise_columns = [c for c in rows[0] if c.startswith("loss under noise")]
    print(heading)
    print_table([{"method": r["method"], **{c.removeprefix("loss under noise "): r[c] for c in noise_columns}} for r in rows])


def median_step_ms(results, methods) -> dict[str, float]:
    return {m: statistics.median(r.step_ms for r in results if r.method == m) for m in methods}


def save_results(start: JobStart, plots: list[Path], *, task: str, settings: dict, choices, reference: dict, summary, runs: list, **extra) -> None:
    """results.json (the machine, settings, choices, summary, runs and ``extra``), then the load
    average at the end and what was saved."""
    seconds = time.perf_counter() - start.wall
    end_load = load_average()
    saved = {
        "task": task,
        "machine": {**start.host, "load average at end": end_load},
        "settings": settings,
        "selection": {m: c.as_json() for m, c in choices.items()},
        "plain lora validation NLL": reference["val"],
        "plain lora validation NLL by step": {str(k): v for k, v in reference["curve"].items()},
        **extra,
        "summary": summary,
        "wall seconds": seconds,
        "runs": runs,
    }
    (start.out / "results.json").write_text(json.dumps(saved, indent=1))
    print(f"\nload average at the end: {end_load}")
    print(f"saved {start.out / 'results.json'} and {', '.join(str(p) for p in plots)} ({seconds:.0f} s)")
