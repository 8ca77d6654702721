"""The compared implementations of one Flat-LoRA layer, as plain callables.

Each implementation has a per-layer ``forward(x, layer) -> y`` and an optional ``perturbation``: a
context manager wrapped around the whole training step (forward *and* backward) of a list of
layers. Only the ``inplace`` baseline uses it: it edits the frozen weights before the step and
after it, as the official Flat-LoRA code does.

=============== ==================================================================================
``fused``       ``flat_lora_linear(backend="auto")``: C++ on CPU, Triton on CUDA. eps is
                regenerated from the seed in both passes, never stored.
``fused+compile`` the same layer under ``torch.compile(fullgraph=True)``.
``reference``   ``flat_lora_linear(backend="reference")``: same math and noise in plain PyTorch
                (the Philox stream in int64 tensor ops; weight-sized temporaries per pass).
``naive``       ``baselines.naive_randn_flat_lora_linear``: ``W + eps`` materialised and kept
                alive by autograd until backward, one weight-sized tensor per layer. Its eps is
                drawn with ``torch.randn`` (docs/DESIGN.md, "Baselines"), as in the GPU script:
                the package's stream in plain PyTorch would add its own cost (0.8x a LoRA step
                at 1024 x 1024, M = 2048, one CPU thread) to what this baseline is meant to show.
``inplace``     the official code's approach (docs/DESIGN.md, section 1): before the step, add ``torch.normal``
                noise to each frozen weight in place; after backward, regenerate it and subtract.
``lora``        plain LoRA, no noise (the cost to match).
=============== ==================================================================================
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator, Sequence

import torch
from torch import Tensor

from flatlora_kernels import flat_lora_linear
from flatlora_kernels.baselines import lora_linear, naive_randn_flat_lora_linear

from workloads import AdaptedLayer

Forward = Callable[[Tensor, AdaptedLayer], Tensor]
Perturbation = Callable[[Sequence[AdaptedLayer]], ContextManager[None]]


@contextlib.contextmanager
def no_perturbation(layers: Sequence[AdaptedLayer]) -> Iterator[None]:
    yield


@dataclass(frozen=True)
class Implementation:
    name: str
    forward: Forward
    perturbation: Perturbation = no_perturbation
    # Which noise the layer adds: "philox" (the stream of flatlora_kernels.noise, bit for bit),
    # "torch.normal" (the global generator, as the official code), "torch.randn" (naive_generator's
    # draw) or "none" (plain LoRA).
    noise: str = "philox"
    # Backends that are built separately (C++ extension, Triton, Inductor) may be missing on a machine:
    # an exception from them skips the benchmark with the reason. Plain-PyTorch code has no excuse to fail.
    may_be_unavailable: bool = False
    # Regenerates eps with the pure-PyTorch Philox (int64 tensor ops): seconds per pass for large
    # weights on a CPU, so large CPU cases skip it rather than take minutes.
    pure_torch_philox: bool = False


def step(impl: Implementation, layers: Sequence[AdaptedLayer], x: Tensor, grad_out: Tensor | None, grad_inputs):
    """One training step through ``layers``: forward, and backward when ``grad_out`` is given.

    Backward uses ``torch.autograd.grad`` (no ``.grad`` accumulation to zero between rounds).
    Returns ``(y, grads)`` with ``grads`` None for a forward-only step.
    """
    with impl.perturbation(layers):
        y = x
        for layer in layers:
            y = impl.forward(y, layer)
        grads = None if grad_out is None else torch.autograd.grad(y, grad_inputs, grad_out)
    return y, grads


# ---- the fused op ---------------------------------------------------------------------------------


def _flat_lora_forward(backend: str) -> Forward:
    """``flat_lora_linear(backend=...)`` on a layer, with the 0-dim sigma/seed tensors training passes."""

    def forward(x: Tensor, layer: AdaptedLayer) -> Tensor:
        return flat_lora_linear(
            x, layer.weight, layer.lora_A, layer.lora_B, layer.bias,
            scaling=layer.scaling, sigma=layer.sigma_tensor, seed=layer.seed_tensor, backend=backend,
        )

    return forward


def _fused_tensors(x, weight, lora_A, lora_B, bias, sigma, seed, scaling: float):
    return flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=scaling, sigma=sigma, seed=seed, backend="auto")


_compiled_fused = None


def _compiled_fused_forward(x: Tensor, layer: AdaptedLayer) -> Tensor:
    global _compiled_fused
    if _compiled_fused is None:
        # Every case has its own shapes; dynamic=False keeps the kernels specialised (the fastest
        # compiled code) and the raised limit keeps Dynamo from falling back to eager after 8 shapes.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _compiled_fused = torch.compile(_fused_tensors, fullgraph=True, dynamic=False)
    return _compiled_fused(
        x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, layer.sigma_tensor, layer.seed_tensor, layer.scaling
    )


# ---- unfused baselines ----------------------------------------------------------------------------


_naive_generators: dict[torch.device, torch.Generator] = {}


def naive_generator(layer: AdaptedLayer) -> torch.Generator:
    """The naive baseline's generator, reseeded from the layer's seed at every step (one ``manual_seed``
    call), so that ``sanity.py`` can redraw the same eps."""
    device = layer.weight.device
    if device not in _naive_generators:
        _naive_generators[device] = torch.Generator(device=device)
    return _naive_generators[device].manual_seed(layer.seed)


def _naive_forward(x: Tensor, layer: AdaptedLayer) -> Tensor:
    return naive_randn_flat_lora_linear(
        x, layer.weight, layer.lora_A, layer.lora_B, layer.bias,
        scaling=layer.scaling, sigma=layer.sigma, generator=naive_generator(layer),
    )


def _lora_forward(x: Tensor, layer: AdaptedLayer) -> Tensor:
    return lora_linear(x, layer.weight, layer.lora_A, layer.lora_B, layer.bias, scaling=layer.scaling)


def inplace_noise(layer: AdaptedLayer, row_std: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Draw one layer's noise the official way, from the *global* generator; returns ``(noise, row_std)``.

    Full-size temporaries, as in the official code: the merged weight ``W' = W + s*B@A`` (only when
    ``row_std`` is not given), the std expanded to the weight's shape, and the noise itself, all in
    the weight's dtype.
    """
    weight = layer.weight
    if row_std is None:
        merged = weight + layer.scaling * (layer.lora_B.detach() @ layer.lora_A.detach()).to(weight.dtype)
        row_std = layer.sigma * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(weight.shape[1])
        del merged
    std = row_std[:, None].expand_as(weight).contiguous()
    return torch.normal(0.0, std), row_std


