"""EFMLoRA (arXiv 2508.00522): FMLoRA with one forward/backward per step.

Instead of a fresh perturbation from an extra pass, the model trains at ``(B + E_hat, A)``, where
``E_hat`` is an exponential moving average of past B-perturbations. Per optimizer step t:

1. (user) forward/backward at ``(B + E_hat_{t-1}, A)``: one pass, any number of micro-batches;
2. ``E_B_t`` from those gradients (with the perturbed B they were taken at: the estimate's
   ``pinv(B^T) @ grad_A`` projects G only when B is the B that produced ``grad_A``);
3. B restored to its exact unperturbed values;
4. ``E_hat_t = (1 - beta) * E_hat_{t-1} + beta * E_B_t``;
5. the base optimizer steps (on the unperturbed B, with the gradients of pass 1);
6. ``B + E_hat_t`` is applied for the next step's forwards.

``E_hat_0 = 0``, so the first step trains at the unperturbed point. Between steps the model's B
holds ``B + E_hat``: evaluate inside ``with opt.unperturbed():`` and save checkpoints after
``opt.restore()`` (or inside the same context).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._validation import check_real
from .offset import ReversibleOffset
from .optimizer_wrapper import LoraSharpnessOptimizer

__all__ = ["EFMLoRA"]


class EFMLoRA(LoraSharpnessOptimizer):
    """Wraps an optimizer; use it like the optimizer itself::

        opt = EFMLoRA(model, torch.optim.AdamW(trainable_params, lr=1e-4), rho=0.05, beta=0.9)
        for x, y in loader:
            loss_fn(model(x), y).backward()   # at B + E_hat (applied by the previous step)
            opt.step()                          # restore B, update E_hat, base step, re-apply
            opt.zero_grad()
        with opt.unperturbed():
            evaluate(model)                     # sees the plain B

    Args:
        model, base_optimizer, rho, and the keyword options rho_schedule, total_steps, normalization,
            pinv_rtol: as ``FMLoRA``.
        beta: EMA weight of the newest perturbation, in (0, 1]; 0.9 (the public port's default)
            follows the newest gradient closely while smoothing step-to-step noise; 1 uses only the
            previous step's perturbation.

    Gradient accumulation: the perturbation only changes inside ``step``, so every micro-batch
    between two steps sees the same ``B + E_hat``.
    Mixed precision: as ``FMLoRA``; ``E_hat`` is kept in fp32 (fp64 for fp64 factors) whatever
    B's dtype. GradScaler: call ``scaler.step(opt)`` and ``scaler.update()`` as with any optimizer:
    ``unscale_`` acts on the shared parameter groups, so ``step`` sees unscaled gradients, and a
    step skipped for an overflow leaves B, ``E_hat`` and the applied perturbation unchanged.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        beta: float = 0.9,
        **options,
    ) -> None:
        beta = check_real("beta", beta, low=0, high=1, low_open=True)
        super().__init__(model, base_optimizer, rho, **options)
        self.beta = beta
        self._offset = ReversibleOffset()
        self.perturbation_ema: list[Tensor] | None = None  # E_hat per layer; None until the first step

    # --- the perturbation between steps ---------------------------------------------------------

    @property
    def perturbation_applied(self) -> bool:
        return self._offset.applied

    def restore(self) -> None:
        """Take ``E_hat`` off B (bit-exact). Training may go on: the next ``step`` re-applies it."""
        self._offset.restore()

    def perturb(self) -> None:
        """Apply ``B + E_hat`` (no-op if applied or before the first step)."""
        if not self._offset.applied and self.perturbation_ema is not None:
            self._offset.apply(self.lora_B_params, self.perturbation_ema)

    @contextmanager
    def unperturbed(self):
        """B without ``E_hat`` inside the block (evaluation, checkpointing); re-applied on exit."""
        was_applied = self._offset.applied
        self.restore()
        try:
            yield self
        finally:
            if was_applied:
                self.perturb()

    # --- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_ema(self, perturbations: list[Tensor]) -> None:
        if self.perturbation_ema is None:
            self.perturbation_ema = [torch.zeros_like(p) for p in perturbations]
        for ema, new in zip(self.perturbation_ema, perturbations):
            ema.mul_(1.0 - self.beta).add_(new, alpha=self.beta)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One EFMLoRA step using the gradients already in ``.grad`` (or those ``closure`` computes)."""
        return self._one_pass_step(closure, self._update)

    def _update(self, step: int) -> None:
        perturbations = self.compute_perturbations(self.rho_at(step))  # at the B the gradients saw
        self._offset.restore()
        self._update_ema(perturbations)
        self.base_optimizer.step()
        self._offset.apply(self.lora_B_params, self.perturbation_ema)

    # --- checkpoints ----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        if self._offset.applied:
            raise RuntimeError(
                "EFMLoRA.load_state_dict: a perturbation is applied to the model's lora_B; call opt.restore() "
                "before loading model and optimizer state"
            )
        super().load_state_dict(state_dict)

    def _wrapper_state(self) -> dict:
        ema = None if self.perturbation_ema is None else [e.clone() for e in self.perturbation_ema]
        return {"steps_done": self.steps_done, "beta": self.beta, "perturbation_ema": ema}

    def _load_wrapper_state(self, state: dict) -> None:
        """Loads ``E_hat``; it is not applied until ``perturb()`` or the next ``step``."""
        ema = state["perturbation_ema"]
        if ema is not None:
            if len(ema) != len(self.layers):
                raise ValueError(f"the checkpoint has {len(ema)} perturbations for {len(self.layers)} LoRA layers")
            for saved, B in zip(ema, self.lora_B_params):
                if saved.shape != B.shape:
                    raise ValueError(f"checkpointed perturbation {tuple(saved.shape)} vs lora_B {tuple(B.shape)}")
            ema = [
                saved.to(device=B.device, dtype=torch.promote_types(B.dtype, torch.float32)).clone()
                for saved, B in zip(ema, self.lora_B_params)
            ]
        self.perturbation_ema = ema
        self.steps_done = int(state["steps_done"])
