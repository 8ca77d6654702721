"""The per-step noise state shared by ``FlatLoraLinear`` and patched PEFT layers.

A layer holds ``noise_seed`` (0-dim int64) and ``noise_factor`` (0-dim fp32) as non-persistent
buffers, written in place by the schedule (so compiled graphs keep their inputs), plus
``noise_rank_key``, a plain int mixed into the seed so data-parallel ranks can draw different noise.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["StepNoise"]


class StepNoise(nn.Module):
    """Mixin: call ``_init_step_noise(device)`` in ``__init__``; needs a ``sigma`` attribute."""

    sigma: float

    def _init_step_noise(self, device) -> None:
        self.register_buffer("noise_seed", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("noise_factor", torch.zeros((), dtype=torch.float32, device=device), persistent=False)
        self.noise_rank_key = 0
        self._noise_driven = False

    @torch.no_grad()
    def set_noise(self, seed: int, factor: float, rank_key: int | None = None) -> None:
        """Set this step's draw: written in place, so the buffers keep their identity (and graphs stay valid)."""
        self.noise_seed.fill_(int(seed))
        self.noise_factor.fill_(float(factor))
        if rank_key is not None:
            self.noise_rank_key = int(rank_key)
        self._noise_driven = True

    def effective_seed(self) -> Tensor:
        """The seed the op uses: the step's seed, mixed with this rank's key."""
        if self.noise_rank_key == 0:
            return self.noise_seed
        return torch.bitwise_xor(self.noise_seed, self.noise_rank_key)

    def effective_sigma(self) -> Tensor:
        """``sigma * factor`` as a 0-dim fp32 tensor (no host sync, no recompile when the factor moves)."""
        return self.noise_factor * self.sigma
