"""Kernel-level GPU checks and timings of the Triton backend (a standalone script; needs CUDA).
``scripts/gpu_check.sh`` runs its stages, each under its own time limit:

    python benchmarks/gpu_kernels.py --selfcheck [--report report.md --jsonl results.jsonl]
    python benchmarks/gpu_kernels.py [--timing] [--full] [--report ... --jsonl ...]
    python benchmarks/gpu_kernels.py --memory [--report ... --jsonl ...]
    python benchmarks/gpu_kernels.py --resources     # no GPU needed (TRITON_INTERPRET unset)
    TRITON_INTERPRET=1 python -m tests.test_gpu_script_dry_run [same arguments]   # CPU dry run, tiny shapes

Every table and every PASS/FAIL line is written the moment it is finished: printed, appended to the
``--report`` markdown file and, one JSON object a line, to the ``--jsonl`` file. A stage stopped by
its time limit (SIGINT) so keeps what it finished and notes where it stopped.

``--selfcheck``: the noise stream on the GPU against its definition (``flatlora_kernels/noise.py``):
   Philox integers bit for bit (offsets past 2**32 included); normals within
   ``noise_tile.MAX_ULPS_FROM_DEFINITION`` ulps, on a few rows and on a 4096 x 4096 block (max abs
   error, max ulps, share bit-equal; noise.py evaluated on the same GPU); eps of forward (row) chunks
   and backward (counter) chunks bit-equal.
``--timing`` (the default): a correctness gate at the three target shapes (forward and every
   gradient against the plain-PyTorch backend on fp32 copies, ``||out - ref|| / ||ref||``, the
   allocator poisoned with NaN first); then, only if it passes, fwd+bwd of Flat-LoRA, LoRA (PEFT's
   math) and the naive perturbation (``W + eps`` kept for backward) at each target shape with
   ``triton.testing.do_bench`` medians (p20/p80 kept) and a PASS/FAIL line per target; the
   regeneration kernel's normals/s; a ``torch.profiler`` kernel table of one Flat-LoRA step; the
   same fwd+bwd under ``do_bench_cudagraph`` (host overhead removed) with its PASS/FAIL lines; the
   tuning flags of ``backends/triton_tuning.py`` timed both ways. ``--full`` adds the small-M and
   odd-shape checks, the kernels alone, the in-register crossover sweep, the chunk-cap sweep and the
   stack memory (a second call's worth).
``--memory``: peak memory of a 16-layer 4096-wide stack at M=8192, fwd+bwd: LoRA, naive, Flat-LoRA.
``--resources``: records the launchers' kernel calls on CPU tensors (nothing runs), compiles each for
   sm_90 with Triton's own argument specialisation (Triton's bundled ptxas) and prints registers,
   stack, ptxas spill stores, shared memory and instruction counts (tensor-core ops, vector
   loads/stores, barriers, layout conversions). A 32-byte stack is expected: libdevice's sin/cos keep
   a scratch array for huge arguments, a path Box-Muller never takes.

Targets (docs/DESIGN.md, "targets"; none measured yet), bf16, r=16: Flat-LoRA fwd+bwd <= 0.90x LoRA's
at (M, N, K) = (8192, 4096, 4096) and <= 1.00x at (2048, 4096, 4096) and (8192, 11008, 4096); the
regeneration kernel >= 300 G normals/s; the 16-layer stack's peak <= LoRA's + 1%.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlora_kernels import flat_lora_linear  # noqa: E402
from flatlora_kernels import noise  # noqa: E402
from flatlora_kernels.backends import torch_reference  # noqa: E402
from flatlora_kernels.backends import triton_tuning  # noqa: E402
from flatlora_kernels import baselines  # noqa: E402
from flatlora_kernels.baselines import lora_linear  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16
RANK, SCALING, SIGMA = 16, 2.0, 0.05
# (M, N, K) and the ceiling of Flat-LoRA fwd+bwd / LoRA fwd+bwd there (docs/DESIGN.md, "targets").
TARGETS = [((8192, 4096, 4096), 0.90), ((2048, 4096, 4096), 1.00), ((8192, 11008, 4096), 1.00)]
REGEN_TARGET_G_NORMALS = 300.0
MEMORY_TARGET_X_LORA = 1.01
SMALL_M = [1, 16, 64, 256]
SQUARE_LAYER = (4096, 4096)  # (N, K) of the small-M checks and the kernels-alone timings
ODD_SHAPE = (300, 1000, 1030)  # (M, N, K) of the fp16/fp32 checks: no dimension a multiple of 16
CROSSOVER_M = [16, 32, 64, 128, 256, 512, 1024]
CHUNK_CAPS_MIB = [4, 8, 16, 32, 64]
# (M, N, K) of the BATCHED_STRIP_GEMM flag, timed both ways: at M=2048 a [2048, 512] strip GEMM has
# only 32 output tiles of 128x256 for 132 SMs; one batched GEMM per chunk has four times as many.
STRIP_SHAPES = [(2048, 4096, 4096), (8192, 11008, 4096)]
# (M, N, K) of the WHOLE_WEIGHT_INPUT_GRAD_BYTES flag, timed both ways (one full-width dx GEMM vs chunks).
WHOLE_WEIGHT_SHAPE = (2048, 4096, 4096)
# Relative-error ceilings against the fp32 reference (docs/DESIGN.md, "precision": bf16 operands land in 1e-3..1e-2).
MAX_RELATIVE_ERROR = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-4}
# ---- setup --------------------------------------------------------------------------------------


def make_layer(N, K, r=RANK, dtype=DTYPE, factor_dtype=torch.float32, seed=0):
    """Frozen W (dtype), fp32 A and B (as PEFT keeps them under autocast), bias: ``baselines.make_layer``."""
    return baselines.make_layer(N, K, r, dtype=dtype, device=DEVICE, seed=seed, lora_dtype=factor_dtype,
                                lora_B_std=0.02, bias_std=0.1)  # fmt: skip


def make_inputs(M, N, K, dtype=DTYPE, seed=1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(M, K, generator=g, device=DEVICE).to(dtype)
    dy = torch.randn(M, N, generator=g, device=DEVICE).to(dtype)
    return x, dy


def seed_and_sigma(step=7):
    return torch.tensor(1000 + step, device=DEVICE), torch.tensor(SIGMA, device=DEVICE)


def poison_allocator(nbytes=2**30):
    """Fill freed cache blocks with NaN so that outputs the kernels fail to write stay NaN."""
    block = torch.full((nbytes // 4,), float("nan"), device=DEVICE)
    del block


def triton_backend_module():
    from flatlora_kernels.backends import triton_backend

    return triton_backend


@contextlib.contextmanager
def strategy(name):
    with triton_backend_module().use_strategy(name):
        yield


@contextlib.contextmanager
def chunk_cap(nbytes, grows_to_output):
    with patched(triton_tuning, "CHUNK_BYTES", nbytes), \
            patched(triton_tuning, "CHUNK_GROWS_TO_OUTPUT", grows_to_output):
        yield


# ---- the computations compared --------------------------------------------------------------------


def flat_lora(x, weight, lora_A, lora_B, bias, seed, sigma):
    return flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=SCALING, sigma=sigma, seed=seed, backend="triton")


def lora(x, weight, lora_A, lora_B, bias, *_):
    return lora_linear(x, weight, lora_A.to(x.dtype), lora_B.to(x.dtype), bias, scaling=SCALING)


def naive_perturbation(x, weight, lora_A, lora_B, bias, *_):
    """The naive baseline (docs/DESIGN.md, "baselines"): eps from torch.randn, ``W + eps`` kept alive by autograd for backward."""
    return baselines.naive_randn_flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=SCALING, sigma=SIGMA)


def fwd_bwd_closure(fn, x, weight, lora_A, lora_B, bias, dy, seed, sigma):
    x = x.detach().requires_grad_(True)
    lora_A = lora_A.detach().requires_grad_(True)
    lora_B = lora_B.detach().requires_grad_(True)
    leaves = [x, lora_A, lora_B]

    def run():
        fn(x, weight, lora_A, lora_B, bias, seed, sigma).backward(dy)

    return run, leaves


def fwd_closure(fn, x, weight, lora_A, lora_B, bias, seed, sigma):
    def run():
        with torch.no_grad():
            fn(x, weight, lora_A, lora_B, bias, seed, sigma)

    return run


# ---- 0. compiler resource report (no GPU) -------------------------------------------------------

def recorded_launches(compute_dtype, weight_dtype, factor_dtype, rank=RANK, shape=(4096, 4096), token_counts=(16, 64)):
    """``[(label, kernel, args, kwargs)]``: the kernel calls the launchers of ``triton_backend`` make for
    a contiguous ``[N, K]`` layer, recorded on CPU tensors instead of run (nothing is computed), so the
    compiled signature below is the launchers' own, not a copy of it."""
    tb = triton_backend_module()
    N, K = shape
    calls = []

    class Recorder:  # stands in for tb.traceable_kernel (wrap_triton): kernel[grid](*args, **kwargs) is recorded
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    zeros = lambda *size, dtype=torch.float32: torch.zeros(*size, dtype=dtype)  # noqa: E731
    weight, lora_A, lora_B = zeros(N, K, dtype=weight_dtype), zeros(rank, K, dtype=factor_dtype), zeros(N, rank, dtype=factor_dtype)
    seed, sigma, scales, bias = zeros((), dtype=torch.int64), zeros(()), zeros(N), zeros(N, dtype=compute_dtype)
    labels = []
    with patched(tb, "traceable_kernel", Recorder):
        tb.row_scale(weight, lora_A, lora_B, SCALING, sigma, compute_dtype)
        labels.append("row_scale")
        tb.perturbed_weight_rows(weight, lora_A, lora_B, scales, SCALING, seed, 0, N, compute_dtype)
        labels.append("perturbed_weight")
        width = min(64, K // 4)  # a backward (counter) chunk as the streamed dx builds it: [N, 4, width]
        chunk = zeros(N, 4, width, dtype=compute_dtype)
        tb.regenerate_perturbed_weight(chunk, weight, lora_A, lora_B, scales, SCALING, seed, rows=(0, N),
                                       counters=(width, 2 * width), stride_out_row=4 * width, stride_out_strip=width)  # fmt: skip
        labels.append("perturbed_weight dx chunk")
        for M in token_counts:
            tb.forward_in_register(zeros(M, K, dtype=compute_dtype), weight, lora_A, lora_B, bias, SCALING, scales, seed)
            tb.input_grad_in_register(zeros(M, N, dtype=compute_dtype), weight, lora_A, lora_B, scales, SCALING, seed)
            labels += [f"fused_forward M={M}", f"fused_input_grad M={M}"]
        tb.normal_rows(seed, K, 0, N, compute_dtype)
        labels.append("normal_rows")
    assert len(calls) == len(labels), "a launcher made an unexpected number of kernel calls"
    return [(label, *call) for label, call in zip(labels, calls)]


@contextlib.contextmanager
def patched(module, name, value):
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def compile_recorded(kernel, args, kwargs, target):
    """Compile a recorded call for ``target`` exactly as a launch would: Triton's own binder decides
    the specialisation (integers equal to 1 or divisible by 16, pointer alignment) from the values."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Instruction counts in the compiled code (static counts, not executions): tensor-core ops, vector
# widths of global loads/stores, barriers, and layout conversions left in the Triton GPU IR.
CODE_COUNTS = {
    "HGMMA": ("sass", r"HGMMA"),
    "HMMA": ("sass", r"HMMA"),
    "LDG.128": ("sass", r"LDG[.A-Z0-9_]*\.128"),
    "LDG.64": ("sass", r"LDG[.A-Z0-9_]*\.64"),
    "LDG": ("sass", r"LDG"),
    "STG.128": ("sass", r"STG[.A-Z0-9_]*\.128"),
    "STG": ("sass", r"STG"),
    "BAR": ("sass", r"BAR\.SYNC"),
    "convert_layout": ("ttgir", r"ttg\.convert_layout"),
}


def compiled_resources(compiled, arch: int) -> tuple[dict, str]:
    """``(registers, stack_bytes, spill_stores)`` of one compiled kernel (cuobjdump's resource usage;
    ``ptxas -v`` for spills apart from the stack), each "?" where a tool says nothing, and its SASS."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump, ptxas = os.path.join(tools, "cuobjdump"), os.path.join(tools, "ptxas")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        verbose = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", ptx.name, "-o", os.devnull],
                                 capture_output=True, text=True).stderr  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    spills = re.search(r"(\d+) bytes spill stores", verbose)
    return dict(
        registers=int(found.group(1)) if found else "?",
        stack_bytes=int(found.group(2)) if found else "?",
        spill_stores=int(spills.group(1)) if spills else "?",
    ), sass


