"""``FlatLoraPeftLinear``: PEFT's LoRA ``Linear`` with Flat-LoRA's training forward.

``enable_flat_lora`` switches a PEFT layer's class to this subclass in place (``disable_flat_lora``
switches it back): every PEFT module and Parameter stays where it is, and being a module-level class
(not a patched bound method) the model pickles, unpickles and deep-copies like a plain PEFT model.
This module imports peft, so the package imports it only when a PEFT model is enabled.
"""

from __future__ import annotations

from peft.tuners.lora import Linear as PeftLoraLinear
from torch import Tensor

from ..step_noise import StepNoise

__all__ = ["FlatLoraPeftLinear", "PeftLoraLinear"]


class FlatLoraPeftLinear(PeftLoraLinear, StepNoise):
    """A PEFT LoRA Linear whose adapter ``flat_lora_adapter`` trains under Flat-LoRA noise.

    PEFT's own forward runs whenever Flat-LoRA does not apply: eval mode, disabled adapters, merged
    layers, mixed-batch ``adapter_names``, extra arguments, or active adapters other than the enabled one.
    """

    flat_lora_adapter: str

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        adapter = self.flat_lora_adapter
        if (
            not self.training
            or self.disable_adapters
            or self.merged
            or args
            or kwargs.get("adapter_names") is not None
            or list(self.active_adapters) != [adapter]
        ):
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if base._forward_hooks or base._forward_pre_hooks or "forward" in vars(base):
            raise RuntimeError(
                f"{type(self).__name__}: its base layer ({type(base).__name__}) got forward hooks or a replaced "
                "forward after enable_flat_lora; the fused op never calls the base layer, so they would be skipped. "
                "Remove them, or call disable_flat_lora first"
            )
        weight = base.weight.t() if self.fan_in_fan_out else base.weight  # Conv1D: [in, out] -> view [out, in]
        return self.noisy_linear(
            x,
            weight,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            base.bias,
            self.scaling[adapter],
            self.lora_dropout[adapter],
        )

    def extra_repr(self) -> str:
        return f"flat_lora_adapter={self.flat_lora_adapter!r}, sigma={self.sigma}, fused={self.fused}"
