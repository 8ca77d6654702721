"""enable_flat_lora on models given PEFT LoRA layers without a PeftModel: transformers'
``model.add_adapter``, diffusers' ``unet.add_adapter`` (the Stable Diffusion LoRA recipe) and
``peft.inject_adapter_in_model``; each trains with noise by default and reloads through its own library."""

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from flatlora_kernels import FlatLoraSchedule  # noqa: E402
from flatlora_kernels.peft import enable_flat_lora, patched_layers  # noqa: E402

from ._peft_layers import assert_trains_with_noise  # noqa: E402
from .test_hf_peft_native import IDS, tiny_llama  # noqa: E402


def _train(model, batch, loss_of, steps=2, sigma=0.3):
    """A few SGD steps under a schedule; returns the schedule (noise on: factor > 0 after step 1)."""
    schedule = FlatLoraSchedule(model, total_steps=steps + 1, seed=4)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    return schedule


def _eval_equal(a, b, forward):
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(forward(a), forward(b), rtol=1e-5, atol=1e-6)


def _llama_logits(model, ids=IDS):
    return model(ids).logits


def test_no_lora_layer_is_a_clear_error():
    for model in (tiny_llama(), nn.Sequential(nn.Linear(4, 4))):
        with pytest.raises(ValueError, match="no PEFT LoRA layer in the model; add an adapter first"):
            enable_flat_lora(model)


def test_transformers_add_adapter_trains_with_noise_and_reloads(tmp_path):
    model = tiny_llama()
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    enable_flat_lora(model, sigma=0.3)  # the active adapter, as transformers' active_adapters() gives it
    layers = patched_layers(model)
    assert len(layers) == 2 and {layer.flat_lora_adapter for _, layer in layers} == {"default"}
    _train(model, IDS, lambda m, ids: m(ids).logits.square().mean())
    assert_trains_with_noise(layers[0][1], "default")
    model.save_pretrained(tmp_path)  # transformers writes the adapter only
    reloaded = tiny_llama()
    reloaded.load_adapter(str(tmp_path))
    _eval_equal(model, reloaded, _llama_logits)
    _eval_equal(model, peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)), _llama_logits)


def test_inject_adapter_in_model_trains_with_noise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    model = peft.inject_adapter_in_model(config, model, adapter_name="mine")
    enable_flat_lora(model, sigma=0.3)  # no model-level API: the layers' active adapter
    layers = patched_layers(model)
    assert [layer.flat_lora_adapter for _, layer in layers] == ["mine", "mine"]
    _train(model, torch.randn(4, 8), lambda m, x: m(x).square().mean())
    for _, layer in layers:
        assert_trains_with_noise(layer, "mine")


diffusers = pytest.importorskip("diffusers")

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusers LoRA training scripts' targets


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )
    return unet.requires_grad_(False)


LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
TEXT = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))


def _unet_out(unet, batch=None):
    return unet(LATENTS, 3, TEXT).sample


def test_diffusers_unet_add_adapter_trains_with_noise_and_reloads(tmp_path):
    unet = tiny_unet()
    unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    enable_flat_lora(unet, sigma=0.3)  # diffusers' active_adapters()
    layers = patched_layers(unet)
    assert len(layers) == 32 and all(layer.flat_lora_adapter == "default" for _, layer in layers)
    _train(unet, None, lambda m, _: (_unet_out(m) - LATENTS).square().mean())
    for _, layer in layers[:: len(layers) // 4]:
        assert_trains_with_noise(layer, "default")
    assert all(p.abs().max() > 0 for n, p in unet.named_parameters() if "lora_B" in n)  # trained: reload shows
    unet.save_lora_adapter(str(tmp_path))
    reloaded = tiny_unet()
    reloaded.load_lora_adapter(str(tmp_path), prefix=None, adapter_name="default", use_safetensors=True)
    _eval_equal(unet, reloaded, _unet_out)