def resource_report(arch=90, ranks=(RANK,)):
    import re

    from triton.backends.compiler import GPUTarget

    if triton_backend_module().INTERPRETING:
        sys.exit("--resources compiles real kernels: run it with TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    rows = {}
    cases = [(torch.bfloat16, torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
             (torch.float16, torch.float16, torch.float16), (torch.float32, torch.float32, torch.float32)]  # fmt: skip
    for rank, (compute_dtype, weight_dtype, factor_dtype) in ((r, c) for r in ranks for c in cases):
        case = f"x {TRITON_TYPES[compute_dtype]}, W {TRITON_TYPES[weight_dtype]}, A/B {TRITON_TYPES[factor_dtype]}, r={rank}"
        for label, kernel, args, kwargs in recorded_launches(compute_dtype, weight_dtype, factor_dtype, rank):
            compiled = compile_recorded(kernel, args, kwargs, target)
            usage, sass = compiled_resources(compiled, arch)
            code = dict(sass=sass, ttgir=compiled.asm["ttgir"])
            rows[f"{label} [{case}]"] = dict(
                **usage,
                shared_bytes=compiled.metadata.shared,
                **{name: len(re.findall(pattern, code[source])) for name, (source, pattern) in CODE_COUNTS.items()},
                options=" ".join(f"{k}={kwargs[k]}" for k in ("num_warps", "num_stages") if k in kwargs),
            )
    columns = ["registers", "stack_bytes", "spill_stores", "shared_bytes", *CODE_COUNTS, "options"]
    print(markdown_table(f"Compiler resource report, sm_{arch} (compiled, not timed)", rows, columns))


# ---- 1. correctness -------------------------------------------------------------------------------


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    return (torch.linalg.vector_norm(actual - expected) / (torch.linalg.vector_norm(expected) + 1e-30)).item()


def check_correctness(M, N, K, name, dtype=DTYPE):
    weight, lora_A, lora_B, bias = make_layer(N, K, dtype=dtype, seed=M + N)
    x, dy = make_inputs(M, N, K, dtype=dtype, seed=M * 3 + K)
    seed, sigma = seed_and_sigma(M)
    poison_allocator()
    xr = x.detach().requires_grad_(True)
    A, B = lora_A.detach().requires_grad_(True), lora_B.detach().requires_grad_(True)
    with strategy(name):
        y = flat_lora(xr, weight, A, B, bias, seed, sigma)
        y.backward(dy)
    torch.cuda.synchronize()
    ref_y, scale = torch_reference.forward(x.float(), weight, lora_A, lora_B, bias, SCALING, sigma, seed)
    ref_dx, ref_dA, ref_dB = torch_reference.backward(
        dy.float(), x.float(), weight, lora_A, lora_B, scale, SCALING, seed, True
    )
    errors = {
        "y": relative_error(y, ref_y),
        "dx": relative_error(xr.grad, ref_dx),
        "dA": relative_error(A.grad, ref_dA),
        "dB": relative_error(B.grad, ref_dB),
    }
    ok = all(e <= MAX_RELATIVE_ERROR[dtype] for e in errors.values())
    return dict(M=M, N=N, K=K, strategy=name, dtype=str(dtype), ok=ok, **errors)




def correctness_gate(report, full):
    """The timing stage's own gate: the target shapes (auto strategy), and with ``full`` the small-M and
    odd-shape checks of both strategies. Returns whether every check passed."""
    checks = [check_correctness(M, N, K, "auto") for (M, N, K), _ in TARGETS]
    if full:
        checks += [check_correctness(M, N, K, "streamed") for (M, N, K), _ in TARGETS]
        checks += [check_correctness(M, *SQUARE_LAYER, name) for M in SMALL_M for name in ("streamed", "in_register")]
        checks += [check_correctness(*ODD_SHAPE, name, dtype) for dtype in (torch.float16, torch.float32)
                   for name in ("streamed", "in_register")]  # fmt: skip
    rows = {f"{c['M']}x{c['N']}x{c['K']} {c['dtype']} {c['strategy']}": c for c in checks}
    report.table("correctness", "Correctness (relative error vs fp32 reference)", rows, ["ok", "y", "dx", "dA", "dB"])
    passed = all(c["ok"] for c in checks)
    ceilings = ", ".join(f"{str(dtype).removeprefix('torch.')} {bound:g}" for dtype, bound in MAX_RELATIVE_ERROR.items())
    report.verdict("correctness", passed, f"correctness gate, {len(checks)} checks: every output and gradient within ({ceilings})"
                   + ("" if passed else ": no timings taken"))  # fmt: skip
    return passed


# ---- 2. the noise stream on the device vs noise.py -------------------------------------------------


def ulp_error(actual, expected):
    """``|actual - expected|`` elementwise, in units in the last place of the fp32 ``expected`` (fp64)."""
    magnitude = expected.float().abs()
    ulp = torch.nextafter(magnitude, torch.full_like(magnitude, math.inf)) - magnitude
    return (actual.double() - expected.double()).abs() / ulp.double()


def max_ulps_allowed():
    from flatlora_kernels.kernels.noise_tile import MAX_ULPS_FROM_DEFINITION

    return MAX_ULPS_FROM_DEFINITION


def stream_self_check(device=None):
    """A few Philox integers (offsets past 2**32 included) bit for bit, and a few normals within the
    ulp bound, from the device vs noise.py on the CPU."""
    device = device or DEVICE
    tb = triton_backend_module()
    offsets = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 11], device=device)
    results = []
    for seed in (0, 123456789, 2**63 - 1):
        seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
        expected = torch.stack(noise.philox4x32_10(seed_t.cpu(), offsets.cpu()), dim=1) & 0xFFFFFFFF
        ok = torch.equal(tb.philox_words(seed_t, offsets).cpu(), expected)
        results.append(dict(check=f"Philox words, seed {seed}", ok=bool(ok)))
    z = tb.normal_rows(torch.tensor(77, device=device), 1030, 2**31 + 3, 2**31 + 7).cpu()
    expected = noise.normal_rows(77, 1030, 2**31 + 3, 2**31 + 7)
    ulps = ulp_error(z, expected).max().item()
    results.append(dict(check="normals, rows past 2**32 offsets", ok=ulps <= max_ulps_allowed(), max_ulps=ulps,
                        max_abs_err=(z - expected).abs().max().item()))  # fmt: skip
    return results


