"""The C++ CPU backend: thin wrappers over the ``flatlora_kernels._C`` extension (``csrc/``).

The perturbed weight ``W + s*B@A + eps`` is regenerated in row chunks of at most ``chunk_bytes``
(fp32) that feed BLAS directly, so the pass needs LoRA's memory plus one chunk. Tests lower the cap
to check that results do not depend on it.
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

# Cap on one regenerated chunk of the perturbed weight, in bytes (fp32 rows; at least one row).
chunk_bytes: int = _C.DEFAULT_CHUNK_BYTES


def forward(x, weight, lora_A, lora_B, bias, scaling, sigma, seed):
    return _C.forward(x, weight, lora_A, lora_B, bias, float(scaling), sigma, seed, chunk_bytes)


def backward(dy, x, weight, lora_A, lora_B, row_scale, scaling, seed, compute_dx):
    return _C.backward(dy, x, weight, lora_A, lora_B, row_scale, float(scaling), seed, bool(compute_dx), chunk_bytes)
