"""``python -m flatlora_kernels.demo``: what Flat-LoRA buys and what it costs, against baselines tuned as hard.

Task ``digits`` (default): pretrains a digits MLP on upright digits, then fine-tunes LoRA adapters on
a rotated/shifted domain with few training images (where fine-tuning overfits) with LoRA, Flat-LoRA
(fused kernels), EFMLoRA and Bi-LoRA under the same budget, seeds and cosine LR schedule.
Task ``lm``: pretrains a tiny GPT-2 (transformers config, byte tokens) on Python's standard-library
sources, then fine-tunes it on a shifted corpus (the Python documentation's prose) through PEFT LoRA,
``enable_flat_lora``, ``transformers.Trainer`` and ``FlatLoraCallback``.

The question is a practitioner's: does adding a method to a tuned LoRA recipe help? First the LoRA
recipe is tuned on the validation split: its ``lora_dropout`` and its step count (early stopping:
validation checkpoints, the best one kept). Then Flat-LoRA, EFMLoRA and Bi-LoRA each train with the
recipe's dropout and tune only their own knob (sigma, rho, rho) and step by the same rule. Every knob
comes from a geometric grid with the same number of candidates and seeds; a choice at a grid's edge
extends the grid until it is interior or a cap is hit. The test split is touched once, by the
reported runs. Reports each measure of "recipe + method" as a paired 95% interval of the difference
vs the recipe alone and a paired t-test's p-value.
"""

from __future__ import annotations

import argparse
import os

import torch

from .finetune import KNOBS, METHODS

LM_METHODS = ("lora", "flat-lora", "bilora", "efmlora")
GRID_OPTIONS = {"lora": "dropout_grid", "flat-lora": "sigma_grid", "efmlora": "efm_rho_grid", "bilora": "bilora_rho_grid"}
assert set(GRID_OPTIONS) == set(KNOBS)
DEFAULTS = {  # per task: options whose default differs
    # grids centred where wider searches chose, on validation only (docs/DESIGN.md section 11); dropout's
    # lm grid is geometric in its odds (2/3, 4/3, 8/3, 16/3), as its extensions are
    "digits": {"steps": 400, "eval_every": 25, "pretrain_steps": 800, "seeds": 20, "select_seeds": 4, "lr": 3e-3, "rank": 8,
               "methods": ",".join(METHODS), "noise_draws": 8, "dropout_grid": "0.1,0.2,0.4,0.8",
               "sigma_grid": "0.2,0.4,0.8,1.6", "efm_rho_grid": "0.1,0.2,0.4,0.8", "bilora_rho_grid": "0.025,0.05,0.1,0.2"},
    "lm": {"steps": 120, "eval_every": 20, "pretrain_steps": 600, "seeds": 10, "select_seeds": 2, "lr": 2e-3, "rank": 8,
           "methods": "lora,flat-lora,bilora", "noise_draws": 4, "dropout_grid": "0.4,0.5714,0.7273,0.8421",
           "sigma_grid": "0.00625,0.0125,0.025,0.05", "efm_rho_grid": "0.025,0.05,0.1,0.2", "bilora_rho_grid": "0.00625,0.0125,0.025,0.05"},
}


def _floats(parser, name, text):
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--{name} must be comma-separated numbers, got {text!r}")
    if len(values) < 2 or min(values) <= 0:
        parser.error(f"--{name} needs at least two values > 0, got {text!r}")
    return sorted(values)


def parse_args(argv):
    """The demo's command line (``python -m flatlora_kernels.demo --help``) parsed into its options."""
    parser = argparse.ArgumentParser(prog="python -m flatlora_kernels.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("digits", "lm"), default="digits", help="digits MLP (default) or tiny GPT-2 through PEFT + Trainer (how long each takes: README, Measured times)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning step budget per run; the LR schedule spans it (digits 400, lm 120)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between validation checkpoints, the candidates of early stopping (digits 25, lm 20)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="source-domain pretraining steps (digits 800, lm 600)")
    parser.add_argument("--seeds", type=int, default=None, help="reported fine-tuning runs per method (seeds 0..n-1; digits 20, lm 10)")
    parser.add_argument("--select-seeds", type=int, default=None, help="seeds per candidate in the validation search (digits 4, lm 2)")
    parser.add_argument("--train-images", type=int, default=100, help="digits: target training images (data-scarce regime)")
    parser.add_argument("--train-bytes", type=int, default=None, help="lm: bytes of the fine-tuning corpus's training split")
    parser.add_argument("--dropout-grid", default=None, help="LoRA's lora_dropout candidates (digits 0.1,0.2,0.4,0.8; lm 0.4,...,0.8421)")
    parser.add_argument("--sigma-grid", default=None, help="Flat-LoRA's sigma candidates (digits 0.2,...,1.6; lm 0.00625,...,0.05)")
    parser.add_argument("--efm-rho-grid", default=None, help="EFMLoRA's rho candidates (digits 0.1,...,0.8; lm 0.025,...,0.2)")
    parser.add_argument("--bilora-rho-grid", default=None, help="Bi-LoRA's rho candidates (digits 0.025,...,0.2; lm 0.00625,...,0.05)")
    parser.add_argument("--max-extensions", type=int, default=3, help="rounds of grid extension for a choice at a grid's edge")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank r (8)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate, cosine decay (digits 3e-3, lm 2e-3)")
    parser.add_argument("--noise-draws", type=int, default=None, help="noise draws per sigma' for loss under noise (digits 8, lm 4)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {METHODS} (lora is always run; lm default: lora,flat-lora,bilora)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (results depend on it)")
    parser.add_argument("--cost-tokens", type=int, default=2048, help="digits: M of the cost table (0 skips it)")
    parser.add_argument("--cost-width", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the cost table")
    parser.add_argument("--lm-tiny", action="store_true", help="lm: miniature model and corpus (tests)")
    parser.add_argument("--out", default=None, help="folder for results.json and the plots (default demo_out, lm: demo_out/lm)")
    parser.add_argument("--no-progress", action="store_true", help="print nothing while runs progress")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = "demo_out" if args.task == "digits" else os.path.join("demo_out", "lm")
    for name in ("steps", "eval_every", "seeds", "pretrain_steps", "workers", "threads", "select_seeds", "noise_draws", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_extensions < 0:
        parser.error("--max-extensions must be >= 0")
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 for paired intervals")
    known = METHODS if args.task == "digits" else LM_METHODS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {known}")
    args.methods = ["lora"] + [m for m in dict.fromkeys(methods) if m != "lora"]
    for name in ("dropout_grid", "sigma_grid", "efm_rho_grid", "bilora_rho_grid"):
        setattr(args, name, _floats(parser, name.replace("_", "-"), getattr(args, name)))
    sizes = {m: len(getattr(args, GRID_OPTIONS[m])) for m in args.methods}
    if len(set(sizes.values())) > 1:
        parser.error(f"every method's grid needs the same number of candidates (a fair search), got {sizes}")
    if max(args.dropout_grid) >= 1:
        parser.error("--dropout-grid values must be < 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.task == "lm":
        from .lm_job import run_lm

        return run_lm(args)
    from .digits_job import run_digits

    return run_digits(args)


if __name__ == "__main__":
    raise SystemExit(main())
