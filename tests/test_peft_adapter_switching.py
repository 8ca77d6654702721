"""enable_flat_lora's noise follows the active adapter (``set_adapter``, adapters added after enabling,
in either order), with that adapter's scaling; what it cannot run it names: an adapter the fused op
cannot compute, several adapters active at once, hooks on ``lora_A`` / ``lora_B``. A base weight
unfrozen after enabling gets its gradient."""

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from flatlora_kernels import FlatLoraSchedule, UnsupportedLayerError  # noqa: E402
from flatlora_kernels.peft import disable_flat_lora, enable_flat_lora, patched_layers  # noqa: E402

from ._peft_layers import assert_trains_with_noise, dense_weight, noisy_reference  # noqa: E402
from .test_hf_peft_native import IDS, tiny_gpt2, tiny_llama  # noqa: E402


def mlp_peft(**config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False, **config)
    return peft.get_peft_model(model, config, adapter_name="first")


def _config(targets, **kw):
    return peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, init_lora_weights=False, **kw)


def _layer(model, name):
    return dict(model.named_modules())[name]


@pytest.mark.parametrize("order", ["added_before_enabling", "added_after_enabling"])
def test_noise_follows_set_adapter_with_its_scaling(order):
    model = mlp_peft()
    if order == "added_before_enabling":
        model.add_adapter("b", _config(["0"]))
    enable_flat_lora(model, sigma=0.4)
    if order == "added_after_enabling":
        model.add_adapter("b", _config(["0"]))  # PEFT adds "b" to the patched layer
    schedule = FlatLoraSchedule(model, total_steps=3)
    schedule.step()
    layer = _layer(model, "base_model.model.0")
    assert layer.scaling["b"] != layer.scaling["first"]
    assert_trains_with_noise(layer, "first")
    model.set_adapter("b")
    assert_trains_with_noise(layer, "b")  # b's factors and scaling (16/4), under the same draw


@pytest.mark.parametrize("build", ["peft", "transformers"])
def test_an_adapter_on_new_modules_added_after_enabling_is_patched_and_driven(build):
    model = tiny_llama()
    if build == "peft":
        model = peft.get_peft_model(model, _config(["q_proj"]))
        prefix = "base_model.model."
    else:
        model.add_adapter(_config(["q_proj"]))
        prefix = ""
    enable_flat_lora(model, sigma=0.4)
    schedule = FlatLoraSchedule(model, total_steps=4)
    schedule.step()
    config = _config(["q_proj", "v_proj"])  # v_proj: a new, unpatched PEFT layer
    model.add_adapter("b", config) if build == "peft" else model.add_adapter(config, adapter_name="b")
    model.set_adapter("b")
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no FlatLoraSchedule" warning: the new layer gets this step's draw
        model(IDS)
    new = _layer(model, prefix + "model.layers.0.self_attn.v_proj")
    assert new in [layer for _, layer in patched_layers(model)]
    assert_trains_with_noise(new, "b")
    schedule.step()  # the schedule now drives it with the others
    assert new in schedule.layers and float(new.noise_factor) == pytest.approx(schedule.factor)
    assert_trains_with_noise(new, "b")
    assert_trains_with_noise(_layer(model, prefix + "model.layers.0.self_attn.q_proj"), "b")


def test_an_adapter_the_op_cannot_run_is_named_at_its_training_forward():
    for after in (False, True):
        model = mlp_peft()
        if not after:
            model.add_adapter("dora", _config(["0"], use_dora=True))
        enable_flat_lora(model, sigma=0.3)
        if after:
            model.add_adapter("dora", _config(["0"], use_dora=True))
        FlatLoraSchedule(model, total_steps=2).step()
        model.set_adapter("dora")
        model.train()
        with pytest.raises(UnsupportedLayerError, match=r"adapter 'dora' of 'base_model.model.0'.*DoRA"):
            model(torch.randn(2, 8))
        model.eval()
        model(torch.randn(2, 8))  # evaluation is PEFT's own forward


def test_skip_unsupported_warns_once_naming_the_adapter_and_layers_added_later():
    model = mlp_peft()
    enable_flat_lora(model, sigma=0.3, skip_unsupported=True)
    FlatLoraSchedule(model, total_steps=2).step()
    model.add_adapter("dora", _config(["0", "2"], use_dora=True))
    model.set_adapter("dora")
    model.train()
    with pytest.warns(UserWarning) as caught:
        model(torch.randn(2, 8))
        model(torch.randn(2, 8))
    messages = [str(w.message) for w in caught if "dora" in str(w.message)]
    assert len(messages) == 2, messages  # once for the patched layer '0', once for the new layer '2'
    assert any("'base_model.model.0'" in m and "without noise" in m for m in messages)
    assert any("'base_model.model.2'" in m and "DoRA" in m for m in messages)


def test_several_active_adapters_warn_once_and_run_peft():
    model = mlp_peft()
    model.add_adapter("b", _config(["0"]))
    enable_flat_lora(model, sigma=0.3, adapter="first")
    FlatLoraSchedule(model, total_steps=2).step()
    model.base_model.set_adapter(["first", "b"])
    model.train()
    x = torch.randn(2, 8)
    with pytest.warns(UserWarning, match=r"adapters \['first', 'b'\] are active together"):
        y = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(x), y)  # PEFT's deterministic forward, warned once


