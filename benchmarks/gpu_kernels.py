"""Kernel-level GPU checks and timings of the Triton backend (a standalone script; needs CUDA).

    python benchmarks/gpu_kernels.py [--quick] [--json results.json]
    python benchmarks/gpu_kernels.py --resources     # no GPU needed (TRITON_INTERPRET unset)
    TRITON_INTERPRET=1 python -m tests.test_gpu_script_dry_run [--quick ...]   # CPU dry run, tiny shapes

1. Correctness on fresh random data at real sizes, before any timing: forward and every gradient of
   ``flat_lora_linear(backend="triton")`` under each strategy, against the plain-PyTorch backend run
   on fp32 copies of the inputs (same eps by definition), as ``||out - ref|| / ||ref||``. The
   caching allocator is poisoned with NaN first, so an unwritten output element shows up.
2. ``triton.testing.do_bench`` medians (p20/p80 kept in the JSON) of: cuBLAS ``x @ W^T``; LoRA fwd and
   fwd+bwd (PEFT's math under autograd); the naive perturbation (``W + eps`` kept for backward);
   Flat-LoRA fwd and fwd+bwd per strategy; the kernels alone (row scales, one regeneration of W',
   the z tile) with their normal rates; the in-register crossover sweep over M; the chunk-cap sweep.
3. Peak memory of a 16-layer 4096-wide stack at M=8192 (LoRA vs naive vs Flat-LoRA).

``--resources`` records the launchers' kernel calls on CPU tensors (nothing runs), compiles each for
sm_90 with Triton's own argument specialisation (Triton's bundled ptxas) and prints registers, stack,
ptxas spill stores, shared memory and instruction counts (tensor-core ops, vector loads/stores,
barriers, layout conversions). A 32-byte stack is expected: libdevice's sin/cos keep a scratch array
for huge arguments, a path Box-Muller never takes.

Targets (docs/DESIGN.md, "targets"; none measured yet): Flat-LoRA fwd+bwd <= 1.00x LoRA fwd+bwd at (M, N, K) =
(8192, 4096, 4096), (2048, 4096, 4096), (8192, 11008, 4096), bf16, r=16; noise generation
>= 300 G normals/s at M=256; stack peak <= LoRA's + 1%. Markdown tables are printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flatlora_kernels import flat_lora_linear  # noqa: E402
from flatlora_kernels.backends import torch_reference  # noqa: E402
from flatlora_kernels.backends import triton_tuning  # noqa: E402
from flatlora_kernels import baselines  # noqa: E402
from flatlora_kernels.baselines import lora_linear  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16
RANK, SCALING, SIGMA = 16, 2.0, 0.05
TARGET_SHAPES = [(8192, 4096, 4096), (2048, 4096, 4096), (8192, 11008, 4096)]
SMALL_M = [1, 16, 64, 256]
SQUARE_LAYER = (4096, 4096)  # (N, K) of the small-M checks and the kernels-alone timings
ODD_SHAPE = (300, 1000, 1030)  # (M, N, K) of the fp16/fp32 checks: no dimension a multiple of 16
CROSSOVER_M = [16, 32, 64, 128, 256, 512, 1024]
CHUNK_CAPS_MIB = [4, 8, 16, 32, 64]
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
    tb = triton_backend_module()
    with patched(tb, "chunk_bytes", nbytes), patched(tb, "chunk_grows_to_output", grows_to_output):
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

    class Recorder:  # stands in for triton_backend._traceable (wrap_triton): kernel[grid](*args, **kwargs) is recorded
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))

    zeros = lambda *size, dtype=torch.float32: torch.zeros(*size, dtype=dtype)  # noqa: E731
    weight, lora_A, lora_B = zeros(N, K, dtype=weight_dtype), zeros(rank, K, dtype=factor_dtype), zeros(N, rank, dtype=factor_dtype)
    seed, sigma, scales, bias = zeros((), dtype=torch.int64), zeros(()), zeros(N), zeros(N, dtype=compute_dtype)
    labels = []
    with patched(tb, "_traceable", Recorder):
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
            tb._forward_in_register(zeros(M, K, dtype=compute_dtype), weight, lora_A, lora_B, bias, SCALING, scales, seed)
            tb._input_grad_in_register(zeros(M, N, dtype=compute_dtype), weight, lora_A, lora_B, scales, SCALING, seed)
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


def resource_report(arch=90, ranks=(RANK,)):
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget

    if triton_backend_module().INTERPRETING:
        sys.exit("--resources compiles real kernels: run it with TRITON_INTERPRET unset")
    target = GPUTarget("cuda", arch, 32)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump, ptxas = os.path.join(tools, "cuobjdump"), os.path.join(tools, "ptxas")
    rows = {}
    cases = [(torch.bfloat16, torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
             (torch.float16, torch.float16, torch.float16), (torch.float32, torch.float32, torch.float32)]  # fmt: skip
    for rank, (compute_dtype, weight_dtype, factor_dtype) in ((r, c) for r in ranks for c in cases):
        case = f"x {TRITON_TYPES[compute_dtype]}, W {TRITON_TYPES[weight_dtype]}, A/B {TRITON_TYPES[factor_dtype]}, r={rank}"
        for label, kernel, args, kwargs in recorded_launches(compute_dtype, weight_dtype, factor_dtype, rank):
            compiled = compile_recorded(kernel, args, kwargs, target)
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
                code = dict(sass=subprocess.run([cuobjdump, "-sass", cubin.name], capture_output=True, text=True).stdout,
                            ttgir=compiled.asm["ttgir"])  # fmt: skip
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:  # ptxas -v: spills apart from the stack
                ptx.write(compiled.asm["ptx"])
                ptx.flush()
                verbose = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", ptx.name, "-o", os.devnull],
                                         capture_output=True, text=True).stderr  # fmt: skip
            found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
            spills = re.search(r"(\d+) bytes spill stores", verbose)
            rows[f"{label} [{case}]"] = dict(
                registers=int(found.group(1)) if found else "?",
                stack_bytes=int(found.group(2)) if found else "?",
                spill_stores=int(spills.group(1)) if spills else "?",
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


# ---- 2. timings -----------------------------------------------------------------------------------


def bench(run, grad_to_none=None):
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(run, warmup=50, rep=300, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return dict(ms=p50, p20=p20, p80=p80)


def time_layer(M, N, K, strategies):
    weight, lora_A, lora_B, bias = make_layer(N, K)
    x, dy = make_inputs(M, N, K)
    seed, sigma = seed_and_sigma()
    args = (x, weight, lora_A, lora_B, bias)
    rows = {"cuBLAS x@W^T": bench(lambda: torch.mm(x, weight.t()))}
    for label, fn in (("LoRA", lora), ("naive perturbation", naive_perturbation)):
        if label == "LoRA":
            rows["LoRA fwd"] = bench(fwd_closure(fn, *args, seed, sigma))
        run, leaves = fwd_bwd_closure(fn, *args, dy, seed, sigma)
        rows[f"{label} fwd+bwd"] = bench(run, grad_to_none=leaves)
    for name in strategies:
        with strategy(name):
            rows[f"Flat-LoRA {name} fwd"] = bench(fwd_closure(flat_lora, *args, seed, sigma))
            run, leaves = fwd_bwd_closure(flat_lora, *args, dy, seed, sigma)
            rows[f"Flat-LoRA {name} fwd+bwd"] = bench(run, grad_to_none=leaves)
    lora_ms = rows["LoRA fwd+bwd"]["ms"]
    for key, row in rows.items():
        if key.endswith("fwd+bwd"):
            row["x LoRA"] = row["ms"] / lora_ms
    return rows


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
    regenerations = math.ceil(M_in_register / tb._fused_tiles("fused_forward", M_in_register, DTYPE)["BLOCK_TOKENS"])
    with torch.no_grad():
        key = f"in-register fwd GEMM, M={M_in_register}"
        rows[key] = bench(lambda: tb._forward_in_register(x, weight, lora_A, lora_B, bias, SCALING, scale, seed))
        rows[key]["G normals/s"] = regenerations * normals / (rows[key]["ms"] * 1e-3) / 1e9
        key = f"streamed fwd, M={M_in_register}"
        rows[key] = bench(lambda: tb._forward_streamed(x, weight, lora_A, lora_B, bias, SCALING, scale, seed))
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


def strip_gemm_check(M=8192, N=11008, K=4096, cap_mib=16):
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
            run = lambda: tb._input_grad_streamed(dy, weight, lora_A, lora_B, scale, SCALING, seed)  # noqa: E731
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            dx[batched] = run()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            rows[label] = dict(bench(run), peak_MiB=peak)
    rows["one batched GEMM per chunk"]["max_abs_diff"] = (dx[True].float() - dx[False].float()).abs().max().item()
    return rows


# ---- 3. peak memory -------------------------------------------------------------------------------


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


def stream_self_check(device=None):
    """A few Philox integers (offsets past 2**32 included) and normals from the GPU vs noise.py."""
    from flatlora_kernels import noise

    device = device or DEVICE
    tb = triton_backend_module()
    offsets = torch.tensor([0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, 2**40 + 3, 2**62 + 11], device=device)
    results = []
    for seed in (0, 123456789, 2**63 - 1):
        seed_t = torch.tensor(seed, dtype=torch.int64, device=device)
        expected = torch.stack(noise.philox4x32_10(seed_t.cpu(), offsets.cpu()), dim=1) & 0xFFFFFFFF
        ok = torch.equal(tb.philox_words(seed_t, offsets).cpu(), expected)
        results.append(dict(check=f"Philox words, seed {seed}", ok=bool(ok)))
    z = tb.normal_rows(torch.tensor(77, device=device), 1030, 2**31 + 3, 2**31 + 7)
    err = (z.cpu() - noise.normal_rows(77, 1030, 2**31 + 3, 2**31 + 7)).abs().max().item()
    results.append(dict(check="normals, rows past 2**32 offsets", ok=err <= 1e-5, max_abs_err=err))
    return results


def regen_rate(shapes=((4096, 4096), (11008, 4096), (4096, 11008))):
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="first target shape only, no sweeps")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--resources", action="store_true", help="compiler resource report only (no GPU needed)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[RANK], help="LoRA ranks of --resources")
    parser.add_argument("--selfcheck", action="store_true", help="noise stream on the GPU vs noise.py only")
    parser.add_argument("--regen", action="store_true", help="normals/s of the regeneration kernel only")
    parser.add_argument("--memory", action="store_true", help="stack peak memory only")
    parser.add_argument("--strips", action="store_true", help="streamed dx: four strip GEMMs vs one batched GEMM only")
    args = parser.parse_args(argv)
    if args.resources:
        return resource_report(ranks=tuple(args.ranks))
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA device")
    if args.selfcheck:
        checks = stream_self_check()
        print(markdown_table("Noise stream self-check (GPU vs noise.py)", {c["check"]: c for c in checks}, ["ok", "max_abs_err"]))
        sys.exit(0 if all(c["ok"] for c in checks) else "noise stream differs from noise.py: stop here")
    if args.regen:
        print(markdown_table("Regeneration rate, bf16 out", regen_rate(), ["ms", "G normals/s"]))
        return None
    if args.strips:
        title = f"Streamed dx, (8192, 11008, 4096) bf16, 16 MiB chunks (BATCHED_STRIP_GEMM={triton_tuning.BATCHED_STRIP_GEMM})"
        print(markdown_table(title, strip_gemm_check(), ["ms", "p20", "p80", "peak_MiB", "max_abs_diff"]))
        return None
    if args.memory:
        print(markdown_table("Peak memory, 16 x 4096-wide layers, M=8192, fwd+bwd", stack_peak_memory(), ["peak_MiB", "x LoRA"]))
        return None
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False
    facts = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype=str(DTYPE),
        rank=RANK,
        chunk_bytes=triton_backend_module().chunk_bytes,
        in_register_max_tokens=triton_tuning.IN_REGISTER_MAX_TOKENS,
    )
    shapes = TARGET_SHAPES[:1] if args.quick else TARGET_SHAPES
    report = dict(facts=facts)

    checks = [check_correctness(M, N, K, "auto") for M, N, K in shapes]
    checks += [check_correctness(M, N, K, "streamed") for M, N, K in shapes]
    checks += [check_correctness(M, *SQUARE_LAYER, name) for M in SMALL_M for name in ("streamed", "in_register")]
    checks += [check_correctness(*ODD_SHAPE, name, dtype) for dtype in (torch.float16, torch.float32)
               for name in ("streamed", "in_register")]  # fmt: skip
    report["correctness"] = checks
    tables = [markdown_table("Correctness (relative error vs fp32 reference)",
                             {f"{c['M']}x{c['N']}x{c['K']} {c['dtype']} {c['strategy']}": c for c in checks},
                             ["ok", "y", "dx", "dA", "dB"])]  # fmt: skip
    if not all(c["ok"] for c in checks):
        print("\n".join(tables))
        sys.exit("correctness check failed: no timings taken")

    report["layers"] = {}
    for M, N, K in shapes:
        rows = time_layer(M, N, K, ["auto", "streamed"])
        report["layers"][f"{M}x{N}x{K}"] = rows
        tables.append(markdown_table(f"(M, N, K) = ({M}, {N}, {K}), bf16, r={RANK}: medians", rows, ["ms", "p20", "p80", "x LoRA"]))
    report["kernels"] = time_kernels(*SQUARE_LAYER)
    tables.append(markdown_table(f"Kernels alone, (N, K) = {SQUARE_LAYER}", report["kernels"], ["ms", "G normals/s"]))
    if not args.quick:
        report["crossover"] = crossover_sweep()
        tables.append(markdown_table("fwd+bwd by strategy over M (N = K = 4096)", report["crossover"], ["ms"]))
        report["chunks"] = chunk_sweep()
        tables.append(markdown_table("Streamed fwd+bwd by chunk cap, (8192, 11008, 4096)", report["chunks"], ["ms"]))
        report["memory"] = stack_peak_memory()
        tables.append(markdown_table("Peak memory, 16 x 4096-wide layers, M=8192, fwd+bwd", report["memory"], ["peak_MiB", "x LoRA"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    print("\n" + "\n".join(f"{k}: {v}" for k, v in facts.items()) + "\n")
    print("\n".join(tables))


if __name__ == "__main__":
    main()
