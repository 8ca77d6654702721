"""Which layers Flat-LoRA can run: the one check behind every entry point.

``apply_flat_lora``, ``FlatLoraLinear.from_linear``, ``from_peft``, ``enable_flat_lora``, the
tensor-parallel styles and FMLoRA/EFMLoRA all ask this module, so they accept and refuse the same
layers, and a refusal names the layer, says why and lists what is supported (README's
"What is and is not supported" is this module's list).

Base layers are recognised by the kinds in ``BASE_LAYER_KINDS`` (first match wins): ``nn.Linear`` and
transformers' ``Conv1D`` (float weights, declared here), and whatever a base format registers from
above: ``flatlora_kernels.quantized`` registers bitsandbytes' 4-bit ``Linear4bit`` (NF4/FP4, run by
Flat-QLoRA) when the package loads. A module of no kind is refused with the most specific reason
found: another quantized layer (bitsandbytes ``Linear8bitLt``, torchao, integer or float8 weights;
recognised by class, module or weight dtype), an embedding, a convolution, or another module.

A kind runs its layer: ``BaseLayerKind.run(base, x, lora_A, lora_B, ...)`` is the fused forward over
the base's weight (``fused_forward``; by default ``lora_forward.float_weight_forward`` on its float
weight), what the patched PEFT layers' training (and, with ``eval_runs_op``, evaluation) forward
calls. To support a new base kind, register it with ``register_base_layer_kind``: also its
``flat_layer(base, **config)`` (``config`` as ``FlatLoraLinear.from_linear``'s keywords; it returns a
``FlatLoraLinear`` subclass) builds the layer ``apply_flat_lora`` / ``from_peft`` /
``FlatLoraLinear.from_linear`` put in the base's place (``model_conversion.build_flat_layer``).
PEFT's LoRA layer over such a base (any LoRA layer with linear factors) is then accepted too.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .lora_forward import float_weight_forward
from .variants import variant_of

__all__ = [
    "UnsupportedLayerError",
    "BaseLayerKind",
    "BASE_LAYER_KINDS",
    "kind_named",
    "register_base_layer_kind",
    "base_layer_kind",
    "looks_linear",
    "base_layer_problem",
    "check_base_layer",
    "peft_lora_layer_problem",
    "refuse_or_skip",
    "supported_layers",
]

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class UnsupportedLayerError(ValueError):
    """A layer Flat-LoRA cannot run; the message names it and lists what is supported."""


@dataclass(frozen=True)
class BaseLayerKind:
    """One kind of base layer Flat-LoRA runs.

    ``name`` is how messages and README call it; ``matches(module)`` recognises it; ``fan_in_fan_out``
    says the weight is stored ``[in, out]`` (the op gets ``weight.t()``, a view); ``base_forward`` is
    the class's forward the fused path replaces (a subclass overriding it is refused: its forward
    would be skipped); ``flat_layer(base, **config)`` builds the replacing layer (None:
    ``FlatLoraLinear.from_linear``); ``patch_in_place``: ``enable_flat_lora`` can run it;
    ``problem(module, bypasses_forward)``: why this layer of the kind cannot run (e.g. a 4-bit weight
    not quantized yet), or None; ``fused_forward(base, x, lora_A, lora_B, *, scaling, sigma, seed,
    backend, name)``: the fused op over the base's weight and bias (None: its float weight's,
    ``float_weight_forward``); ``eval_runs_op``: evaluation runs that op at sigma 0 instead of the
    base's own forward (a 4-bit base: its eval forward may repack the weight in place).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    fan_in_fan_out: bool = False
    base_forward: Callable | None = None
    flat_layer: Callable[..., nn.Module] | None = None
    patch_in_place: bool = True
    problem: Callable[[nn.Module, bool], str | None] | None = None
    fused_forward: Callable[..., Tensor] | None = None
    eval_runs_op: bool = False

    def run(self, base: nn.Module, x: Tensor, lora_A: Tensor, lora_B: Tensor, *, scaling: float, sigma, seed,
            backend: str, name: str) -> Tensor:  # fmt: skip
        """``x (W + s*B@A + eps)^T + bias`` with ``base``'s weight and bias, the adapters under PEFT's
        dtype rule; bad input raises naming ``name``."""
        noise = dict(scaling=scaling, sigma=sigma, seed=seed, backend=backend, name=name)
        if self.fused_forward is not None:
            return self.fused_forward(base, x, lora_A, lora_B, **noise)
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        return float_weight_forward(x, weight, base.bias, lora_A, lora_B, **noise)


