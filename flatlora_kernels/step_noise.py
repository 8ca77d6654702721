"""The per-step noise state and the one training forward, shared by ``FlatLoraLinear`` and patched PEFT layers.

A layer holds ``noise_seed`` (0-dim int64) and ``noise_factor`` (0-dim fp32) as non-persistent
buffers, written in place by the schedule (so compiled graphs keep their inputs), plus
``noise_rank_key``, a plain int mixed into the seed so data-parallel ranks can draw different noise:
DistributedDataParallel broadcasts buffers from rank 0 before every forward, which would otherwise
give every rank rank 0's noise. ``noise_factor`` stays fp32 when the model is cast (``model.to(bf16)``
would round sigma by up to 0.4%).

Default (no schedule): factor 0 and seed 0, i.e. plain LoRA, the state the cosine schedule prescribes
before the first optimizer step; a training forward of such a layer with ``sigma > 0`` warns once
per model (the layers of one conversion share a ``WarnOnce``).

The training forward (``StepNoise.noisy_linear``) runs the layer's fused op (its base kind's:
``layer_support.BaseLayerKind.run``) with this step's sigma and seed, then PEFT's dropout rule
(``lora_forward.dropout_correction``).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from .lora_forward import dropout_correction
from .user_warnings import user_stacklevel

__all__ = ["StepNoise", "WarnOnce"]


class WarnOnce:
    """A flag shared by the layers of one model, so the no-noise warning fires once per model. A plain
    object: pickling and ``copy.deepcopy`` carry it with the model (a copy warns on its own)."""

    def __init__(self) -> None:
        self.fired = False


_STEP_NOISE_ATTRIBUTES = ("noise_rank_key", "noise_warning", "_noise_driven", "_noise_waits_for_total_steps")


class StepNoise(nn.Module):
    """Mixin: call ``init_step_noise(device)``; needs ``sigma`` (float) and ``fused`` (bool) attributes."""

    sigma: float
    fused: bool

    def init_step_noise(self, device, warn_once: WarnOnce | None = None) -> None:
        """Give the layer its step-noise state: zero seed and factor buffers on ``device``, not yet driven."""
        self.register_buffer("noise_seed", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("noise_factor", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.noise_rank_key = 0
        self.noise_warning = warn_once or WarnOnce()
        self._noise_driven = False
        self._noise_waits_for_total_steps = False

    def remove_step_noise(self) -> None:
        """Delete what ``init_step_noise`` added (``disable_flat_lora`` hands the layer back to PEFT)."""
        for name in ("noise_seed", "noise_factor", *_STEP_NOISE_ATTRIBUTES):
            delattr(self, name)

    @torch.no_grad()
    def set_noise(self, seed: int, factor: float, rank_key: int | None = None, *, total_steps_known: bool = True) -> None:
        """Set this step's draw: written in place, so the buffers keep their identity (and graphs stay valid).
        ``total_steps_known=False``: a schedule without T set it (factor 0 until T is known)."""
        self.noise_seed.fill_(int(seed))
        self.noise_factor.fill_(float(factor))
        if rank_key is not None:
            self.noise_rank_key = int(rank_key)
        self._noise_driven = True
        self._noise_waits_for_total_steps = not total_steps_known

    def effective_seed(self) -> Tensor:
        """The seed the op uses: the step's seed, mixed with this rank's key."""
        if self.noise_rank_key == 0:
            return self.noise_seed
        return torch.bitwise_xor(self.noise_seed, self.noise_rank_key)

    def _op_backend(self) -> str:
        """``"auto"`` (C++ on CPU, Triton on CUDA) when fused, else ``"reference"`` (plain PyTorch)."""
        return "auto" if self.fused else "reference"

    def effective_sigma(self) -> Tensor:
        """``sigma * factor`` as a 0-dim fp32 tensor (no host sync, no recompile when the factor moves)."""
        return self.noise_factor * self.sigma

    def _apply(self, fn, *args, **kwargs):
        factor = self._buffers.get("noise_factor")
        result = super()._apply(fn, *args, **kwargs)
        moved = self._buffers.get("noise_factor")
        if factor is not None and moved is not None and moved.dtype != torch.float32:
            self._buffers["noise_factor"] = factor.to(moved.device)  # a dtype cast: keep the fp32 value
        return result

    def _warn_if_undriven(self) -> None:
        undriven = not self._noise_driven or self._noise_waits_for_total_steps
        if not undriven or self.noise_warning.fired or self.sigma == 0 or torch.compiler.is_compiling():
            return
        self.noise_warning.fired = True
        if self._noise_waits_for_total_steps:
            cause = (
                "its FlatLoraSchedule has total_steps=None, which only FlatLoraCallback fills in (from the "
                "Trainer), so the noise factor stays 0. Pass FlatLoraSchedule(model, total_steps=<optimizer steps>) "
                "in a plain training loop, or add callbacks=[FlatLoraCallback(schedule)] to the Trainer."
            )
        else:
            cause = (
                "no FlatLoraSchedule (or set_noise call) drives it, so its noise factor is 0. Create "
                "flatlora_kernels.FlatLoraSchedule(model, total_steps) and call .step() after each optimizer step."
            )
        warnings.warn(
            f"{type(self).__name__} is training with no noise (as plain LoRA): {cause}", stacklevel=user_stacklevel()
        )

    def noisy_linear(
        self,
        x: Tensor,
        fused_op: Callable[..., Tensor],
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: float,
        dropout: nn.Module | None,
    ) -> Tensor:
        """The training forward: ``x (W + s*B@A + eps)^T + bias`` plus the dropout correction.

        ``fused_op(x, lora_A, lora_B, *, scaling, sigma, seed, backend)`` is the layer's base run by its
        fused op (``float_weight_forward`` over a float weight, a base kind's ``run``), here with this
        step's sigma and seed (the op applies PEFT's adapter dtype rule).
        """
        y = fused_op(
            x, lora_A, lora_B, scaling=scaling, sigma=self.effective_sigma(), seed=self.effective_seed(),
            backend=self._op_backend(),
        )
        self._warn_if_undriven()
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            y = y + dropout_correction(x, dropout, lora_A, lora_B, scaling).to(y.dtype)
        return y
