"""A once-per-case correctness check, run outside the timed rounds.

Benchmarks are not unit tests (``tests/`` checks accuracy properly), but a timing of a layer that
returns garbage is worse than no timing. So before timing, each implementation runs one step on the
case's own tensors (same shapes, so a compiled layer is not recompiled) with a large noise level
(sigma = 1: a wrong noise stream changes the output by about its own size, visible in any dtype),
and its output and gradients are compared in fp64 on the first few output features:

* ``y[:, :R]``, and ``dx``, ``dA``, ``dB`` from a ``dy`` that is zero outside those R columns, so the
  expected values need only R rows of the perturbed weight (cheap even for 11008 x 4096).
* the expected noise is the implementation's own: the Philox stream of ``flatlora_kernels.noise``
  (fused, reference), the ``torch.randn`` draw of ``naive_generator`` (naive), the official code's
  ``torch.normal`` draw (inplace), or none (lora).

Any NaN/Inf or a relative error above the dtype's tolerance raises ``SanityError``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from flatlora_kernels.noise import normal_rows, perturbation_row_scale

from implementations import Implementation, inplace_noise, naive_generator, step
from workloads import AdaptedLayer

CHECKED_FEATURES = 64
SANITY_SIGMA = 1.0
# Largest error allowed, relative to the largest expected magnitude: loose enough for low-precision
# GEMMs over K up to 11008, far below the O(1) error of a wrong noise draw at sigma = 1.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


class SanityError(AssertionError):
    pass


def with_sigma(layer: AdaptedLayer, sigma: float) -> AdaptedLayer:
    """The same tensors (shared, not copied) at another noise level."""
    return dataclasses.replace(layer, sigma=sigma, sigma_tensor=torch.full_like(layer.sigma_tensor, sigma))


def check_layer(impl: Implementation, layer: AdaptedLayer, x: Tensor, grad_out: Tensor) -> dict:
    """Check one training step of ``impl`` on ``layer``; returns facts worth recording (may be empty).

    ``layer``'s weight is restored afterwards even when the implementation edits it in place.
    """
    layer = with_sigma(layer, SANITY_SIGMA)
    rows = min(CHECKED_FEATURES, layer.weight.shape[0])
    dy = torch.zeros_like(grad_out)
    dy[:, :rows] = grad_out[:, :rows]
    x = x.detach().clone().requires_grad_(True)
    weight_before = layer.weight.clone()

    expected_noise_rows = _expected_noise_rows(impl, layer, rows)
    y, (dx, d_lora_A, d_lora_B) = step(impl, [layer], x, dy, [x, layer.lora_A, layer.lora_B])

    facts = {}
    if not torch.equal(layer.weight, weight_before):  # only the inplace baseline edits the weight
        changed = layer.weight != weight_before
        facts["weight_elements_changed_by_one_step"] = changed.float().mean().item()
        facts["weight_relative_drift_after_one_step"] = (
            torch.linalg.vector_norm((layer.weight - weight_before).double())
            / torch.linalg.vector_norm(weight_before.double())
        ).item()
        layer.weight.copy_(weight_before)  # leave the case's tensors as they were

    expected = _expected_step(layer, x.detach(), dy[:, :rows], expected_noise_rows, rows)
    got = {"y[:, :R]": y.detach()[:, :rows], "dx": dx, "dA": d_lora_A, "dB": d_lora_B}
    tolerance = TOLERANCE[x.dtype]
    for name, value in got.items():
        if not torch.isfinite(value).all():
            raise SanityError(f"{impl.name}: {name} has NaN/Inf")
        truth = expected[name]
        error = (value.double() - truth).abs().max().item() / max(truth.abs().max().item(), 1e-30)
        if not error <= tolerance:
            raise SanityError(
                f"{impl.name}: {name} is wrong: relative error {error:.2e} > {tolerance:.0e} "
                f"(checked on the first {rows} output features at sigma={SANITY_SIGMA})"
            )
    return facts


def _expected_noise_rows(impl: Implementation, layer: AdaptedLayer, rows: int) -> Tensor | None:
    """eps[:rows] as ``impl`` should add it, drawn *before* the step (the inplace draw uses the global RNG)."""
    if impl.noise == "none":
        return None
    if impl.noise in ("philox", "torch.randn"):
        scale = perturbation_row_scale(
            layer.weight[:rows], layer.lora_A.detach(), layer.lora_B.detach()[:rows],
            scaling=layer.scaling, sigma=layer.sigma,
        )
    if impl.noise == "philox":
        return scale[:, None] * normal_rows(layer.seed, layer.weight.shape[1], 0, rows, device=layer.weight.device)
    if impl.noise == "torch.randn":
        weight = layer.weight[:rows]
        z = torch.randn(layer.weight.shape, generator=naive_generator(layer), device=weight.device)[:rows]
        # The baseline rounds W + eps to x's dtype, the weight's in every workload: round the same way.
        return (weight.float() + scale[:, None] * z).to(weight.dtype).double() - weight.double()
    if impl.noise == "torch.normal":
        torch.manual_seed(layer.seed)  # the same seed and draw as official_inplace_perturbation
        with torch.no_grad():
            noise, _ = inplace_noise(layer)
        # The step adds it to the weight in the weight's dtype: round the same way.
        return (layer.weight[:rows] + noise[:rows]).double() - layer.weight[:rows].double()
    raise ValueError(f"unknown noise kind {impl.noise!r}")


def _expected_step(layer: AdaptedLayer, x: Tensor, dy_rows: Tensor, noise_rows: Tensor | None, rows: int) -> dict:
    """fp64 ``y[:, :R]``, dx, dA, dB of ``y = x (W + s*B@A + eps)^T + b`` for a dy zero past column R."""
    x64, dy64 = x.double(), dy_rows.double()
    lora_A, lora_B = layer.lora_A.detach().double(), layer.lora_B.detach().double()[:rows]
    w_eff = layer.weight[:rows].double() + layer.scaling * (lora_B @ lora_A)
    if noise_rows is not None:
        w_eff = w_eff + noise_rows.double()
    y = x64 @ w_eff.t()
    if layer.bias is not None:
        y = y + layer.bias[:rows].double()
    return {
        "y[:, :R]": y,
        "dx": dy64 @ w_eff,
        "dA": layer.scaling * (dy64 @ lora_B).t() @ x64,
        "dB": torch.cat(
            [layer.scaling * dy64.t() @ (x64 @ lora_A.t()), x64.new_zeros(layer.weight.shape[0] - rows, lora_A.shape[0])]
        ),
    }