def quantization_of(module: nn.Module) -> str | None:
    """What makes ``module`` a quantized layer (class, module or weight), or None."""
    cls = type(module)
    if cls.__module__.split(".")[0] in ("bitsandbytes", "torchao") or cls.__name__ in ("Linear4bit", "Linear8bitLt"):
        return f"a quantized layer ({cls.__module__}.{cls.__name__})"
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor):
        wcls = type(weight)
        if wcls.__module__.split(".")[0] in ("bitsandbytes", "torchao") or "quantized" in wcls.__name__.lower():
            return f"a quantized weight ({wcls.__module__}.{wcls.__name__})"
        if weight.dtype not in _WEIGHT_DTYPES:
            return f"a {weight.dtype} weight (quantized?)"
    if "quantized" in cls.__module__.lower() or "quantized" in cls.__name__.lower():
        return f"a quantized layer ({cls.__module__}.{cls.__name__})"
    return None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family), ``y = x @ W + b`` with W: [in, out]; recognised without importing it.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor)


LINEAR = BaseLayerKind(
    "nn.Linear", lambda m: isinstance(m, nn.Linear) and quantization_of(m) is None, base_forward=nn.Linear.forward
)
CONV1D = BaseLayerKind(
    "transformers Conv1D (GPT-2)", lambda m: _is_conv1d(m) and quantization_of(m) is None, fan_in_fan_out=True
)


#: Recognised base-layer kinds, first match wins (``register_base_layer_kind`` puts new ones first).
BASE_LAYER_KINDS: list[BaseLayerKind] = [LINEAR, CONV1D]


def register_base_layer_kind(kind: BaseLayerKind, *, first: bool = True) -> None:
    """Accept a new kind of base layer everywhere: tried before the kinds already known, or after them
    (``first=False``, how the package's own formats register, so messages list the float kinds first)."""
    if first:
        BASE_LAYER_KINDS.insert(0, kind)
    else:
        BASE_LAYER_KINDS.append(kind)


def base_layer_kind(module: nn.Module) -> BaseLayerKind | None:
    return next((kind for kind in BASE_LAYER_KINDS if kind.matches(module)), None)


def kind_named(name: str) -> BaseLayerKind:
    """The registered kind called ``name``."""
    for kind in BASE_LAYER_KINDS:
        if kind.name == name:
            return kind
    raise KeyError(f"no base layer kind named {name!r}")


def looks_linear(module: nn.Module) -> bool:
    """A layer ``target_modules="all-linear"`` considers: a known kind, or any linear layer, quantized
    ones included (which the check then refuses by name rather than leaving them out silently)."""
    return base_layer_kind(module) is not None or isinstance(module, nn.Linear) or _is_conv1d(module)


def supported_layers() -> str:
    """The supported set, as every refusal states it."""
    kinds = ", ".join(kind.name for kind in BASE_LAYER_KINDS)
    return (
        f"supported: plain LoRA (no DoRA or other variant without a Flat-LoRA implementation, no lora_bias) over a "
        f"frozen base layer of kind {kinds}, "
        "with float weights (fp32/bf16/fp16/fp64) or, for Linear4bit, quantized 4-bit weights, no forward hooks "
        "and no forward of its own"
    )


def _not_a_kind(module: nn.Module) -> str:
    quantized = quantization_of(module)
    if quantized is not None:
        return f"it is {quantized}"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return f"it is an embedding ({type(module).__name__})"
    if isinstance(module, _CONVOLUTIONS):
        return f"it is a convolution ({type(module).__name__})"
    return f"it is a {type(module).__name__}, not a linear layer"


