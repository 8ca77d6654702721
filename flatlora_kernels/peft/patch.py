"""``enable_flat_lora``: train a model's PEFT LoRA layers under Flat-LoRA noise, in place.

It takes any model holding PEFT LoRA layers: a ``PeftModel``, a transformers model after
``model.add_adapter(LoraConfig(...))``, a diffusers model after ``unet.add_adapter(...)``, or a model
given adapters by ``peft.inject_adapter_in_model``. Unlike ``from_peft`` (which swaps PEFT's layers
for ``FlatLoraLinear``), it keeps every PEFT module and Parameter where it is and switches each
accepted ``peft.tuners.lora.Linear`` (over any accepted base, a bitsandbytes ``Linear4bit`` included)
to the subclass ``FlatLoraPeftLinear``, and each ``peft.tuners.lora.bnb.Linear4bit`` (PEFT's QLoRA
layer) to ``FlatLoraPeftLinear4bit`` (``patched_layer.py``, ``patched_layer_4bit.py``), whose training
forward calls the fused op (the 4-bit one over a 4-bit base) with PEFT's own ``lora_A[adapter]``,
``lora_B[adapter]``, ``scaling[adapter]`` and dropout for the layer's active adapter. So
``save_pretrained``, each library's own adapter saving and loading, ``merge_and_unload``, several
adapters and ``Trainer.save_model`` work untouched, and a saved adapter is a plain LoRA adapter. The
per-step noise state lives on the layer as non-persistent buffers (``state_dict`` and saved adapters
do not change); ``FlatLoraSchedule`` drives it.

Adapters added later: a forward pre-hook on the model (``AdapterWatch``) notices, at the first
training forward after the model's adapters or active adapter changed, LoRA layers created since
(``add_adapter`` on new target modules) and patches them too, or names those it cannot patch.

Which layers are accepted is the shared check's decision (``flatlora_kernels.layer_support``).
"""

from __future__ import annotations

import torch
from torch import nn

from .._validation import check_real
from ..experts.support import by_experts_module, is_param_wrapper, param_wrapper_problem
from ..layer_support import UnsupportedLayerError, peft_lora_layer_problem, refuse_or_skip
from ..step_noise import StepNoise, WarnOnce

__all__ = ["enable_flat_lora", "disable_flat_lora", "patched_layers"]

_PATCH_ATTRIBUTES = (
    "flat_lora_adapter", "flat_lora_name", "flat_lora_state", "_flat_lora_problems", "_flat_lora_kind", "sigma", "fused",
)


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


def _is_patched(module: nn.Module) -> bool:
    return isinstance(module, StepNoise) and hasattr(module, "flat_lora_adapter")


def patched_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every PEFT layer patched by ``enable_flat_lora``, in module order."""
    return [(name, m) for name, m in model.named_modules() if _is_patched(m)]


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    lora_layer = _lora_layer_class()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, lora_layer)]


def _active_adapters(model: nn.Module, layers) -> list[str]:
    """The active adapters as the model's library defines them: a property on a ``PeftModel``, a method
    on transformers and diffusers models (which raises while no adapter was added through it); a model
    from ``inject_adapter_in_model`` has neither, and its LoRA layers' own are used."""
    active = getattr(model, "active_adapters", None)
    if callable(active):
        try:
            active = active()
        except ValueError:  # transformers / diffusers: "No adapter loaded" (layers injected another way)
            active = None
    if active is None:
        active = [name for _, layer in layers for name in layer.active_adapters]
    return list(dict.fromkeys([active] if isinstance(active, str) else active))


def _layer_problem(layer: nn.Module, adapter: str) -> str | None:
    """Why ``layer``'s ``adapter`` cannot be patched: the shared check (the experts one for a PEFT
    ``ParamWrapper``), the PEFT class, hooks on the factors."""
    if is_param_wrapper(layer):
        problem = param_wrapper_problem(layer, adapter)
    else:
        problem = peft_lora_layer_problem(layer, adapter, require_frozen=True, in_place=True)
    if problem is None and _patched_class(layer) is None:
        problem = f"it is a PEFT {type(layer).__name__}, which is converted by from_peft, not patched in place"
    if problem is None:
        from .patched_layer import user_hooks

        hooked = [part for part in ("lora_A", "lora_B") if user_hooks(getattr(layer, part)[adapter])]
        if hooked:
            problem = f"its {' and '.join(hooked)}[{adapter!r}] have forward hooks, which the fused op would skip"
    return problem


