"""Bi-LoRA (arXiv 2508.19564, "Bi-LoRA: Efficient Sharpness-Aware Minimization for Fine-Tuning
Large-Scale Models", ICLR 2026): SAM's adversarial weight perturbation carried by an auxiliary
low-rank module that is trained by gradient *ascent* in the same backward as the LoRA adapter, so a
step costs one forward/backward (LoRA's), not SAM's two.

Per adapted layer the training forward uses (paper Eq. 7, with LoRA's scaling ``s`` written out)

    W = W0 + s * B1 @ A1 + s * B2 @ A2

where ``(B1, A1)`` is the LoRA adapter (trained by the base optimizer) and ``(B2, A2)`` the auxiliary
module (held here, not in the model). One optimizer step, after the user's ``backward`` at that W
(``G`` = dL/dW there, so ``dL/dB2 = s * G @ A2^T`` and ``dL/dA2 = s * B2^T @ G``):

1. the base optimizer steps on ``(B1, A1)`` (descent; Eq. 9 writes it as plain gradient descent);
2. the auxiliary module takes the paper's plain gradient-ascent step (Eq. 9), both factors from the
   same gradients: ``B2 += eta2 * dL/dB2``, ``A2 += eta2 * dL/dA2``, no normalisation, no momentum.
   ``eta2`` is ``ascent_lr_scale`` times the base optimizer's current learning rate: the paper uses
   ``eta2 = eta1`` in every experiment (section 3, Appendix Q), so a scheduler on the wrapper moves
   both. ``ascent="adam"`` replaces this step by an Adam ascent step (``maximize=True``) at the same
   rate: this package's earlier reading, kept as an option (see docs/DESIGN.md section 13);
3. global clip (Eq. 10): with ``c = sqrt(sum_layers ||s * B2 @ A2||_F^2)``, if ``c > rho`` every
   ``B2`` and ``A2`` is multiplied by ``sqrt(rho / c)``, so the whole perturbation has norm <= rho.

The module persists from step to step (Eq. 9 updates step k into k+1; it is never reset) and is
discarded after training (Algorithm 1, line 11): it is added by a forward hook in training mode only,
so ``model.eval()`` (and every saved adapter) is the plain LoRA model ``W0 + s * B1 @ A1``.
``||B2 @ A2||_F^2`` is computed from the two r x r Gram matrices, never an ``out x in`` matrix.

Where the paper is silent (docs/DESIGN.md section 13 has the sensitivity numbers): the
initialisation (Algorithm 1 only says "initialize"; here like a LoRA adapter, ``A2``
Kaiming-uniform from ``seed`` and ``B2 = 0``, so the first step trains at the unperturbed point);
where ``s`` goes (the paper folds it into the factors; here the gradients are those of the forward
as written above, the same convention the base optimizer sees, and the clip measures the weight
perturbation ``s * B2 @ A2`` itself); and weight decay on the module (none).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_integer, check_real
from .optimizer_wrapper import LoraSharpnessOptimizer

__all__ = ["BiLoRA", "ASCENT_STEPS"]

ASCENT_STEPS = ("sgd", "adam")  # "sgd": the paper's Eq. 9 (plain gradient ascent); "adam": Adam ascent


class BiLoRA(LoraSharpnessOptimizer):
    """Wraps an optimizer; use it like the optimizer itself (one pass per step)::

        opt = BiLoRA(model, torch.optim.AdamW(trainable_params, lr=5e-4), rho=0.05)  # the paper's LLM recipe
        for x, y in loader:
            loss_fn(model(x), y).backward()   # model.train(): the forward includes s * B2 @ A2
            opt.step()                          # descent on the adapter, ascent on the module, clip
            opt.zero_grad()
        model.eval(); evaluate(model)           # eval forwards never include the module

    With an Adam base optimizer ``eta2`` is an Adam-sized rate used for a plain step, so the module
    can take many steps to reach ``rho``; ``clip_bound_steps`` against ``steps_done`` shows whether
    the ball was reached (docs/DESIGN.md section 13 has measured cases).

    Args:
        model: the module holding the LoRA layers (``FlatLoraLinear``, anything with ``lora_A``
            ``[r, in]``, ``lora_B`` ``[out, r]`` and ``scaling``, or PEFT LoRA linear layers with one
            active adapter); their factors must be in ``base_optimizer``.
        base_optimizer: the optimizer of the LoRA adapter (and anything else it holds).
        rho: the radius of the global clip (Frobenius norm of the whole perturbation), >= 0.
        rank: the auxiliary module's rank (default: each layer's LoRA rank).
        ascent_lr_scale: the auxiliary learning rate ``eta2`` as a multiple of the base optimizer's
            first group's current learning rate (default 1: the paper's ``eta2 = eta1``).
        ascent: ``"sgd"`` (default): the paper's plain gradient-ascent step (Eq. 9); ``"adam"``: an
            Adam ascent step (the base group's betas and eps, no weight decay) at the same rate.
        seed: seed of the auxiliary ``A2`` initialisation.
        rho_schedule, total_steps: as ``FMLoRA`` (a schedule of the radius).
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        rho: float = 0.05,
        *,
        rank: int | None = None,
        ascent_lr_scale: float = 1.0,
        ascent: str = "sgd",
        seed: int = 0,
        rho_schedule: str | Callable[[int], float] = "constant",
        total_steps: int | None = None,
    ) -> None:
        rank = check_integer("rank", rank, minimum=1, optional=True)
        self.ascent_lr_scale = check_real("ascent_lr_scale", ascent_lr_scale, low=0)
        seed = check_integer("seed", seed, minimum=0)
        if ascent not in ASCENT_STEPS:
            raise ValueError(f"ascent must be one of {ASCENT_STEPS}, got {ascent!r}")
        self.ascent = ascent
        super().__init__(model, base_optimizer, rho, rho_schedule=rho_schedule, total_steps=total_steps)
        generator = torch.Generator().manual_seed(seed)
        self.aux_A: list[nn.Parameter] = []
        self.aux_B: list[nn.Parameter] = []
        for layer in self.layers:
            A, B = layer.lora_A, layer.lora_B
            r = rank or A.shape[0]
            dtype = torch.promote_types(A.dtype, torch.float32)
            aux_A = torch.empty(r, A.shape[1], dtype=dtype)
            bound = 1.0 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=sqrt(5)), as nn.Linear and PEFT's lora_A
            aux_A.uniform_(-bound, bound, generator=generator)
            self.aux_A.append(nn.Parameter(aux_A.to(A.device)))
            self.aux_B.append(nn.Parameter(torch.zeros(B.shape[0], r, dtype=dtype, device=B.device)))
        self._clipped = torch.tensor(0)  # steps on which the clip bound, counted on the device
        self.ascent_optimizer = self._make_ascent_optimizer([p for pair in zip(self.aux_A, self.aux_B) for p in pair])
        self._hooks = [
            layer.module.register_forward_hook(self._hook(index), with_kwargs=True) for index, layer in enumerate(self.layers)
        ]

    # --- the auxiliary branch -------------------------------------------------------------------

    def _hook(self, index: int):
        def add_perturbation(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            if not module.training:
                return output
            x = args[0] if args else kwargs["x"]
            A2, B2 = self.aux_A[index], self.aux_B[index]
            branch = F.linear(F.linear(x, A2.to(x.dtype)), B2.to(x.dtype)) * self.layers[index].scaling
            return output + branch.to(output.dtype)

        return add_perturbation

    def remove(self) -> None:
        """Take the auxiliary branch out of the model's forward for good (the hooks are removed)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @torch.no_grad()
    def perturbation(self, index: int) -> Tensor:
        """``s * B2 @ A2`` of layer ``index`` (materialised: for tests and inspection only)."""
        return self.layers[index].scaling * (self.aux_B[index] @ self.aux_A[index])

    @torch.no_grad()
    def perturbation_norm(self) -> Tensor:
        """``sqrt(sum ||s * B2 @ A2||_F^2)`` from r x r Grams: ``||BA||^2 = sum((B^T B) * (A A^T))``."""
        total = None
        for layer, A2, B2 in zip(self.layers, self.aux_A, self.aux_B):
            sq = (layer.scaling**2) * ((B2.T @ B2) * (A2 @ A2.T)).sum()
            total = sq if total is None else total + sq.to(total.device)
        return total.clamp_min(0).sqrt()

    # --- the step -------------------------------------------------------------------------------

    def _make_ascent_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        # maximize=True: the optimizer steps along +grad, the ascent of Eq. 9.
        if self.ascent == "sgd":  # p += eta2 * grad: no momentum, no decay, no normalisation
            return torch.optim.SGD(params, lr=self._ascent_lr(), momentum=0.0, weight_decay=0.0, maximize=True)
        group = self.base_optimizer.param_groups[0]
        return torch.optim.Adam(
            params, lr=self._ascent_lr(), betas=group.get("betas", (0.9, 0.999)), eps=group.get("eps", 1e-8),
            weight_decay=0.0, maximize=True,
        )

    @property
    def clip_bound_steps(self) -> int:
        """How many steps ended with the ascent past ``rho`` (so the clip bound). Far below
        ``steps_done``, the ascent is too slow to reach the ball: rho then does not act (raise
        ``ascent_lr_scale`` or lower ``rho``)."""
        return int(self._clipped)

    def _ascent_lr(self) -> float:
        return self.ascent_lr_scale * float(self.base_optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def _clip(self, rho: float) -> None:
        norm = self.perturbation_norm()
        # sqrt(rho / c) on both factors scales the product by rho / c; decided on the device (no sync).
        binds = norm > rho
        factor = torch.where(binds, torch.sqrt(rho / torch.where(norm > 0, norm, 1.0)), 1.0)
        self._clipped = self._clipped.to(binds.device) + binds
        for A2, B2 in zip(self.aux_A, self.aux_B):
            A2.mul_(factor.to(A2.device, A2.dtype))
            B2.mul_(factor.to(B2.device, B2.dtype))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One Bi-LoRA step from the gradients already in ``.grad`` (or those ``closure`` computes)."""
        return self._one_pass_step(closure, self._update)

    def _update(self, step: int) -> None:
        # Both steps read the gradients of the same backward (Eq. 9: step k's G for both modules).
        self.base_optimizer.step()
        for group in self.ascent_optimizer.param_groups:
            group["lr"] = self._ascent_lr()
        self.ascent_optimizer.step()
        self._clip(self.rho_at(step))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)
        self.ascent_optimizer.zero_grad(set_to_none=set_to_none)

    # --- checkpoints ----------------------------------------------------------------------------

    def _wrapper_state(self) -> dict:
        return {
            "steps_done": self.steps_done,
            "ascent": self.ascent,
            "clip_bound_steps": self.clip_bound_steps,
            "aux_A": [p.detach().clone() for p in self.aux_A],
            "aux_B": [p.detach().clone() for p in self.aux_B],
            "ascent_optimizer": self.ascent_optimizer.state_dict(),
        }

    def _load_wrapper_state(self, state: dict) -> None:
        saved_ascent = state.get("ascent", "adam")  # checkpoints from before the option had Adam's ascent
        if saved_ascent != self.ascent:
            raise ValueError(f"the checkpoint's ascent step is {saved_ascent!r}, this BiLoRA's is {self.ascent!r}")
        for name in ("aux_A", "aux_B"):
            saved, mine = state[name], getattr(self, name)
            if len(saved) != len(mine) or any(s.shape != p.shape for s, p in zip(saved, mine)):
                raise ValueError(f"the checkpoint's {name} shapes do not match this model's auxiliary module")
            with torch.no_grad():
                for s, p in zip(saved, mine):
                    p.copy_(s)
        self.ascent_optimizer.load_state_dict(state["ascent_optimizer"])
        self.steps_done = int(state["steps_done"])
        self._clipped = torch.tensor(int(state.get("clip_bound_steps", 0)))
