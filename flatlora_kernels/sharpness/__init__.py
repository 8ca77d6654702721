"""Sharpness-aware LoRA training: FMLoRA and EFMLoRA (arXiv 2508.00522), and Bi-LoRA (arXiv 2508.19564).

A SAM-style alternative to Flat-LoRA's random weight noise: B is perturbed along the full-weight
gradient estimate ``g = 0.5 * (G P_A + P_B G)`` transferred to the low-rank subspace. Everything is
computed from r x r Gram matrices (``lowrank.py``), never from an ``out x in`` matrix.

* ``FMLoRA``: two forward/backward passes per step, ``opt.step(closure)``.
* ``EFMLoRA``: one pass per step, ``opt.step()`` after ``backward``; an EMA of past perturbations
  is applied between steps (``opt.unperturbed()`` for evaluation).
* ``BiLoRA``: an auxiliary low-rank module, trained by gradient ascent in the same backward and
  clipped to ``rho``, adds to each LoRA layer in training forwards (one pass per step).

Files: ``lowrank`` (the math of one layer), ``perturbation`` (all layers of a model, normalised),
``layers`` (finding LoRA layers), ``rho_schedule``, ``offset`` (apply / exact restore),
``optimizer_wrapper`` (shared plumbing), ``fmlora``, ``efmlora``, ``bilora``.
"""

from .bilora import BiLoRA
from .efmlora import EFMLoRA
from .fmlora import FMLoRA
from .layers import LoraLayerRef, find_lora_layers
from .lowrank import FactoredGradient, estimate_full_gradient, guarded_gram_pinv, transfer_to_B
from .perturbation import compute_b_perturbations
from .rho_schedule import RhoSchedule

__all__ = [
    "FMLoRA",
    "EFMLoRA",
    "BiLoRA",
    "RhoSchedule",
    "find_lora_layers",
    "LoraLayerRef",
    "compute_b_perturbations",
    "estimate_full_gradient",
    "transfer_to_B",
    "guarded_gram_pinv",
    "FactoredGradient",
]
