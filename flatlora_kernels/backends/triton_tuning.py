"""The Triton backend's tuning, in one place: read by ``backends/triton_backend.py`` at call time and
by ``benchmarks/gpu_kernels.py``. Each value says where it comes from. Nothing here has been timed on
a GPU yet; "compiled" means checked against the sm_90 resource report
(``benchmarks/results/sm90_resources.md``: registers, no stack beyond libdevice's 32-byte sin/cos
scratch), which says nothing about speed.
"""

from __future__ import annotations

#: Cap on one regenerated chunk of ``W'`` (bytes, compute dtype): the only memory the backend adds
#: to LoRA's. Guess, sized to the memory target: 16 MiB is under 1% of LoRA's measured peak for a
#: 16-layer 4096-wide stack at M=8192 (docs/DESIGN.md, "Why not naive perturbation"). Not swept.
CHUNK_BYTES: int = 16 * 2**20

#: A chunk may also grow to the size of its pass's output (y forward, dx backward): LoRA's own pass
#: holds a second buffer of that size at the same moment (its branch's GEMM output, before the sum),
#: so the peak stays at LoRA's and large M gets fewer, wider GEMMs. Reasoned from the memory
#: argument (the CPU backend measured it, backends/cpu_tuning.py); its GPU speed is a guess.
CHUNK_GROWS_TO_OUTPUT: bool = True

#: Chunk lengths are rounded down to this many rows/counters (when the cap allows), so chunk views
#: handed to cuBLAS start 16-byte aligned and the regeneration kernel's counter offsets are multiples
#: of 16 (vectorised loads of W, docs/DESIGN.md "GPU code generation"). Guess.
CHUNK_ALIGN: int = 64

#: Streamed backward: multiply a counter chunk's four column strips by one strided-batched GEMM
#: (``torch.bmm`` writing straight into a strided view of dx; every dx element still comes from one
#: GEMM) instead of four narrow ones; only when K = 4*Kq (K % 4 == 0), else the four-GEMM loop.
#: Off until a GPU run measures it and checks cuBLAS takes the view without a copy (on CPU it does,
#: bit-identical to the loop). Guess.
BATCHED_STRIP_GEMM: bool = False

#: Streamed backward: when all of ``W'`` takes at most this many bytes (compute dtype), regenerate it
#: whole and run one full-width dx GEMM, instead of counter chunks of four strip GEMMs each. At small
#: M the strips under-fill the GPU (M=2048, N=K=4096, 16 MiB chunks: [2048, 512] outputs, 32 tiles of
#: 128x256 for 132 SMs); the price is W' held whole, up to this many bytes instead of the chunk cap.
#: 0 (off) until a GPU run measures it (``benchmarks/gpu_kernels.py`` times both ways). Guess.
WHOLE_WEIGHT_INPUT_GRAD_BYTES: int = 0

#: The dispatcher's auto rule: the in-register path for ``M <= IN_REGISTER_MAX_TOKENS`` and M within
#: one token tile of that pass's fused kernel (``MAX_BLOCK_TOKENS`` below). Guess: to be measured
#: (M = 16..512 at N = K = 4096, ``benchmarks/gpu_kernels.py`` crossover sweep).
IN_REGISTER_MAX_TOKENS: int = 64

#: Small M gives the in-register kernels few output tiles; they split their reduction loop until the
#: grid has about this many programs per SM (fp32 partials, summed after). Guess.
IN_REGISTER_PROGRAMS_PER_SM: int = 2

#: Largest rank block of the ``B@A`` tiles (``kernels/weight_tile.py``): larger ranks loop over
#: blocks at run time, a rank within one block takes no loop, except where ``B@A`` is an exact fp32
#: dot (FMA units, operands in registers), which always loops. Compiled: no spills at r = 16, 64, 128
#: in bf16/fp16/fp32 (with the blocks unrolled, up to 776 B of spill stores at r=128; an exact-fp32
#: block of 64 without the loop spilled at r=64, and so did blocks of 32). Speed of each choice: a guess.
MAX_RANK_BLOCK: int = 64

