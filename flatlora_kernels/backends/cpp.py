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

#: Cap on one regenerated chunk of the perturbed weight, in bytes (at least one row).
chunk_bytes: int = _C.DEFAULT_CHUNK_BYTES

#: A chunk may also grow to the size of its pass's output (y forward, dx backward): LoRA's own pass
#: holds a second buffer of that size at the same moment (its branch's output before the sum), so
#: the peak stays at LoRA's, and large M gets one GEMM instead of several (in bf16 that also avoids
#: summing per-chunk dx products in an fp32 buffer).
chunk_grows_to_output: bool = True


def _cap(output_elements: int, element_size: int) -> int:
    return max(chunk_bytes, output_elements * element_size) if chunk_grows_to_output else chunk_bytes


def forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    cap = _cap(x.shape[0] * weight.shape[0], x.element_size())
    return _C.forward(x, weight, lora_A, lora_B, bias, float(scaling), sigma, seed, cap)


def backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx):
    cap = _cap(x.shape[0] * weight.shape[1], x.element_size())
    return _C.backward(dy, x, weight, lora_A, lora_B, row_scale, float(scaling), seed, bool(compute_dx), cap)
