"""Flat-QLoRA end to end on a real 4-bit model: a tiny Llama built from a config, saved, loaded with
``BitsAndBytesConfig(load_in_4bit=True)`` on the CPU (no downloads), PEFT LoRA on it, and its LoRA
layers replaced by ``flat_qlora_layer_from`` (what the model entry points route a 4-bit base to)."""

from __future__ import annotations

import hashlib

import pytest
import torch

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flatlora_kernels import FlatLoraSchedule  # noqa: E402
from flatlora_kernels.quantized import FlatLoraLinear4bit, flat_qlora_layer_from, is_bnb_4bit  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_qlora_model(path):
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    torch.manual_seed(7)  # the same adapter for every load
    model = peft.get_peft_model(model, config)
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    return model


def replace_with_flat_qlora(model, sigma):
    """What the entry points do for each PEFT QLoRA layer: a FlatLoraLinear4bit in its place."""
    replaced = []
    for name, module in list(model.named_modules()):
        if name.endswith(("q_proj", "v_proj")) and hasattr(module, "lora_A"):
            assert is_bnb_4bit(module.base_layer)
            layer = flat_qlora_layer_from(
                module.base_layer, module.lora_A["default"].weight, module.lora_B["default"].weight,
                module.scaling["default"], sigma=sigma, name=name,
            )  # fmt: skip
            parent, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent), child, layer)
            replaced.append(name)
    return replaced


def digest(bases) -> str:
    h = hashlib.sha256()
    for module in bases:
        state = module.weight.quant_state
        for t in (module.weight.data, state.absmax, state.state2.absmax, state.state2.code, state.offset):
            h.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train_language_model(model, tokens, schedule, steps: int) -> torch.Tensor:
    """``steps`` AdamW steps of causal-LM loss on ``tokens``, the schedule stepped after each; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_loaded_4bit_model_trains_under_flat_qlora(model_dir, tmp_path):
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(3))
    reference = load_qlora_model(model_dir).train()
    with torch.enable_grad():
        want = reference(input_ids=tokens).logits

    model = load_qlora_model(model_dir).train()
    replaced = replace_with_flat_qlora(model, sigma=0.1)
    bases = [m.base_layer for m in model.modules() if isinstance(m, FlatLoraLinear4bit)]
    before = digest(bases)
    assert len(replaced) == 4
    # No schedule yet: factor 0, i.e. QLoRA exactly (and a warning that no noise is on).
    with pytest.warns(UserWarning, match="no noise"):
        got = model(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    schedule = FlatLoraSchedule(model, total_steps=3)
    layers = [m for m in model.modules() if isinstance(m, FlatLoraLinear4bit)]
    assert len(schedule.layers) == len(layers) == 4
    assert torch.isfinite(train_language_model(model, tokens, schedule, steps=3)).all()
    noisy = model(input_ids=tokens).logits  # factor 1 now: differs from the noise-free eval output
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=tokens).logits
    assert not torch.allclose(noisy, plain)
    # The Flat-QLoRA layers' bases were never written, nor repacked by the eval forward (bitsandbytes'
    # own eval forward repacks the model's other 4-bit layers in place on AVX512-BF16 CPUs).
    assert digest(bases) == before


def test_registered_kind_routes_apply_flat_lora_to_flat_qlora(monkeypatch, tmp_path):
    """The hook the shared layer check takes (``bnb_4bit_layer_kind``): registered, ``apply_flat_lora``
    puts ``FlatLoraLinear4bit`` layers in place of ``Linear4bit`` bases, and their adapter saves."""
    import bitsandbytes as bnb

    from flatlora_kernels import apply_flat_lora, layer_support, save_peft_adapter
    from flatlora_kernels.quantized import bnb_4bit_layer_kind

    monkeypatch.setattr(layer_support, "BASE_LAYER_KINDS", [bnb_4bit_layer_kind(), *layer_support.BASE_LAYER_KINDS])
    torch.manual_seed(0)
    bases = [bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu"), bnb.nn.Linear4bit(32, 16, quant_type="fp4").to("cpu")]
    model = torch.nn.Sequential(bases[0], torch.nn.ReLU(), bases[1])
    apply_flat_lora(model, target_modules=["0", "2"], r=4, lora_alpha=8, sigma=0.1)
    assert [type(m) for m in model[::2]] == [FlatLoraLinear4bit, FlatLoraLinear4bit]
    assert model[0].base_layer is bases[0] and model[2].base_layer is bases[1]
    FlatLoraSchedule(model, total_steps=2).set_step(2)
    model(torch.randn(3, 64)).square().sum().backward()
    assert model[0].lora_B.grad.abs().sum() > 0 and model[2].lora_A.grad is not None
    save_peft_adapter(model, str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").exists()
