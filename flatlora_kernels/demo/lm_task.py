"""The language-model task's data and model: byte-level text that every Python install has offline.

* pretraining corpus ("source"): the standard library's top-level ``*.py`` files (code, comments,
  docstrings), sorted by name, up to ``pretrain_bytes``;
* fine-tuning corpus ("target", shifted from code to prose): the Python reference documentation's
  topic texts shipped as ``pydoc_data.topics`` (what ``help("assert")`` prints). Topics are shuffled
  with a fixed seed and split *by topic* into test, validation and a small training split, so no
  text is shared between splits;
* tokens are bytes (vocabulary 256), cut into non-overlapping blocks of ``block`` tokens;
* the model: ``transformers.GPT2LMHeadModel`` from a ``GPT2Config`` (nothing downloaded), dropout 0
  in the base model so LoRA's ``lora_dropout`` is the only dropout.

Nats per byte are the NLL unit; perplexity is per byte.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class LmSettings:
    block: int = 64
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    pretrain_bytes: int = 1_500_000
    train_bytes: int = 12_000
    val_bytes: int = 24_000
    test_bytes: int = 48_000
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3


TINY = LmSettings(block=32, n_embd=32, n_layer=1, n_head=2, pretrain_bytes=60_000, train_bytes=2_000, val_bytes=2_000, test_bytes=2_000)


@dataclass
class LmTask:
    source: Tensor  # [bytes] uint8 as int64, the pretraining stream
    source_val: Tensor  # [n, block] held-out pretraining blocks
    train: Tensor  # [n, block] target blocks
    val: Tensor
    test: Tensor | None
    settings: LmSettings

    def without_test(self) -> LmTask:
        """The task the validation search sees: no test split to touch by mistake."""
        return replace(self, test=None)


def _stdlib_code(limit: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_bytes()
        chunks.append(text)
        size += len(text)
        if size >= limit:
            break
    if size < limit // 4:
        raise RuntimeError(f"the lm task found only {size} bytes of standard-library sources under {root}")
    return b"\n".join(chunks)[:limit]


def _doc_topics() -> list[tuple[str, bytes]]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - every CPython ships it
        raise RuntimeError("the lm task needs pydoc_data.topics (part of CPython's standard library)") from exc
    return [(name, topics[name].encode("utf-8")) for name in sorted(topics)]


def _blocks(data: bytes, block: int) -> Tensor:
    n = len(data) // block
    return torch.frombuffer(bytearray(data[: n * block]), dtype=torch.uint8).to(torch.int64).view(n, block)


def make_lm_task(settings: LmSettings, seed: int = 0) -> LmTask:
    code = _stdlib_code(settings.pretrain_bytes)
    held_out = max(settings.block * 16, len(code) // 50)
    topics = _doc_topics()
    random.Random(seed).shuffle(topics)
    splits = {"test": bytearray(), "val": bytearray(), "train": bytearray()}
    sizes = {"test": settings.test_bytes, "val": settings.val_bytes, "train": settings.train_bytes}
    order = iter(("test", "val", "train"))
    current = next(order)
    for _, text in topics:  # whole topics per split; the last topic of a split is cut to its size
        while current is not None and len(splits[current]) >= sizes[current]:
            current = next(order, None)
        if current is None:
            break
        splits[current] += text[: sizes[current] - len(splits[current])] + b"\n"
    for name, data in splits.items():
        if len(data) < settings.block * 4:
            raise RuntimeError(f"the lm task's {name} split has only {len(data)} bytes (pydoc_data.topics too small?)")
    return LmTask(
        source=torch.frombuffer(bytearray(code[:-held_out]), dtype=torch.uint8).to(torch.int64),
        source_val=_blocks(code[-held_out:], settings.block),
        train=_blocks(bytes(splits["train"]), settings.block),
        val=_blocks(bytes(splits["val"]), settings.block),
        test=_blocks(bytes(splits["test"]), settings.block),
        settings=settings,
    )


def tiny_gpt(settings: LmSettings, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=256, n_positions=settings.block, n_embd=settings.n_embd, n_layer=settings.n_layer,
        n_head=settings.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


@torch.no_grad()
def mean_nll(model: nn.Module, blocks: Tensor, batch_size: int = 64) -> float:
    """Mean next-byte NLL (nats) over every predicted position of ``blocks``, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size]
        logits = model(input_ids=ids).logits[:, :-1]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def pretrain_lm(task: LmTask, *, steps: int, seed: int = 0) -> nn.Module:
    """Train every weight of a fresh tiny GPT-2 on random windows of the standard-library code."""
    settings = task.settings
    model = tiny_gpt(settings, seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / 50) * max(0.1, 1 - t / steps))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, task.source.numel() - settings.block, (settings.pretrain_batch,), generator=generator)
        ids = torch.stack([task.source[s : s + settings.block] for s in starts.tolist()])
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()
