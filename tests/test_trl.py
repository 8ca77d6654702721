"""TRL's SFTTrainer with enable_flat_lora, both orders: a PeftModel enabled before the trainer is built,
and the PeftModel SFTTrainer builds from ``peft_config`` enabled before ``train()``. Either trains with
the noise on every LoRA layer (the adapters differ from a noise-free run) and saves a plain adapter."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from flatlora_kernels import FlatLoraSchedule  # noqa: E402
from flatlora_kernels.hf import FlatLoraCallback  # noqa: E402
from flatlora_kernels.peft import enable_flat_lora, patched_layers  # noqa: E402

from .test_hf_peft_native import tiny_llama  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away"]
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


def _tokenizer():
    """A word-level tokenizer built in memory (no download): ids 0-3 special, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")  # fmt: skip


def _data():
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=gen)) for _ in range(8)]
    return datasets.Dataset.from_dict({"text": lines})


def _train(tmp_path, order, sigma):
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                         max_length=16, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                         dataloader_num_workers=0, disable_tqdm=True, seed=0, bf16=False)  # fmt: skip
    base = tiny_llama()
    if order == "enabled_before_the_trainer":
        model = enable_flat_lora(peft.get_peft_model(base, peft.LoraConfig(**LORA)), sigma=sigma)
        schedule = FlatLoraSchedule(model, total_steps=None, seed=1)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=_data(), processing_class=_tokenizer(),
                                 callbacks=[FlatLoraCallback(schedule)])  # fmt: skip
    else:
        trainer = trl.SFTTrainer(model=base, args=args, train_dataset=_data(), processing_class=_tokenizer(),
                                 peft_config=peft.LoraConfig(**LORA))  # fmt: skip
        enable_flat_lora(trainer.model, sigma=sigma)
        schedule = FlatLoraSchedule(trainer.model, total_steps=None, seed=1)
        trainer.add_callback(FlatLoraCallback(schedule))
    assert len(patched_layers(trainer.model)) == 2
    trainer.train()
    assert schedule.step_count == 2 and all(float(layer.noise_factor) > 0 for layer in schedule.layers)
    trainer.save_model(str(tmp_path / "adapter"))
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("order", ["enabled_before_the_trainer", "sft_trainer_builds_the_peft_model"])
def test_sft_trainer_trains_with_noise_and_saves_a_peft_adapter(order, tmp_path):
    noisy = _train(tmp_path / "noisy", order, sigma=0.5)
    plain = _train(tmp_path / "plain", order, sigma=0.0)
    assert noisy.keys() == plain.keys() and len(noisy) == 4
    assert max((noisy[k] - plain[k]).abs().max().item() for k in noisy) > 1e-3  # the noise reached the updates
    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "noisy" / "adapter"))
    for name, param in reloaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, noisy[name], msg=name)
