"""``FlatLoraPeftLinear``: PEFT's LoRA ``Linear`` with Flat-LoRA's training forward.

``enable_flat_lora`` switches a PEFT layer's class to a subclass in place (``disable_flat_lora``
switches it back): every PEFT module and Parameter stays where it is, and being module-level classes
(not patched bound methods) the model pickles, unpickles and deep-copies like a plain PEFT model.
``FlatLoraPeftForward`` is the forward both subclasses share: this module's ``FlatLoraPeftLinear``
(PEFT's ``lora.Linear``, over any accepted base, a hand-built bitsandbytes ``Linear4bit`` included)
and ``patched_layer_4bit.FlatLoraPeftLinear4bit`` (PEFT's ``lora.bnb.Linear4bit``, what PEFT picks
for a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``).

The noise follows the layer's active adapter (PEFT's ``set_adapter``), with that adapter's factors,
scaling and dropout: an adapter added or switched to after enabling trains under the same schedule.
An active adapter the fused op cannot run (DoRA, LoRA bias, ... added later) raises at its first
training forward, or with ``skip_unsupported=True`` warns once naming it and runs PEFT's forward.

DeepSpeed ZeRO-3: a patched layer is marked a ZeRO-3 leaf module (``_z3_leaf``), so DeepSpeed's
pre-forward hook on the layer itself gathers all its parameters (base weight, bias, factors) and puts
no hooks on its children, which the fused op reads without calling them.
This module imports peft, so the package imports it only when a PEFT model is enabled.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import Tensor, nn

from ..layer_support import UnsupportedLayerError, base_layer_kind, kind_named, peft_lora_layer_problem
from ..step_noise import StepNoise
from ..user_warnings import user_stacklevel
from ..variants import variant_of

__all__ = ["FlatLoraPeftForward", "FlatLoraPeftLinear", "PeftLoraLinear", "PatchState", "user_hooks", "deepspeed_hooks",
           "zero3_input_requires_grad"]


class PatchState:
    """What the layers of one ``enable_flat_lora`` call share: its options (for layers patched later too)
    and the warnings already given (once per model and cause). A plain object: it pickles and deep-copies."""

    def __init__(self, sigma: float, fused: bool, skip_unsupported: bool) -> None:
        self.sigma, self.fused, self.skip_unsupported = float(sigma), bool(fused), bool(skip_unsupported)
        self.warned: set = set()

    def warn_once(self, key, message: str) -> None:
        if key not in self.warned and not torch.compiler.is_compiling():
            self.warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())


def _is_deepspeed(hook) -> bool:
    return (getattr(hook, "__module__", None) or "").startswith("deepspeed")


def _hooks(module: nn.Module) -> list:
    return [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]


def deepspeed_hooks(module: nn.Module) -> bool:
    """``module`` carries DeepSpeed ZeRO-3's parameter-gathering hooks."""
    return any(_is_deepspeed(hook) for hook in _hooks(module))


def user_hooks(module: nn.Module) -> bool:
    """``module`` has forward hooks (or a forward replaced on the instance) that are not DeepSpeed's."""
    return "forward" in vars(module) or any(not _is_deepspeed(hook) for hook in _hooks(module))


def zero3_input_requires_grad(layer: nn.Module, args):
    """Forward pre-hook of a patched layer under ZeRO-3 (``patch.AdapterWatch`` puts it before DeepSpeed's):
    an input that does not require grad (the first layers over frozen embeddings) gets a ``requires_grad``
    alias. DeepSpeed reduces a leaf module's gradients in a full backward hook, which fires before the
    module's backward when no input requires grad, so the factors' gradients would arrive after it
    reduced and freed them."""
    x = args[0] if args else None
    if not isinstance(x, Tensor) or x.requires_grad or not layer.training or not torch.is_grad_enabled():
        return None
    if not hasattr(getattr(layer.get_base_layer(), "weight", None), "ds_id"):  # not a ZeRO-3 parameter
        return None
    return (x.detach().requires_grad_(True), *args[1:])


