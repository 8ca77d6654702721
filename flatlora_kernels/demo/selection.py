"""Choosing every method's knob the same way: a geometric grid, scored on the validation split.

Each method gets a grid with the same number of candidates and the same seeds. The choice is the
candidate with the lowest mean validation NLL. If it is at either end of the values tried, the grid
is extended geometrically past that end (one value per round, all methods' extensions of a round run
together) until the choice is interior or the knob's cap is reached; the result says which.
Scoring is the caller's ``evaluate`` (validation only; the test split is never passed to it).

The step rule (early stopping, the same for every method): a candidate's runs evaluate the validation
split at checkpoints; its score is the lowest point of its seed-mean validation curve, and that
checkpoint's step is the step count its method is reported at (``Choice.step``).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace


# The knobs' caps (an extension stops past them; dropout must stay < 1: 0.97 is three odds-doublings
# past 0.8) and their short names in tables.
CAPS = {"lora": (0.05 / 8, 0.97), "flat-lora": (0.05 / 8, 3.2), "efmlora": (0.025 / 8, 1.6), "bilora": (0.025 / 16, 1.6)}
LABELS = {"lora": "dropout", "flat-lora": "sigma", "efmlora": "rho", "bilora": "rho"}


@dataclass(frozen=True)
class Knob:
    """One method's hyperparameter: its name, starting grid and the bounds an extension may reach."""

    method: str
    name: str
    grid: tuple[float, ...]
    low_cap: float  # extensions stop below this value
    high_cap: float  # ... and above this one
    ratio: float = 2.0  # a geometric grid's step
    probability: bool = False  # a value in (0, 1) (dropout): extended geometrically in its odds p / (1 - p)

    def __post_init__(self):
        if len(self.grid) < 2 or min(self.grid) <= 0:
            raise ValueError(f"{self.method} {self.name}: the grid needs >= 2 values > 0, got {self.grid}")
        if self.ratio <= 1:
            raise ValueError(f"{self.method} {self.name}: the grid ratio must be > 1, got {self.ratio}")
        if not self.low_cap <= min(self.grid) <= max(self.grid) <= self.high_cap:
            raise ValueError(f"{self.method} {self.name}: the grid {self.grid} lies outside its caps [{self.low_cap}, {self.high_cap}]")
        if self.probability and not self.high_cap < 1:
            raise ValueError(f"{self.method} {self.name}: a probability's cap must be < 1, got {self.high_cap}")

    def scaled(self, value: float, factor: float) -> float:
        """``value`` moved one grid step (``factor`` = ratio or 1/ratio): geometric in the value, or in
        its odds for a probability (so 0.8 extends to 0.889, not past 1; near 0 the two agree)."""
        if not self.probability:
            return value * factor
        odds = value / (1 - value) * factor
        return odds / (1 + odds)


@dataclass
class Choice:
    """What the search tried and chose; ``status`` is "interior", "capped at low/high end" or "rounds exhausted"."""

    method: str
    knob: str
    initial_grid: list[float]
    validation: dict[float, float] = field(default_factory=dict)  # value -> mean validation NLL at its best step
    value: float | None = None
    extensions: list[float] = field(default_factory=list)
    status: str = ""
    curves: dict[float, dict[int, float]] = field(default_factory=dict)  # value -> {checkpoint step: seed-mean NLL}
    budget: int | None = None  # the runs' step budget (the last checkpoint)

    @property
    def step(self) -> int | None:
        """The chosen candidate's best checkpoint (early stopping): the step count it is reported at."""
        curve = self.curves.get(self.value)
        return best_step(curve) if curve else None  # None: chosen by ``choose`` alone, no curves

    @property
    def step_status(self) -> str:
        if self.step is None or self.budget is None:
            return ""
        return "at the budget's end" if self.step >= self.budget else "interior"

    @property
    def grid(self) -> list[float]:
        return sorted(self.validation)

    def as_json(self) -> dict:
        return {
            "method": self.method, "knob": self.knob, "initial grid": self.initial_grid, "grid": self.grid,
            "validation NLL": {str(k): v for k, v in sorted(self.validation.items())}, "choice": self.value,
            "extensions": self.extensions, "status": self.status, "step": self.step, "step status": self.step_status,
            "budget": self.budget,
            "validation NLL by step": {str(v): {str(k): c for k, c in curve.items()} for v, curve in sorted(self.curves.items())},
        }


def best_step(curve: dict[int, float]) -> int:
    """The checkpoint with the lowest seed-mean validation NLL (the earliest on a tie)."""
    return min(curve, key=lambda step: (curve[step], step))


