"""What FMLoRA and EFMLoRA share as optimizer wrappers: arguments, layer discovery, the radius
schedule and the plumbing that lets a wrapper stand in for the optimizer it wraps.

The wrapper is a ``torch.optim.Optimizer`` whose ``param_groups`` and ``state`` *are* the base
optimizer's (the same objects), so learning-rate schedulers and ``GradScaler.unscale_`` attached to
the wrapper act on the base optimizer; ``step`` adds the perturbation logic around ``base.step()``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._validation import check_real
from .layers import LoraLayerRef, find_lora_layers
from .perturbation import NORMALIZATIONS, compute_b_perturbations
from .rho_schedule import RhoSchedule

__all__ = ["LoraSharpnessOptimizer"]


class LoraSharpnessOptimizer(torch.optim.Optimizer):
    """Base class; ``FMLoRA`` documents the arguments. The keyword options and their defaults are
    defined here only: the subclasses pass their ``**options`` through."""

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        rho: float,
        *,
        rho_schedule: str | Callable[[int], float] = "constant",
        total_steps: int | None = None,
        normalization: str = "layer",
        pinv_rtol: float | None = None,
        skip_unsupported: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        if isinstance(base_optimizer, LoraSharpnessOptimizer):
            raise TypeError("base_optimizer is already an FMLoRA/EFMLoRA wrapper; wrap the plain optimizer once")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.pinv_rtol = check_real("pinv_rtol", pinv_rtol, low=0, high=1, high_open=True, optional=True)
        self.rho_schedule = RhoSchedule(rho, rho_schedule, total_steps)
        self.normalization = normalization
        self.layers: list[LoraLayerRef] = find_lora_layers(model, skip_unsupported)
        if not self.layers:
            raise ValueError(
                f"{type(self).__name__}: no trainable LoRA layers found in the model (modules with lora_A, "
                "lora_B and scaling, e.g. FlatLoraLinear or PEFT LoRA linear layers, with requires_grad factors)"
            )
        self._check_layers_are_optimized(base_optimizer)
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.base_optimizer = base_optimizer
        # Share, not copy: schedulers and GradScaler that edit the wrapper's groups edit the base's.
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.defaults = base_optimizer.defaults
        self.steps_done = 0

    def _check_layers_are_optimized(self, base_optimizer: torch.optim.Optimizer) -> None:
        optimized = {id(p) for group in base_optimizer.param_groups for p in group["params"]}
        missing = [layer.name for layer in self.layers if id(layer.lora_B) not in optimized]
        if missing:
            raise ValueError(
                f"the lora_B of {len(missing)} LoRA layer(s) is not in base_optimizer (e.g. {missing[:3]}); "
                "pass the optimizer that trains the LoRA factors"
            )

    # --- perturbation -------------------------------------------------------------------------

    @property
    def lora_B_params(self) -> list[Tensor]:
        return [layer.lora_B for layer in self.layers]

    def rho_at(self, step: int) -> float:
        """The radius used by optimizer step ``step`` (1-based)."""
        return self.rho_schedule.rho_at(step)

    def compute_perturbations(self, rho: float) -> list[Tensor]:
        """``E_B`` of every layer from the gradients now in ``.grad`` (see ``perturbation.py``)."""
        return compute_b_perturbations(self.layers, rho, normalization=self.normalization, pinv_rtol=self.pinv_rtol)

    # --- the step -------------------------------------------------------------------------------

    def _one_pass_step(self, closure: Callable[[], Tensor] | None, update: Callable[[int], None]) -> Tensor | None:
        """A step with one forward/backward: ``closure`` (if given) fills ``.grad``, then ``update``
        acts on those gradients as step ``steps_done + 1`` (1-based, the radius schedule's count)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        step = self.steps_done + 1
        update(step)
        self.steps_done = step  # only once the update went through
        return loss

    # --- Optimizer plumbing -------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        # Optimizer.__init__ calls this before base_optimizer is set: it re-adds the base's own groups.
        if "base_optimizer" in self.__dict__:
            self.base_optimizer.add_param_group(param_group)
        else:
            super().add_param_group(param_group)

    def _wrapper_state(self) -> dict:
        return {"steps_done": self.steps_done}

    def _load_wrapper_state(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])

    def state_dict(self) -> dict:
        return {"base_optimizer": self.base_optimizer.state_dict(), "wrapper": self._wrapper_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        # The base may rebuild its groups on load: keep sharing them.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._load_wrapper_state(state_dict["wrapper"])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(layers={len(self.layers)}, {self.rho_schedule}, "
            f"normalization={self.normalization!r}, steps_done={self.steps_done}, "
            f"base_optimizer={self.base_optimizer!r})"
        )
