"""Tensor parallelism for ``FlatLoraLinear`` with the unsharded layer's noise (module level, not fused).

``parallelize_module(model, mesh, {"up": FlatLoraColwiseParallel(), "down": FlatLoraRowwiseParallel()})``
(``torch.distributed.tensor.parallel``): the layer stays a ``FlatLoraLinear`` (its class becomes the
subclass ``TensorParallelFlatLoraLinear``) whose parameters are DTensors on the 1-D mesh in the
standard layout (colwise: ``weight``/``lora_B``/``bias`` ``Shard(0)``, ``lora_A`` ``Replicate``;
rowwise: ``weight``/``lora_A`` ``Shard(1)``, ``lora_B``/``bias`` ``Replicate``), so optimizers,
``get_state_dict``/DCP and ``full_tensor()`` see what they see for torch's own styles. Inputs and
outputs follow torch's ``ColwiseParallel``/``RowwiseParallel`` (the styles subclass them).

``colwise`` splits the output rows ``[0, N)`` across the group, ``rowwise`` the input columns ``[0, K)``
(the Megatron pair: a colwise layer's sharded output feeds a rowwise layer, whose partial outputs are
summed). Each shard draws ``eps`` at the *global* indices of its block in the one noise stream of
``flatlora_kernels/noise.py``, so the sharded layers perturb the weight exactly as the unsharded layer:

* colwise: the shard owns whole rows, so its row norms of ``W + s*B@A`` are local; ``lora_A`` is
  replicated and its gradient (and the input's) is summed across shards in backward;
* rowwise: a row is split across shards, so the squared partial row norms are all-reduced (one
  all-reduce of N floats) and cached until the seed, the factor or the adapter changes, i.e. once per
  optimizer step however many micro-batches run; ``lora_B`` is replicated and its gradient summed.

Not fused: the shard materialises its block of ``W + s*B@A + eps`` and runs autograd through it
(the fused ops take whole ``[0, N) x [0, K)`` weights only; a fused path needs row/column offsets in
the kernels). All ranks of the group must use the same seed: drive the model with a schedule whose
``rank`` is the data-parallel rank (0 without data parallelism), not the tensor-parallel rank; the
first training forward after the rank key changes checks this with one tiny all-reduce and raises.

LoRA dropout (``lora_forward.dropout_correction``) needs the tensor-parallel ranks' torch RNG in step, as in
Megatron: colwise applies the unsharded layer's dropout to its (replicated) input; rowwise draws the
mask of the whole input row from that RNG and keeps its columns, so on CPU both equal the unsharded
layer's dropout bit for bit (on CUDA, where ``F.dropout`` draws differently, the mask has the same
distribution). See docs/DISTRIBUTED.md for the communication per step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from ..layer_support import UnsupportedLayerError, base_layer_problem, supported_layers
from ..modules import FlatLoraLinear
from ..noise import merged_weight, normal_submatrix
from ..lora_forward import dropout_correction

__all__ = ["FlatLoraColwiseParallel", "FlatLoraRowwiseParallel", "TensorParallelFlatLoraLinear"]


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


def _sum_grad(tensor: Tensor | None, group) -> Tensor | None:
    """``tensor`` whose gradient is summed over the group (no collective for a frozen tensor)."""
    if tensor is None or not tensor.requires_grad:
        return tensor
    return _SumGradAcrossShards.apply(tensor, group)


def _block(n: int, rank: int, world: int, what: str) -> tuple[int, int]:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel world size {world}")
    size = n // world
    return rank * size, (rank + 1) * size


def _shard_ranges(layer: FlatLoraLinear, style: str, rank: int, world: int):
    """Global ``(rows, cols)`` of this rank's block of the ``[N, K]`` weight."""
    if style == "colwise":
        return _block(layer.out_features, rank, world, "out_features"), (0, layer.in_features)
    return (0, layer.out_features), _block(layer.in_features, rank, world, "in_features")


def _check_layer(layer, style: str) -> None:
    if not isinstance(layer, FlatLoraLinear):
        why = base_layer_problem(layer) or "convert it with apply_flat_lora (or FlatLoraLinear.from_linear) first"
        raise UnsupportedLayerError(
            f"{style} tensor parallelism: expected a FlatLoraLinear, got a {type(layer).__name__}: {why}; "
            f"{supported_layers()}"
        )
    if layer.fan_in_fan_out:
        raise UnsupportedLayerError(
            f"{style} tensor parallelism: a FlatLoraLinear over a Conv1D ([in, out] weight) is not sharded; "
            "tensor parallelism supports FlatLoraLinear over nn.Linear"
        )
    if type(layer) not in (FlatLoraLinear, TensorParallelFlatLoraLinear):
        raise UnsupportedLayerError(
            f"{style} tensor parallelism: a {type(layer).__name__} (a FlatLoraLinear subclass, e.g. over a 4-bit "
            "base) is not sharded; tensor parallelism supports FlatLoraLinear over nn.Linear"
        )
    if layer.merged:
        raise RuntimeError("FlatLoraLinear is merged: call unmerge() before sharding it")


