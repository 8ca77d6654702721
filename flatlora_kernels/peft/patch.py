"""``enable_flat_lora``: train an existing ``PeftModel``'s LoRA layers under Flat-LoRA noise, in place.

Unlike ``from_peft`` (which swaps PEFT's layers for ``FlatLoraLinear``), this keeps every PEFT module
and Parameter where it is and switches each accepted ``peft.tuners.lora.Linear`` (over any accepted
base, a bitsandbytes ``Linear4bit`` included) to the subclass ``FlatLoraPeftLinear``, and each
``peft.tuners.lora.bnb.Linear4bit`` (PEFT's QLoRA layer) to ``FlatLoraPeftLinear4bit``
(``patched_layer.py``, ``patched_layer_4bit.py``), whose training forward calls the fused op (the
4-bit one over a 4-bit base) with PEFT's own ``lora_A[adapter]``, ``lora_B[adapter]``,
``scaling[adapter]`` and dropout. So ``save_pretrained``,
``merge_and_unload``, several adapters and ``Trainer.save_model`` work untouched, and a saved adapter
is a plain LoRA adapter. The per-step noise state lives on the layer as non-persistent buffers
(``state_dict`` and saved adapters do not change); ``FlatLoraSchedule`` drives it.

Which layers are accepted is the shared check's decision (``flatlora_kernels.layer_support``).
"""

from __future__ import annotations

from torch import nn

from .._validation import check_real
from ..experts.support import by_experts_module, is_param_wrapper, param_wrapper_problem
from ..layer_support import peft_lora_layer_problem, refuse_or_skip
from ..step_noise import StepNoise, WarnOnce

__all__ = ["enable_flat_lora", "disable_flat_lora", "patched_layers"]


def _lora_layer_class():
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as error:
        raise ImportError("enable_flat_lora needs the peft package: pip install peft") from error
    return LoraLayer


def _patched_class(layer: nn.Module):
    """The Flat-LoRA subclass of ``layer``'s PEFT class, or None when that class is not patched in place:
    PEFT's ``lora.Linear``, and ``lora.bnb.Linear4bit`` (imported only when met: it needs bitsandbytes)."""
    cls = type(layer)
    if cls.__module__ == "peft.tuners.lora.layer" and cls.__name__ == "Linear":
        from .patched_layer import FlatLoraPeftLinear

        return FlatLoraPeftLinear
    if cls.__module__ == "peft.tuners.lora.bnb" and cls.__name__ == "Linear4bit":
        from .patched_layer_4bit import FlatLoraPeftLinear4bit

        return FlatLoraPeftLinear4bit
    if is_param_wrapper(layer):  # LoraConfig(target_parameters=...) on an expert stack
        from ..experts.peft_wrapper import FlatLoraParamWrapper

        return FlatLoraParamWrapper
    return None


def patched_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every PEFT layer patched by ``enable_flat_lora``, in module order."""
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, StepNoise) and hasattr(m, "flat_lora_adapter")
    ]


def _active_adapter(peft_model: nn.Module) -> str:
    active = getattr(peft_model, "active_adapters", None) or [getattr(peft_model, "active_adapter", "default")]
    if len(active) != 1:
        raise ValueError(f"enable_flat_lora: several adapters are active ({active}); pass adapter=")
    return active[0]


def enable_flat_lora(
    peft_model: nn.Module,
    *,
    sigma: float = 0.05,
    fused: bool = True,
    adapter: str | None = None,
    skip_unsupported: bool = False,
):
    """Patch every LoRA layer of ``peft_model``'s active adapter (or ``adapter``) to train under Flat-LoRA.

    Returns ``peft_model`` itself. Raises ``UnsupportedLayerError`` naming every LoRA layer the
    shared check refuses (DoRA and other variants, embedding/conv LoRA, LoRA bias, a quantized base
    other than bitsandbytes 4-bit, a base layer with hooks or its own forward, a trainable base weight) unless
    ``skip_unsupported=True``, which patches the others and warns that the named layers train
    without noise; raises ``ValueError`` when the model is already patched ("already converted").
    Drive it with ``FlatLoraSchedule(peft_model, total_steps)`` (or ``FlatLoraCallback``); undo with
    ``disable_flat_lora``.
    """
    lora_layer = _lora_layer_class()
    check_real("sigma", sigma, low=0)
    if patched_layers(peft_model):
        raise ValueError("enable_flat_lora: the model is already converted (call disable_flat_lora first)")
    adapter = _active_adapter(peft_model) if adapter is None else adapter
    targets = [(name, m) for name, m in peft_model.named_modules() if isinstance(m, lora_layer) and adapter in m.r]
    if not targets:
        raise ValueError(f"enable_flat_lora: no PEFT LoRA layer holds adapter {adapter!r}")
    problems = {}
    for name, layer in targets:
        if is_param_wrapper(layer):
            problem = param_wrapper_problem(layer, adapter)
        else:
            problem = peft_lora_layer_problem(layer, adapter, require_frozen=True, in_place=True)
        if problem is None and _patched_class(layer) is None:
            problem = f"it is a PEFT {type(layer).__name__}, which is converted by from_peft, not patched in place"
        if problem is not None:
            problems[name] = problem
    refuse_or_skip("enable_flat_lora", by_experts_module(problems, targets), skip_unsupported)
    warn_once = WarnOnce()
    for name, layer in targets:
        if name in problems:
            continue
        layer.__class__ = _patched_class(layer)
        layer.flat_lora_adapter, layer.sigma, layer.fused = adapter, float(sigma), bool(fused)
        weight = layer.get_param() if is_param_wrapper(layer) else layer.get_base_layer().weight
        layer.init_step_noise(weight.device, warn_once)
    return peft_model


def disable_flat_lora(peft_model: nn.Module):
    """Undo ``enable_flat_lora``: the layers are PEFT's own classes again. Returns the model."""
    layers = patched_layers(peft_model)
    if not layers:
        raise ValueError("disable_flat_lora: the model has no layer patched by enable_flat_lora")
    for _, layer in layers:
        layer.remove_step_noise()
        for name in ("flat_lora_adapter", "sigma", "fused"):
            delattr(layer, name)
        layer.__class__ = layer.peft_class
    return peft_model
