"""Adding a perturbation to parameters in place and taking it off again, bit-exactly.

``(B + E) - E`` is not ``B`` in floating point (in bf16 it is often off by an ulp), so the
original values are kept: ``apply`` clones each parameter before adding its offset and ``restore``
copies the clone back. The parameters keep their identity and storage (optimizer state, hooks,
FSDP and compiled graphs keep working); the extra memory is one copy of each B (``out x r``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ReversibleOffset"]


class ReversibleOffset:
    """At most one offset applied at a time; ``restore`` with nothing applied is a no-op."""

    def __init__(self) -> None:
        self._originals: list[tuple[Tensor, Tensor]] | None = None

    @property
    def applied(self) -> bool:
        return self._originals is not None

    @torch.no_grad()
    def apply(self, params: Sequence[Tensor], offsets: Sequence[Tensor]) -> None:
        """``p += offset`` for each pair; the sum is formed in the wider dtype and rounded once to p's."""
        if self.applied:
            raise RuntimeError("a perturbation is already applied; restore() it first")
        if len(params) != len(offsets):
            raise ValueError(f"{len(params)} parameters but {len(offsets)} offsets")
        originals = []
        for param, offset in zip(params, offsets):
            originals.append((param, param.detach().clone()))
            param.add_(offset)
        self._originals = originals

    @torch.no_grad()
    def restore(self) -> None:
        """Put the values saved by ``apply`` back (exactly)."""
        if self._originals is None:
            return
        for param, original in self._originals:
            param.copy_(original)
        self._originals = None
