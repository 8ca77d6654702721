"""``FlatLoraSchedule``: one noise draw per optimizer step, its cosine ramp, and where seeds come from.

Call ``schedule.step()`` once per optimizer step (after ``optimizer.step()``). Between two calls the
noise state of every layer is constant, so all gradient-accumulation micro-batches of a step, and
forwards recomputed by ``torch.utils.checkpoint``, see the same eps.

Factor: ``factor(t) = 0.5 * (1 - cos(pi * min(t, T) / T))``, t = optimizer steps done, T =
``total_steps`` (optimizer steps, i.e. after gradient accumulation; every data-parallel rank steps
once per global step, so T does not depend on the world size). The layer's noise level is
``sigma * factor(t)``: 0 for the first step, rising to ``sigma``. This cosine *rises*; the
sharpness methods' ``rho_schedule="cosine"`` (``flatlora_kernels/sharpness/rho_schedule.py``) is the
opposite, a radius that *decays* from ``rho`` to 0.

Seeds: the seed of layer ``l`` at step ``t`` on data-parallel rank ``k`` is ``derive_seed(seed, t, l, k)``,
a splitmix64-style hash, so draws are independent across layers, steps and ranks and reproducible
from ``seed`` alone. The global torch RNG is never read nor reseeded. It is computed in two parts:
``step_seed(seed, t, l)`` goes into each layer's ``noise_seed`` buffer (the same on every rank) and
``rank_key(seed, k)`` into the layer's ``noise_rank_key`` attribute, XOR-ed in at forward time. That
split makes the per-rank noise survive wrappers that sync buffers from rank 0.

Distributed training
--------------------
* DistributedDataParallel: wrap the model after ``apply_flat_lora``; default options work (the frozen
  base weights get no gradient and are skipped by the reducer; ``broadcast_buffers=True`` only copies
  rank-independent state). The rank defaults to ``torch.distributed.get_rank()`` when a process group
  is initialised, read at every ``step()``.
* FSDP (``fully_shard`` / FSDP2, or FSDP1 with ``use_orig_params=True`` because a wrapped unit then
  mixes frozen base weights with trainable ``lora_A`` / ``lora_B``): apply Flat-LoRA before sharding.
  Each layer's forward and backward run on the all-gathered full weight, so the noise (defined on
  whole rows of ``W + s*B@A``) is the same as without sharding; the frozen base weight is sharded and
  gathered like any parameter but never receives a gradient, and only the LoRA factors are reduced.
  Build the schedule on every rank from the same ``seed``; each rank then draws its own stream
  (``per_rank_seeds=True``), or all ranks share one with ``per_rank_seeds=False``.
* Tensor parallelism (and hybrid data/tensor/pipeline parallelism): pass ``rank=`` the
  *data-parallel* rank, never the global one. All shards of a layer must share its seed (each uses
  its own block of the one noise matrix), so ranks that hold shards of the same replica must get
  the same ``rank=``; with tensor parallelism alone that is 0.

The setups, and what each was tested with, are in ``docs/DISTRIBUTED.md``.
"""

from __future__ import annotations

import math

from torch import distributed as dist
from torch import nn

from ._validation import check_integer
from .step_noise import StepNoise

__all__ = ["FlatLoraSchedule", "cosine_factor", "derive_seed", "step_seed", "rank_key"]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1  # seeds are kept below 2**63 so they are also valid Python-int seeds
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
# Domain tags keep the per-layer seeds and the per-rank keys from ever being the same hash input.
_TAG_STEP_SEED = 0x5EED_0F_57E9
_TAG_RANK_KEY = 0x5EED_0F_4A4B


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit words with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _hash_words(*words: int) -> int:
    """Absorb the words one at a time, each through a full mix (order matters, no word is lost)."""
    state = 0
    for word in words:
        state = _mix64((state + _GOLDEN_GAMMA + _mix64(word & _MASK64)) & _MASK64)
    return state


def cosine_factor(step: int, total_steps: int) -> float:
    """``0.5 * (1 - cos(pi * t / T))`` with ``t`` clamped to ``[0, T]``: rises from 0 to 1 (the rho
    schedule's "cosine" in ``sharpness/rho_schedule.py`` decays instead)."""
    t = min(max(step, 0), total_steps)
    return 0.5 * (1.0 - math.cos(math.pi * t / total_steps))


def step_seed(seed: int, step: int, layer_index: int) -> int:
    """The rank-independent seed of one layer at one optimizer step."""
    return _hash_words(_TAG_STEP_SEED, seed, step, layer_index) & _MASK63