def _refuse_deepspeed_hooks(name: str, layer: nn.Module) -> None:
    from .patched_layer import deepspeed_hooks

    parts = [layer.get_base_layer(), *layer.lora_A.values(), *layer.lora_B.values()]
    if any(deepspeed_hooks(part) for part in parts):
        raise UnsupportedLayerError(
            f"enable_flat_lora: {name!r} already carries DeepSpeed ZeRO-3's parameter hooks on its base layer or "
            "factors (deepspeed.initialize ran first); the fused op never calls them, so the weights would stay "
            "partitioned. Call enable_flat_lora before deepspeed.initialize (before Trainer.train)"
        )


def _remove_hooks(hooks: dict, hook_type) -> None:
    for key in [key for key, hook in hooks.items() if hook is hook_type or isinstance(hook, hook_type)]:
        del hooks[key]


def _patch(name: str, layer: nn.Module, adapter: str, state, warn_once: WarnOnce) -> None:
    layer.__class__ = _patched_class(layer)
    layer.flat_lora_adapter, layer.flat_lora_name, layer.flat_lora_state = adapter, name, state
    layer.sigma, layer.fused = state.sigma, state.fused
    layer._flat_lora_problems = {adapter: (layer.lora_A[adapter], None)} if adapter in layer.lora_A else {}
    layer._z3_leaf = True  # DeepSpeed ZeRO-3 gathers the whole layer in its hook on the layer (module docstring)
    layer.init_step_noise(_base_weight(layer).device, warn_once)
    from .patched_layer import FlatLoraPeftForward

    if isinstance(layer, FlatLoraPeftForward):
        layer._base_kind(layer.get_base_layer())  # looked up now, so a first call under torch.compile need not


def _base_weight(layer: nn.Module):
    """The frozen weight a patched layer perturbs: its base layer's, or an expert stack (``ParamWrapper``)."""
    return layer.get_param() if is_param_wrapper(layer) else layer.get_base_layer().weight


def _hook_zero3_inputs(layer: nn.Module) -> None:
    from .patched_layer import zero3_input_requires_grad

    # First, so DeepSpeed's own pre-hooks (registered at deepspeed.initialize) see the input it returns.
    layer.register_forward_pre_hook(zero3_input_requires_grad, prepend=True)


class AdapterWatch:
    """Forward pre-hook on the enabled model: when its adapters or active adapter changed since the last
    training forward, patch the LoRA layers created since that hold an active adapter, or name the ones
    that cannot be patched (an error, or a warning under ``skip_unsupported``). The first training
    forward under DeepSpeed ZeRO-3 puts ``zero3_input_requires_grad`` before DeepSpeed's hooks on every
    patched layer (only then: it would cost every other run a hook call per layer). A few attribute
    reads per forward otherwise; skipped while compiling."""

    def __init__(self, state, probe: nn.Module, known: set[tuple[str, str]]) -> None:
        self.state, self.probe, self.known = state, probe, known
        self.key, self.zero3 = None, False

    def _key(self, model: nn.Module):
        config = getattr(model, "peft_config", None)
        return tuple(config) if isinstance(config, dict) else (), tuple(self.probe.active_adapters)

    def __call__(self, model: nn.Module, args) -> None:
        if not model.training or torch.compiler.is_compiling():
            return
        key = self._key(model)
        if key != self.key:
            self.key = key
            self.patch_new_layers(model)
        if not self.zero3 and hasattr(_base_weight(self.probe), "ds_id"):  # a ZeRO-3 parameter
            self.zero3 = True
            for _, layer in patched_layers(model):
                _hook_zero3_inputs(layer)

    def patch_new_layers(self, model: nn.Module) -> None:
        from ..schedule import step_seed

        probe, problems = self.probe, []
        for index, (name, layer) in enumerate(_lora_layers(model)):
            held = [adapter for adapter in layer.active_adapters if adapter in layer.r]
            if _is_patched(layer) or not held or (name, held[0]) in self.known:
                continue
            self.known.add((name, held[0]))
            problem = _layer_problem(layer, held[0])
            if problem is not None:
                problems.append((name, f"adapter {held[0]!r} (added after enable_flat_lora): {problem}"))
                continue
            _patch(name, layer, held[0], self.state, probe.noise_warning)
            if self.zero3:
                _hook_zero3_inputs(layer)
            if probe._noise_driven:  # this step's draw, until the schedule's next step includes the layer
                seed = step_seed(int(probe.noise_seed), 0, index)
                layer.set_noise(seed, float(probe.noise_factor), probe.noise_rank_key,
                                total_steps_known=not probe._noise_waits_for_total_steps)  # fmt: skip
        refuse_or_skip("enable_flat_lora", problems, self.state.skip_unsupported)