def base_layer_problem(
    module: nn.Module, *, require_frozen: bool = False, bypasses_forward: bool = True, in_place: bool = False
) -> str | None:
    """Why Flat-LoRA cannot run over ``module`` as a base layer, or None.

    ``require_frozen``: the caller does not freeze the weight itself (PEFT models);
    ``bypasses_forward``: the caller never calls the module's forward (the fused paths), so hooks
    and overridden forwards would be skipped; ``in_place``: ``enable_flat_lora``'s patch.
    """
    kind = base_layer_kind(module)
    if kind is None:
        return _not_a_kind(module)
    if in_place and not kind.patch_in_place:
        return f"its kind ({kind.name}) is converted by apply_flat_lora / from_peft, not patched in place"
    if bypasses_forward:
        if kind.base_forward is not None and type(module).forward is not kind.base_forward:
            return f"it is a {type(module).__name__} with a forward of its own, which the fused op would skip"
        if "forward" in vars(module):
            return "its forward is replaced on the instance (e.g. an accelerate hook), which the fused op would skip"
        if module._forward_hooks or module._forward_pre_hooks:
            return "it has forward hooks, which the fused op would skip (it never calls the layer's forward)"
    if require_frozen and getattr(module, "weight", None) is not None and module.weight.requires_grad:
        return "its weight requires grad (Flat-LoRA trains only the adapter: freeze the base weight)"
    if kind.problem is not None:
        return kind.problem(module, bypasses_forward)
    return None


def check_base_layer(entry: str, name: str, module: nn.Module, **options) -> BaseLayerKind:
    """The kind of ``module``; raises ``UnsupportedLayerError`` naming it when it cannot be run."""
    problem = base_layer_problem(module, **options)
    if problem is not None:
        raise UnsupportedLayerError(f"{entry}: cannot run {name!r}: {problem}; {supported_layers()}")
    return base_layer_kind(module)


def peft_lora_layer_problem(layer: nn.Module, adapter: str, **options) -> str | None:
    """Why Flat-LoRA cannot run PEFT LoRA layer ``layer``'s adapter ``adapter``, or None
    (``options`` as ``base_layer_problem``'s, for its base layer). A LoRA variant is refused unless it
    has an implementation (``variants``) and the layer is patched in place (``in_place``)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else None
    if base is not None and base is not layer:
        problem = base_layer_problem(base, **options)
        if problem is not None:
            return f"its base layer: {problem}"
    factors = getattr(layer, "lora_A", {})
    if not (adapter in factors and isinstance(factors[adapter], nn.Linear)):
        if adapter in getattr(layer, "lora_embedding_A", {}):
            return f"it is a PEFT LoRA {type(layer).__name__} (LoRA on an embedding)"
        return f"it is a PEFT {type(layer).__name__} without linear LoRA factors for adapter {adapter!r}"
    variant = getattr(layer, "lora_variant", {}).get(adapter)
    if variant is not None and variant_of(layer, adapter) is None:
        return f"it uses a LoRA variant ({type(variant).__name__}, e.g. DoRA) with no Flat-LoRA implementation"
    if variant is not None and not options.get("in_place", False):
        return (f"it uses a LoRA variant ({type(variant).__name__}, e.g. DoRA), which only enable_flat_lora runs "
                "(it keeps PEFT's modules)")  # fmt: skip
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        return "it has a LoRA bias (lora_bias=True)"
    return None


def refuse_or_skip(entry: str, problems: Iterable[tuple[str, str]], skip_unsupported: bool) -> None:
    """Raise one error naming every unsupported layer, or (``skip_unsupported=True``) warn once, naming
    the layers that keep training without Flat-LoRA."""
    problems = list(problems)
    if not problems:
        return
    listed = "; ".join(f"{name!r}: {why}" for name, why in problems)
    if not skip_unsupported:
        raise UnsupportedLayerError(
            f"{entry}: cannot run {len(problems)} layer(s): {listed}. {supported_layers()}. "
            "Pass skip_unsupported=True to convert the supported layers and leave these as they are"
        )
    warnings.warn(
        f"{entry}: skip_unsupported=True: {len(problems)} layer(s) are left as they are and train without "
        f"Flat-LoRA: {listed}",
        UserWarning,
        stacklevel=3,
    )
