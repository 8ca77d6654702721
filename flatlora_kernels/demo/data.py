"""The demo's data: real handwritten digits, a source domain to pretrain on, a shifted target domain
to fine-tune on, and corrupted copies of the target test set.

Why this is a fair small stand-in for the paper's setting: fine-tuning adapts a model pretrained on
one distribution to a related but shifted one with little labelled data, and Flat-LoRA's claim is
better generalisation there, including under corruption (the paper's CIFAR-100-C result). The UCI
handwritten digits ship inside scikit-learn (1,797 real 8x8 scans), so nothing is downloaded.

* source: upright digits, upsampled to 16x16 (the "pretraining corpus");
* target: *other* images of the same digits, rotated by 25-50 degrees (either way), shifted and
  thickened: the downstream task, with a small training set;
* corrupted target test sets: Gaussian noise, blur, contrast loss and pixel dropout, each at three
  severities (as CIFAR-C does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 16
NUM_CLASSES = 10


@dataclass
class Split:
    images: Tensor  # [n, IMAGE_SIZE * IMAGE_SIZE] in [0, 1]
    labels: Tensor  # [n] int64


@dataclass
class DigitsTask:
    source_train: Split
    source_test: Split
    target_train: Split
    target_val: Split  # for every choice; never the test set
    target_test: Split | None
    target_test_corrupted: dict[str, Split] | None  # "noise-1", ..., "dropout-3"

    def without_test(self) -> DigitsTask:
        """The task the validation search sees: no test split to touch by mistake."""
        return replace(self, target_test=None, target_test_corrupted=None)


def _load_digits() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the setup script installs it
        raise RuntimeError("the demo needs scikit-learn for its packaged digits data: pip install scikit-learn") from exc
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [n, 1, 8, 8]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def _shift_domain(images: Tensor, generator: torch.Generator) -> Tensor:
    """Rotate 25-50 degrees (random sign), translate up to 2 px, then thicken strokes."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 25 + 25) * math.pi / 180
    angle = angle * torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * (4 / IMAGE_SIZE)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, align_corners=False)
    return _thicken(moved).clamp(0, 1)


def _thicken(images: Tensor) -> Tensor:
    return torch.maximum(images, 0.6 * F.max_pool2d(images, kernel_size=3, stride=1, padding=1))


def _corrupt(images: Tensor, kind: str, severity: int, generator: torch.Generator) -> Tensor:
    level = severity / 3
    if kind == "noise":
        out = images + torch.randn(images.shape, generator=generator) * (0.15 + 0.25 * level)
    elif kind == "blur":
        width = 0.6 + 0.8 * level
        taps = torch.arange(-2, 3, dtype=torch.float32)
        kernel = torch.exp(-(taps**2) / (2 * width**2))
        kernel = (kernel[:, None] * kernel[None, :]) / kernel.sum() ** 2
        out = F.conv2d(images, kernel[None, None], padding=2)
    elif kind == "contrast":
        mean = images.mean(dim=(2, 3), keepdim=True)
        out = mean + (images - mean) * (0.6 - 0.4 * level)
    elif kind == "dropout":
        keep = torch.rand(images.shape, generator=generator) > (0.15 + 0.25 * level)
        out = images * keep
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return out.clamp(0, 1)


CORRUPTIONS = ("noise", "blur", "contrast", "dropout")


def make_digits_task(*, target_train_size: int = 300, target_val_size: int = 200, seed: int = 0) -> DigitsTask:
    """Split the digits into disjoint source / target images and build every evaluation set.

    The validation images are the same for every ``target_train_size``, so regimes compare fairly."""
    if target_train_size < 10 or target_val_size < 10:
        raise ValueError(f"target_train_size ({target_train_size}) and target_val_size ({target_val_size}) must be >= 10")
    images, labels = _load_digits()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    images, labels = images[order], labels[order]
    n_source = images.shape[0] // 2
    source_images, source_labels = images[:n_source], labels[:n_source]
    target_images = _shift_domain(images[n_source:], generator)
    target_labels = labels[n_source:]

    def split(img: Tensor, lab: Tensor) -> Split:
        return Split(img.flatten(1).contiguous(), lab)

    n_source_test = 200
    max_train = 300  # the test set starts after the largest training set, so it never changes with the regime
    if target_train_size > max_train:
        raise ValueError(f"target_train_size must be <= {max_train}, got {target_train_size}")
    test_start = max_train + target_val_size
    target_test_images = target_images[test_start:]
    corrupted = {
        f"{kind}-{severity}": split(_corrupt(target_test_images, kind, severity, generator), target_labels[test_start:])
        for kind in CORRUPTIONS
        for severity in (1, 2, 3)
    }
    return DigitsTask(
        source_train=split(source_images[n_source_test:], source_labels[n_source_test:]),
        source_test=split(source_images[:n_source_test], source_labels[:n_source_test]),
        target_train=split(target_images[:target_train_size], target_labels[:target_train_size]),
        target_val=split(target_images[max_train:test_start], target_labels[max_train:test_start]),
        target_test=split(target_test_images, target_labels[test_start:]),
        target_test_corrupted=corrupted,
    )
