"""The C++ CPU backend: thin wrappers over the ``flatlora_kernels._C`` extension (``csrc/``).

The perturbed weight ``W + s*B@A + eps`` is regenerated in row chunks (fp32; bf16 when the GEMMs
run in bf16) that feed BLAS directly, so a pass needs LoRA's memory plus one chunk. Tests lower the
cap to check that results do not depend on it.
"""

from __future__ import annotations

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

# Module attributes (read at call time) so tests can lower them; values and provenance: cpu_tuning.py.
chunk_bytes: int = cpu_tuning.CHUNK_BYTES
chunk_grows_to_output: bool = cpu_tuning.CHUNK_GROWS_TO_OUTPUT
parallel_grain: int = cpu_tuning.PARALLEL_GRAIN_ELEMENTS
workspace_bytes: int = cpu_tuning.WORKSPACE_BYTES
backward_fold_min_tokens_per_output: dict[str, float] = dict(cpu_tuning.BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT)


def cpu_isa() -> str:
    """The ISA of the C++ noise/row kernels chosen at load time: ``"avx512"``, ``"avx2"`` or
    ``"scalar"`` (``FLATLORA_CPU_ISA`` forces a lower level; an unsupported one raises ValueError)."""
    return _C.cpu_isa()


def _cap(output_elements: int, element_size: int) -> int:
    return max(chunk_bytes, output_elements * element_size) if chunk_grows_to_output else chunk_bytes


def forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    cap = _cap(x.shape[0] * weight.shape[0], x.element_size())
    return _C.forward(x, weight, lora_A, lora_B, bias, float(scaling), sigma, seed, cap, parallel_grain, workspace_bytes)


def backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx):
    cap = _cap(x.shape[0] * weight.shape[1], x.element_size())
    ratio = backward_fold_min_tokens_per_output.get(str(x.dtype).removeprefix("torch."), 0.0)
    fold_lora = x.shape[0] >= ratio * weight.shape[0]
    return _C.backward(
        dy, x, weight, lora_A, lora_B, row_scale, float(scaling), seed, bool(compute_dx), fold_lora, cap,
        parallel_grain, workspace_bytes,
    )
