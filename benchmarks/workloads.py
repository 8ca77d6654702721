"""What the benchmarks measure: layer shapes of real models, token counts, and the tensors of a case.

Every implementation of a case runs on the very same tensors (built once from fixed seeds), so the
timings differ only by the implementation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from flatlora_kernels.baselines import make_layer

RANK = 16
LORA_ALPHA = 32  # scaling s = alpha / r = 2, as in the reference measurements (docs/DESIGN.md, "Measured anchors")
SIGMA = 0.05  # the paper's default noise level for T5-base and Llama-2
NOISE_SEED = 20250117  # the Philox seed of the timed step; any fixed value does


@dataclass(frozen=True)
class LayerShape:
    """One adapted ``nn.Linear`` of a real model: ``weight: [out_features, in_features]``."""

    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class LinearCase:
    """One benchmarked layer: ``tokens`` rows of input (batch x sequence, flattened) through ``shape``."""

    shape: LayerShape
    tokens: int
    dtype: torch.dtype
    rank: int = RANK

    @property
    def id(self) -> str:
        return f"{self.shape.name}-M{self.tokens}-{dtype_name(self.dtype)}"

    def result_fields(self) -> dict:
        """What identifies the case in a result's ``extra_info`` (``benchmarks/report.py`` reads these)."""
        shape = self.shape
        return dict(
            shape=shape.name, M=self.tokens, N=shape.out_features, K=shape.in_features, r=self.rank,
            dtype=dtype_name(self.dtype),
        )


@dataclass(frozen=True)
class StackCase(LinearCase):
    """``depth`` square layers (``shape``, named ``stack-<width>``) applied one after another: memory
    that grows with depth. Build it with ``StackCase.square``."""

    depth: int = 1

    @classmethod
    def square(cls, width: int, tokens: int, depth: int, dtype: torch.dtype) -> "StackCase":
        return cls(LayerShape(f"stack-{width}", width, width), tokens, dtype, depth=depth)

    @property
    def width(self) -> int:
        return self.shape.in_features

    @property
    def id(self) -> str:
        return f"w{self.width}-M{self.tokens}-L{self.depth}-{dtype_name(self.dtype)}"

    def result_fields(self) -> dict:
        return {**super().result_fields(), "depth": self.depth}


# Shapes of LoRA-targeted layers. T5-base and ViT-B share d_model = 768 and d_ff = 3072.
LLAMA2_7B_ATTN = LayerShape("llama2-7b.qkvo", 4096, 4096)
LLAMA2_7B_MLP_UP = LayerShape("llama2-7b.gate_up", 11008, 4096)
LLAMA2_7B_MLP_DOWN = LayerShape("llama2-7b.down", 4096, 11008)
T5_VIT_ATTN = LayerShape("t5-base|vit-b.attn", 768, 768)
T5_VIT_MLP_IN = LayerShape("t5-base|vit-b.mlp_in", 3072, 768)
T5_VIT_MLP_OUT = LayerShape("t5-base|vit-b.mlp_out", 768, 3072)
CPU_TARGET = LayerShape("cpu-target", 1024, 1024)  # the shape the C++ backend is tuned on
TINY_SQUARE = LayerShape("tiny", 128, 128)
TINY_WIDE = LayerShape("tiny-wide", 192, 96)

GPU_TOKEN_SWEEP = (256, 1024, 2048, 4096, 8192, 16384)
CPU_TOKEN_SWEEP = (256, 512, 1024, 2048)
STACK_DEPTHS = (1, 2, 4, 8, 16)
SHORT_STACK_DEPTHS = (1, 2, 4)


def linear_cases(device: torch.device, full: bool) -> list[LinearCase]:
    if not full:  # CI smoke run: two token counts (so the ratio plot has a curve) and a non-square layer
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        return [LinearCase(TINY_SQUARE, 64, dtype), LinearCase(TINY_SQUARE, 256, dtype), LinearCase(TINY_WIDE, 64, dtype)]
    if device.type == "cpu":
        fp32 = torch.float32
        sweep = [LinearCase(CPU_TARGET, m, fp32) for m in CPU_TOKEN_SWEEP]
        real = [LinearCase(s, 256, fp32) for s in (T5_VIT_ATTN, T5_VIT_MLP_IN, T5_VIT_MLP_OUT, LLAMA2_7B_ATTN)]
        # bf16 at two token counts: CPU bf16 GEMMs, and the inplace baseline's bf16 weight drift.
        return sweep + real + [LinearCase(CPU_TARGET, m, torch.bfloat16) for m in (512, 2048)]
    bf16 = torch.bfloat16
    sweep = [LinearCase(s, m, bf16) for s in (LLAMA2_7B_ATTN, LLAMA2_7B_MLP_UP) for m in GPU_TOKEN_SWEEP]
    real = [LinearCase(s, 8192, bf16) for s in (LLAMA2_7B_MLP_DOWN, T5_VIT_ATTN, T5_VIT_MLP_IN, T5_VIT_MLP_OUT)]
    return sweep + real


