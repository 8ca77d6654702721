"""Which PEFT ``target_parameters`` LoRA layers (``ParamWrapper``) Flat-LoRA can run, and their refusals.

PEFT wraps each targeted parameter of a module in its own ``ParamWrapper``; two parameters of one
experts module are two nested wrappers (``experts`` and ``experts.base_layer``) over the one module.
A refusal names that module once, with the parameters it would have run (``by_experts_module``).
This module never imports peft: PEFT's classes are recognised by name.
"""

from __future__ import annotations

from torch import nn

from .layout import ExpertLayout, expert_layout

__all__ = ["is_param_wrapper", "param_wrapper_layout", "param_wrapper_problem", "by_experts_module"]

_FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def is_param_wrapper(layer: nn.Module) -> bool:
    """PEFT's ``lora.ParamWrapper`` (``LoraConfig(target_parameters=...)``), or a subclass of it."""
    return any(c.__name__ == "ParamWrapper" and c.__module__.startswith("peft.") for c in type(layer).__mro__)


def param_wrapper_layout(layer: nn.Module) -> ExpertLayout | str:
    """The layout of the parameter ``layer`` wraps, or why it is not known."""
    return expert_layout(layer.get_base_layer(), layer.parameter_name)


def param_wrapper_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why Flat-LoRA cannot run ``ParamWrapper`` ``layer``'s adapter ``adapter``, or None."""
    layout = param_wrapper_layout(layer)
    if isinstance(layout, str):
        return layout
    param = layer.get_param()
    what = f"{type(layer.get_base_layer()).__name__}.{layer.parameter_name}"
    if str(param.dtype).removeprefix("torch.") not in _FLOAT_DTYPES:
        return f"{what} is {param.dtype} (quantized?); supported: fp32/bf16/fp16/fp64 expert weights"
    if param.requires_grad:
        return f"{what} requires grad (Flat-LoRA trains only the adapter: freeze the base weight)"
    if (layer.in_features, layer.out_features) != (layout.in_features, layout.out_features):
        return (
            f"PEFT reads {what} as in={layer.in_features}, out={layer.out_features}, its layout says "
            f"in={layout.in_features}, out={layout.out_features}"
        )
    if getattr(layer, "lora_variant", {}).get(adapter) is not None or getattr(layer, "lora_bias", {}).get(adapter):
        return f"{what}'s adapter {adapter!r} uses a LoRA variant or a LoRA bias"
    return None


def by_experts_module(problems: dict[str, str], targets: list[tuple[str, nn.Module]]) -> list[tuple[str, str]]:
    """``problems`` (layer name -> why) with the ``ParamWrapper`` entries of one module merged into one,
    named by the outermost wrapper's path and the parameters: each module listed once."""
    merged: dict[int, list] = {}
    listed = []
    for name, layer in targets:
        if name not in problems:
            continue
        if not is_param_wrapper(layer):
            listed.append((name, problems[name]))
            continue
        key = id(layer.get_base_layer())
        if key not in merged:
            merged[key] = [name, [], []]
            listed.append(merged[key])
        merged[key][1].append(layer.parameter_name)
        if problems[name] not in merged[key][2]:
            merged[key][2].append(problems[name])
    return [
        entry if isinstance(entry, tuple)
        else (f"{entry[0]} (target_parameters {', '.join(entry[1])})", "; ".join(entry[2]))
        for entry in listed
    ]
