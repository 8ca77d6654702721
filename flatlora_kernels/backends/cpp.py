"""The C++ CPU backend: thin wrappers over the ``flatlora_kernels._C`` extension (``csrc/``).

The perturbed weight ``W + s*B@A + eps`` is regenerated in row chunks (fp32; bf16 when the GEMMs
run in bf16) that feed BLAS directly, so a pass needs LoRA's memory plus one chunk. Tests lower the
cap to check that results do not depend on it.
"""

from __future__ import annotations

import torch

try:
    from .. import _C
except ImportError as error:  # no silent fallback: a missing build is an error with the fix
    raise ImportError(
        "flatlora_kernels: the C++ extension flatlora_kernels._C is not built, so backend='cpp' "
        "(the default on CPU) cannot run. Build it from the repository root with:\n"
        "    pip install --no-build-isolation -e .\n"
        "(or `python setup.py build_ext --inplace`), or pass backend='reference'."
    ) from error

from . import cpu_tuning

# Tuning values are read from cpu_tuning.py at every call (tests patch them there).


def cpu_isa() -> str:
    """The ISA of the C++ noise/row kernels chosen at load time: ``"avx512"``, ``"avx2"`` or
    ``"scalar"`` (``FLATLORA_CPU_ISA`` forces a lower level; an unsupported one raises ValueError)."""
    return _C.cpu_isa()


def chunk_cap(output_elements: int, element_size: int, in_features: int) -> int:
    """The chunk byte cap of a pass whose output has ``output_elements`` (chunk and output elements of
    ``element_size`` bytes, chunk rows of ``in_features``): ``CHUNK_BYTES``, or the output's size when
    larger and ``CHUNK_GROWS_TO_OUTPUT``; then at most ``CHUNK_OUTPUT_FRACTION`` of the output, but
    never below ``CHUNK_MIN_ROWS`` rows."""
    output_bytes = output_elements * element_size
    cap = cpu_tuning.CHUNK_BYTES
    if cpu_tuning.CHUNK_GROWS_TO_OUTPUT:
        cap = max(cap, output_bytes)
    fraction = cpu_tuning.CHUNK_OUTPUT_FRACTION
    if fraction is not None:
        cap = min(cap, max(int(fraction * output_bytes), cpu_tuning.CHUNK_MIN_ROWS * in_features * element_size))
    return cap


def chunk_element_size(x) -> int:
    """Bytes per chunk element (``csrc/chunk_passes.h: gemm_dtype``): bf16 and fp64 chunks for bf16 and
    fp64 compute, fp32 otherwise (fp16 runs fp32 GEMMs)."""
    return {torch.bfloat16: 2, torch.float64: 8}.get(x.dtype, 4)


def fold_lora(tokens: int, out_features: int, dtype) -> bool:
    """Whether a backward folds ``s*B@A`` into its chunks (``BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT``)."""
    ratio = cpu_tuning.BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT.get(str(dtype).removeprefix("torch."), 0.0)
    return tokens >= ratio * out_features


def forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    cap = chunk_cap(x.shape[0] * weight.shape[0], chunk_element_size(x), weight.shape[1])
    return _C.forward(x, weight, lora_A, lora_B, bias, float(scaling), sigma, seed, cap,
                      cpu_tuning.PARALLEL_GRAIN_ELEMENTS, cpu_tuning.WORKSPACE_BYTES)  # fmt: skip


def backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx):
    cap = chunk_cap(x.shape[0] * weight.shape[1], chunk_element_size(x), weight.shape[1])
    return _C.backward(
        dy, x, weight, lora_A, lora_B, row_scale, float(scaling), seed, bool(compute_dx),
        fold_lora(x.shape[0], weight.shape[0], x.dtype), cap, cpu_tuning.PARALLEL_GRAIN_ELEMENTS,
        cpu_tuning.WORKSPACE_BYTES,
    )