class _BaseWeightGradient(torch.autograd.Function):
    """The identity on ``y``, whose backward also gives a trainable base weight its gradient
    ``dL/dW = g^T x`` (the fused op treats W as frozen; eps is a constant, as in the op)."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        ctx.weight_dtype = weight.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        d_weight = grad.reshape(-1, grad.shape[-1]).to(x2.dtype).t() @ x2
        return grad, None, d_weight.to(ctx.weight_dtype)


class FlatLoraPeftForward(StepNoise):
    """The forward of a PEFT LoRA layer whose active adapter trains under Flat-LoRA noise.

    PEFT's own forward runs whenever Flat-LoRA does not apply: disabled adapters, merged layers,
    mixed-batch ``adapter_names``, extra arguments, no active adapter held by this layer, and
    evaluation over a base whose kind evaluates with its own forward. The base's kind
    (``layer_support``) runs the fused op; a kind with ``eval_runs_op`` (a bitsandbytes 4-bit base)
    also evaluates with it, at sigma 0 (plain QLoRA; the base alone at scaling 0, with adapters
    disabled), instead of ``base_layer(x)``, whose eval forward repacks the base in place on CPUs with
    AVX512-BF16 (a layout the Flat-QLoRA op does not read).
    """

    flat_lora_adapter: str  #: the adapter ``enable_flat_lora`` was asked for (the noise follows the active one)
    flat_lora_name: str  #: the layer's name in the enabled model, for messages
    flat_lora_state: PatchState
    _flat_lora_problems: dict  #: adapter -> (its lora_A module, why the fused op cannot run it or None)
    peft_class: type  #: the PEFT class ``disable_flat_lora`` switches back to

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.merged or args or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        kind = self._base_kind(base)
        if kind is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.flat_lora_name!r}: its base layer ({type(base).__name__}) was replaced "
                "after enable_flat_lora by a layer Flat-LoRA cannot run; call disable_flat_lora first"
            )
        factors = self.lora_A
        held = [name for name in self.active_adapters if name in factors]
        adapter = held[0] if len(held) == 1 and self._runs(held[0], warn=False) else None
        if kind.eval_runs_op and not self.training:
            if self.disable_adapters:
                return self._eval_with_op(kind, base, x, next(iter(factors)), scaling=0.0)  # the base alone
            if adapter is not None:
                return self._eval_with_op(kind, base, x, adapter, scaling=self.scaling[adapter])
        if not self.training or self.disable_adapters or not held:
            return super().forward(x, *args, **kwargs)
        if len(held) > 1:
            self.flat_lora_state.warn_once(
                ("several", tuple(held)),
                f"enable_flat_lora: adapters {held} are active together in {self.flat_lora_name!r} (and maybe other "
                "layers); the fused op runs one adapter, so they train with PEFT's forward, without noise. "
                "Activate one adapter to train it under Flat-LoRA",
            )
            return super().forward(x, *args, **kwargs)
        if adapter is None:
            self._runs(held[0], warn=True)  # raises, or warns once (skip_unsupported)
            return super().forward(x, *args, **kwargs)
        self._check_unhooked(base, adapter)
        variant = variant_of(self, adapter)
        if variant is None:
            raise RuntimeError(
                f"{type(self).__name__} {self.flat_lora_name!r}: adapter {adapter!r} got a LoRA variant with no "
                "Flat-LoRA implementation after enable_flat_lora; call disable_flat_lora first"
            )
        lora_A, lora_B, scaling = factors[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        y = variant.training_forward(self, adapter, x, partial(self._fused_op, kind, base), lora_A, lora_B,
                                     scaling, self.lora_dropout[adapter])  # fmt: skip
        base_weight = getattr(base, "weight", None)
        if isinstance(base_weight, nn.Parameter) and base_weight.requires_grad and base_weight.is_floating_point():
            # unfrozen after enabling: PEFT's forward trains it, so this one does too
            weight = base_weight.t() if self.fan_in_fan_out else base_weight
            y = _BaseWeightGradient.apply(y, x, weight)
        return y

    def _base_kind(self, base):
        """The base layer's kind, looked up again only when the base layer object changed: the lookup reads
        class and module names, which torch.compile (torch 2.13) cannot trace without a graph break. The
        cache keeps the kind's name, not the kind (whose functions would stop the model from pickling)."""
        cached = self.__dict__.get("_flat_lora_kind")
        if cached is None or cached[0] is not base:
            kind = base_layer_kind(base)
            cached = self.__dict__["_flat_lora_kind"] = (base, None if kind is None else kind.name)
        return None if cached[1] is None else kind_named(cached[1])

    def _fused_op(self, kind, base, x: Tensor, lora_A: Tensor, lora_B: Tensor, **noise) -> Tensor:
        return kind.run(base, x, lora_A, lora_B, name=type(self).__name__, **noise)

    def _runs(self, adapter: str, warn: bool) -> bool:
        """Whether the fused op can run ``adapter`` here (checked once per adapter); with ``warn``, an
        adapter it cannot run raises, or under ``skip_unsupported`` warns once, naming it."""
        factor = self.lora_A[adapter]
        checked = self._flat_lora_problems.get(adapter)
        if checked is None or checked[0] is not factor:  # an adapter re-added under the same name is checked anew
            checked = self._flat_lora_problems[adapter] = (factor, peft_lora_layer_problem(self, adapter, bypasses_forward=False))
        problem = checked[1]
        if problem is None or not warn:
            return problem is None
        message = (
            f"enable_flat_lora: cannot train adapter {adapter!r} of {self.flat_lora_name!r} under Flat-LoRA: {problem}"
        )
        if not self.flat_lora_state.skip_unsupported:
            raise UnsupportedLayerError(message + " (enable_flat_lora(..., skip_unsupported=True) trains it as plain PEFT)")
        self.flat_lora_state.warn_once(("unsupported", self.flat_lora_name, adapter), message + "; it trains without noise")
        return False

    def _eval_with_op(self, kind, base, x: Tensor, adapter: str, scaling: float) -> Tensor:
        """Evaluation by the base kind's op at sigma 0 (plain LoRA; at scaling 0 the base alone),
        never ``base_layer(x)``."""
        self._check_unhooked(base, adapter)
        return self._fused_op(kind, base, x, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                              scaling=scaling, sigma=0.0, seed=0, backend=self._op_backend())  # fmt: skip

    def _check_unhooked(self, base, adapter: str) -> None:
        """The fused op calls neither the base layer nor ``lora_A`` / ``lora_B``: hooks on them would be skipped."""
        parts = (("its base layer", base), ("lora_A", self.lora_A[adapter]), ("lora_B", self.lora_B[adapter]))
        for role, module in parts:
            if not (module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__):
                continue  # the common case, checked cheaply on every training forward
            role = role if module is base else f"its {role}[{adapter!r}]"
            if deepspeed_hooks(module):
                raise RuntimeError(
                    f"{type(self).__name__} {self.flat_lora_name!r}: {role} carries DeepSpeed ZeRO-3's parameter "
                    "hooks, which the fused op would skip (the weights would stay partitioned). Call enable_flat_lora "
                    "before deepspeed.initialize (before Trainer.train), so DeepSpeed gathers the whole layer"
                )
            if user_hooks(module):
                raise RuntimeError(
                    f"{type(self).__name__} {self.flat_lora_name!r}: {role} ({type(module).__name__}) got forward "
                    "hooks or a replaced forward after enable_flat_lora; the fused op never calls it, so they would "
                    "be skipped. Remove them, or call disable_flat_lora first"
                )

    def _get_name(self) -> str:
        # PEFT's class name in repr and get_layer_status()'s module_type: what users and tools print stays PEFT's
        return self.peft_class.__name__

    def extra_repr(self) -> str:
        return f"flat_lora_adapter={self.flat_lora_adapter!r}, sigma={self.sigma}, fused={self.fused}"


class FlatLoraPeftLinear(FlatLoraPeftForward, PeftLoraLinear):
    """PEFT's ``lora.Linear`` under Flat-LoRA (``FlatLoraPeftForward``)."""

    peft_class = PeftLoraLinear
