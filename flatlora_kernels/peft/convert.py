"""``from_peft``: turn a PEFT LoRA model into a Flat-LoRA one with the same weights.

Each PEFT LoRA layer the shared check accepts (``flatlora_kernels.layer_support``: one plain LoRA
adapter, unmerged, over an ``nn.Linear``, ``Conv1D`` or bitsandbytes 4-bit ``Linear4bit``) becomes a
``FlatLoraLinear`` (``FlatLoraLinear4bit`` over a 4-bit base) that shares its base and takes over its
``lora_A`` / ``lora_B`` Parameters, rank, scaling (PEFT's own value, so rsLoRA, ``alpha_pattern`` and
``set_scale`` carry over) and dropout. At noise factor 0 (the schedule's start) and in eval mode the
outputs equal PEFT's (to rounding over a 4-bit base, whose op computes in one pass). Other PEFT modules (e.g.
``modules_to_save`` wrappers) are left as they are.

The result is the underlying model (``peft_model.get_base_model()``); the PEFT wrapper no longer
describes it, so save with ``flatlora_kernels.save_peft_adapter`` (a standard PEFT directory) or
``save_adapter``. To keep the ``PeftModel`` itself, use ``enable_flat_lora`` (``patch.py``).
"""

from __future__ import annotations

from torch import nn

from ..experts.support import by_experts_module, is_param_wrapper
from ..layer_support import peft_lora_layer_problem, refuse_or_skip
from ..model_conversion import build_flat_layer, replace_submodule
from ..modules import FlatLoraLinear
from ..step_noise import WarnOnce

__all__ = ["from_peft"]


def _peft_lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as error:
        raise ImportError("from_peft needs the peft package: pip install peft") from error
    return LoraLayer


def _check_state(name: str, peft_layer) -> str:
    """The layer's one adapter; raises when its state (not its kind) stops a conversion."""
    adapters = list(peft_layer.r.keys())
    if len(adapters) != 1:
        raise ValueError(f"from_peft: {name!r} holds adapters {adapters}; exactly one LoRA adapter is supported")
    problems = []
    if peft_layer.merged:
        problems.append("its adapter is merged (call unmerge_adapter() first)")
    if peft_layer.disable_adapters:
        problems.append("its adapters are disabled")
    if problems:
        raise ValueError(f"from_peft: cannot convert {name!r}: " + "; ".join(problems))
    return adapters[0]


def _convert(peft_layer, adapter: str, sigma: float, fused: bool) -> FlatLoraLinear:
    dropout = peft_layer.lora_dropout[adapter]
    peft_A, peft_B = peft_layer.lora_A[adapter].weight, peft_layer.lora_B[adapter].weight
    layer = build_flat_layer(
        peft_layer.get_base_layer(),
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


def from_peft(peft_model: nn.Module, *, sigma: float = 0.05, fused: bool = True, skip_unsupported: bool = False):
    """Replace PEFT LoRA layers by ``FlatLoraLinear`` (noise level ``sigma``); returns the base model.

    Accepts a ``PeftModel`` or any module containing PEFT LoRA layers. Raises when it finds no LoRA
    layer, one with several adapters, a merged or disabled adapter, and ``UnsupportedLayerError``
    naming every layer the shared check refuses (DoRA, LoRA bias, embedding or convolution LoRA,
    a quantized base other than bitsandbytes 4-bit, ...) unless ``skip_unsupported=True``, which
    converts the others and warns that the named layers stay PEFT layers, training without noise.
    """
    lora_layer = _peft_lora_layer_class()
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, lora_layer)]
    if not found:
        raise ValueError("from_peft: no PEFT LoRA layer found in the model")
    adapters = {name: _check_state(name, module) for name, module in found}
    problems = {}
    for name, module in found:
        if is_param_wrapper(module):
            problem = "it is PEFT target_parameters LoRA (a ParamWrapper), which enable_flat_lora trains in place"
        else:
            problem = peft_lora_layer_problem(module, adapters[name], require_frozen=True)
        if problem is not None:
            problems[name] = problem
    refuse_or_skip("from_peft", by_experts_module(problems, found), skip_unsupported)
    warn_once = WarnOnce()
    for name, module in found:
        if name not in problems:
            layer = _convert(module, adapters[name], sigma, fused)
            layer.noise_warning = warn_once
            replace_submodule(model, name, layer)
    return model