def enable_flat_lora(
    peft_model: nn.Module,
    *,
    sigma: float = 0.05,
    fused: bool = True,
    adapter: str | None = None,
    skip_unsupported: bool = False,
):
    """Patch the PEFT LoRA layers of ``peft_model`` to train under Flat-LoRA; returns ``peft_model`` itself.

    ``peft_model``: a ``PeftModel`` or any model with PEFT LoRA layers injected (transformers or diffusers
    ``add_adapter``, ``peft.inject_adapter_in_model``). Every layer holding ``adapter`` (default: the
    one active adapter) must pass the shared check; the noise then follows each layer's active adapter
    (``set_adapter``, adapters added later). Raises ``ValueError`` when there is no PEFT LoRA layer,
    several adapters are active and ``adapter`` is not given, or the model is already patched;
    ``UnsupportedLayerError`` naming every LoRA layer the shared check refuses (DoRA and other variants,
    embedding/conv LoRA, LoRA bias, a quantized base other than bitsandbytes 4-bit, hooks on the base
    layer or the factors, a trainable base weight) unless ``skip_unsupported=True``, which patches the
    others and warns that the named layers train without noise. Drive it with
    ``FlatLoraSchedule(peft_model, total_steps)`` (or ``FlatLoraCallback``); undo with ``disable_flat_lora``.
    """
    from .patched_layer import PatchState

    check_real("sigma", sigma, low=0)
    if patched_layers(peft_model):
        raise ValueError("enable_flat_lora: the model is already converted (call disable_flat_lora first)")
    layers = _lora_layers(peft_model)
    if not layers:
        raise ValueError(
            "enable_flat_lora: no PEFT LoRA layer in the model; add an adapter first (peft.get_peft_model, "
            "model.add_adapter(LoraConfig(...)) in transformers or diffusers, or peft.inject_adapter_in_model)"
        )
    if adapter is None:
        active = _active_adapters(peft_model, layers)
        if len(active) != 1:
            raise ValueError(f"enable_flat_lora: {len(active)} adapters are active ({active}); pass adapter=")
        adapter = active[0]
    targets = [(name, layer) for name, layer in layers if adapter in layer.r]
    if not targets:
        raise ValueError(f"enable_flat_lora: no PEFT LoRA layer holds adapter {adapter!r}")
    for name, layer in layers:
        _refuse_deepspeed_hooks(name, layer)
    problems = {name: _layer_problem(layer, adapter) for name, layer in targets}
    problems = {name: problem for name, problem in problems.items() if problem is not None}
    refuse_or_skip("enable_flat_lora", by_experts_module(problems, targets), skip_unsupported)
    state, warn_once = PatchState(sigma, fused, skip_unsupported), WarnOnce()
    for name, layer in layers:
        if name in problems:
            continue
        # A layer of another adapter only is patched too when it passes the check for one of its adapters,
        # so the noise follows set_adapter there; the ones left are named when their adapter is active.
        if adapter in layer.r or _layer_problem(layer, next(iter(layer.r))) is None:
            _patch(name, layer, adapter, state, warn_once)
    patched = patched_layers(peft_model)
    if patched:  # (none when skip_unsupported left out every layer)
        known = {(name, adapter) for name in problems}
        peft_model.register_forward_pre_hook(AdapterWatch(state, patched[0][1], known))
    return peft_model


def disable_flat_lora(peft_model: nn.Module):
    """Undo ``enable_flat_lora``: the layers are PEFT's own classes again. Returns the model."""
    from .patched_layer import zero3_input_requires_grad

    layers = patched_layers(peft_model)
    if not layers:
        raise ValueError("disable_flat_lora: the model has no layer patched by enable_flat_lora")
    for _, layer in layers:
        layer.remove_step_noise()
        for name in (*_PATCH_ATTRIBUTES, "_z3_leaf"):
            layer.__dict__.pop(name, None)
        _remove_hooks(layer._forward_pre_hooks, zero3_input_requires_grad)
        layer.__class__ = layer.peft_class
    _remove_hooks(peft_model._forward_pre_hooks, AdapterWatch)
    return peft_model