def noise_accuracy_at_scale(n_rows=4096, in_features=4096, seed=2024):
    """A [n_rows, K] block of z from the Triton z tile vs noise.py evaluated on the same device."""
    tb = triton_backend_module()
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    got = tb.normal_rows(seed_t, in_features, 0, n_rows)
    expected = noise.normal_rows(seed_t, in_features, 0, n_rows, device=DEVICE)
    max_ulps = ulp_error(got, expected).max().item()
    return dict(normals=got.numel(), max_abs_err=(got - expected).abs().max().item(), max_ulps=max_ulps,
                share_bit_equal=(got == expected).double().mean().item(), ok=max_ulps <= max_ulps_allowed())  # fmt: skip


def chunk_eps_equality(N=4096, K=4096, counters_per_chunk=256):
    """eps as a forward (row) chunk of W' and as backward (counter) chunks, bit for bit: W, A and B are
    zero there, so W' = eps (the row scales are the real layer's). Also checks eps is not zero."""
    tb = triton_backend_module()
    weight, lora_A, lora_B, _ = make_layer(N, K)
    seed, sigma = seed_and_sigma()
    scale = tb.row_scale(weight, lora_A, lora_B, SCALING, sigma, torch.float32)
    zeros = [torch.zeros_like(t) for t in (weight, lora_A, lora_B)]
    forward = tb.perturbed_weight_rows(*zeros, scale, SCALING, seed, 0, N, torch.float32)
    kq = noise.counters_per_row(K)
    equal, chunks = True, 0
    for start in range(0, kq, counters_per_chunk):
        width = min(kq, start + counters_per_chunk) - start
        chunk = torch.empty((N, 4, width), dtype=torch.float32, device=DEVICE)
        tb.regenerate_perturbed_weight(chunk, *zeros, scale, SCALING, seed, rows=(0, N), counters=(start, start + width),
                                       stride_out_row=4 * width, stride_out_strip=width)  # fmt: skip
        for strip in range(4):
            first = strip * kq + start
            n_columns = min(width, K - first)
            if n_columns > 0:
                equal = equal and torch.equal(chunk[:, strip, :n_columns], forward[:, first : first + n_columns])
        chunks += 1
    nonzero = bool(forward.abs().max().item() > 0)
    return dict(backward_chunks=chunks, bit_equal=bool(equal), eps_nonzero=nonzero, ok=bool(equal) and nonzero)


