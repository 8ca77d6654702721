"""apply_flat_lora on config-built Hugging Face models: classifier heads, GPT-2 Conv1D, dtypes, diagnostics,
and save_peft_adapter / load_peft_adapter round trips through vanilla PEFT in a fresh process."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flatlora_kernels import FlatLoraSchedule, apply_flat_lora, flat_lora_layers  # noqa: E402
from flatlora_kernels import load_adapter, merge_and_unload, merge_flat_lora, save_adapter, unmerge_flat_lora  # noqa: E402

from .conftest import undriven_warnings  # noqa: E402
from flatlora_kernels.peft import load_peft_adapter, save_peft_adapter  # noqa: E402

BERT_CFG = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
    max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)
GPT2_CFG = dict(
    vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
    attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
)
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def bert(seed=0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**BERT_CFG))


def gpt2(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_CFG))


def randomise_lora(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in flat_lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def test_classifier_head_is_trained_in_full_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="flatlora_kernels"):
        model = apply_flat_lora(bert(), "all-linear", r=2)
    assert "modules_to_save" in caplog.text and "classifier" in caplog.text
    assert model.flatlora_modules_to_save == ["classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or n.endswith(("lora_A", "lora_B")) for n in trainable)
    # Override: keep the head frozen.
    model = apply_flat_lora(bert(), "all-linear", r=2, modules_to_save=[])
    assert not model.classifier.weight.requires_grad
    # A causal LM's lm_head stays frozen and is no head to save.
    model = apply_flat_lora(gpt2(), "all-linear", r=2)
    assert model.flatlora_modules_to_save == [] and not model.lm_head.weight.requires_grad


def test_head_saved_and_loaded_with_safetensors_adapter(tmp_path):
    model = apply_flat_lora(bert(), "all-linear", r=2)
    randomise_lora(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    save_adapter(model, str(tmp_path / "a.safetensors"))
    fresh = apply_flat_lora(bert(), "all-linear", r=2)
    load_adapter(fresh, str(tmp_path / "a.safetensors"))
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_gpt2_conv1d_outputs_unchanged_at_init_and_merge_exact():
    model = gpt2().eval()
    ref = model(IDS).logits
    apply_flat_lora(model, "all-linear", r=4, sigma=0.1)
    names = [n for n, _ in flat_lora_layers(model)]
    assert "transformer.h.0.attn.c_attn" in names and "transformer.h.0.mlp.c_proj" in names
    assert all(layer.fan_in_fan_out for _, layer in flat_lora_layers(model))
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)  # B = 0 at init
    # One training step under full noise moves B; the noise is on output rows of the [in, out] weight.
    schedule = FlatLoraSchedule(model, total_steps=1)
    schedule.step()
    model.train()
    model(IDS, labels=IDS).loss.backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 for _, layer in flat_lora_layers(model))
    randomise_lora(model)
    model.eval()
    adapted = model(IDS).logits
    weights = [layer.weight.clone() for _, layer in flat_lora_layers(model)]
    merge_flat_lora(model)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    unmerge_flat_lora(model)
    assert all(torch.equal(w, layer.weight) for w, (_, layer) in zip(weights, flat_lora_layers(model)))
    merge_and_unload(model)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)


def test_input_dtype_mismatch_fails_in_train_and_eval_and_autocast_runs_both():
    torch.manual_seed(0)
    model = apply_flat_lora(torch.nn.Sequential(torch.nn.Linear(8, 8)), "all-linear", r=2, sigma=0.0)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    for mode in (True, False):
        model.train(mode)
        with pytest.raises(RuntimeError, match="dtype"):
            model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(torch.randn(3, 8))
        assert y.dtype == torch.bfloat16


def test_warning_points_at_user_line_once_per_model_and_diagnostics():
    model = apply_flat_lora(bert(), "all-linear", r=2, sigma=0.1).train()
    with undriven_warnings() as ours:
        model(IDS)
        model(IDS)
    assert len(ours) == 1 and ours[0].filename == __file__
    with pytest.raises(ValueError, match="already converted"):
        apply_flat_lora(model, "all-linear")
    with pytest.raises(TypeError, match=r"apply_flat_lora\(\).*'alpha'.*did you mean 'lora_alpha'"):
        apply_flat_lora(bert(), "all-linear", alpha=4)


def _run_fresh(script: str) -> None:
    """Run ``script`` in a new interpreter that never imports flatlora_kernels."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env,
                          timeout=180)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_save_peft_adapter_loads_in_vanilla_peft_and_back(tmp_path):
    cases = {}
    for kind, build in (("bert", bert), ("gpt2", gpt2)):
        model = apply_flat_lora(build(), "all-linear", r=4, lora_alpha=8, sigma=0.1, lora_dropout=0.1)
        randomise_lora(model)
        if kind == "bert":
            with torch.no_grad():
                model.classifier.weight.mul_(-2.0)
        model.eval()
        save_peft_adapter(model, str(tmp_path / kind))
        cases[kind] = model(IDS).logits
        # And back: a fresh conversion loads the directory.
        again = apply_flat_lora(build(), "all-linear", r=4, lora_alpha=8, lora_dropout=0.1).eval()
        load_peft_adapter(again, str(tmp_path / kind))
        torch.testing.assert_close(again(IDS).logits, cases[kind], rtol=0, atol=0)
    torch.save({"ids": IDS, **cases}, tmp_path / "expected.pt")
    _run_fresh(
        f"""
        import sys, torch, transformers, peft
        data = torch.load({str(tmp_path / 'expected.pt')!r})
        for kind, cls, cfg_cls, cfg in (
            ("bert", transformers.BertForSequenceClassification, transformers.BertConfig, {BERT_CFG!r}),
            ("gpt2", transformers.GPT2LMHeadModel, transformers.GPT2Config, {GPT2_CFG!r}),
        ):
            torch.manual_seed(0)
            base = cls(cfg_cls(**cfg)).eval()
            model = peft.PeftModel.from_pretrained(base, {str(tmp_path)!r} + "/" + kind).eval()
            torch.testing.assert_close(model(data["ids"]).logits, data[kind], rtol=0, atol=0)
        assert "flatlora_kernels" not in sys.modules
        print("OK")
        """
    )