def next_value(knob: Knob, validation: dict[float, float]) -> tuple[float | None, str]:
    """The value to try next (None when done) and the status if done: the pure extension rule."""
    tried = sorted(validation)
    best = min(tried, key=lambda v: (validation[v], v))
    if tried[0] < best < tried[-1]:
        return None, "interior"
    if best == tried[-1]:
        candidate = knob.scaled(tried[-1], knob.ratio)
        if candidate > knob.high_cap * (1 + 1e-9):
            return None, f"capped at the high end (cap {knob.high_cap:g})"
        return candidate, ""
    candidate = knob.scaled(tried[0], 1 / knob.ratio)
    if candidate < knob.low_cap * (1 - 1e-9):
        return None, f"capped at the low end (cap {knob.low_cap:g})"
    return candidate, ""


def choose(
    knobs: Sequence[Knob],
    evaluate: Callable[[list[tuple[str, float]]], list[float]],
    *,
    max_rounds: int = 4,
    log: Callable[[str], None] = print,
) -> dict[str, Choice]:
    """Search every knob; ``evaluate([(method, value), ...])`` returns each candidate's mean validation NLL."""
    choices = {k.method: Choice(k.method, k.name, list(k.grid)) for k in knobs}
    pending = [(k.method, float(v)) for k in knobs for v in k.grid]
    for round_index in range(max_rounds + 1):
        if not pending:
            break
        for (method, value), score in zip(pending, evaluate(pending)):
            choices[method].validation[value] = score
        pending = []
        for knob in knobs:
            choice = choices[knob.method]
            if choice.status:
                continue
            value, status = next_value(knob, choice.validation)
            if value is None:
                choice.status = status
            elif round_index == max_rounds:
                choice.status = f"at the edge after {max_rounds} extension rounds"
            else:
                choice.extensions.append(value)
                pending.append((knob.method, value))
                log(f"  {knob.method}: {knob.name} chosen at the edge of {choice.grid}; extending the grid to {value:g}")
    for choice in choices.values():
        choice.value = min(choice.validation, key=lambda v: (choice.validation[v], v))
    return choices


def validation_search(knobs: Sequence[Knob], config, *, select_seeds: int, max_rounds: int, run, reference_run: bool = True) -> tuple[dict[str, Choice], dict]:
    """Every knob on the validation split, with seeds 1000+ (disjoint from the reported 0..n-1).

    ``config`` is a dataclass with a field named after each knob and ``steps`` (the budget);
    ``run(jobs, label)`` runs jobs ``(method, seed, config, search=True)``, whose task has no test split,
    and returns their results (``val_nll``, and ``eval_steps`` / ``eval_val_nll``: the validation
    checkpoints the step rule picks from). With ``reference_run``, plain LoRA (``lora_dropout=0``)
    runs once beside the first round, as a reference line, not a candidate: returned with its mean
    validation NLL at its best checkpoint and its curve.
    """
    seeds = list(range(1000, 1000 + select_seeds))
    reference = {}
    curves: dict[tuple[str, float], dict[int, float]] = {}

    def evaluate(candidates):
        jobs = [(m, s, replace(config, **{knob_of[m]: v}), True) for m, v in candidates for s in seeds]
        first = reference_run and not reference
        if first:
            jobs += [("lora", s, replace(config, lora_dropout=0.0), True) for s in seeds]
        results = run(jobs, "validation search")
        if first:
            plain = mean_curve(results[-len(seeds):])
            reference["val"] = plain[best_step(plain)]
            reference["curve"] = plain
        scores = []
        for i, candidate in enumerate(candidates):
            curves[candidate] = curve = mean_curve(results[i * len(seeds):(i + 1) * len(seeds)])
            scores.append(curve[best_step(curve)])
        return scores

    knob_of = {k.method: k.name for k in knobs}
    choices = choose(knobs, evaluate, max_rounds=max_rounds)
    for choice in choices.values():
        choice.curves = {v: curve for (m, v), curve in curves.items() if m == choice.method}
        choice.budget = config.steps
    return choices, reference


def mean_curve(runs) -> dict[int, float]:
    """The seed-mean validation NLL at each checkpoint of ``runs``."""
    steps = list(runs[0].eval_steps)
    if not steps:
        raise ValueError("a search run evaluated no validation checkpoint: the step rule has nothing to pick from")
    if any(list(r.eval_steps) != steps for r in runs):
        raise ValueError("the runs of one candidate evaluated different checkpoints")
    return {step: statistics.fmean(r.eval_val_nll[i] for r in runs) for i, step in enumerate(steps)}
