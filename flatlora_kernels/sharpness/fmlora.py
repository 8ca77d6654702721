"""FMLoRA (arXiv 2508.00522): a sharpness-aware LoRA step with two forward/backward passes.

Per optimizer step:

1. forward/backward at the current point -> ``grad_A``, ``grad_B``;
2. from them, the full-weight gradient estimate g and ``E_B = (1/s) * (rho g / ||g||) @ pinv(A)``
   (``lowrank.py``; ``E_A = 0``: only B is perturbed);
3. forward/backward at ``(B + E_B, A)``;
4. B is restored to its exact previous values, and the base optimizer steps with the gradients
   of pass 3 (for every parameter it holds, LoRA or not).

A step whose radius is 0 (``rho=0``, or a decay that reached 0) skips pass 3: it would only repeat
pass 1, and the step is then plain LoRA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .offset import ReversibleOffset
from .optimizer_wrapper import LoraSharpnessOptimizer

__all__ = ["FMLoRA"]


class FMLoRA(LoraSharpnessOptimizer):
    """Wraps an optimizer; ``step(closure)`` runs both passes. A SAM-style closure::

        opt = FMLoRA(model, torch.optim.AdamW(trainable_params, lr=1e-4), rho=0.05)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)  # the loss at the unperturbed point

    Args:
        model: the module holding the LoRA layers (``FlatLoraLinear``, or anything with ``lora_A``
            ``[r, in]``, ``lora_B`` ``[out, r]`` and ``scaling``; PEFT LoRA linear layers with one
            active adapter). Their ``lora_B`` must be in ``base_optimizer``.
        base_optimizer: the optimizer that applies the (second-pass) gradients.
        rho: the perturbation radius (``||E_W||_F``, per layer by default), >= 0.
        rho_schedule, total_steps: ``"constant"`` (default), ``"inverse_sqrt"`` (the paper's analysis),
            ``"linear"``/``"cosine"`` decay to 0 over ``total_steps``, or a callable ``step -> factor``.
        normalization: ``"layer"`` (default, as the public port) or ``"global"``; see ``perturbation.py``.
        pinv_rtol: eigenvalue cut-off of the guarded Gram pseudo-inverses (default ``64 * eps``).
        skip_unsupported: leave PEFT LoRA layers the shared layer check refuses (DoRA, embedding LoRA,
            quantized base, ...) unperturbed, with a warning naming them, instead of raising.
        grad_scaler: a ``torch.amp.GradScaler`` if the closure backpropagates ``scaler.scale(loss)``.

    ``rho_schedule``, ``total_steps``, ``normalization``, ``pinv_rtol`` and ``skip_unsupported`` are keyword-only; they go
    through ``**options`` to ``LoraSharpnessOptimizer``, which holds their defaults.

    Gradient accumulation: the closure runs all micro-batches of the step (each ``backward`` adds
    to ``.grad``); the perturbation is fixed between its two calls. ``step`` zeroes the gradients
    of the base optimizer's parameters before each call, so the closure need not.

    Mixed precision: forwards may run under ``torch.autocast``; the LoRA factors may be fp32 or
    bf16. The perturbation is computed in fp32 and rounded once when added to B.
    GradScaler: the perturbation direction ``g / ||g||`` does not depend on the loss scale, so the
    scaled first-pass gradients are used as they are (no unscale needed); if they overflowed, the
    perturbation is skipped (E_B = 0, decided without a host sync). Pass the scaler as
    ``grad_scaler``: ``step`` then calls ``grad_scaler.step(base_optimizer)`` (unscale, inf check,
    skip) after the second pass; call ``grad_scaler.update()`` after ``step`` as usual. Do not call
    ``grad_scaler.step(opt, closure)``: GradScaler does not run closures.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        *,
        grad_scaler: torch.amp.GradScaler | None = None,
        **options,
    ) -> None:
        super().__init__(model, base_optimizer, rho, **options)
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None, got {type(grad_scaler).__name__}")
        self.grad_scaler = grad_scaler
        self._offset = ReversibleOffset()
        self.last_perturbed_loss = None  # the loss of pass 2, for logging

    def _run_closure(self, closure: Callable[[], torch.Tensor]):
        self.zero_grad(set_to_none=True)
        with torch.enable_grad():
            return closure()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One FMLoRA step; returns the closure's loss at the unperturbed point."""
        if closure is None:
            raise ValueError(
                "FMLoRA.step needs a closure that runs forward and backward (it is called twice: at the "
                "current point and at the perturbed one); for one pass per step use EFMLoRA"
            )
        step = self.steps_done + 1
        rho = self.rho_at(step)
        loss = self._run_closure(closure)
        if rho > 0:
            self._offset.apply(self.lora_B_params, self.compute_perturbations(rho))
            try:
                self.last_perturbed_loss = self._run_closure(closure)
            finally:
                self._offset.restore()  # also on errors: never leave B perturbed
        else:  # a zero radius (e.g. the end of a decay): pass 2 would repeat pass 1
            self.last_perturbed_loss = loss
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self.steps_done = step
        return loss
