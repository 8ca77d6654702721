"""apply_flat_lora's PEFT-style targeting, freezing, merge helpers and adapter files."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from flatlora_kernels import FlatLoraSchedule, apply_flat_lora, flat_lora_layers
from flatlora_kernels import UnsupportedLayerError, load_adapter, merge_and_unload, merge_flat_lora, save_adapter, unmerge_flat_lora


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, h):
        z = self.norm(h)
        return h + self.mlp(self.q_proj(z) * torch.sigmoid(self.v_proj(z)))


class TinyLM(nn.Module):
    def __init__(self, vocab=11, width=16, depth=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.mixer = nn.MultiheadAttention(width, 2, batch_first=True)
        self.lm_head = nn.Linear(width, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        h = h + self.mixer(h, h, h, need_weights=False)[0]
        return self.lm_head(h)


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return TinyLM()


def converted_names(model):
    return [name for name, _ in flat_lora_layers(model)]


def test_all_linear_skips_head_and_multihead_attention_and_freezes_the_rest():
    model = tiny_lm()
    assert apply_flat_lora(model, "all-linear", r=2) is model
    assert converted_names(model) == [
        f"blocks.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj", "mlp.0", "mlp.2")
    ]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.mixer.out_proj, nn.Linear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert len(trainable) == 2 * 8


def test_all_linear_skips_classifier_heads():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))

    model = apply_flat_lora(Classifier(), "all-linear")
    assert converted_names(model) == ["body"]


def test_list_targets_match_names_or_suffixes():
    model = apply_flat_lora(tiny_lm(), ["q_proj", "blocks.1.v_proj", "mlp.2"], r=2)
    assert converted_names(model) == [
        "blocks.0.q_proj", "blocks.0.mlp.2", "blocks.1.q_proj", "blocks.1.v_proj", "blocks.1.mlp.2"
    ]
    # A suffix must be a whole name component: "proj" alone matches nothing.
    with pytest.raises(ValueError, match="matched no convertible layer"):
        apply_flat_lora(tiny_lm(), ["proj"])


def test_regex_targets_must_match_the_whole_name_and_exclusions_apply():
    model = apply_flat_lora(tiny_lm(), r"blocks\.\d+\.(q|v)_proj", exclude_modules=["blocks.0.v_proj"])
    assert converted_names(model) == ["blocks.0.q_proj", "blocks.1.q_proj", "blocks.1.v_proj"]
    with pytest.raises(ValueError, match="matched no convertible layer"):
        apply_flat_lora(tiny_lm(), r"q_proj")  # full match: the bare name is not the qualified name
    model = apply_flat_lora(tiny_lm(), "all-linear", exclude_modules=r".*mlp\..*")
    assert converted_names(model) == [f"blocks.{i}.{n}" for i in range(2) for n in ("q_proj", "v_proj")]


def test_targeting_errors_are_clear():
    with pytest.raises(ValueError, match="matched no convertible layer.*blocks.0.q_proj"):
        apply_flat_lora(tiny_lm(), ["k_proj"])
    with pytest.raises(UnsupportedLayerError, match="'blocks.0.norm'.*LayerNorm"):
        apply_flat_lora(tiny_lm(), ["norm"])
    with pytest.raises(UnsupportedLayerError, match="MultiheadAttention"):
        apply_flat_lora(tiny_lm(), ["mixer.out_proj"])
    with pytest.raises(ValueError, match="regular expression"):
        apply_flat_lora(tiny_lm(), "blocks.(")
    with pytest.raises(ValueError, match="r must be"):
        apply_flat_lora(tiny_lm(), "all-linear", r=0)


def test_layer_kwargs_and_training_mode_are_passed_on():
    model = tiny_lm().eval()
    apply_flat_lora(model, ["q_proj"], r=4, lora_alpha=2, sigma=0.2, fused=False, lora_dropout=0.1, use_rslora=True)
    layer = model.blocks[0].q_proj
    assert (layer.r, layer.sigma, layer.fused, layer.lora_dropout_p, layer.scaling) == (4, 0.2, False, 0.1, 1.0)
    assert not layer.training


def test_huggingface_llama_all_linear_skips_lm_head():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    apply_flat_lora(model, "all-linear", r=2)
    names = converted_names(model)
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    assert isinstance(model.lm_head, nn.Linear)


def trained_like(model, seed):
    """Give every adapter non-zero, model-specific values (as if trained)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flat_lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


def test_save_load_round_trip_with_schedule_state(tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    source = trained_like(apply_flat_lora(tiny_lm(seed=0), "all-linear", r=2), seed=1)
    schedule = FlatLoraSchedule(source, total_steps=10, seed=4)
    for _ in range(3):
        schedule.step()
    save_adapter(source, path, schedule=schedule)

    # The same base model, a fresh adapter: loading restores the outputs and the noise stream.
    target = apply_flat_lora(tiny_lm(seed=0), "all-linear", r=2)
    resumed = FlatLoraSchedule(target, total_steps=1)
    params_before = [id(p) for p in target.parameters()]
    load_adapter(target, path, schedule=resumed)
    assert [id(p) for p in target.parameters()] == params_before  # optimizers keep working
    assert resumed.state_dict() == schedule.state_dict()
    tokens = torch.randint(0, 11, (2, 5))
    for model in (source, target):
        model.train()
    assert torch.equal(source(tokens), target(tokens))
    assert torch.equal(source.eval()(tokens), target.eval()(tokens))

    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        assert all(key.endswith((".lora_A", ".lora_B")) for key in handle.keys())


def test_load_adapter_rejects_mismatches(tmp_path):
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(apply_flat_lora(tiny_lm(), "all-linear", r=2), path)
    with pytest.raises(ValueError, match="layer names differ"):
        load_adapter(apply_flat_lora(tiny_lm(), ["q_proj"], r=2), path)
    with pytest.raises(ValueError, match="saved with"):
        load_adapter(apply_flat_lora(tiny_lm(), "all-linear", r=4), path)
    plain = str(tmp_path / "plain.safetensors")
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not a Flat-LoRA adapter"):
        load_adapter(apply_flat_lora(tiny_lm(), "all-linear", r=2), plain)
    with pytest.raises(ValueError, match="no FlatLoraLinear"):
        save_adapter(tiny_lm(), path)


def test_merge_helpers():
    model = trained_like(apply_flat_lora(tiny_lm(), "all-linear", r=2), seed=3).eval()
    tokens = torch.randint(0, 11, (2, 5))
    expected = model(tokens)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    merge_flat_lora(model)
    assert all(layer.merged for _, layer in flat_lora_layers(model))
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
    unmerge_flat_lora(model)
    assert all(torch.equal(model.get_parameter(n), p) for n, p in originals.items())

    merge_and_unload(model)
    assert not flat_lora_layers(model)
    assert type(model.blocks[0].q_proj) is nn.Linear and model.blocks[0].v_proj.bias is None
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
