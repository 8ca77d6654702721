"""from_peft: PEFT LoRA layers become FlatLoraLinear with the same weights and the same outputs at sigma 0."""

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from flatlora_kernels.model_conversion import flat_lora_layers  # noqa: E402
from flatlora_kernels.modules import FlatLoraLinear  # noqa: E402
from flatlora_kernels.peft import from_peft  # noqa: E402
from flatlora_kernels.schedule import FlatLoraSchedule  # noqa: E402


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 24)
        self.act = nn.GELU()
        self.down = nn.Linear(24, 12, bias=False)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


def peft_mlp(**config):
    torch.manual_seed(0)
    settings = dict(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    settings.update(config)
    return peft.get_peft_model(Mlp(), peft.LoraConfig(**settings))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "r": 8, "lora_alpha": 4}])
def test_outputs_equal_at_sigma_zero(fused, config):
    model = peft_mlp(**config)
    x = torch.randn(5, 12)
    model.eval()
    expected = model(x)
    peft_params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    converted = from_peft(model, sigma=0.1, fused=fused)
    assert isinstance(converted, Mlp)
    layers = flat_lora_layers(converted)
    assert [n for n, _ in layers] == ["up", "down"]
    assert all(layer.fused == fused and layer.sigma == 0.1 for _, layer in layers)
    # The very same LoRA Parameters (an optimizer built on the PEFT model keeps working).
    assert {id(p) for p in peft_params.values()} == {id(p) for n, p in converted.named_parameters() if p.requires_grad}

    torch.testing.assert_close(converted.eval()(x), expected, rtol=1e-5, atol=1e-5)
    converted.train()
    FlatLoraSchedule(converted, total_steps=10)  # factor 0 at step 0: sigma * 0
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)


def test_dropout_and_scale_carry_over():
    model = peft_mlp(lora_dropout=0.2)
    model.base_model.model.up.set_scale("default", 0.5)  # PEFT's runtime rescaling
    converted = from_peft(model)
    up = converted.up
    assert isinstance(up, FlatLoraLinear) and up.lora_dropout_p == 0.2
    assert up.scaling == pytest.approx(8 / 4 * 0.5) and converted.down.scaling == pytest.approx(2.0)
    assert not up.weight.requires_grad and up.lora_A.requires_grad


def test_unsupported_layers_raise():
    with pytest.raises(ValueError, match="DoRA|variant"):
        from_peft(peft_mlp(use_dora=True))
    merged = peft_mlp()
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        from_peft(merged)
    two = peft_mlp()
    two.add_adapter("second", peft.LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(ValueError, match="exactly one"):
        from_peft(two)
    with pytest.raises(ValueError, match="no PEFT LoRA layer"):
        from_peft(Mlp())


def test_gpt2_conv1d_layers_convert_with_equal_outputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=16, bos_token_id=0,
                                  eos_token_id=0)
    model = peft.get_peft_model(
        transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False)
    ).eval()
    ids = torch.randint(0, 64, (2, 6))
    expected = model(ids).logits
    converted = from_peft(model, sigma=0.1).eval()
    (name, layer), = flat_lora_layers(converted)
    assert name.endswith("attn.c_attn") and layer.fan_in_fan_out
    torch.testing.assert_close(converted(ids).logits, expected, rtol=1e-5, atol=1e-5)
