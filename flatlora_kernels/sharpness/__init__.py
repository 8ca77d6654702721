"""Sharpness-aware LoRA training: FMLoRA and EFMLoRA (arXiv 2508.00522).

A SAM-style alternative to Flat-LoRA's random weight noise: B is perturbed along the full-weight
gradient estimate ``g = 0.5 * (G P_A + P_B G)`` transferred to the low-rank subspace. Everything is
computed from r x r Gram matrices (``lowrank.py``), never from an ``out x in`` matrix.

* ``FMLoRA``: two forward/backward passes per step, ``opt.step(closure)``.
* ``EFMLoRA``: one pass per step, ``opt.step()`` after ``backward``; an EMA of past perturbations
  is applied between steps (``opt.unperturbed()`` for evaluation).

Files: ``lowrank`` (the math of one layer), ``perturbation`` (all layers of a model, normalised),
``layers`` (finding LoRA layers), ``rho_schedule``, ``offset`` (apply / exact restore),
``optimizer_wrapper`` (shared plumbing), ``fmlora``, ``efmlora``.
"""

from .efmlora import EFMLoRA
from .fmlora import FMLoRA
from .layers import LoraLayerRef, find_lora_layers
from .lowrank import FactoredGradient, estimate_full_gradient, guarded_gram_pinv, transfer_to_B
from .perturbation import compute_b_perturbations
from .rho_schedule import RhoSchedule

__all__ = [
    "FMLoRA",
    "EFMLoRA",
    "RhoSchedule",
    "find_lora_layers",
    "LoraLayerRef",
    "compute_b_perturbations",
    "estimate_full_gradient",
    "transfer_to_B",
    "guarded_gram_pinv",
    "FactoredGradient",
]
