"""enable_flat_lora on real PEFT models built from tiny configs (Llama, GPT-2 Conv1D, BERT classifier)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from flatlora_kernels import FlatLoraSchedule, filter_noise  # noqa: E402
from flatlora_kernels.peft import disable_flat_lora, enable_flat_lora, patched_layers  # noqa: E402

from .conftest import undriven_warnings  # noqa: E402


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def peft_wrap(model, targets, seed=1, **kw):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw)
    model = peft.get_peft_model(model, config)
    # Non-zero B so the adapter changes the output (PEFT initialises B to zero).
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("build,targets", [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_sigma_zero_train_matches_peft_and_grads(build, targets):
    model = peft_wrap(build(), targets)
    model.train()
    ref = model(IDS).logits
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    enable_flat_lora(model, sigma=0.0)
    out = model(IDS).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("build,targets", [(tiny_llama, ["q_proj"]), (tiny_gpt2, ["c_fc"])])
def test_noise_is_the_filter_noise_of_the_transposed_weight(build, targets):
    """One patched layer, driven by a schedule, computes x (W + sBA + eps)^T + b with W as [out, in]."""
    model = peft_wrap(build(), targets)
    enable_flat_lora(model, sigma=0.5, fused=True)
    schedule = FlatLoraSchedule(model, total_steps=2, seed=3)
    schedule.step()  # factor 0.5 * (1 - cos(pi/2)) = 0.5
    model.train()
    layer = next(m for _, m in model.named_modules() if hasattr(m, "flat_lora_adapter"))
    state = layer
    base = layer.get_base_layer()
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight
    x = torch.randn(5, weight.shape[1])
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    eps = filter_noise(weight, A, B, scaling=s, sigma=0.5 * 0.5, seed=int(state.effective_seed()))
    bias = 0 if base.bias is None else base.bias
    expected = x @ (weight + s * B @ A + eps).t() + bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert eps.abs().max() > 0
    # eval: plain PEFT LoRA, no noise
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (weight + s * B @ A).t() + bias, rtol=1e-5, atol=1e-5)


def test_lora_dropout_matches_peft_exactly_at_sigma_zero():
    """PEFT drops out the branch input only; the patched forward adds the same correction (same mask)."""
    model = peft_wrap(tiny_llama(), ["q_proj", "o_proj"], lora_dropout=0.5)
    model.train()
    torch.manual_seed(5)
    ref = model(IDS).logits
    enable_flat_lora(model, sigma=0.0)
    torch.manual_seed(5)
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_disabled_merged_and_disable_restore():
    model = peft_wrap(tiny_gpt2(), ["c_attn"])
    model.eval()
    ref = model(IDS).logits
    enable_flat_lora(model, sigma=0.1)
    with pytest.raises(ValueError, match="already converted"):
        enable_flat_lora(model)
    FlatLoraSchedule(model, total_steps=1).step()  # full noise
    model.train()
    with model.disable_adapter():
        base_out = model(IDS).logits  # no LoRA, no noise: deterministic
        torch.testing.assert_close(model(IDS).logits, base_out)
    noisy = model(IDS).logits
    assert not torch.allclose(noisy, ref, atol=1e-4)
    model.eval()
    torch.testing.assert_close(model(IDS).logits, ref)
    model.merge_adapter()
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    disable_flat_lora(model)
    assert not patched_layers(model)
    model.train()
    torch.testing.assert_close(model(IDS).logits, ref, rtol=1e-5, atol=1e-5)  # PEFT forward again, no noise


def test_unsupported_variants_name_the_layer():
    model = peft_wrap(tiny_llama(), ["q_proj"], use_dora=True)
    with pytest.raises(ValueError, match=r"q_proj.*DoRA"):
        enable_flat_lora(model)
    model = peft_wrap(tiny_llama(), ["embed_tokens"])
    with pytest.raises(ValueError, match=r"embed_tokens.*Embedding"):
        enable_flat_lora(model)


def test_multiple_adapters_only_the_enabled_one_is_patched():
    model = peft_wrap(tiny_llama(), ["q_proj"])
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    enable_flat_lora(model, sigma=0.2)
    assert {layer.flat_lora_adapter for _, layer in patched_layers(model)} == {"default"}
    FlatLoraSchedule(model, total_steps=1).step()
    model.train()
    model.set_adapter("other")
    ref = model(IDS).logits  # PEFT's own forward for the other adapter: deterministic
    torch.testing.assert_close(model(IDS).logits, ref)


def test_state_dict_unchanged_autocast_dtype_errors_and_merge_and_unload():
    model = peft_wrap(tiny_llama(), ["q_proj", "up_proj"])
    keys = list(model.state_dict())
    model.eval()
    ref = model(IDS).logits
    enable_flat_lora(model, sigma=0.1)
    assert list(model.state_dict()) == keys  # the noise state is non-persistent
    FlatLoraSchedule(model, total_steps=1).step()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(IDS).logits
    assert torch.isfinite(out).all()
    layer = next(m for _, m in model.named_modules() if hasattr(m, "flat_lora_adapter"))
    with pytest.raises(RuntimeError, match="dtype"):
        layer(torch.randn(2, 32, dtype=torch.bfloat16))
    merged = model.merge_and_unload()
    assert not patched_layers(merged)
    torch.testing.assert_close(merged.eval()(IDS).logits, ref, rtol=1e-5, atol=1e-5)


def test_undriven_warning_once_per_model_at_the_user_line():
    model = peft_wrap(tiny_llama(), ["q_proj", "v_proj"])
    enable_flat_lora(model, sigma=0.1)
    model.train()
    with undriven_warnings() as ours:
        model(IDS)
        model(IDS)
    assert len(ours) == 1 and ours[0].filename == __file__


def test_patched_layers_keep_peft_class_name_in_repr_and_layer_status():
    model = peft_wrap(tiny_gpt2(), ["c_attn"])
    before = [(s.name, s.module_type) for s in model.get_layer_status()]
    layer_repr = repr(model.base_model.model.transformer.h[0].attn.c_attn)
    enable_flat_lora(model, sigma=0.1)
    assert [(s.name, s.module_type) for s in model.get_layer_status()] == before
    patched = repr(model.base_model.model.transformer.h[0].attn.c_attn)
    assert patched.startswith("lora.Linear(") and patched.split("(", 1)[0] == layer_repr.split("(", 1)[0]
    assert "flat_lora_adapter='default'" in patched