def rank_key(seed: int, rank: int) -> int:
    """The key XOR-ed into every seed on data-parallel rank ``rank`` (0 for rank 0)."""
    return 0 if rank == 0 else _hash_words(_TAG_RANK_KEY, seed, rank) & _MASK63


def derive_seed(seed: int, step: int, layer_index: int, rank: int = 0) -> int:
    """The Philox seed layer ``layer_index`` uses at optimizer step ``step`` on rank ``rank``."""
    return step_seed(seed, step, layer_index) ^ rank_key(seed, rank)


class FlatLoraSchedule:
    """Drives the noise of every Flat-LoRA layer in ``model``: call ``.step()`` once per optimizer step.

    Args:
        model: the model (or a DDP/FSDP wrapper of it) holding the Flat-LoRA layers; their order in
            ``model.modules()`` gives the layer indices.
        total_steps: T, the number of optimizer steps of the run. ``None`` leaves it to be filled in
            later (``FlatLoraCallback`` takes ``TrainerState.max_steps``); the factor is 0 until then,
            a training forward warns, and ``step()`` raises while it is still None.
        seed: base seed of the noise stream (use the same on every rank).
        rank: data-parallel rank; ``None`` reads ``torch.distributed.get_rank()`` (0 without a group),
            which is right for pure data parallelism only: under tensor parallelism pass the
            data-parallel rank (all shards of a layer share a seed; see the module docstring).
        per_rank_seeds: True gives each rank its own draws (more noise samples per step); False makes
            all ranks draw the same eps.
    """

    def __init__(
        self,
        model: nn.Module,
        total_steps: int | None,
        seed: int = 0,
        rank: int | None = None,
        per_rank_seeds: bool = True,
    ) -> None:
        self.model = model
        self.layers = self._find_layers()
        if not self.layers:
            raise ValueError(
                "FlatLoraSchedule: the model has no Flat-LoRA layers "
                "(call apply_flat_lora, or enable_flat_lora on a PeftModel, first)"
            )
        self.total_steps = total_steps
        self.seed = check_integer("seed", seed, minimum=0)
        self.rank = check_integer("rank", rank, minimum=0, optional=True)
        self.per_rank_seeds = bool(per_rank_seeds)
        self.step_count = 0
        self._apply()

    @property
    def total_steps(self) -> int | None:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self._total_steps = check_integer("total_steps", value, minimum=1, optional=True)

    @property
    def factor(self) -> float:
        """The noise factor in force now (0 while ``total_steps`` is unknown)."""
        if self.total_steps is None:
            return 0.0
        return cosine_factor(self.step_count, self.total_steps)

    def data_parallel_rank(self) -> int:
        if self.rank is not None:
            return self.rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
        return 0

    def _find_layers(self) -> list[StepNoise]:
        return [module for module in self.model.modules() if isinstance(module, StepNoise)]

    def _apply(self) -> None:
        self.layers = self._find_layers()  # layers patched since (an adapter added after enable_flat_lora)
        factor = self.factor
        key = rank_key(self.seed, self.data_parallel_rank()) if self.per_rank_seeds else 0
        known = self.total_steps is not None
        for index, layer in enumerate(self.layers):
            layer.set_noise(step_seed(self.seed, self.step_count, index), factor, rank_key=key, total_steps_known=known)

    def step(self) -> None:
        """Advance to the next optimizer step: new factor, fresh draw for every layer."""
        if self.total_steps is None:
            raise RuntimeError(
                "FlatLoraSchedule.step(): total_steps is None, so the noise factor would stay 0 (training as "
                "plain LoRA). Pass FlatLoraSchedule(model, total_steps=<optimizer steps>), set schedule.total_steps, "
                "or let FlatLoraCallback fill it in from the Trainer"
            )
        self.step_count += 1
        self._apply()

    def set_step(self, step: int) -> None:
        """Jump to ``step`` optimizer steps done (e.g. the trainer's global step on resume)."""
        self.step_count = check_integer("step", step, minimum=0)
        self._apply()

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "per_rank_seeds": self.per_rank_seeds,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next ``step()`` continues the saved run's stream exactly."""
        self.total_steps = state["total_steps"]
        self.seed = check_integer("seed", state["seed"], minimum=0)
        self.per_rank_seeds = bool(state.get("per_rank_seeds", self.per_rank_seeds))
        self.set_step(state["step"])

    def __repr__(self) -> str:
        return (
            f"FlatLoraSchedule(layers={len(self.layers)}, step={self.step_count}, total_steps={self.total_steps}, "
            f"seed={self.seed}, factor={self.factor:.4f}, per_rank_seeds={self.per_rank_seeds})"
        )
