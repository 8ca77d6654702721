"""``from_peft``: turn a PEFT LoRA model into a Flat-LoRA one with the same weights.

Each ``peft.tuners.lora.Linear`` (one adapter, plain LoRA, unmerged, over ``nn.Linear`` or ``Conv1D``)
becomes a ``FlatLoraLinear`` that shares its base weight and bias and takes over its ``lora_A`` /
``lora_B`` Parameters, rank, scaling (PEFT's own value, so rsLoRA, ``alpha_pattern`` and
``set_scale`` carry over) and dropout. At noise factor 0 (the schedule's start) and in eval mode the
outputs equal PEFT's. Other PEFT modules (e.g. ``modules_to_save`` wrappers) are left as they are.

The result is the underlying model (``peft_model.get_base_model()``); the PEFT wrapper no longer
describes it, so save with ``flatlora_kernels.save_peft_adapter`` (a standard PEFT directory) or
``save_adapter``. To keep the ``PeftModel`` itself, use ``enable_flat_lora`` (``peft_native.py``).
"""

from __future__ import annotations

from torch import nn

from .model_helpers import _replace_submodule
from .modules import FlatLoraLinear, _is_conv1d

__all__ = ["from_peft"]


def _peft_lora_linear_class():
    try:
        from peft.tuners.lora import Linear
    except ImportError as error:
        raise ImportError("from_peft needs the peft package: pip install peft") from error
    return Linear


def _convert(name: str, peft_layer, sigma: float, fused: bool) -> FlatLoraLinear:
    adapters = list(peft_layer.lora_A.keys())
    if len(adapters) != 1:
        raise ValueError(f"from_peft: {name!r} holds adapters {adapters}; exactly one LoRA adapter is supported")
    adapter = adapters[0]
    problems = []
    if peft_layer.merged:
        problems.append("its adapter is merged (call unmerge_adapter() first)")
    if peft_layer.disable_adapters:
        problems.append("its adapters are disabled")
    if adapter in getattr(peft_layer, "lora_variant", {}):
        problems.append(f"it uses a LoRA variant ({type(peft_layer.lora_variant[adapter]).__name__}, e.g. DoRA)")
    if getattr(peft_layer, "lora_bias", {}).get(adapter, False):
        problems.append("it has a LoRA bias (lora_bias=True)")
    base = peft_layer.get_base_layer()
    if not (isinstance(base, nn.Linear) or _is_conv1d(base)):
        problems.append(f"its base layer is a {type(base).__name__}, not an nn.Linear or Conv1D")
    if problems:
        raise ValueError(f"from_peft: cannot convert {name!r}: " + "; ".join(problems))

    dropout = peft_layer.lora_dropout[adapter]
    peft_A, peft_B = peft_layer.lora_A[adapter].weight, peft_layer.lora_B[adapter].weight
    layer = FlatLoraLinear.from_linear(
        base,
        r=peft_layer.r[adapter],
        lora_alpha=peft_layer.lora_alpha[adapter],
        sigma=sigma,
        fused=fused,
        lora_dropout=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        use_rslora=peft_layer.use_rslora.get(adapter, False),
        lora_dtype=peft_A.dtype,
    )
    # Take over PEFT's Parameters (same shapes and layout: A [r, in], B [out, r]) and its exact scale.
    layer.lora_A, layer.lora_B = peft_A, peft_B
    layer.scaling = float(peft_layer.scaling[adapter])
    layer.train(peft_layer.training)
    return layer


def from_peft(peft_model: nn.Module, *, sigma: float = 0.05, fused: bool = True) -> nn.Module:
    """Replace PEFT LoRA Linear layers by ``FlatLoraLinear`` (noise level ``sigma``); returns the base model.

    Accepts a ``PeftModel`` or any module containing PEFT LoRA layers. Raises when it finds no
    convertible layer, or one with several adapters, a merged adapter, DoRA or another variant,
    a LoRA bias, or a non-``nn.Linear`` base layer.
    """
    peft_linear = _peft_lora_linear_class()
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, peft_linear)]
    if not found:
        raise ValueError("from_peft: no peft.tuners.lora.Linear layer found in the model")
    converted = [(name, _convert(name, module, sigma, fused)) for name, module in found]
    for name, layer in converted:
        _replace_submodule(model, name, layer)
    return model
