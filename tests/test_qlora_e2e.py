"""Flat-QLoRA as a user runs it (issue 24 item 3): a tiny Llama built from a config, saved, loaded with
``BitsAndBytesConfig(load_in_4bit=True)`` on the CPU (no downloads), ``get_peft_model``,
``enable_flat_lora`` (in place, PEFT's own QLoRA layers), a few steps driven by ``FlatLoraSchedule`` in
a plain loop and through ``transformers.Trainer`` + ``FlatLoraCallback``, ``save_pretrained``, and a
reload with vanilla PEFT over a fresh 4-bit base: the same outputs at eval. The LoRA layers' 4-bit
bases are hashed: never written, nor repacked by an evaluation forward."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from flatlora_kernels import FlatLoraCallback, FlatLoraSchedule, enable_flat_lora  # noqa: E402
from flatlora_kernels.peft import patched_layers  # noqa: E402
from flatlora_kernels.quantized import is_bnb_4bit  # noqa: E402

from .test_qlora_model import digest, load_qlora_model, model_dir, train_language_model  # noqa: E402,F401  (the saved tiny Llama)

VOCAB = 96
CPU_REPACKS = bool(getattr(bnb.nn.Linear4bit(64, 64), "support_avx512bf16_for_cpu", False))  # AVX512-BF16


def lora_bases(model):
    return [m.base_layer for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))]


def allow_bitsandbytes_repacking(model, allowed: bool) -> None:
    """bitsandbytes' own eval forward (the 4-bit layers without LoRA, and vanilla PEFT's) repacks a 4-bit
    base in place on AVX512-BF16 CPUs, rounding its scales to bf16 (and, in 0.50.2, leaving that layer
    with no gradient in later training): off while outputs are compared exactly."""
    for module in model.modules():
        if is_bnb_4bit(module):
            module.support_avx512bf16_for_cpu = allowed and CPU_REPACKS


def eval_logits(model, tokens):
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_enable_flat_lora_on_a_4bit_model_trains_saves_and_reloads_in_vanilla_peft(model_dir, tmp_path):  # noqa: F811
    tokens = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    model = load_qlora_model(model_dir)
    qlora_layers = [m for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
    assert {type(m).__module__ + "." + type(m).__name__ for m in qlora_layers} == {"peft.tuners.lora.bnb.Linear4bit"}
    bases = lora_bases(model)
    before = digest(bases)

    enable_flat_lora(model, sigma=0.1)
    assert len(patched_layers(model)) == 4

    # A plain loop, driven by the schedule.
    schedule = FlatLoraSchedule(model, total_steps=3)
    model.train()
    assert torch.isfinite(train_language_model(model, tokens, schedule, steps=3)).all()

    # Then the Trainer, the schedule's T filled in by the callback.
    data = [{"input_ids": row, "labels": row} for row in tokens]
    trainer_schedule = FlatLoraSchedule(model, total_steps=None)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True,
    )  # fmt: skip
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[FlatLoraCallback(trainer_schedule)]
    )
    trainer.train()
    assert trainer_schedule.total_steps == 2 and trainer_schedule.step_count == 2
    changed = [name for name, p in model.named_parameters() if name in start and not torch.equal(p, start[name])]
    assert len(changed) == len(start) == 8, changed
    assert digest(bases) == before

    # The saved adapter is a plain PEFT adapter: vanilla PEFT over a fresh 4-bit base gives the same outputs.
    model.save_pretrained(tmp_path / "adapter")
    allow_bitsandbytes_repacking(model, False)
    want = eval_logits(model, tokens)
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=tokens).logits, want)  # training forwards carry the noise
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    fresh = transformers.LlamaForCausalLM.from_pretrained(model_dir, quantization_config=quantization, device_map="cpu")
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    allow_bitsandbytes_repacking(reloaded, False)
    torch.testing.assert_close(eval_logits(reloaded, tokens), want, rtol=1e-4, atol=1e-4)

    # With bitsandbytes' repacking back on, an eval forward leaves the Flat-QLoRA bases as they were
    # (it runs the op at sigma 0), where bitsandbytes repacks the 4-bit layers it runs itself.
    allow_bitsandbytes_repacking(model, True)
    eval_logits(model, tokens)
    assert digest(bases) == before
    others = [m for name, m in model.named_modules() if is_bnb_4bit(m) and name.endswith(("k_proj", "o_proj"))]
    if CPU_REPACKS:
        assert all(m.weight.quant_state.packing_format_for_cpu for m in others)
