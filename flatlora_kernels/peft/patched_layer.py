"""``FlatLoraPeftLinear``: PEFT's LoRA ``Linear`` with Flat-LoRA's training forward.

``enable_flat_lora`` switches a PEFT layer's class to a subclass in place (``disable_flat_lora``
switches it back): every PEFT module and Parameter stays where it is, and being module-level classes
(not patched bound methods) the model pickles, unpickles and deep-copies like a plain PEFT model.
``FlatLoraPeftForward`` is the forward both subclasses share: this module's ``FlatLoraPeftLinear``
(PEFT's ``lora.Linear``, over any accepted base, a hand-built bitsandbytes ``Linear4bit`` included)
and ``patched_layer_4bit.FlatLoraPeftLinear4bit`` (PEFT's ``lora.bnb.Linear4bit``, what PEFT picks
for a model loaded with ``BitsAndBytesConfig(load_in_4bit=True)``).
This module imports peft, so the package imports it only when a PEFT model is enabled.
"""

from __future__ import annotations

from functools import partial

from peft.tuners.lora import Linear as PeftLoraLinear
from torch import Tensor

from ..layer_support import base_layer_kind
from ..step_noise import StepNoise
from ..variants import variant_of

__all__ = ["FlatLoraPeftForward", "FlatLoraPeftLinear", "PeftLoraLinear"]


class FlatLoraPeftForward(StepNoise):
    """The forward of a PEFT LoRA layer whose adapter ``flat_lora_adapter`` trains under Flat-LoRA noise.

    PEFT's own forward runs whenever Flat-LoRA does not apply: disabled adapters, merged layers,
    mixed-batch ``adapter_names``, extra arguments, active adapters other than the enabled one, and
    evaluation over a base whose kind evaluates with its own forward. The base's kind
    (``layer_support``) runs the fused op; a kind with ``eval_runs_op`` (a bitsandbytes 4-bit base)
    also evaluates with it, at sigma 0 (plain QLoRA; the base alone at scaling 0, with the enabled
    adapter or adapters disabled), instead of ``base_layer(x)``, whose eval forward repacks the base in
    place on CPUs with AVX512-BF16 (a layout the Flat-QLoRA op does not read).
    """

    flat_lora_adapter: str
    peft_class: type  #: the PEFT class ``disable_flat_lora`` switches back to

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter = self.flat_lora_adapter
        base = self.get_base_layer()
        enabled_only = list(self.active_adapters) == [adapter]
        if self.merged or args or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        kind = base_layer_kind(base)
        if kind is None:
            raise RuntimeError(
                f"{type(self).__name__}: its base layer ({type(base).__name__}) was replaced after enable_flat_lora "
                "by a layer Flat-LoRA cannot run; call disable_flat_lora first"
            )
        if kind.eval_runs_op and not self.training:
            if self.disable_adapters:
                return self._eval_with_op(kind, base, x, scaling=0.0)  # the base alone (e.g. a DPO reference pass)
            if enabled_only:
                return self._eval_with_op(kind, base, x, scaling=self.scaling[adapter])
        if not self.training or self.disable_adapters or not enabled_only:
            return super().forward(x, *args, **kwargs)
        self._check_base_unhooked(base)
        variant = variant_of(self, adapter)
        if variant is None:
            raise RuntimeError(
                f"{type(self).__name__}: adapter {adapter!r} got a LoRA variant with no Flat-LoRA implementation "
                "after enable_flat_lora; call disable_flat_lora first"
            )
        lora_A, lora_B, scaling = self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
        return variant.training_forward(self, adapter, x, partial(self._fused_op, kind, base), lora_A, lora_B,
                                        scaling, self.lora_dropout[adapter])  # fmt: skip

    def _fused_op(self, kind, base, x: Tensor, lora_A: Tensor, lora_B: Tensor, **noise) -> Tensor:
        return kind.run(base, x, lora_A, lora_B, name=type(self).__name__, **noise)

    def _eval_with_op(self, kind, base, x: Tensor, scaling: float) -> Tensor:
        """Evaluation by the base kind's op at sigma 0 (plain LoRA; at scaling 0 the base alone),
        never ``base_layer(x)``."""
        self._check_base_unhooked(base)
        adapter = self.flat_lora_adapter
        return self._fused_op(kind, base, x, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                              scaling=scaling, sigma=0.0, seed=0, backend=self._op_backend())  # fmt: skip

    def _check_base_unhooked(self, base) -> None:
        if base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
            raise RuntimeError(
                f"{type(self).__name__}: its base layer ({type(base).__name__}) got forward hooks or a replaced "
                "forward after enable_flat_lora; the fused op never calls the base layer, so they would be skipped. "
                "Remove them, or call disable_flat_lora first"
            )

    def _get_name(self) -> str:
        # PEFT's class name in repr and get_layer_status()'s module_type: what users and tools print stays PEFT's
        return self.peft_class.__name__

    def extra_repr(self) -> str:
        return f"flat_lora_adapter={self.flat_lora_adapter!r}, sigma={self.sigma}, fused={self.fused}"


class FlatLoraPeftLinear(FlatLoraPeftForward, PeftLoraLinear):
    """PEFT's ``lora.Linear`` under Flat-LoRA (``FlatLoraPeftForward``)."""

    peft_class = PeftLoraLinear