@pytest.mark.parametrize("build,target", [(tiny_llama, "q_proj"), (tiny_gpt2, "c_fc")])
def test_base_weight_unfrozen_after_enabling_gets_its_gradient(build, target):
    model = peft.get_peft_model(build(), _config([target]))
    enable_flat_lora(model, sigma=0.5)
    FlatLoraSchedule(model, total_steps=2).step()
    layer = next(layer for _, layer in patched_layers(model))
    base_weight = layer.get_base_layer().weight
    base_weight.requires_grad_(True)
    x = torch.randn(3, dense_weight(layer).shape[1])
    g = torch.randn(3, dense_weight(layer).shape[0])
    layer.train()
    (layer(x) * g).sum().backward()
    ours = base_weight.grad.clone()
    base_weight.grad = None
    (noisy_reference(layer, x, "default") * g).sum().backward()  # eps a constant, as in the op
    torch.testing.assert_close(ours, base_weight.grad, rtol=1e-5, atol=1e-5)
    assert ours.abs().max() > 0


def test_base_weight_unfrozen_after_enabling_trains_like_peft_at_sigma_zero():
    def grads(model):
        model.train()
        model(IDS).logits.square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    models = []
    for enable in (False, True):
        model = peft.get_peft_model(tiny_llama(), _config(["q_proj", "v_proj"]))
        if enable:
            enable_flat_lora(model, sigma=0.0)
        for name, param in model.named_parameters():
            if "v_proj.base_layer.weight" in name:
                param.requires_grad_(True)
        models.append(grads(model))
    assert any("base_layer" in n for n in models[1]) and models[0].keys() == models[1].keys()
    for name in models[0]:
        torch.testing.assert_close(models[1][name], models[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_hooks_on_lora_factors_are_refused_before_and_after_enabling():
    model = mlp_peft()
    layer = _layer(model, "base_model.model.0")
    handle = layer.lora_A["first"].register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(UnsupportedLayerError, match=r"base_model.model.0.*lora_A\['first'\] have forward hooks"):
        enable_flat_lora(model)
    handle.remove()
    enable_flat_lora(model, sigma=0.1)
    FlatLoraSchedule(model, total_steps=2).step()
    layer.lora_B["first"].register_forward_pre_hook(lambda module, args: None)
    model.train()
    with pytest.raises(RuntimeError, match=r"'base_model.model.0': its lora_B\['first'\] \(Linear\) got forward hooks"):
        model(torch.randn(2, 8))
    model.eval()
    model(torch.randn(2, 8))  # PEFT's forward calls lora_B: the hook runs


def _deepspeed_like_hook(module, args):
    """Stands in for ZeRO-3's parameter-gathering hook: recognised by its module, as DeepSpeed's are."""


_deepspeed_like_hook.__module__ = "deepspeed.runtime.zero.parameter_offload"


def test_deepspeed_hooks_on_the_base_name_deepspeed_and_the_layer():
    """Hooks ZeRO-3 put on a layer's children (deepspeed.initialize before enable_flat_lora) are not taken
    for a user's: the message names DeepSpeed ZeRO-3, the layer, and the order that works."""
    model = mlp_peft()
    handle = _layer(model, "base_model.model.0").get_base_layer().register_forward_pre_hook(_deepspeed_like_hook)
    with pytest.raises(UnsupportedLayerError, match=r"'base_model.model.0' already carries DeepSpeed ZeRO-3.*before "
                                                     r"deepspeed.initialize"):  # fmt: skip
        enable_flat_lora(model)
    handle.remove()
    enable_flat_lora(model, sigma=0.1)
    layer = _layer(model, "base_model.model.0")
    assert layer._z3_leaf  # DeepSpeed gathers the whole layer in its hook on the layer itself
    FlatLoraSchedule(model, total_steps=2).step()
    layer.lora_A["first"].register_forward_pre_hook(_deepspeed_like_hook)
    model.train()
    with pytest.raises(RuntimeError, match=r"'base_model.model.0': its lora_A\['first'\] carries DeepSpeed ZeRO-3"):
        model(torch.randn(2, 8))


def test_a_layer_of_another_adapter_only_follows_set_adapter():
    """Adapter "b" targets a module "first" does not: enabled with "first" active, that layer trains "b"
    with the noise once "b" is active."""
    model = mlp_peft()
    model.add_adapter("b", _config(["2"]))
    enable_flat_lora(model, sigma=0.4)
    FlatLoraSchedule(model, total_steps=3).step()
    model.set_adapter("b")
    assert_trains_with_noise(_layer(model, "base_model.model.2"), "b")


def test_disable_flat_lora_removes_every_hook_and_mark():
    model = mlp_peft()
    before = {name: (dict(m._forward_pre_hooks), set(vars(m))) for name, m in model.named_modules()}
    enable_flat_lora(model, sigma=0.2)
    layer = _layer(model, "base_model.model.0")
    assert model._forward_pre_hooks and not layer._forward_pre_hooks  # no per-layer hook without ZeRO-3
    layer.get_base_layer().weight.ds_id = 0  # what a ZeRO-3 parameter carries
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].requires_grad))
    FlatLoraSchedule(model, total_steps=2).step()
    model.train()(torch.randn(2, 8))
    assert seen == [True]  # the input alias, put before every other pre-hook
    layer._forward_pre_hooks.popitem()
    del layer.get_base_layer().weight.ds_id
    disable_flat_lora(model)
    after = {name: (dict(m._forward_pre_hooks), set(vars(m))) for name, m in model.named_modules()}
    assert after == before  # no hook, leaf mark or attribute left behind
    enable_flat_lora(model, sigma=0.2)  # and it enables again
