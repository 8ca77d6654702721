"""Tensor parallelism for ``FlatLoraLinear`` with the unsharded layer's noise (module level, not fused).

``shard_colwise(layer, group)`` splits the output rows ``[0, N)`` across the group, ``shard_rowwise``
the input columns ``[0, K)`` (the Megatron pair: a colwise layer's sharded output feeds a rowwise
layer, whose partial outputs are summed). Each shard draws ``eps`` at the *global* indices of its
block in the one noise stream of ``flatlora_kernels/noise.py``, so the sharded layers perturb the
weight exactly as the unsharded layer would:

* colwise: the shard owns whole rows, so its row norms of ``W + s*B@A`` are local; ``lora_A`` is
  replicated and its gradient (and the input's) is summed across shards in backward;
* rowwise: a row is split across shards, so the squared partial row norms are all-reduced (one
  all-reduce of N floats) and cached until the seed, the factor or the adapter changes, i.e. once per
  optimizer step however many micro-batches run; ``lora_B`` is replicated and its gradient summed.

Not fused: the shard materialises its block of ``W + s*B@A + eps`` and runs autograd through it
(the fused ops take whole ``[0, N) x [0, K)`` weights only; a fused path needs row/column offsets in
the kernels). All ranks of the group must use the same seed: drive the model with a schedule whose
``rank`` is the data-parallel rank (0 without data parallelism), not the tensor-parallel rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..modules import FlatLoraLinear
from ..noise import normal_block

__all__ = ["shard_colwise", "shard_rowwise", "ShardedFlatLoraLinear", "shard_noise"]


def shard_noise(seed: Tensor, in_features: int, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """``z(seed, i, j)`` for global rows ``[i0, i1)`` and columns ``[j0, j1)`` of a ``K = in_features`` layer."""
    return normal_block(seed, in_features, rows, cols)


class _SumGradAcrossShards(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (a replicated input or factor)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumAcrossShards(torch.autograd.Function):
    """Forward sums partial outputs over the group; backward hands every shard the whole gradient."""

    @staticmethod
    def forward(ctx, tensor, group):
        out = tensor.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _block(n: int, rank: int, world: int, what: str) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel world size {world}")
    size = n // world
    return rank * size, (rank + 1) * size


class ShardedFlatLoraLinear(nn.Module):
    """One tensor-parallel shard of a ``FlatLoraLinear`` (built by ``shard_colwise`` / ``shard_rowwise``)."""

    def __init__(self, layer: FlatLoraLinear, style: str, group=None) -> None:
        super().__init__()
        if not isinstance(layer, FlatLoraLinear):
            raise TypeError(f"expected a FlatLoraLinear, got {type(layer).__name__}")
        if style not in ("colwise", "rowwise"):
            raise ValueError(f"style must be 'colwise' or 'rowwise', got {style!r}")
        if not dist.is_initialized():
            raise RuntimeError("tensor parallelism needs an initialised process group")
        if layer.lora_dropout is not None:
            raise NotImplementedError("tensor-parallel FlatLoraLinear does not support lora_dropout yet")
        self.style, self.group = style, group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.scaling, self.sigma = layer.scaling, layer.sigma
        self.layer = layer  # kept for its noise state (seed, factor, rank key), which the schedule drives
        if style == "colwise":
            self.rows, self.cols = _block(layer.out_features, rank, world, "out_features"), (0, layer.in_features)
        else:
            self.rows, self.cols = (0, layer.out_features), _block(layer.in_features, rank, world, "in_features")
        (i0, i1), (j0, j1) = self.rows, self.cols
        with torch.no_grad():
            self.weight = nn.Parameter(layer.weight[i0:i1, j0:j1].clone(), requires_grad=False)
            self.lora_A = nn.Parameter(layer.lora_A[:, j0:j1].clone())
            self.lora_B = nn.Parameter(layer.lora_B[i0:i1].clone())
            bias = layer.bias if layer.bias is None or style == "rowwise" else layer.bias[i0:i1]
            self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)
        # Drop the full tensors from the wrapped layer: only its noise buffers are used.
        for name in ("weight", "bias", "lora_A", "lora_B"):
            layer._parameters.pop(name, None)
        self._norm_cache: tuple | None = None

    def _row_scale(self, seed: Tensor) -> Tensor:
        """``sigma_eff * ||W + s*B@A||_row / sqrt(K)`` for this shard's rows; rowwise: one all-reduce per step."""
        merged = self.weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        if self.style == "colwise":
            return self.layer.effective_sigma() * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(self.in_features)
        key = (int(seed), float(self.layer.noise_factor), self.lora_A._version, self.lora_B._version)
        if self._norm_cache is None or self._norm_cache[0] != key:
            squares = merged.square().sum(dim=1)
            dist.all_reduce(squares, group=self.group)
            self._norm_cache = (key, squares.sqrt())
        return self.layer.effective_sigma() * self._norm_cache[1] / math.sqrt(self.in_features)

    def shard_eps(self) -> Tensor:
        """This shard's block of the unsharded layer's eps (fp32)."""
        seed = self.layer.effective_seed()
        with torch.no_grad():
            return self._row_scale(seed)[:, None] * shard_noise(seed, self.in_features, self.rows, self.cols)

    def forward(self, x: Tensor) -> Tensor:
        lora_A, lora_B = self.lora_A, self.lora_B
        if self.style == "colwise":
            x, lora_A = _SumGradAcrossShards.apply(x, self.group), _SumGradAcrossShards.apply(lora_A, self.group)
        else:
            lora_B = _SumGradAcrossShards.apply(lora_B, self.group)
        weight = self.weight.float() + self.scaling * (lora_B.float() @ lora_A.float())
        if self.training:
            weight = weight + self.shard_eps()
        y = F.linear(x, weight.to(x.dtype))
        if self.style == "rowwise":
            y = _SumAcrossShards.apply(y, self.group)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _replace(model: nn.Module, name: str, style: str, group) -> ShardedFlatLoraLinear:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer = getattr(parent, child)
    shard = ShardedFlatLoraLinear(layer, style, group)
    setattr(parent, child, shard)
    return shard


def shard_colwise(model: nn.Module, name: str, group=None) -> ShardedFlatLoraLinear:
    """Replace the ``FlatLoraLinear`` at ``model.<name>`` by this rank's block of output rows (in place)."""
    return _replace(model, name, "colwise", group)


def shard_rowwise(model: nn.Module, name: str, group=None) -> ShardedFlatLoraLinear:
    """Replace the ``FlatLoraLinear`` at ``model.<name>`` by this rank's block of input columns (in place)."""
    return _replace(model, name, "rowwise", group)
