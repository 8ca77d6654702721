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

#: A chunk may also grow to the size of its pass's output (y forward, dx backward): LoRA's own pass
#: holds a second buffer of that size at the same moment, so the peak stays at LoRA's. Measured
#: (same CPU): bf16 2048x1024x1024 step memory 54 -> 25 MiB vs LoRA's 24.5, and one GEMM at large M.
CHUNK_GROWS_TO_OUTPUT: bool = True

#: A chunk is also at most this fraction of its pass's output (y forward, dx backward), so that the
#: chunk and the output together fit in the two output-sized buffers a LoRA pass holds at once (PEFT's
#: backward: dy's scaled copy or the branch's dx, and the base's dx), with room for the row scales
#: and rank-r products. Measured (AMD EPYC family 26, 8 x 1024 and 8 x 2048 layers at M=512, 4 x 2048
#: at M=2048, benchmarks/adapter_dtype_memory.py): at 1.0 the fused peak was 1.005-1.013x PEFT's in
#: fp32 (and 1.22x in bf16 with the old fp32 running sum), at 0.5 MEASURED_HALF. ``None``: no such cap.
CHUNK_OUTPUT_FRACTION: float | None = 0.5

#: ... but a chunk keeps at least this many rows (GEMMs of fewer rows lose speed; below it a small
#: output's chunk may exceed the fraction). MEASURED_ROWS
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
