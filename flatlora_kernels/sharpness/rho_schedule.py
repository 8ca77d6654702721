"""The perturbation radius over training: ``rho_t = rho * factor(t)``, t = 1, 2, ... (optimizer steps).

* ``"constant"`` (default): ``factor = 1``. SAM-style practice; the public FMLoRA port's
  ``rho = 0.05`` is a constant radius.
* ``"inverse_sqrt"``: ``factor = 1 / sqrt(t)``, the decay the paper's convergence analysis assumes.
  It is offered for fidelity to the analysis, not as the default: the radius is already 10x smaller
  at step 100, so over most of a fine-tuning run the method is close to plain LoRA.
* ``"linear"`` / ``"cosine"``: from ``rho`` at t = 1 down to 0 at ``t = total_steps`` (0 after).
  This "cosine" *decays*; Flat-LoRA's noise schedule (``flatlora_kernels/schedule.py``) is the
  opposite, a cosine that *rises* from 0 to 1 over training.
* a callable ``factor(t) -> float`` for anything else.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .._validation import check_integer, check_real

__all__ = ["RHO_SCHEDULES", "RhoSchedule"]

RHO_SCHEDULES = ("constant", "inverse_sqrt", "linear", "cosine")


def _decay_progress(step: int, total_steps: int) -> float:
    """0 at step 1, 1 at ``total_steps`` (clamped)."""
    if total_steps == 1:
        return 1.0
    return min(max(step - 1, 0), total_steps - 1) / (total_steps - 1)


class RhoSchedule:
    """``rho_at(t)``: the radius used by optimizer step ``t`` (1-based)."""

    def __init__(self, rho: float, schedule: str | Callable[[int], float] = "constant", total_steps: int | None = None):
        self.rho = check_real("rho", rho, low=0)
        if not callable(schedule) and schedule not in RHO_SCHEDULES:
            raise ValueError(
                f"rho_schedule must be one of {RHO_SCHEDULES} or a callable step -> factor, got {schedule!r}"
            )
        needs_total = schedule in ("linear", "cosine")
        self.schedule = schedule
        self.total_steps = check_integer(
            f"total_steps (for rho_schedule={schedule!r})" if needs_total else "total_steps",
            total_steps,
            minimum=1,
            optional=not needs_total,
        )

    def factor(self, step: int) -> float:
        if callable(self.schedule):
            return float(self.schedule(step))
        if self.schedule == "constant":
            return 1.0
        if self.schedule == "inverse_sqrt":
            return 1.0 / math.sqrt(max(step, 1))
        progress = _decay_progress(step, self.total_steps)
        if self.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine: decays (the noise schedule's rises)

    def rho_at(self, step: int) -> float:
        rho = self.rho * self.factor(step)
        if not math.isfinite(rho) or rho < 0:
            raise ValueError(f"the rho schedule gave rho={rho!r} at step {step}; it must be finite and >= 0")
        return rho

    def __repr__(self) -> str:
        name = getattr(self.schedule, "__name__", repr(self.schedule)) if callable(self.schedule) else self.schedule
        return f"RhoSchedule(rho={self.rho}, schedule={name}, total_steps={self.total_steps})"
