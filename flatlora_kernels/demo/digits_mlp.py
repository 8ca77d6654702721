"""The demo's network and its pretraining on the source domain (full fine-tuning, every weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import IMAGE_SIZE, NUM_CLASSES, Split


class DigitsMLP(nn.Module):
    """A 4-layer MLP on 16x16 digits: small enough for a CPU, deep enough for adapters to matter."""

    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden // 2)
        self.head = nn.Linear(hidden // 2, NUM_CLASSES)

    def forward(self, x):
        x = F.gelu(self.fc1(x))
        x = F.gelu(self.fc2(x))
        x = F.gelu(self.fc3(x))
        return self.head(x)


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, split.labels.numel(), batch_size):
        images = split.images[start : start + batch_size].to(device)
        correct += (model(images).argmax(1).cpu() == split.labels[start : start + batch_size]).sum().item()
    model.train(was_training)
    return correct / split.labels.numel()


def pretrain(train: Split, *, steps: int, seed: int, device: torch.device, batch_size: int = 64) -> DigitsMLP:
    """Train every weight on the source domain; this plays the role of the pretrained checkpoint."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsMLP().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        index = torch.randint(0, train.labels.numel(), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(train.images[index].to(device)), train.labels[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()