def run_selfcheck(report):
    checks = stream_self_check()
    report.table("selfcheck", "Noise stream self-check (device vs noise.py)", {c["check"]: c for c in checks},
                 ["ok", "max_ulps", "max_abs_err"])  # fmt: skip
    report.verdict("selfcheck", all(c["ok"] for c in checks),
                   f"Philox integers bit-exact, normals within {max_ulps_allowed()} ulps of noise.py")  # fmt: skip
    accuracy = noise_accuracy_at_scale()
    report.table("noise_accuracy", "Noise accuracy at scale: z on the device vs noise.py on the device",
                 {"z block": accuracy}, ["normals", "max_abs_err", "max_ulps", "share_bit_equal", "ok"])  # fmt: skip
    report.verdict("noise_accuracy", accuracy["ok"], f"{accuracy['normals']} normals: max {accuracy['max_ulps']:g} ulps "
                   f"(bound {max_ulps_allowed()}), {100 * accuracy['share_bit_equal']:.1f}% bit-equal")  # fmt: skip
    chunks = chunk_eps_equality()
    report.table("chunk_eps", "eps of forward row chunks vs backward counter chunks", {"eps": chunks},
                 ["backward_chunks", "bit_equal", "eps_nonzero", "ok"])  # fmt: skip
    report.verdict("chunk_eps", chunks["ok"], "forward-chunk and backward-chunk eps bit-equal (and not zero)")
    return all(c["ok"] for c in checks) and accuracy["ok"] and chunks["ok"]


