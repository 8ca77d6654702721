"""The FMLoRA perturbation of one LoRA layer, computed from r x r matrices only.

Notation (arXiv 2508.00522): frozen ``W0: [m, n]``, adapter ``dW = s * B @ A`` with ``B: [m, r]``,
``A: [r, n]``, ``G = dL/dW``; autograd gives ``grad_B = s * G @ A^T`` and ``grad_A = s * B^T @ G``.

The paper's full-weight gradient estimate and its transfer to B are

    g   = 0.5 * ( (1/s) * grad_B @ pinv(A^T)  +  (1/s) * pinv(B^T) @ grad_A )
    E_W = rho * g / ||g||_F
    E_B = (1/s) * E_W @ pinv(A)

Both terms of g are projections of G: ``G @ P_A`` and ``P_B @ G`` (P = projector onto the row space
of A, the column space of B). Writing ``pinv(A^T) = K_A^+ @ A`` and ``pinv(B^T) = B @ K_B^+`` with the
Gram matrices ``K_A = A @ A^T`` and ``K_B = B^T @ B`` (both r x r), g has the factored form

    g = 0.5 * ( U @ A  +  B @ V ),     U = (grad_B / s) @ K_A^+  [m, r],   V = K_B^+ @ (grad_A / s)  [r, n]

so ||g||_F and E_B need only products whose inner or outer size is r: O((m + n) r^2) work, no
m x n matrix and no pinv of a big matrix.

Numerics:
* A and B are divided by their Frobenius norms before the Grams are formed. The projectors do not
  change, the Grams' eigenvalues then lie in [0, 1], and a tiny B (just after a zero
  initialisation) cannot underflow the Gram nor overflow its inverse.
* The pseudo-inverse of a Gram drops eigenvalues below ``rtol`` times the largest one (and all of
  them when the Gram is zero): B = 0 gives ``K_B^+ = 0``, so the B-term vanishes instead of
  producing Inf/NaN, and rank-deficient A or B work.
Every function here accepts leading batch dimensions (layers of one shape are stacked by
``perturbation.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["default_pinv_rtol", "guarded_gram_pinv", "FactoredGradient", "estimate_full_gradient", "transfer_to_B"]


def default_pinv_rtol(dtype: torch.dtype) -> float:
    """Eigenvalue cut-off of a unit-norm Gram relative to its largest eigenvalue.

    64 eps is about the rounding error of a Gram summed over a few thousand entries in ``dtype``
    (fp32: 7.6e-6, i.e. singular values below ~2.8e-3 of the largest are treated as zero);
    inverting eigenvalues below that level would only amplify rounding noise.
    """
    return 64 * torch.finfo(dtype).eps


def guarded_gram_pinv(gram: Tensor, rtol: float) -> Tensor:
    """Pseudo-inverse of symmetric PSD ``[..., r, r]`` matrices via an eigendecomposition.

    Eigenvalues at most ``rtol * largest`` (or not positive) are dropped, so a zero matrix gives a
    zero pseudo-inverse and a rank-deficient one the pseudo-inverse of its kept part.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    largest = eigenvalues.amax(dim=-1, keepdim=True)
    keep = (eigenvalues > rtol * largest) & (eigenvalues > torch.finfo(gram.dtype).tiny)
    inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
    return (eigenvectors * inverse.unsqueeze(-2)) @ eigenvectors.mT


def _unit_frobenius(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(matrix / ||matrix||_F, ||matrix||_F)``; a zero matrix stays zero (its norm is reported as 1)."""
    norm = torch.linalg.matrix_norm(matrix, keepdim=True)
    safe = torch.where(norm > 0, norm, 1.0)
    return matrix / safe, safe


def _frobenius_inner(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(dim=(-2, -1))


@dataclass
class FactoredGradient:
    """The full-weight gradient estimate ``g = 0.5 * (U @ A_unit + B_unit @ V)`` of one layer (or a stack).

    ``A_unit = A / a_norm`` and ``B_unit = B / ||B||``; ``U`` and ``V`` absorb the norms, so g is the
    paper's g exactly. ``sq_norm`` is ``||g||_F^2`` per layer, shape ``[...]``.
    """

    U: Tensor  # [..., m, r]
    V: Tensor  # [..., r, n]
    A_unit: Tensor  # [..., r, n]
    B_unit: Tensor  # [..., m, r]
    a_norm: Tensor  # [..., 1, 1]
    gram_A_pinv: Tensor  # [..., r, r], pinv of A_unit @ A_unit^T
    V_At: Tensor  # [..., r, r], V @ A_unit^T (shared by the norm and the transfer)
    sq_norm: Tensor  # [...]

    def dense(self) -> Tensor:
        """Materialise g as ``[..., m, n]`` (tests and small layers only)."""
        return 0.5 * (self.U @ self.A_unit + self.B_unit @ self.V)


def estimate_full_gradient(
    lora_A: Tensor, lora_B: Tensor, grad_A: Tensor, grad_B: Tensor, scaling: float | Tensor, rtol: float
) -> FactoredGradient:
    """The paper's ``g`` in factored form, from the LoRA factors and their gradients (any float dtype;
    compute in the dtype the inputs are given in). ``scaling`` is a float or broadcasts as ``[..., 1, 1]``."""
    A_unit, a_norm = _unit_frobenius(lora_A)
    B_unit, b_norm = _unit_frobenius(lora_B)
    gram_A = A_unit @ A_unit.mT
    gram_B = B_unit.mT @ B_unit
    # One batched eigendecomposition for both Grams (a single solver call per layer shape).
    gram_A_pinv, gram_B_pinv = guarded_gram_pinv(torch.stack([gram_A, gram_B]), rtol).unbind(0)
    # grad_B / s = G @ A^T = (G @ A_unit^T) * a_norm, and likewise for B: divide the norms out.
    U = (grad_B / (scaling * a_norm)) @ gram_A_pinv  # term 1 = U @ A_unit = G @ P_A
    V = gram_B_pinv @ (grad_A / (scaling * b_norm))  # term 2 = B_unit @ V = P_B @ G
    V_At = V @ A_unit.mT
    # ||U A + B V||^2 = <U^T U, A A^T> + <B^T B, V V^T> + 2 <B^T U, V A^T>, all r x r.
    sq_norm_sum = (
        _frobenius_inner(U.mT @ U, gram_A)
        + _frobenius_inner(gram_B, V @ V.mT)
        + 2 * _frobenius_inner(B_unit.mT @ U, V_At)
    )
    sq_norm = 0.25 * sq_norm_sum.clamp_min(0)  # rounding can make a true 0 slightly negative
    return FactoredGradient(U, V, A_unit, B_unit, a_norm, gram_A_pinv, V_At, sq_norm)


def transfer_to_B(gradient: FactoredGradient, coefficient: Tensor, scaling: float | Tensor) -> Tensor:
    """``E_B = (1/s) * E_W @ pinv(A)`` with ``E_W = coefficient * g`` (coefficient: ``[...]``).

    ``pinv(A) = A_unit^T @ K^+ / a_norm`` (K: Gram of A_unit), and ``U @ A_unit @ A_unit^T @ K^+ = U``
    because U already ends in ``K^+`` (``K^+ K K^+ = K^+`` for the eigen-truncated pinv), so
    ``E_W @ pinv(A) = 0.5 * coefficient * (U + B_unit @ V_At @ K^+) / a_norm``.
    """
    g_times_pinv_A = 0.5 * (gradient.U + gradient.B_unit @ (gradient.V_At @ gradient.gram_A_pinv))
    return g_times_pinv_A * (coefficient[..., None, None] / (scaling * gradient.a_norm))
