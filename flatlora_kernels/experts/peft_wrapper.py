"""``FlatLoraParamWrapper``: PEFT's ``lora.ParamWrapper`` on an expert stack, trained under Flat-LoRA noise.

PEFT trains ``target_parameters`` LoRA by a parametrization: while the wrapper's forward runs, the
experts module reads its parameter as ``W + delta``, one ``baddbmm`` of PEFT's factors
(``get_delta_factors``: ``W`` plus ``s * lhs @ rhs`` in ``W``'s dtype and stored layout, cached for the
forward). Here the training forward of the enabled adapter reads ``W + delta + eps`` instead: PEFT's
``W + delta`` exactly, then the stack's eps added in place (``stack_noise``), chunk by chunk, under
an autograd function whose backward is the identity. So the experts module's own forward (any of
transformers' implementations) runs unchanged, no eps is kept for backward and none is written
into ``W``; the gradients of the factors are autograd's ``baddbmm`` ones, PEFT's.

Memory: PEFT's own (the merged stack that the experts' GEMMs keep for backward) plus one chunk.

The noise (``flatlora_kernels.noise``, "Expert stacks") uses PEFT's factors per expert:
``lora_A.weight: [r*E, K]`` holds ``A_e`` as rows ``[e*r, (e+1)*r)`` and ``lora_B.weight: [N, r*E]``
holds ``B_e`` as columns ``e, e + E, e + 2E, ...`` (``get_delta_weight``'s ``"o r e, e r i"``).

Everything else is PEFT's: evaluation, merged or disabled adapters, other active adapters, merging
and saving (a saved adapter is a plain PEFT adapter).
This module imports peft: the package imports it only when such a layer is enabled.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..step_noise import StepNoise
from .layout import ExpertLayout
from .stack_noise import add_stack_noise_
from .support import param_wrapper_layout

__all__ = ["FlatLoraParamWrapper", "expert_factors"]


def expert_factors(layer: ParamWrapper, adapter: str) -> tuple[Tensor, Tensor]:
    """PEFT's factors of ``adapter`` per expert, out x in: ``A: [E, r, K]``, ``B: [E, N, r]`` (views)."""
    weight_A, weight_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    experts = layer.num_experts
    lora_A = weight_A.reshape(experts, -1, weight_A.shape[-1])
    return lora_A, weight_B.reshape(weight_B.shape[0], -1, experts).permute(2, 0, 1)


class _AddStackNoise(torch.autograd.Function):
    """``merged + eps`` in place; eps is a constant of the step, so the backward is the identity."""

    @staticmethod
    def forward(ctx, merged: Tensor, weight: Tensor, layer: "FlatLoraParamWrapper", layout: ExpertLayout) -> Tensor:
        lora_A, lora_B = expert_factors(layer, layer.flat_lora_adapter)
        add_stack_noise_(
            layout.out_in(merged), layout.out_in(weight), lora_A.detach(), lora_B.detach(),
            scaling=layer.scaling[layer.flat_lora_adapter], sigma=layer.effective_sigma(),
            seed=layer.effective_seed(), backend=layer._op_backend(),
        )  # fmt: skip
        ctx.mark_dirty(merged)
        return merged

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None


class _FlatLoraFactorsProxy(nn.Module):
    """The parametrization of the training forward: PEFT's ``W + s * lhs @ rhs``, plus eps."""

    def __init__(self, layer: "FlatLoraParamWrapper", layout: ExpertLayout) -> None:
        super().__init__()
        self.lhs, self.rhs, self.scaling = layer.get_delta_factors(layer.flat_lora_adapter)
        # A plain attribute, not a submodule: the wrapper holds the parametrization, not the reverse.
        self.__dict__["layer"] = layer
        self.layout = layout

    def forward(self, weight: Tensor) -> Tensor:
        with torch.autocast(device_type=weight.device.type, enabled=False):  # PEFT's fold, in W's dtype; eps in fp32
            merged = torch.baddbmm(weight, self.lhs, self.rhs, alpha=self.scaling)
            return _AddStackNoise.apply(merged, weight.detach(), self.layer, self.layout)


class FlatLoraParamWrapper(StepNoise, ParamWrapper):
    """PEFT's ``ParamWrapper`` whose adapter ``flat_lora_adapter`` trains under Flat-LoRA noise."""

    flat_lora_adapter: str
    peft_class = ParamWrapper  #: the PEFT class ``disable_flat_lora`` switches back to

    def _runs_flat_lora(self, active_adapters) -> bool:
        return self.training and list(active_adapters) == [self.flat_lora_adapter]

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self._runs_flat_lora(self.active_adapters) and not (self.disable_adapters or self.merged):
            self._warn_if_undriven()  # here, not in _activate_lora: the warning names the caller's line
        return super().forward(x, *args, **kwargs)

    @contextmanager
    def _activate_lora(self, active_adapters: list[str]):
        if not self._runs_flat_lora(active_adapters):
            with super()._activate_lora(active_adapters):
                yield
            return
        layout = param_wrapper_layout(self)
        if isinstance(layout, str):  # the module changed since enable_flat_lora accepted it
            raise RuntimeError(f"{type(self).__name__} ({self.parameter_name}): {layout}")
        base = self.get_base_layer()
        param = self.get_param()
        proxy = _FlatLoraFactorsProxy(self, layout)
        requires_grad = param.requires_grad
        # unsafe: skip the consistency check, which would run the proxy (and draw the noise) once more
        parametrize.register_parametrization(base, self.parameter_name, proxy, unsafe=True)
        base.parametrizations[self.parameter_name].original.requires_grad_(requires_grad)
        try:
            with parametrize.cached():
                yield
        finally:
            self._remove_parametrizations()

    def extra_repr(self) -> str:
        return f"flat_lora_adapter={self.flat_lora_adapter!r}, sigma={self.sigma}, fused={self.fused}"
