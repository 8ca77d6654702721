"""Choosing every method's knob the same way: a geometric grid, scored on the validation split.

Each method gets a grid with the same number of candidates and the same seeds. The choice is the
candidate with the lowest mean validation NLL. If it is at either end of the values tried, the grid
is extended geometrically past that end (one value per round, all methods' extensions of a round run
together) until the choice is interior or the knob's cap is reached; the result says which.
Scoring is the caller's ``evaluate`` (validation only; the test split is never passed to it).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace


# The knobs' caps (an extension stops past them; dropout must stay < 1) and their short names in tables.
CAPS = {"lora": (0.05 / 8, 0.8), "flat-lora": (0.05 / 8, 3.2), "efmlora": (0.025 / 8, 1.6), "bilora": (0.025 / 16, 1.6)}
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

    def __post_init__(self):
        if len(self.grid) < 2 or min(self.grid) <= 0:
            raise ValueError(f"{self.method} {self.name}: the grid needs >= 2 values > 0, got {self.grid}")
        if self.ratio <= 1:
            raise ValueError(f"{self.method} {self.name}: the grid ratio must be > 1, got {self.ratio}")
        if not self.low_cap <= min(self.grid) <= max(self.grid) <= self.high_cap:
            raise ValueError(f"{self.method} {self.name}: the grid {self.grid} lies outside its caps [{self.low_cap}, {self.high_cap}]")


@dataclass
class Choice:
    """What the search tried and chose; ``status`` is "interior", "capped at low/high end" or "rounds exhausted"."""

    method: str
    knob: str
    initial_grid: list[float]
    validation: dict[float, float] = field(default_factory=dict)  # value -> mean validation NLL
    value: float | None = None
    extensions: list[float] = field(default_factory=list)
    status: str = ""

    @property
    def grid(self) -> list[float]:
        return sorted(self.validation)

    def as_json(self) -> dict:
        return {
            "method": self.method, "knob": self.knob, "initial grid": self.initial_grid, "grid": self.grid,
            "validation NLL": {str(k): v for k, v in sorted(self.validation.items())}, "choice": self.value,
            "extensions": self.extensions, "status": self.status,
        }


def next_value(knob: Knob, validation: dict[float, float]) -> tuple[float | None, str]:
    """The value to try next (None when done) and the status if done: the pure extension rule."""
    tried = sorted(validation)
    best = min(tried, key=lambda v: (validation[v], v))
    if tried[0] < best < tried[-1]:
        return None, "interior"
    if best == tried[-1]:
        candidate = tried[-1] * knob.ratio
        if candidate > knob.high_cap * (1 + 1e-9):
            return None, f"capped at the high end (cap {knob.high_cap:g})"
        return candidate, ""
    candidate = tried[0] / knob.ratio
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


def validation_search(knobs: Sequence[Knob], config, *, select_seeds: int, max_rounds: int, run) -> tuple[dict[str, Choice], dict]:
    """Every knob on the validation split, with seeds 1000+ (disjoint from the reported 0..n-1).

    ``config`` is a dataclass with a field named after each knob; ``run(jobs, label)`` runs jobs
    ``(method, seed, config, search=True)``, whose task has no test split, and returns their results
    (with ``val_nll``). Plain LoRA (``lora_dropout=0``) runs once beside the first round, as a
    reference line, not a candidate: returned with its mean validation NLL (and its curve if any).
    """
    seeds = list(range(1000, 1000 + select_seeds))
    reference = {}

    def evaluate(candidates):
        jobs = [(m, s, replace(config, **{knob_of[m]: v}), True) for m, v in candidates for s in seeds]
        first = not reference
        if first:
            jobs += [("lora", s, replace(config, lora_dropout=0.0), True) for s in seeds]
        results = run(jobs, "validation search")
        if first:
            plain = results[-len(seeds):]
            reference["val"] = statistics.fmean(r.val_nll for r in plain)
            if getattr(plain[0], "eval_steps", None):
                curves = zip(*(r.eval_val_nll for r in plain))
                reference["curve"] = dict(zip(plain[0].eval_steps, (statistics.fmean(v) for v in curves)))
        return [statistics.fmean(r.val_nll for r in results[i * len(seeds):(i + 1) * len(seeds)]) for i in range(len(candidates))]

    knob_of = {k.method: k.name for k in knobs}
    return choose(knobs, evaluate, max_rounds=max_rounds), reference
