"""Flat-LoRA fine-tuning of a small transformers Llama, built from a config (nothing is downloaded).

1. Build ``LlamaForCausalLM`` from a tiny ``LlamaConfig`` and pretrain all of it briefly on synthetic
   sequences: arithmetic progressions modulo the vocabulary size with steps 1-2.
2. ``apply_flat_lora(model, "all-linear")`` and fine-tune only the adapters on a shifted task
   (progressions with steps 3-5), with gradient accumulation and a ``FlatLoraSchedule`` stepped once
   per optimizer step; ``--trainer`` does the same with ``transformers.Trainer`` + ``FlatLoraCallback``.
3. Check the frozen base weights are bit-identical, save the adapter, load it into a fresh copy of
   the pretrained model and check the outputs match.

    python examples/hf_tiny_llama.py            # plain PyTorch loop
    python examples/hf_tiny_llama.py --trainer  # transformers.Trainer (needs accelerate)
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from flatlora_kernels import apply_flat_lora, flat_lora_layers, load_adapter, save_adapter
from flatlora_kernels.schedule import FlatLoraSchedule

VOCAB = 97
SEQ_LEN = 24


def progressions(count: int, steps: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """``count`` sequences ``(a + b*t) mod VOCAB`` with random start ``a`` and step ``b`` from ``steps``."""
    start = torch.randint(0, VOCAB, (count, 1), generator=generator)
    step = torch.tensor(steps)[torch.randint(0, len(steps), (count, 1), generator=generator)]
    return (start + step * torch.arange(SEQ_LEN)) % VOCAB


def build_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def loss_on(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, labels=tokens).loss


def pretrain(model, steps: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss_on(model, progressions(32, (1, 2), generator)).backward()
        optimizer.step()
        optimizer.zero_grad()


def finetune_loop(model, schedule, steps: int, accumulation: int, generator: torch.Generator) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for step in range(steps):
        for _ in range(accumulation):  # every micro-batch of a step sees the same noise draw
            (loss_on(model, progressions(16, (3, 4, 5), generator)) / accumulation).backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()  # once per optimizer step: new draw, next factor of the cosine ramp
        if step % 20 == 0 or step == steps - 1:
            print(f"  step {step:3d}  noise factor {schedule.factor:.3f}")


def finetune_trainer(model, schedule, steps: int, accumulation: int, generator: torch.Generator, out_dir: str) -> None:
    from transformers import Trainer, TrainingArguments

    from flatlora_kernels.hf import FlatLoraCallback

    data = [{"input_ids": t, "labels": t} for t in progressions(16 * accumulation * steps, (3, 4, 5), generator)]
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=16, gradient_accumulation_steps=accumulation,
        learning_rate=5e-3, lr_scheduler_type="constant", report_to=[], save_strategy="no", logging_steps=20,
        use_cpu=True, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[FlatLoraCallback(schedule)]).train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", action="store_true", help="fine-tune with transformers.Trainer + FlatLoraCallback")
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning optimizer steps")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient-accumulation micro-batches per step")
    parser.add_argument("--sigma", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    target_eval = progressions(256, (3, 4, 5), torch.Generator().manual_seed(12345))

    model = build_model()
    pretrain(model, args.pretrain_steps, generator)
    pretrained = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        print(f"pretrained: target-task loss {loss_on(model, target_eval).item():.3f}")

    apply_flat_lora(model, "all-linear", r=8, lora_alpha=16, sigma=args.sigma)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"Flat-LoRA on {len(flat_lora_layers(model))} Linear layers, {trainable:,} trainable parameters")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    schedule = FlatLoraSchedule(model, total_steps=args.steps, seed=args.seed)

    model.train()
    with tempfile.TemporaryDirectory() as out_dir:
        if args.trainer:
            finetune_trainer(model, schedule, args.steps, args.accumulation, generator, out_dir)
        else:
            finetune_loop(model, schedule, args.steps, args.accumulation, generator)
        model.eval()
        with torch.no_grad():
            finetuned_loss = loss_on(model, target_eval).item()
        print(f"fine-tuned: target-task loss {finetuned_loss:.3f}")

        unchanged = all(torch.equal(model.get_parameter(n), p) for n, p in frozen.items())
        print(f"frozen base weights bit-identical after training: {unchanged}")

        path = os.path.join(out_dir, "adapter.safetensors")
        save_adapter(model, path, schedule=schedule)
        restored = apply_flat_lora(pretrained, "all-linear", r=8, lora_alpha=16, sigma=args.sigma)
        load_adapter(restored, path)
        restored.eval()
        with torch.no_grad():
            same = torch.equal(restored(input_ids=target_eval).logits, model(input_ids=target_eval).logits)
        print(f"adapter reloaded into a fresh copy ({os.path.getsize(path):,} bytes): outputs equal: {same}")
    if not (unchanged and same):
        raise SystemExit("check failed")


if __name__ == "__main__":
    main()
