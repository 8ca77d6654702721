"""Add an expert stack's eps (``flatlora_kernels.noise``, "Expert stacks") to its merged weight, in place.

``add_stack_noise_(merged, ...)`` turns ``W + delta`` (the ``[E, N, K]`` out x in view of the stack a
parametrization returns) into ``W + delta + eps`` chunk by chunk: for a chunk of rows it takes the
row norms of ``W + s*B@A`` in fp32 (from ``merged`` itself when it is fp32, else folded again),
regenerates ``z`` with the package's generator and adds ``row_scale * z``. So the transient is two
chunk-sized buffers at most (``cpu_tuning.CHUNK_BYTES`` of fp32 rows, or half the stack), never more than a
stack, and nothing is kept: backward needs no eps (``d(W + delta + eps) / d delta = 1``).

Generators, all the one stream: the C++ extension on CPU (``"cpp"``: ``_C.add_stack_noise_``,
``csrc/stack_noise.cpp``, regenerates each row's normals and adds them into the row, no z buffer),
the Triton z tile (``kernels/noise_tile.py``, through ``backends.triton_backend.normal_rows``) on CUDA
or under ``TRITON_INTERPRET=1`` (``"triton"``), and ``noise.normal_rows`` in plain PyTorch
(``"reference"``); the last two add a chunk of z with one ``addcmul_``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import noise
from ..backends import cpu_tuning, resolve

__all__ = ["add_stack_noise_"]


def _add_eps_(backend: str, target: Tensor, row_scale: Tensor, seed: Tensor, first_row: int) -> None:
    """``target[e, i, :] += row_scale[e, i] * z(seed, first_row + e*rows + i, :)`` in place, the sum rounded
    once to the target's dtype."""
    if backend == "cpp":  # the generator adds into each row itself: no z buffer
        from ..backends.cpp import _C

        if not hasattr(_C, "add_stack_noise_"):
            raise RuntimeError(
                "flatlora_kernels._C was built before csrc/stack_noise.cpp existed: rebuild it from the repository "
                "root with `python setup.py build_ext --inplace` (or pass fused=False to enable_flat_lora)"
            )
        _C.add_stack_noise_(target, row_scale, int(seed), first_row)
        return
    experts, rows, in_features = target.shape
    if backend == "triton":
        from ..backends import triton_backend

        z = triton_backend.normal_rows(seed, in_features, first_row, first_row + experts * rows)
    else:
        z = noise.normal_rows(seed, in_features, first_row, first_row + experts * rows, device=seed.device)
    target.addcmul_(z.view(experts, rows, in_features), row_scale[..., None])


def _chunks(experts: int, rows: int, row_bytes: int, cap: int):
    """``(expert slice, row slice)`` pieces of the stack, each contiguous in the stream and within ``cap``
    bytes: whole experts when one fits, else rows of one expert."""
    per_expert = rows * row_bytes
    if per_expert <= cap:
        step = max(1, cap // per_expert)
        for e0 in range(0, experts, step):
            yield slice(e0, min(e0 + step, experts)), slice(0, rows)
        return
    step = max(1, cap // row_bytes)
    for e in range(experts):
        for r0 in range(0, rows, step):
            yield slice(e, e + 1), slice(r0, min(r0 + step, rows))


@torch.no_grad()
def add_stack_noise_(
    merged: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    *,
    scaling: float,
    sigma: Tensor,
    seed: Tensor,
    backend: str = "auto",
) -> Tensor:
    """``merged += eps`` in place and return it. ``merged`` holds ``W + s*B@A`` (PEFT's fold, in W's
    dtype); every stack is read out x in: ``merged``, ``weight`` ``[E, N, K]`` (views of any strides),
    ``lora_A: [E, r, K]``, ``lora_B: [E, N, r]``. ``sigma`` (fp32) and ``seed`` (int64) are 0-dim
    tensors on the stack's device. When ``merged`` is in the merge dtype (fp32 stacks and adapters)
    its row norms are the definition's, to rounding, and are read from it; otherwise the rows are
    folded again in fp32."""
    experts, rows, in_features = weight.shape
    backend = resolve(backend, weight.device)
    dtype = noise.merge_dtype(weight, lora_A, lora_B)
    row_bytes = in_features * dtype.itemsize
    # At most two chunk-sized buffers live at once (the fold; or z and the cast in a mixed-dtype addcmul_):
    # capped at half the stack's own bytes, the transient stays within one stack even for small ones.
    # cpu_tuning.CHUNK_BYTES (the C++ backend's chunk cap, provenance there) is read per call: tests patch it there.
    cap = min(cpu_tuning.CHUNK_BYTES, max(row_bytes, merged.numel() * merged.element_size() // 2))
    for es, rs in _chunks(experts, rows, row_bytes, cap):
        target = merged[es, rs]
        if merged.dtype == dtype:  # merged is already the fold, in the dtype its norms are defined in
            norms = torch.linalg.vector_norm(target, dim=2)
        else:  # 16-bit stacks: the norms of the fp32 fold, not of its rounding
            fold = weight[es, rs].to(dtype, copy=True)
            fold.baddbmm_(lora_B[es, rs].to(dtype), lora_A[es].to(dtype), alpha=scaling)
            norms = torch.linalg.vector_norm(fold, dim=2)
            del fold
        row_scale = sigma * norms.float() / math.sqrt(in_features)
        _add_eps_(backend, target, row_scale, seed, es.start * rows + rs.start)
    return merged
