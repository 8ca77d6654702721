"""Compiler resource report of the Flat-QLoRA Triton kernels for sm_90, without a GPU.

Records the kernel calls that ``flatlora_kernels/backends/triton_quantized.py`` makes for a 4096x4096
NF4 layer (double-quantized, bf16 dequantized dtype) on CPU tensors (nothing runs), compiles each with
Triton's own argument specialisation through ``benchmarks/gpu_kernels.py``'s ``compile_recorded``, and
prints registers, stack and ptxas spill stores per kernel. Run with TRITON_INTERPRET unset:

    python benchmarks/qlora_resources.py
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RANK, SCALING, SHAPE, TOKENS = 16, 2.0, (4096, 4096), (16, 64)


def _gpu_kernels():
    spec = importlib.util.spec_from_file_location("gpu_kernels", os.path.join(HERE, "gpu_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _recording(module, calls):
    class Recorder:  # stands in for wrap_triton: kernel[grid](*args, **kwargs) is recorded, not run
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    previous = module.traceable_kernel
    module.traceable_kernel = Recorder
    try:
        yield
    finally:
        module.traceable_kernel = previous


def recorded_launches(compute_dtype, factor_dtype):
    import bitsandbytes.functional as bnb_functional

    from flatlora_kernels.backends import triton_backend, triton_quantized
    from flatlora_kernels.quantized import Packed4bit

    n, k = SHAPE
    codes, state = bnb_functional.quantize_4bit(torch.zeros(n, k, dtype=torch.bfloat16), blocksize=64,
                                                quant_type="nf4", compress_statistics=True)
    packed = Packed4bit.from_quant_state(codes, state)
    lora_A, lora_B = torch.zeros(RANK, k, dtype=factor_dtype), torch.zeros(n, RANK, dtype=factor_dtype)
    layer = triton_quantized.Layer4bit(*packed.op_args(), lora_A, lora_B, SCALING)
    seed, sigma, scales = torch.zeros((), dtype=torch.int64), torch.zeros(()), torch.zeros(n)
    calls, labels = [], []
    with _recording(triton_backend, calls):
        triton_quantized.row_scale(layer, sigma, compute_dtype)
        labels.append("quantized_row_scale")
        triton_quantized.perturbed_weight_rows(layer, scales, seed, 0, n, compute_dtype)
        labels.append("quantized_perturbed_weight")
        for m in TOKENS:
            triton_quantized.forward_in_register(torch.zeros(m, k, dtype=compute_dtype), layer, None, scales, seed)
            triton_quantized.input_grad_in_register(torch.zeros(m, n, dtype=compute_dtype), layer, scales, seed)
            labels += [f"quantized_fused_forward M={m}", f"quantized_fused_input_grad M={m}"]
    assert len(calls) == len(labels)
    return [(label, *call) for label, call in zip(labels, calls)]


def main(arch: int = 90) -> None:
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compiles real kernels: run with TRITON_INTERPRET unset")
    gpu_kernels = _gpu_kernels()
    target = GPUTarget("cuda", arch, 32)
    print(f"| kernel [x, A/B dtypes], r={RANK}, {SHAPE[0]}x{SHAPE[1]} NF4 | registers | stack B | spill stores B |")
    print("|---|---|---|---|")
    for compute_dtype, factor_dtype in ((torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                        (torch.float16, torch.float16), (torch.float32, torch.float32)):  # fmt: skip
        for label, kernel, args, kwargs in recorded_launches(compute_dtype, factor_dtype):
            compiled = gpu_kernels.compile_recorded(kernel, args, kwargs, target)
            usage, _sass = gpu_kernels.compiled_resources(compiled, arch)
            dtypes = f"{str(compute_dtype)[6:]}, {str(factor_dtype)[6:]}"
            print(f"| {label} [{dtypes}] | {usage['registers']} | {usage['stack_bytes']} | {usage['spill_stores']} |")


if __name__ == "__main__":
    main()
