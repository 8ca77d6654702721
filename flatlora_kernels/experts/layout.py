"""Which axes of a mixture-of-experts parameter are "out" and "in": the layouts Flat-LoRA knows.

transformers 5 stores a model's experts as 3-D parameters of one experts module, and its
``use_experts_implementation`` class decorator (``transformers.integrations.moe``) records how on
every instance: ``is_transposed`` and ``is_concatenated``. Every experts forward it dispatches to
(eager loop, ``grouped_mm``, ``batched_mm``, ...) reads them the same way:

* ``is_transposed=False`` (Qwen3-MoE, Mixtral, DeepSeek, OLMoE, ...): ``[E, out, in]``, expert ``e``
  computes ``F.linear(x, W[e])``;
* ``is_transposed=True`` (gpt-oss, Aria, ...): ``[E, in, out]``, expert ``e`` computes ``x @ W[e]``.

``gate_up_proj`` (or ``up_proj`` without a gate) maps the hidden size to the (gate, up) features,
concatenated or interleaved, and ``down_proj`` maps back; with either order of gate and up every
output feature is one filter, so the noise does not depend on ``is_concatenated``. PEFT's
``ParamWrapper`` reads the same flag (its "swap in/out features" rule).

A module without these attributes (e.g. Llama 4's ``Llama4TextExperts``, ``[E, in, out]`` with no
flag, which PEFT reads as ``[E, out, in]``) has no known layout and is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["ExpertLayout", "EXPERT_PARAMETERS", "expert_layout"]

#: The expert parameters of transformers' experts modules (their biases are 2-D and not filters' weights).
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLayout:
    """A 3-D expert parameter read as ``num_experts`` weights of ``[out_features, in_features]``."""

    num_experts: int
    out_features: int
    in_features: int
    transposed: bool  #: stored ``[E, in, out]``

    def out_in(self, stack: Tensor) -> Tensor:
        """The ``[E, out, in]`` view of a stack stored in this layout (no copy)."""
        return stack.transpose(1, 2) if self.transposed else stack


def _flags(module: nn.Module) -> tuple[object, object]:
    return getattr(module, "is_transposed", None), getattr(module, "is_concatenated", None)


def expert_layout(module: nn.Module, parameter_name: str) -> ExpertLayout | str:
    """The layout of ``module``'s parameter ``parameter_name``, or why it is not known (a sentence)."""
    what = f"{type(module).__name__}.{parameter_name}"
    param = getattr(module, parameter_name, None)
    if not isinstance(param, Tensor):
        return f"{what} is not a tensor"
    shape = tuple(param.shape)
    if param.dim() != 3:
        return f"{what} is {param.dim()}-D {shape}; Flat-LoRA runs target_parameters on 3-D expert stacks only"
    transposed, concatenated = _flags(module)
    if not (isinstance(transposed, bool) and isinstance(concatenated, bool)):
        return (
            f"{what} {shape} has no known layout: {type(module).__name__} does not carry transformers' experts "
            "layout flags (is_transposed, is_concatenated), so which axis is out and which is in is unknown"
        )
    if parameter_name not in EXPERT_PARAMETERS:
        return f"{what} {shape} is not one of the known expert parameters {EXPERT_PARAMETERS}"
    if getattr(module, "_is_expert_parallel", False):
        return f"{what} is sharded by expert parallelism (the noise is keyed by the expert's index in the full stack)"
    experts = getattr(module, "num_experts", shape[0])
    if experts != shape[0]:
        return f"{what} {shape} holds {shape[0]} experts, its module says num_experts={experts}"
    out_features, in_features = (shape[2], shape[1]) if transposed else (shape[1], shape[2])
    return ExpertLayout(shape[0], out_features, in_features, transposed)
