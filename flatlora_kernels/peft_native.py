"""``enable_flat_lora``: train an existing ``PeftModel``'s LoRA layers under Flat-LoRA noise, in place.

Unlike ``from_peft`` (which swaps PEFT's layers for ``FlatLoraLinear``), this keeps every PEFT module
and Parameter where it is and only replaces the ``forward`` of each ``peft.tuners.lora.Linear`` (over an
``nn.Linear`` or GPT-2's ``Conv1D``) by one that calls the fused op with PEFT's own ``lora_A[adapter]``,
``lora_B[adapter]``, ``scaling[adapter]`` and dropout. So ``save_pretrained``, ``merge_and_unload``,
several adapters and ``Trainer.save_model`` work untouched, and a saved adapter is a plain LoRA adapter.

The patched forward falls back to PEFT's own forward whenever Flat-LoRA does not apply: eval mode,
disabled adapters, merged layers, mixed-batch ``adapter_names``, or an active adapter other than the
one enabled. The per-step noise state lives in a ``PeftNoiseState`` child (non-persistent buffers, so
``state_dict`` and saved adapters do not change), which ``FlatLoraSchedule`` drives like a
``FlatLoraLinear``.

Conv1D stores its weight as ``[in, out]``; the op gets ``weight.t()`` (a view, no copy), so noise rows
are output features, as for ``nn.Linear``.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import Tensor, nn

from ._validation import check_real
from .functional import flat_lora_linear
from .modules import dropout_correction, user_stacklevel
from .step_noise import StepNoise

__all__ = ["enable_flat_lora", "disable_flat_lora", "PeftNoiseState", "peft_noise_states"]

_STATE = "flatlora_noise"


class PeftNoiseState(StepNoise):
    """The noise state of one patched PEFT layer: ``noise_seed``/``noise_factor`` as in ``FlatLoraLinear``."""

    def __init__(self, adapter: str, sigma: float, fused: bool, device) -> None:
        super().__init__()
        self.adapter = adapter
        self.sigma = float(sigma)
        self.fused = bool(fused)
        self._init_step_noise(device)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter!r}, sigma={self.sigma}, fused={self.fused}"


def _peft_lora_classes():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError as error:
        raise ImportError("enable_flat_lora needs the peft package: pip install peft") from error
    return LoraLayer, PeftLinear


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _check_layer(name: str, layer, adapter: str, peft_linear) -> None:
    """Raise naming the layer when its PEFT variant is one the fused op does not compute."""
    problems = []
    if type(layer) is not peft_linear:
        problems.append(f"it is a {type(layer).__name__} (only LoRA Linear and Conv1D layers are supported)")
    else:
        base = layer.get_base_layer()
        conv1d = _conv1d_class()
        if not (isinstance(base, nn.Linear) or (conv1d is not None and isinstance(base, conv1d))):
            problems.append(f"its base layer is a {type(base).__name__} (e.g. quantized), not nn.Linear or Conv1D")
        elif base.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            problems.append(f"its base weight has dtype {base.weight.dtype} (quantized?)")
        if adapter in getattr(layer, "lora_variant", {}):
            problems.append(f"it uses a LoRA variant ({type(layer.lora_variant[adapter]).__name__}, e.g. DoRA)")
        if getattr(layer, "lora_bias", {}).get(adapter, False):
            problems.append("it has a LoRA bias (lora_bias=True)")
    if problems:
        raise ValueError(f"enable_flat_lora: cannot patch {name!r} for adapter {adapter!r}: " + "; ".join(problems))


def _flat_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """PEFT's LoRA forward with the active adapter's branch and the noise folded into one fused op."""
    state: PeftNoiseState = getattr(self, _STATE)
    active = self.active_adapters
    if (
        not self.training
        or self.disable_adapters
        or self.merged
        or args
        or kwargs.get("adapter_names") is not None
        or list(active) != [state.adapter]
    ):
        return self._flatlora_peft_forward(x, *args, **kwargs)
    if not state._noise_driven and state.sigma > 0 and not torch.compiler.is_compiling():
        warnings.warn(
            "enable_flat_lora: a patched PEFT layer is training with no noise (no FlatLoraSchedule drives it). "
            "Create flatlora_kernels.FlatLoraSchedule(peft_model, total_steps) and call .step() after each "
            "optimizer step.",
            stacklevel=user_stacklevel(),
        )
        for other in self._flatlora_siblings():
            other._noise_driven = True  # warn once per model
    adapter = state.adapter
    base = self.get_base_layer()
    weight = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D: [in, out] -> view [out, in]
    lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    scaling = self.scaling[adapter]
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        # PEFT's forward fails here too (in its base layer): the same error in train and eval.
        raise RuntimeError(
            f"enable_flat_lora: input dtype {x.dtype} differs from the base weight dtype {weight.dtype} "
            "(cast the input or the model, or run under torch.autocast)"
        )
    x_in = x
    y = flat_lora_linear(
        x_in,
        weight,
        lora_A.to(weight.dtype) if lora_A.dtype != weight.dtype else lora_A,
        lora_B.to(weight.dtype) if lora_B.dtype != weight.dtype else lora_B,
        base.bias,
        scaling=scaling,
        sigma=state.effective_sigma(),
        seed=state.effective_seed(),
        backend="auto" if state.fused else "reference",
    )
    dropout = self.lora_dropout[adapter]
    if isinstance(dropout, nn.Dropout) and dropout.p > 0:
        y = y + dropout_correction(x_in, dropout, lora_A, lora_B, scaling).to(y.dtype)
    return y


def _patched_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(getattr(m, _STATE, None), PeftNoiseState)]


def peft_noise_states(model: nn.Module) -> list[PeftNoiseState]:
    """The noise states of the PEFT layers patched by ``enable_flat_lora``, in module order."""
    return [getattr(m, _STATE) for _, m in _patched_layers(model)]


def enable_flat_lora(peft_model: nn.Module, *, sigma: float = 0.05, fused: bool = True, adapter: str | None = None):
    """Patch every LoRA layer of ``peft_model``'s active adapter (or ``adapter``) to train under Flat-LoRA.

    Returns ``peft_model`` itself. Raises ``ValueError`` naming the first layer PEFT built with a
    variant the fused op cannot run (DoRA, embedding/conv LoRA, LoRA bias, quantized base), and when
    the model is already patched ("already converted"). Drive it with
    ``FlatLoraSchedule(peft_model, total_steps)`` (or ``FlatLoraCallback``); undo with ``disable_flat_lora``.
    """
    LoraLayer, peft_linear = _peft_lora_classes()
    check_real("sigma", sigma, low=0)
    if _patched_layers(peft_model):
        raise ValueError("enable_flat_lora: the model is already converted (call disable_flat_lora first)")
    if adapter is None:
        active = getattr(peft_model, "active_adapters", None) or [getattr(peft_model, "active_adapter", "default")]
        if len(active) != 1:
            raise ValueError(f"enable_flat_lora: several adapters are active ({active}); pass adapter=")
        adapter = active[0]
    targets = [
        (name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLayer) and adapter in m.r  # r covers Linear and embedding layers
    ]
    if not targets:
        raise ValueError(f"enable_flat_lora: no PEFT LoRA layer holds adapter {adapter!r}")
    for name, layer in targets:
        _check_layer(name, layer, adapter, peft_linear)
    siblings: list[PeftNoiseState] = []
    for name, layer in targets:
        state = PeftNoiseState(adapter, sigma, fused, layer.get_base_layer().weight.device)
        layer.add_module(_STATE, state)
        siblings.append(state)
        layer._flatlora_peft_forward = layer.forward  # PEFT's bound forward, put back by disable_flat_lora
        layer.forward = types.MethodType(_flat_forward, layer)
        layer._flatlora_siblings = lambda: siblings
    return peft_model


def disable_flat_lora(peft_model: nn.Module):
    """Undo ``enable_flat_lora``: PEFT's forward is back and the noise states are gone. Returns the model."""
    layers = _patched_layers(peft_model)
    if not layers:
        raise ValueError("disable_flat_lora: the model has no layer patched by enable_flat_lora")
    for _, layer in layers:
        del layer.forward  # the instance attribute; the class's forward shows through again
        del layer._flatlora_peft_forward, layer._flatlora_siblings
        delattr(layer, _STATE)
    return peft_model
