"""The LoRA-variant seam (``flatlora_kernels.variants``): a variant with no implementation is refused by
name; a registered one is accepted by ``enable_flat_lora`` and runs the patched layer's training forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from flatlora_kernels import FlatLoraSchedule, UnsupportedLayerError, enable_flat_lora, from_peft  # noqa: E402
from flatlora_kernels import variants  # noqa: E402


def _dora_model():
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["0"], use_dora=True)
    return peft.get_peft_model(nn.Sequential(nn.Linear(8, 6)), config)


def test_a_variant_without_implementation_is_refused_by_name():
    for convert in (enable_flat_lora, from_peft):
        refusal = r"0': it uses a LoRA variant \(DoraLinearVariant, e.g. DoRA\) with no Flat-LoRA implementation"
        with pytest.raises(UnsupportedLayerError, match=refusal):
            convert(_dora_model())


class _Recorder(variants.FlatLoraVariant):
    """A stand-in implementation: records its calls and runs plain Flat-LoRA (not DoRA's math)."""

    def __init__(self):
        self.calls = []

    def training_forward(self, layer, adapter, x, fused_op, lora_A, lora_B, scaling, dropout):
        self.calls.append((adapter, tuple(x.shape), lora_A is layer.lora_A[adapter].weight, scaling))
        return variants.PLAIN.training_forward(layer, adapter, x, fused_op, lora_A, lora_B, scaling, dropout)


def test_a_registered_variant_runs_the_patched_training_forward(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setitem(variants.VARIANTS, "DoraLinearVariant", recorder)
    model = enable_flat_lora(_dora_model(), sigma=0.1).train()
    FlatLoraSchedule(model, total_steps=2, seed=0)  # driven: the noise is on (no "training with no noise" warning)
    x = torch.randn(3, 8)
    y = model(x)
    y.sum().backward()
    assert recorder.calls == [("default", (3, 8), True, model.base_model.model[0].scaling["default"])]
    assert model.base_model.model[0].lora_A["default"].weight.grad is not None
    with pytest.raises(UnsupportedLayerError, match="only enable_flat_lora runs"):
        from_peft(_dora_model())  # its FlatLoraLinear has no place for the variant's parameters


def test_plain_lora_is_the_plain_variant():
    model = peft.get_peft_model(nn.Sequential(nn.Linear(8, 6)), peft.LoraConfig(r=2, target_modules=["0"]))
    assert variants.variant_of(model.base_model.model[0], "default") is variants.PLAIN