#: GPU tiles. Compiled (sm_90 report: ptxas reports no spill stores for any of them), not timed.
#: ``MAX_BLOCK_TOKENS`` caps the in-register kernels' token tile, which the launcher sizes to M. fp32
#: compute takes smaller fused tiles: its exact ("ieee") dots run on FMA units and hold their
#: operands in registers. ``fused_forward_fp32`` and ``normal_rows`` use 4 warps: with 8, ptxas held
#: them at 80 registers and spilled 16-32 B (more registers per thread, same tile). ``row_scale``
#: reads 64 columns per step: with 128, fp32 factors at r >= 64 spilled 8 B.
GPU_TILES: dict[str, dict] = {
    "row_scale": dict(BLOCK_ROWS=16, BLOCK_COLUMNS=64, num_warps=4),
    "perturbed_weight": dict(BLOCK_ROWS=32, BLOCK_COUNTERS=32, num_warps=8),
    "fused_forward": dict(MAX_BLOCK_TOKENS=64, BLOCK_OUT=64, BLOCK_COUNTERS=16, num_warps=8, num_stages=2),
    "fused_input_grad": dict(MAX_BLOCK_TOKENS=64, BLOCK_OUT=64, BLOCK_COUNTERS=16, num_warps=8, num_stages=2),
    "fused_forward_fp32": dict(MAX_BLOCK_TOKENS=16, BLOCK_OUT=32, BLOCK_COUNTERS=16, num_warps=4, num_stages=2),
    "fused_input_grad_fp32": dict(MAX_BLOCK_TOKENS=16, BLOCK_OUT=32, BLOCK_COUNTERS=16, num_warps=8, num_stages=2),
    "normal_rows": dict(BLOCK_ROWS=32, BLOCK_COUNTERS=64, num_warps=4),
}

#: Interpreter tiles (``TRITON_INTERPRET=1``, CPU tensors, tests): it runs programs one by one and
#: pays per loop iteration (~1.7 ms each on the development machine, not re-measured), so few,
#: large tiles. Guess.
INTERPRETER_TILES: dict[str, dict] = {
    "row_scale": dict(BLOCK_ROWS=64, BLOCK_COLUMNS=128),
    "perturbed_weight": dict(BLOCK_ROWS=64, BLOCK_COUNTERS=64),
    "fused_forward": dict(MAX_BLOCK_TOKENS=64, BLOCK_OUT=64, BLOCK_COUNTERS=64),
    "fused_input_grad": dict(MAX_BLOCK_TOKENS=64, BLOCK_OUT=64, BLOCK_COUNTERS=64),
    "normal_rows": dict(BLOCK_ROWS=64, BLOCK_COUNTERS=64),
}

#: The 4-bit kernels' GPU tiles (``backends/triton_quantized.py``) where the dense ones (``GPU_TILES``)
#: spill once the tile also decodes 4-bit codes (sm_90 compile, ``benchmarks/qlora_resources.py``:
#: ``perturbed_weight`` 32x32 spilled 20 B with fp32 factors, ``fused_forward_fp32`` 32 B): half the
#: rows / outputs per program. Compiled, not timed.
GPU_TILES_4BIT: dict[str, dict] = {
    "perturbed_weight": dict(BLOCK_ROWS=16, BLOCK_COUNTERS=32, num_warps=8),
    "fused_forward_fp32": dict(MAX_BLOCK_TOKENS=16, BLOCK_OUT=16, BLOCK_COUNTERS=16, num_warps=4, num_stages=2),
}

#: Force the in-register kernels' split count (tests); None lets ``IN_REGISTER_PROGRAMS_PER_SM`` decide (1 off CUDA).
IN_REGISTER_SPLITS: int | None = None
