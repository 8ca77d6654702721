"""The C++ CPU backend's tuning, in one place: read at call time by ``backends/cpp.py`` and
``quantized/cpp_backend.py`` (passed to ``csrc/`` on every call, which has no defaults of its own;
tests patch the values here) and by the benchmarks. Each value says where it
comes from. Constants that are properties of the code (vector widths, register blocking) are not
here: they are commented where they are defined in ``csrc/``.
"""

from __future__ import annotations

#: Cap on one regenerated chunk of the perturbed weight, in bytes (at least one row is built). The one
#: definition for the CPU family (``backends/cpp.py: chunk_cap`` reads it).
#: Measured (AMD EPYC family 26, 2 threads, shared machine): splitting a 1024x1024 layer's GEMM in
#: two cost ~5%. Measured (Intel Xeon with AMX, 2 threads, oneDNN 3.12 bf16): a 768x3072 bf16 layer
#: (4.5 MiB) under a 4 MiB cap ran as two 384-row GEMMs of 1.33 ms each where one 768-row GEMM takes
#: 1.64 ms (oneDNN's 2-thread split of N = 384 is slow; 256 rows take 0.59 ms), fused/LoRA 2.1-2.25x
#: -> 1.5-1.7x at M=512 with 8 MiB. So the cap holds 768x3072 in bf16 and 1024x2048 in fp32; not a sweep.
CHUNK_BYTES: int = 8 << 20

#: A chunk may also grow past CHUNK_BYTES with its pass's output (y forward, dx backward), to half of
#: it under CHUNK_OUTPUT_FRACTION: LoRA's own pass holds output-sized buffers at the same moment, so
#: the peak stays at LoRA's with fewer GEMMs at large M. Measured (same CPU, growing to the whole
#: output): bf16 2048x1024x1024 step memory 54 -> 25 MiB vs LoRA's 24.5.
CHUNK_GROWS_TO_OUTPUT: bool = True

#: A chunk is also at most this fraction of its pass's output (y forward, dx backward): a LoRA
#: backward holds dy plus two dx-sized buffers at once (PEFT: its branch's dx and the base's), the
#: fused one dy, its dx and the chunk, so half the output leaves room for the row scales and rank-r
#: products. Measured (AMD EPYC family 26, one thread, step peak over PEFT's, bias-free layers,
#: ``benchmarks/adapter_dtype_memory.py``; dense 8 x 1024 / 8 x 2048 at M=512, 4 x 2048 bf16 at
#: M=2048): the whole weight (the 8 MiB cap alone) 1.11-1.33x; a chunk of the output 1.005-1.013x in
#: fp32; half of it 0.93-0.99x (bf16 needs dx accumulated in place, ``csrc/chunk_passes.h``). Step time
#: (one layer fwd + bwd, one thread, 3 interleaved rounds, 1024^2 and 2048^2, M=512 and 2048, bf16 and
#: fp32): 0.97-1.01x the whole-chunk step, fp32 1024^2 M=512 1.06x within its spread (22.7-24.9 ms vs
#: 22.7-23.2), where callgrind counts 618.3 M instructions vs 613.3 M (+0.8%, one thread, C++ forward +
#: backward of 2 steps). ``None``: no such cap (tests).
CHUNK_OUTPUT_FRACTION: float | None = 0.5

#: ... but a chunk keeps at least this many rows, so a small output does not split the GEMM into
#: thin slices (there the chunk may exceed the fraction; at 128 rows a square layer keeps its chunk
#: within the output down to M=128). Measured (same CPU, one thread, load ~4, fused step medians of 9
#: interleaved, floors 32 / 64 / 128 / 256 / whole weight): bf16 1024^2 M=128 3.04 / 3.01 / 2.81 /
#: 2.66 / 2.54 ms, M=32 2.74 / 2.27 / 2.06 / 1.95 / 1.87; bf16 2048^2 M=128 12.5 / 12.2 / 11.8 / 11.4 /
#: 12.1; fp32 1024^2 M=128 7.15 / 7.08 / 6.96 / 6.98 / 7.21. So 128 rows cost ~10% at bf16 1024^2,
#: M <= 128 (a 2-3 ms step), nothing at 2048^2 or in fp32; 32-64 rows cost more.
CHUNK_MIN_ROWS: int = 128

#: A chunk of at most this many bytes is built in a per-thread buffer kept across calls (one per
#: calling thread, never per layer); bigger ones (the cap grown to the output's size) are allocated
#: per pass. Measured (Intel Xeon with AMX, 2 threads, 1024x1024 bf16, M=512): a fresh 2 MiB chunk
#: per pass was faulted in page by page again (glibc returns the freed heap top to the OS): about a
#: third of the fused step's kernel time. Equal to CHUNK_BYTES so every capped chunk reuses it.
WORKSPACE_BYTES: int = CHUNK_BYTES

#: About this many chunk elements per parallel task when a chunk is built (``at::parallel_for``
#: grain, rounded to whole rows, at least one). A guess sized to amortise a thread hand-off (~16 K
#: elements is ~10 us of building), not a sweep; at 1024 columns it gives 16-row tasks, 64 per 1024^2
#: chunk, so two threads stay balanced.
PARALLEL_GRAIN_ELEMENTS: int = 16384

#: The backward folds ``s*B@A`` into its regenerated chunks when ``M >= ratio * out_features``, ratio
#: per compute dtype (absent: always fold); below, chunks hold ``W + eps`` only and dx adds
#: ``(s*dy@B)@A``. Folding costs ``r*N*K`` FMAs in the chunk build, the unfolded branch one
#: ``[M, r] x [r, K]`` GEMM (``s*dy@B`` is needed for dA anyway), so the arithmetic crossover is
#: ``M = N``. Measured (AMD EPYC family 26, one thread, CPU time, r=16; 1024x1024, 768x3072,
#: 3072x768): bf16 unfolded/folded backward 0.85-0.91x at M/N <= 0.5, 0.97x at M = N, 1.00x above;
#: fp32 0.98-1.03x everywhere (its rank-16 GEMM costs what the fold does), so fp32 always folds.
#: A ratio <= 1 keeps M = N folded: the backward's chunks then equal the forward's bit for bit
#: (tests/test_noise_under_load.py checks that with ``dy = I``).
BACKWARD_FOLD_MIN_TOKENS_PER_OUTPUT: dict[str, float] = {"bfloat16": 1.0}

#: A 4-bit layer's chunk may also grow to this fraction of ``deq(W)`` in the compute dtype
#: (``quantized/cpp_backend.py``). PEFT QLoRA (bitsandbytes) holds all of ``deq(W)`` in each pass, so
#: the peak stays below its; fewer, larger GEMMs. Measured (AMD EPYC, 2 threads, fp32, M=512,
#: 4096x4096, forward + dx GEMMs alone): 776 ms in 512-row chunks (the 8 MiB cap), 714 / 685 ms in
#: 1024 / 2048-row ones, 652 ms whole. At a half, this rule alone never puts all of ``deq(W)`` in one
#: chunk (the output-size rule may, for an output larger than the weight, as for a dense layer).
#: ``None``: the dense caps only (tests).
DEQUANTIZED_4BIT_FRACTION: float | None = 0.5
