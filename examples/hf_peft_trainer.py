"""Flat-LoRA through PEFT: transformers.Trainer fine-tunes a PeftModel, vanilla PEFT reloads the adapter.

1. Build a tiny ``LlamaForCausalLM`` from a config (nothing is downloaded) and save it as the "base
   checkpoint".
2. ``peft.get_peft_model(base, LoraConfig(...))``, then ``enable_flat_lora(peft_model, sigma=...)``: PEFT's
   own LoRA layers now train under Flat-LoRA noise, driven by ``FlatLoraCallback``.
3. ``Trainer.save_model`` writes a standard PEFT adapter directory.
4. A fresh Python process that never imports flatlora_kernels loads the base checkpoint and
   ``PeftModel.from_pretrained(base, adapter_dir)`` and must reproduce the trained model's eval logits.

    python examples/hf_peft_trainer.py [--steps 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from flatlora_kernels import FlatLoraSchedule, enable_flat_lora
from flatlora_kernels.hf import FlatLoraCallback

VOCAB, SEQ_LEN = 61, 16


def progressions(count: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences ``(a + b*t) mod VOCAB``: a task a tiny model can learn in a few steps."""
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    step = torch.randint(1, 4, (count, 1), generator=generator)
    return (start + step * torch.arange(SEQ_LEN)) % VOCAB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="flatlora_peft_")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
    )
    base = LlamaForCausalLM(config)
    base_dir, adapter_dir = os.path.join(out, "base"), os.path.join(out, "adapter")
    base.save_pretrained(base_dir)

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    model = enable_flat_lora(get_peft_model(base, lora), sigma=args.sigma)
    schedule = FlatLoraSchedule(model, total_steps=None, seed=0)  # T comes from the Trainer's max_steps

    tokens = progressions(64, torch.Generator().manual_seed(1))
    dataset = [{"input_ids": t, "labels": t} for t in tokens]
    training = TrainingArguments(
        output_dir=os.path.join(out, "trainer"), max_steps=args.steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=5e-3, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[FlatLoraCallback(schedule)])
    result = trainer.train()
    print(f"trained {args.steps} steps, final loss {result.training_loss:.4f}, schedule {schedule}")
    trainer.save_model(adapter_dir)
    print("adapter files:", sorted(os.listdir(adapter_dir)))

    model.eval()
    probe = progressions(4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.save({"ids": probe, "logits": model(input_ids=probe).logits}, os.path.join(out, "expected.pt"))
    check = textwrap.dedent(
        f"""
        import sys, torch
        from peft import PeftModel
        from transformers import LlamaForCausalLM
        base = LlamaForCausalLM.from_pretrained({base_dir!r}).eval()
        model = PeftModel.from_pretrained(base, {adapter_dir!r}).eval()
        data = torch.load({os.path.join(out, 'expected.pt')!r})
        with torch.no_grad():
            same = torch.equal(model(input_ids=data["ids"]).logits, data["logits"])
        print("vanilla PEFT, without flatlora_kernels:", "flatlora_kernels" not in sys.modules, "logits equal:", same)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    print(done.stdout.strip() or done.stderr[-2000:])
    return 0 if "logits equal: True" in done.stdout else 1


if __name__ == "__main__":
    sys.exit(main())