# ---- 3. timings -----------------------------------------------------------------------------------


def bench(run, grad_to_none=None):
    """``triton.testing.do_bench`` median and p20/p80, ms (launch overhead included, L2 flushed)."""
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(run, warmup=25, rep=200, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return dict(ms=p50, p20=p20, p80=p80)


def bench_graph(run, grad_to_none=None):
    """``triton.testing.do_bench_cudagraph`` median and p20/p80, ms: the step replayed from a CUDA
    graph, so host overhead drops out. A capture error is recorded, not raised."""
    from triton.testing import do_bench_cudagraph

    try:
        p50, p20, p80 = do_bench_cudagraph(run, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    except Exception as error:  # noqa: BLE001 - a failed capture is a result to report, not a crash
        return dict(ms=math.nan, error=f"{type(error).__name__}: {error}"[:200])
    return dict(ms=p50, p20=p20, p80=p80)


TIMERS = {"do_bench": bench, "do_bench_cudagraph": bench_graph}
FWD_BWD = {"LoRA": lora, "Flat-LoRA": flat_lora, "naive perturbation": naive_perturbation}


def time_target(M, N, K, timer="do_bench", forward_rows=True):
    """fwd+bwd of each of ``FWD_BWD`` (and, with ``forward_rows``, the forwards and cuBLAS ``x @ W^T``)
    at one shape, auto strategy, with ``x LoRA`` = time / LoRA's fwd+bwd time."""
    timed = TIMERS[timer]
    weight, lora_A, lora_B, bias = make_layer(N, K)
    x, dy = make_inputs(M, N, K)
    seed, sigma = seed_and_sigma()
    args = (x, weight, lora_A, lora_B, bias)
    rows = {}
    if forward_rows:
        rows["cuBLAS x@W^T"] = timed(lambda: torch.mm(x, weight.t()))
        rows["LoRA fwd"] = timed(fwd_closure(lora, *args, seed, sigma))
        rows["Flat-LoRA fwd"] = timed(fwd_closure(flat_lora, *args, seed, sigma))
    for label, fn in FWD_BWD.items():
        run, leaves = fwd_bwd_closure(fn, *args, dy, seed, sigma)
        rows[f"{label} fwd+bwd"] = timed(run, grad_to_none=leaves)
    lora_ms = rows["LoRA fwd+bwd"]["ms"]
    for key, row in rows.items():
        if key.endswith("fwd+bwd"):
            row["x LoRA"] = row["ms"] / lora_ms
    return rows


def speed_verdict(report, shape, ceiling, rows, timer):
    M, N, K = shape
    fused, lora_row, naive = rows["Flat-LoRA fwd+bwd"], rows["LoRA fwd+bwd"], rows["naive perturbation fwd+bwd"]
    ratio = fused["x LoRA"]
    text = (f"(M, N, K) = ({M}, {N}, {K}), {timer} medians: Flat-LoRA fwd+bwd {fused['ms']:.4g} ms = {ratio:.3f}x "
            f"LoRA's {lora_row['ms']:.4g} ms (target <= {ceiling:.2f}x); naive {naive['x LoRA']:.3f}x")  # fmt: skip
    errors = [f"{label}: {row['error']}" for label, row in rows.items() if "error" in row]
    if errors:  # a failed CUDA-graph capture: no number, so no pass
        text += "; not measured: " + "; ".join(errors)
    report.verdict(f"speed {M}x{N}x{K} {timer}", ratio <= ceiling, text, ratio=ratio, ceiling=ceiling)


def time_targets(report, timer):
    forward_rows = timer == "do_bench"
    for shape, ceiling in TARGETS:
        M, N, K = shape
        rows = time_target(M, N, K, timer, forward_rows=forward_rows)
        columns = ["ms", "p20", "p80", "x LoRA"] + ([] if forward_rows else ["error"])
        report.table(f"layer {M}x{N}x{K} {timer}", f"(M, N, K) = ({M}, {N}, {K}), bf16, r={RANK}: {timer} medians, ms",
                     rows, columns)  # fmt: skip
        speed_verdict(report, shape, ceiling, rows, timer)


def regen_rate(shapes=((4096, 4096), (11008, 4096))):
    """Normals/s of the regeneration kernel alone (W' rows in bf16), and of the z tile alone."""
    tb = triton_backend_module()
    seed, sigma = seed_and_sigma()
    rows = {}
    for N, K in shapes:
        weight, lora_A, lora_B, _ = make_layer(N, K)
        scale = tb.row_scale(weight, lora_A, lora_B, SCALING, sigma, DTYPE)
        key = f"regenerate W' {N}x{K}"
        rows[key] = bench(lambda: tb.perturbed_weight_rows(weight, lora_A, lora_B, scale, SCALING, seed, 0, N, DTYPE))
        rows[key]["G normals/s"] = N * K / (rows[key]["ms"] * 1e-3) / 1e9
        key = f"z tile only {N}x{K}"
        rows[key] = bench(lambda: tb.normal_rows(seed, K, 0, N, DTYPE))
        rows[key]["G normals/s"] = N * K / (rows[key]["ms"] * 1e-3) / 1e9
    return rows


def run_regen(report):
    rows = regen_rate()
    report.table("regen", "Regeneration rate, bf16 out (do_bench medians)", rows, ["ms", "p20", "p80", "G normals/s"])
    slowest = min(row["G normals/s"] for key, row in rows.items() if key.startswith("regenerate"))
    report.verdict("regen", slowest >= REGEN_TARGET_G_NORMALS,
                   f"regeneration kernel: {slowest:.4g} G normals/s at the slowest shape (target >= {REGEN_TARGET_G_NORMALS:g})",
                   g_normals_per_s=slowest)  # fmt: skip


def profile_fused_step(M, N, K, top=12):
    """Time per kernel of one Flat-LoRA fwd+bwd step (after two warm-up steps), from ``torch.profiler``:
    device kernels on a GPU, CPU operators in the dry run (which has no device)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    weight, lora_A, lora_B, bias = make_layer(N, K)
    x, dy = make_inputs(M, N, K)
    seed, sigma = seed_and_sigma()
    run, leaves = fwd_bwd_closure(flat_lora, x, weight, lora_A, lora_B, bias, dy, seed, sigma)
    on_device = DEVICE == "cuda"
    for _ in range(2):
        run()
        for leaf in leaves:
            leaf.grad = None
    torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as profiler:
        run()
        torch.cuda.synchronize()
    attribute = "self_device_time_total" if on_device else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if (e.device_type != DeviceType.CPU) == on_device]
    events = sorted((e for e in events if getattr(e, attribute, 0) > 0), key=lambda e: -getattr(e, attribute))
    total = sum(getattr(e, attribute) for e in events) or math.nan
    rows = {}
    for event in events[:top]:
        spent = getattr(event, attribute)
        name = event.key.replace("|", "/")
        rows[name if len(name) <= 90 else name[:87] + "..."] = dict(calls=event.count, us=spent, share=spent / total)
    rest = events[top:]
    if rest:
        spent = sum(getattr(e, attribute) for e in rest)
        rows[f"({len(rest)} others)"] = dict(calls=sum(e.count for e in rest), us=spent, share=spent / total)
    rows["(total)"] = dict(calls=sum(e.count for e in events), us=total, share=1.0)
    return rows


def run_profile(report):
    (M, N, K), _ = TARGETS[0]
    what = "device kernels" if DEVICE == "cuda" else "CPU operators (dry run: no device)"
    report.table("profile", f"One Flat-LoRA fwd+bwd step, (M, N, K) = ({M}, {N}, {K}), bf16: {what}, torch.profiler",
                 profile_fused_step(M, N, K), ["calls", "us", "share"])  # fmt: skip


def strip_gemm_check(M, N, K, cap_mib=16):
    """Streamed dx with fixed chunks: four narrow GEMMs per chunk vs one strided-batched GEMM
    (``triton_tuning.BATCHED_STRIP_GEMM``): time, peak memory (a copy inside ``torch.bmm`` would show
    here) and the largest difference between the two dx."""
    tb = triton_backend_module()
    weight, lora_A, lora_B, _ = make_layer(N, K)
    _, dy = make_inputs(M, N, K)
    seed, sigma = seed_and_sigma()
    scale = tb.row_scale(weight, lora_A, lora_B, SCALING, sigma, DTYPE)
    rows, dx = {}, {}
    for batched in (False, True):
        label = "one batched GEMM per chunk" if batched else "four strip GEMMs per chunk"
        with chunk_cap(int(cap_mib * 2**20), False), patched(triton_tuning, "BATCHED_STRIP_GEMM", batched):
            run = lambda: tb.input_grad_streamed(dy, weight, lora_A, lora_B, scale, SCALING, seed)  # noqa: E731
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            dx[batched] = run()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows[label] = dict(bench(run), peak_MiB=peak)
    rows["one batched GEMM per chunk"]["max_abs_diff"] = (dx[True].float() - dx[False].float()).abs().max().item()
    return rows


def flag_both_ways(flag, values, M, N, K):
    """Flat-LoRA fwd+bwd (auto strategy; do_bench) and its peak memory with ``triton_tuning.<flag>`` at
    each of ``values``; ``x first`` = time / the first value's time."""
    weight, lora_A, lora_B, bias = make_layer(N, K)
    x, dy = make_inputs(M, N, K)
    seed, sigma = seed_and_sigma()
    rows = {}
    for value in values:
        with patched(triton_tuning, flag, value):
            run, leaves = fwd_bwd_closure(flat_lora, x, weight, lora_A, lora_B, bias, dy, seed, sigma)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows[f"{flag} = {value}"] = dict(bench(run, grad_to_none=leaves), peak_MiB=peak)
    first = next(iter(rows.values()))["ms"]
    for row in rows.values():
        row["x first"] = row["ms"] / first
    return rows


def run_tuning_flags(report):
    M, N, K = WHOLE_WEIGHT_SHAPE
    flag = "WHOLE_WEIGHT_INPUT_GRAD_BYTES"
    rows = flag_both_ways(flag, [0, 64 * 2**20], M, N, K)
    report.table(f"flag {flag}", f"Tuning flag {flag} (now {getattr(triton_tuning, flag)}): Flat-LoRA fwd+bwd, "
                 f"(M, N, K) = ({M}, {N}, {K}), bf16", rows, ["ms", "p20", "p80", "x first", "peak_MiB"])  # fmt: skip
    for M, N, K in STRIP_SHAPES:
        title = (f"Tuning flag BATCHED_STRIP_GEMM (now {triton_tuning.BATCHED_STRIP_GEMM}): streamed dx, "
                 f"(M, N, K) = ({M}, {N}, {K}), 16 MiB chunks")  # fmt: skip
        report.table(f"flag BATCHED_STRIP_GEMM {M}x{N}x{K}", title, strip_gemm_check(M, N, K),
                     ["ms", "p20", "p80", "peak_MiB", "max_abs_diff"])  # fmt: skip


def time_kernels(N, K, M_in_register=256):
    """The kernels alone: row scales, one full regeneration of W', the z tile, and the fused GEMM."""
    tb = triton_backend_module()
    weight, lora_A, lora_B, bias = make_layer(N, K)
    seed, sigma = seed_and_sigma()
    normals = N * K
    scale = tb.row_scale(weight, lora_A, lora_B, SCALING, sigma, DTYPE)
    rows = {}
    rows["row scales (reads W once)"] = bench(lambda: tb.row_scale(weight, lora_A, lora_B, SCALING, sigma, DTYPE))
    rows["regenerate W' (bf16 out)"] = bench(
        lambda: tb.perturbed_weight_rows(weight, lora_A, lora_B, scale, SCALING, seed, 0, N, DTYPE)
    )
    rows["z tile only (bf16 out)"] = bench(lambda: tb.normal_rows(seed, K, 0, N, DTYPE))
    for key in ("regenerate W' (bf16 out)", "z tile only (bf16 out)"):
        rows[key]["G normals/s"] = normals / (rows[key]["ms"] * 1e-3) / 1e9
    x, dy = make_inputs(M_in_register, N, K)
    regenerations = math.ceil(M_in_register / tb.fused_tiles("fused_forward", M_in_register, DTYPE)["BLOCK_TOKENS"])
    with torch.no_grad():
        key = f"in-register fwd GEMM, M={M_in_register}"
        rows[key] = bench(lambda: tb.forward_in_register(x, weight, lora_A, lora_B, bias, SCALING, scale, seed))
        rows[key]["G normals/s"] = regenerations * normals / (rows[key]["ms"] * 1e-3) / 1e9
        key = f"streamed fwd, M={M_in_register}"
        rows[key] = bench(lambda: tb.forward_streamed(x, weight, lora_A, lora_B, bias, SCALING, scale, seed))
        rows[key]["G normals/s"] = normals / (rows[key]["ms"] * 1e-3) / 1e9
    return rows


def crossover_sweep(N=4096, K=4096):
    """fwd+bwd per strategy over M: where the in-register path stops paying (sets triton_tuning.IN_REGISTER_MAX_TOKENS)."""
    weight, lora_A, lora_B, bias = make_layer(N, K)
    seed, sigma = seed_and_sigma()
    rows = {}
    for M in CROSSOVER_M:
        x, dy = make_inputs(M, N, K)
        for name in ("streamed", "in_register"):
            with strategy(name):
                run, leaves = fwd_bwd_closure(flat_lora, x, weight, lora_A, lora_B, bias, dy, seed, sigma)
                rows[f"M={M} {name}"] = bench(run, grad_to_none=leaves)
        run, leaves = fwd_bwd_closure(lora, x, weight, lora_A, lora_B, bias, dy, seed, sigma)
        rows[f"M={M} LoRA"] = bench(run, grad_to_none=leaves)
    return rows


def chunk_sweep(M=8192, N=11008, K=4096):
    """Streamed fwd+bwd by fixed chunk cap, and with chunks allowed to grow to the output's size."""
    weight, lora_A, lora_B, bias = make_layer(N, K)
    x, dy = make_inputs(M, N, K)
    seed, sigma = seed_and_sigma()
    rows = {}
    settings = [(mib, False) for mib in CHUNK_CAPS_MIB] + [(16, True)]
    for mib, grows in settings:
        with chunk_cap(mib * 2**20, grows), strategy("streamed"):
            run, leaves = fwd_bwd_closure(flat_lora, x, weight, lora_A, lora_B, bias, dy, seed, sigma)
            rows[f"cap {mib} MiB" + (", grows to output" if grows else "")] = bench(run, grad_to_none=leaves)
    return rows


# ---- 4. peak memory -------------------------------------------------------------------------------


def stack_peak_memory(depth=16, width=4096, M=8192):
    layers = [make_layer(width, width, seed=i) for i in range(depth)]
    x, _ = make_inputs(M, width, width)
    seed, sigma = seed_and_sigma()
    results = {}
    variants = [
        ("LoRA", lora, contextlib.nullcontext()),
        ("naive perturbation", naive_perturbation, contextlib.nullcontext()),
        ("Flat-LoRA (auto)", flat_lora, contextlib.nullcontext()),
        ("Flat-LoRA (streamed, fixed 16 MiB chunks)", flat_lora, chunk_cap(16 * 2**20, False)),
    ]
    for label, fn, setting in variants:
        factors = [(A.detach().requires_grad_(True), B.detach().requires_grad_(True)) for _, A, B, _ in layers]
        h0 = x.detach().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with setting:
            h = h0
            for (weight, _, _, bias), (A, B) in zip(layers, factors):
                h = fn(h, weight, A, B, bias, seed, sigma)
            h.float().square().mean().backward()
        torch.cuda.synchronize()
        results[label] = dict(peak_MiB=(torch.cuda.max_memory_allocated() - base) / 2**20)
        del h, h0, factors
    lora_peak = results["LoRA"]["peak_MiB"]
    for row in results.values():
        row["x LoRA"] = row["peak_MiB"] / lora_peak
    return results


def run_memory(report):
    rows = stack_peak_memory()
    report.table("memory", "Peak memory, 16 x 4096-wide layers, M=8192, bf16, fwd+bwd", rows, ["peak_MiB", "x LoRA"])
    ours = rows["Flat-LoRA (auto)"]
    report.verdict("memory", ours["x LoRA"] <= MEMORY_TARGET_X_LORA,
                   f"16-layer peak: Flat-LoRA {ours['peak_MiB']:.1f} MiB = {ours['x LoRA']:.4f}x LoRA's "
                   f"(target <= {MEMORY_TARGET_X_LORA:g}x); naive {rows['naive perturbation']['x LoRA']:.3f}x",
                   x_lora=ours["x LoRA"])  # fmt: skip


# ---- report -------------------------------------------------------------------------------------


def markdown_table(title, rows, columns):
    lines = [f"### {title}", "", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, row in rows.items():
        cells = []
        for column in columns:
            value = row.get(column, "")
            cells.append(f"{value:.4g}" if isinstance(value, float) else str(value))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class Report:
    """Each table and PASS/FAIL line written the moment it is finished: printed, appended to the
    markdown file and, as one JSON object a line, to the JSON-lines file (either may be None), so a
    stage stopped half-way keeps everything it finished."""

    def __init__(self, markdown=None, jsonl=None):
        self.markdown, self.jsonl = markdown, jsonl

    def _write(self, text, record):
        print(text, flush=True)
        for path, line in ((self.markdown, text + "\n"), (self.jsonl, json.dumps(record, default=str) + "\n")):
            if path is not None:
                with open(path, "a") as f:
                    f.write(line)

    def table(self, key, title, rows, columns):
        self._write(markdown_table(title, rows, columns), dict(table=key, title=title, rows=rows))

    def verdict(self, key, passed, text, **numbers):
        self._write(f"- **{'PASS' if passed else 'FAIL'}** {text}\n", dict(verdict=key, passed=bool(passed), text=text, **numbers))

    def note(self, key, text):
        self._write(f"- {text}\n", dict(note=key, text=text))


def facts():
    import triton

    tb = triton_backend_module()
    return dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        dtype=str(DTYPE), rank=RANK, chunk_bytes=triton_tuning.CHUNK_BYTES,
        chunk_grows_to_output=triton_tuning.CHUNK_GROWS_TO_OUTPUT,
        in_register_max_tokens=triton_tuning.IN_REGISTER_MAX_TOKENS, batched_strip_gemm=triton_tuning.BATCHED_STRIP_GEMM,
        strategies=", ".join(f"M={M}: {tb.choose_strategy(M, DTYPE)}" for (M, _, _), _ in TARGETS),
    )  # fmt: skip


def run_timing(report, full=False):
    report.table("facts", "Machine and settings", {k: dict(value=v) for k, v in facts().items()}, ["value"])
    if not correctness_gate(report, full):
        sys.exit("correctness check failed: no timings taken")
    time_targets(report, "do_bench")
    run_regen(report)
    run_profile(report)
    time_targets(report, "do_bench_cudagraph")  # after the others: a failed capture costs only its own rows
    run_tuning_flags(report)
    if full:
        report.table("kernels", f"Kernels alone, (N, K) = {SQUARE_LAYER}", time_kernels(*SQUARE_LAYER), ["ms", "G normals/s"])
        report.table("crossover", "fwd+bwd by strategy over M (N = K = 4096)", crossover_sweep(), ["ms"])
        report.table("chunks", "Streamed fwd+bwd by chunk cap, (8192, 11008, 4096)", chunk_sweep(), ["ms"])
        run_memory(report)


def main(argv=None):
    # A stage's time limit stops it with SIGINT: set Python's handler explicitly, so that is a
    # KeyboardInterrupt (noted in the report) however this process was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--selfcheck", action="store_true", help="the noise stream on the GPU vs noise.py")
    mode.add_argument("--timing", action="store_true", help="correctness gate, then the timings (the default)")
    mode.add_argument("--memory", action="store_true", help="16-layer stack peak memory")
    mode.add_argument("--resources", action="store_true", help="compiler resource report only (no GPU needed)")
    parser.add_argument("--full", action="store_true", help="with the timings: the sweeps, the kernels alone, the memory")
    parser.add_argument("--ranks", type=int, nargs="+", default=[RANK], help="LoRA ranks of --resources")
    parser.add_argument("--report", type=Path, default=None, help="append the markdown tables here")
    parser.add_argument("--jsonl", type=Path, default=None, help="append every number here, one JSON object a line")
    args = parser.parse_args(argv)
    if args.resources:
        return resource_report(ranks=tuple(args.ranks))
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False
    report = Report(args.report, args.jsonl)
    try:
        if args.selfcheck:
            sys.exit(0 if run_selfcheck(report) else "noise stream differs from noise.py")
        if args.memory:
            return run_memory(report)
        return run_timing(report, full=args.full)
    except KeyboardInterrupt:
        report.note("interrupted", "stopped by its time limit (SIGINT): the tables above it are complete, the rest did not run")
        sys.exit(130)


if __name__ == "__main__":
    main()