def memory_layer_cases(device: torch.device, full: bool) -> list[LinearCase]:
    """Single layers whose peak memory is recorded (the C++ target on CPU; the Llama layers on GPU)."""
    if not full:
        return [LinearCase(TINY_SQUARE, 256, torch.float32 if device.type == "cpu" else torch.bfloat16)]
    if device.type == "cpu":
        return [LinearCase(CPU_TARGET, 2048, torch.float32)]
    return [LinearCase(LLAMA2_7B_ATTN, 8192, torch.bfloat16), LinearCase(LLAMA2_7B_MLP_UP, 8192, torch.bfloat16)]


def stack_cases(device: torch.device, full: bool) -> list[StackCase]:
    if not full:  # three depths are enough to show growth; 16 profiled layers would double the smoke run
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        return [StackCase.square(128, 64, depth, dtype) for depth in SHORT_STACK_DEPTHS]
    if device.type == "cpu":  # 512 wide: naive's kept weight (1 MiB) is as big as a layer's activations
        return [StackCase.square(512, 512, depth, torch.float32) for depth in STACK_DEPTHS]
    return [StackCase.square(4096, 8192, depth, torch.bfloat16) for depth in STACK_DEPTHS]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class AdaptedLayer:
    """The tensors of one LoRA-adapted linear layer, as a training step sees them.

    ``weight`` and ``bias`` are frozen; ``lora_A`` / ``lora_B`` require grad. ``sigma`` and ``seed``
    exist both as Python numbers (for the baselines) and as 0-dim tensors on the device (what the
    fused op gets in training: no recompiles under torch.compile, no host sync).
    """

    weight: Tensor
    lora_A: Tensor
    lora_B: Tensor
    bias: Tensor | None
    scaling: float
    sigma: float
    seed: int
    sigma_tensor: Tensor
    seed_tensor: Tensor

    def trainable(self) -> list[Tensor]:
        return [self.lora_A, self.lora_B]


def adapted_layer(
    out_features: int,
    in_features: int,
    rank: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    init_seed: int,
    sigma: float = SIGMA,
    noise_seed: int = NOISE_SEED,
) -> AdaptedLayer:
    """A layer in a mid-training state (``flatlora_kernels.baselines.make_layer``: B is non-zero, at
    B = 0 the adapter would be a no-op), with trainable factors."""
    weight, lora_A, lora_B, bias = make_layer(
        out_features, in_features, rank, dtype=dtype, device=device, seed=init_seed, lora_B_std=0.1, bias_std=0.1
    )
    return AdaptedLayer(
        weight=weight,
        lora_A=lora_A.requires_grad_(True),
        lora_B=lora_B.requires_grad_(True),
        bias=bias,
        scaling=LORA_ALPHA / rank,
        sigma=sigma,
        seed=noise_seed,
        sigma_tensor=torch.tensor(sigma, dtype=torch.float32, device=device),
        seed_tensor=torch.tensor(noise_seed, dtype=torch.int64, device=device),
    )


@dataclass
class Workload:
    """Layers plus the step's input ``x`` (requires grad: inner layers of a model need dx) and ``dy``."""

    layers: list[AdaptedLayer]
    x: Tensor
    grad_out: Tensor

    def grad_inputs(self) -> list[Tensor]:
        return [self.x] + [t for layer in self.layers for t in layer.trainable()]


@functools.lru_cache(maxsize=1)  # cases run one after another: keep only the current one alive
def linear_workload(case: LinearCase, device: torch.device) -> Workload:
    shape = case.shape
    layer = adapted_layer(shape.out_features, shape.in_features, case.rank, case.dtype, device, init_seed=1)
    return Workload([layer], *_input_and_grad(case.tokens, shape.in_features, shape.out_features, case.dtype, device))


@functools.lru_cache(maxsize=1)
def stack_workload(case: StackCase, device: torch.device) -> Workload:
    layers = [
        adapted_layer(case.width, case.width, case.rank, case.dtype, device, init_seed=100 + i, noise_seed=NOISE_SEED + i)
        for i in range(case.depth)
    ]
    return Workload(layers, *_input_and_grad(case.tokens, case.width, case.width, case.dtype, device))


def _input_and_grad(tokens: int, in_features: int, out_features: int, dtype, device) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, in_features, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    grad_out = torch.randn(tokens, out_features, generator=g).to(device=device, dtype=dtype)
    return x, grad_out
