"""The C++ CPU backend's tuning, in one place: read by ``backends/cpp.py`` (passed to ``csrc/`` on
every call, which has no defaults of its own) and by the benchmarks. Each value says where it
comes from.
"""

from __future__ import annotations

#: Cap on one regenerated chunk of the perturbed weight, in bytes (at least one row is built).
#: Measured (AMD EPYC family 26, 2 threads, shared machine): splitting a 1024x1024 layer's GEMM in
#: two cost ~5%, so the cap holds a whole 1024x1024 fp32 layer (256 rows of a 4096-wide one).
#: The exact value between "one 1024^2 layer" and larger is a guess, not a sweep.
CHUNK_BYTES: int = 4 << 20

#: A chunk may also grow to the size of its pass's output (y forward, dx backward): LoRA's own pass
#: holds a second buffer of that size at the same moment, so the peak stays at LoRA's. Measured
#: (same CPU): bf16 2048x1024x1024 step memory 54 -> 25 MiB vs LoRA's 24.5, and one GEMM at large M.
CHUNK_GROWS_TO_OUTPUT: bool = True

# Not here yet: csrc/perturbed_chunk.cpp's ~16K-element parallel grain per chunk-building task (a
# guess sized to amortise a thread hand-off, not measured) is still a literal in the C++.