@contextlib.contextmanager
def official_inplace_perturbation(layers: Sequence[AdaptedLayer]) -> Iterator[None]:
    """Add noise to every frozen weight in place for the step, then regenerate and subtract it.

    The official code seeds the global generator from the wall clock; a fixed seed (the first
    layer's) keeps runs reproducible and costs the same. Like the original, the subtraction rounds
    in the weight's dtype, so in bf16 ``(W + eps) - eps != W`` and the frozen weights drift.
    """
    row_stds = []
    with torch.no_grad():
        torch.manual_seed(layers[0].seed)
        for layer in layers:
            noise, row_std = inplace_noise(layer)
            layer.weight.add_(noise)
            row_stds.append(row_std)
            del noise
    try:
        yield
    finally:
        with torch.no_grad():
            torch.manual_seed(layers[0].seed)
            for layer, row_std in zip(layers, row_stds):
                noise, _ = inplace_noise(layer, row_std)
                layer.weight.sub_(noise)
                del noise


# ---- the catalogue --------------------------------------------------------------------------------

IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation("fused", _flat_lora_forward("auto"), may_be_unavailable=True),
        Implementation("fused+compile", _compiled_fused_forward, may_be_unavailable=True),
        Implementation("reference", _flat_lora_forward("reference"), pure_torch_philox=True),
        Implementation("naive", _naive_forward, noise="torch.randn"),
        Implementation("inplace", _lora_forward, perturbation=official_inplace_perturbation, noise="torch.normal"),
        Implementation("lora", _lora_forward, noise="none"),
    )
}