def _bias_once(bias: Tensor | None, first: bool) -> Tensor | None:
    """A replicated bias, added to a partial output that is summed over the ranks: it enters on one rank.
    A trainable bias keeps a zero-weighted term on the others, so every rank's backward runs its all-reduce."""
    if bias is None or first:
        return bias
    return bias * 0 if bias.requires_grad else None


_PLACEMENTS = {
    "colwise": {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)},
    "rowwise": {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1), "lora_B": Replicate()},
}


class TensorParallelFlatLoraLinear(FlatLoraLinear):
    """A ``FlatLoraLinear`` whose parameters are DTensors on a 1-D tensor-parallel mesh.

    Made by ``FlatLoraColwiseParallel`` / ``FlatLoraRowwiseParallel`` (which swap the layer's class in
    place, so the schedule, ``flat_lora_layers`` and the state-dict keys are unchanged); not built directly.
    ``forward`` takes a DTensor (the style's input hook makes it) and returns one: ``Shard(-1)`` for
    colwise, ``Partial()`` for rowwise, which the output hook turns into the requested layout.
    """

    tp_mesh: DeviceMesh

    def __init__(self, *args, **kwargs) -> None:  # the styles swap the class of a built layer instead
        raise TypeError(
            "TensorParallelFlatLoraLinear is made by parallelize_module(layer, mesh, FlatLoraColwiseParallel() "
            "or FlatLoraRowwiseParallel()) from a FlatLoraLinear, not built directly"
        )

    def _local_tensors(self):
        with torch.no_grad():
            return self.weight.to_local(), self.lora_A.to_local(), self.lora_B.to_local()

    def _group(self):
        return self.tp_mesh.get_group()

    def _merged(self, weight: Tensor, lora_A: Tensor, lora_B: Tensor) -> Tensor:
        """This shard's block of ``W + s*B@A`` (the unsharded layer's expression, so its row norms match)."""
        return merged_weight(weight, lora_A, lora_B, self.scaling)

    def _row_norms(self, merged: Tensor) -> Tensor:
        """``||W + s*B@A||_row`` of this shard's rows; rowwise: one all-reduce of squared partial norms per step."""
        if self.style == "colwise":
            return torch.linalg.vector_norm(merged, dim=1)
        # In-place updates of a DTensor bump its own version counter, not its local tensor's: key on both.
        versions = tuple(t._version for t in (self.lora_A, self.lora_B, *self._local_tensors()[1:]))
        key = (int(self.effective_seed()), float(self.noise_factor), *versions)
        if self._norm_cache is None or self._norm_cache[0] != key:
            squares = merged.square().sum(dim=1)
            dist.all_reduce(squares, group=self._group())
            self._norm_cache = (key, squares.sqrt())
        return self._norm_cache[1]

    def shard_eps(self, merged: Tensor | None = None) -> Tensor:
        """This shard's block of the unsharded layer's eps (fp32); ``merged``: the shard's ``W + s*B@A``
        if the caller has it (the forward does), else it is formed here."""
        weight, lora_A, lora_B = self._local_tensors()
        with torch.no_grad():
            merged = self._merged(weight, lora_A, lora_B) if merged is None else merged.detach()
            row_scale = self.effective_sigma() * self._row_norms(merged) / math.sqrt(self.in_features)
            # On the shard's device, not normal_submatrix's default (CPU).
            z = normal_submatrix(self.effective_seed(), self.in_features, self.rows, self.cols, device=weight.device)
            return row_scale[:, None] * z

    def _check_shared_seed(self) -> None:
        """Raise unless every rank of the group draws from the same seed (checked when the rank key changes)."""
        if self.noise_rank_key == self._checked_rank_key:
            return
        seed = self.effective_seed().reshape(1)
        extremes = torch.cat([seed, -seed])  # seeds are below 2**63: negating cannot overflow
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self._group())
        if int(extremes[0]) != -int(extremes[1]):
            raise RuntimeError(
                "tensor-parallel shards of a FlatLoraLinear draw from different seeds: build the "
                "FlatLoraSchedule with rank=<the data-parallel rank> (0 without data parallelism), not the "
                "global rank, so that every shard uses its block of the unsharded layer's eps"
            )
        self._checked_rank_key = self.noise_rank_key

    def _dropout_term(self, x: Tensor, lora_A: Tensor, lora_B: Tensor, dropout: nn.Dropout) -> Tensor:
        scaling = self.scaling
        if self.style == "colwise":  # x is whole: the unsharded layer's dropout, from the shared RNG
            return dropout_correction(x, dropout, lora_A, lora_B, scaling)
        # The mask of the whole row, drawn as F.dropout draws it on CPU, and this shard's columns of it.
        keep = 1.0 - dropout.p
        shape = (*x.shape[:-1], self.in_features)
        mask = torch.empty(shape, dtype=lora_A.dtype, device=x.device).bernoulli_(keep).div_(keep)
        mask = mask[..., self.cols[0] : self.cols[1]]
        return dropout_correction(x, lambda xa: xa * mask, lora_A, lora_B, scaling)

    def _sharded_linear(self, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Tensor | None) -> Tensor:
        """This rank's output block (colwise) or partial output (rowwise) from local tensors."""
        if self.training:
            self._check_shared_seed()
        merged = self._merged(weight, lora_A, lora_B)
        if self.training:
            merged = merged + self.shard_eps(merged)
        y = F.linear(x, merged.to(x.dtype))
        if self.training and self.lora_dropout is not None:
            y = y + self._dropout_term(x, lora_A, lora_B, self.lora_dropout).to(y.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def forward(self, x: DTensor) -> DTensor:
        if self.merged:
            raise RuntimeError("a tensor-parallel FlatLoraLinear is never merged")
        if self.training:
            self._warn_if_undriven()
        group = self._group()
        weight, lora_A, lora_B = self.weight.to_local(), self.lora_A.to_local(), self.lora_B.to_local()
        bias = None if self.bias is None else self.bias.to_local()
        if self.style == "colwise":
            # Every shard's input gradient is a partial sum (its rows' share); DTensor reduces it upstream.
            x_local = x.to_local(grad_placements=(Partial(),))
            lora_A = _sum_grad(lora_A, group)
            placement = Shard(-1)
        else:
            x_local = x.to_local()
            lora_B = _sum_grad(lora_B, group)
            bias = _bias_once(_sum_grad(bias, group), self.tp_mesh.get_local_rank() == 0)
            placement = Partial()
        y = self._sharded_linear(x_local, weight, lora_A, lora_B, bias)
        return DTensor.from_local(y, self.tp_mesh, (placement,), run_check=False)

    def merge(self) -> None:
        raise NotImplementedError(
            "merge a tensor-parallel FlatLoraLinear after gathering the model "
            "(get_model_state_dict(..., options=StateDictOptions(full_state_dict=True)) into an unsharded copy)"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tensor_parallel={self.style}"


def _parallelize(style, module: nn.Module, mesh: DeviceMesh, kind: str) -> nn.Module:
    """Shard ``module``'s parameters as ``_PLACEMENTS[kind]`` and install ``style``'s input/output hooks."""
    _check_layer(module, kind)
    if isinstance(module, TensorParallelFlatLoraLinear):
        raise RuntimeError("this FlatLoraLinear is already tensor-parallel")
    if mesh.ndim != 1:
        raise ValueError(f"expected a 1-D tensor-parallel mesh, got {mesh.ndim} dimensions (pass mesh['tp'])")
    rows, cols = _shard_ranges(module, kind, mesh.get_local_rank(), mesh.size())  # checks divisibility
    # torch 2.6's styles and distribute_tensor have no src_data_rank (rank 0's data is the source, as its default).
    source = {"src_data_rank": style.src_data_rank} if hasattr(style, "src_data_rank") else {}
    for name, placement in _PLACEMENTS[kind].items():
        param = getattr(module, name)
        if param is not None:
            dist_param = distribute_tensor(param.detach(), mesh, [placement], **source)
            module.register_parameter(name, nn.Parameter(dist_param, requires_grad=param.requires_grad))
    module.__class__ = TensorParallelFlatLoraLinear
    module.style, module.rows, module.cols, module.tp_mesh = kind, rows, cols, mesh
    module._norm_cache, module._checked_rank_key = None, None
    input_layouts, desired, output_layouts = style.input_layouts, style.desired_input_layouts, style.output_layouts
    use_local = style.use_local_output
    module.register_forward_pre_hook(
        lambda mod, inputs: style._prepare_input_fn(input_layouts, desired, mod, inputs, mesh)
    )
    module.register_forward_hook(
        lambda mod, inputs, outputs: style._prepare_output_fn(output_layouts, use_local, mod, outputs, mesh)
    )
    return module


class FlatLoraColwiseParallel(ColwiseParallel):
    """``ColwiseParallel`` for ``FlatLoraLinear``: output rows split, the unsharded layer's eps.

    Same keyword arguments as torch's style (default: input ``Replicate()``, output ``Shard(-1)``,
    ``use_local_output=True``). ``weight``, ``lora_B`` and ``bias`` become ``Shard(0)`` DTensors and
    ``lora_A`` a ``Replicate()`` one whose gradient is summed over the mesh.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return _parallelize(self, module, device_mesh, "colwise")


class FlatLoraRowwiseParallel(RowwiseParallel):
    """``RowwiseParallel`` for ``FlatLoraLinear``: input columns split, partial outputs summed.

    Same keyword arguments as torch's style (default: input ``Shard(-1)``, output ``Replicate()``, i.e.
    one all-reduce of the output; ``Shard(d)`` makes it a reduce-scatter). ``weight`` and ``lora_A``
    become ``Shard(1)`` DTensors, ``lora_B`` and ``bias`` ``Replicate()`` ones.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)  # what RowwiseParallel sets for nn.Linear
        return _parallelize(self, module, device_mesh, "rowwise")
