"""The C++ backend's CPU target table (issue 16): fused Flat-LoRA vs plain LoRA, fwd+bwd, rank 16.

    .venv/bin/python benchmarks/cpu_target.py                # the table, 2 threads, about 1-2 min
    .venv/bin/python benchmarks/cpu_target.py --json out/cpu_target.json

Per case (layer shape out x in, tokens M, dtype) both implementations get the same tensors and run
the same step: forward, then ``torch.autograd.grad`` for x, A and B (x requires grad, as an inner
layer's does). After warm-up, each repetition times ``--inner`` fused steps and ``--inner`` LoRA steps
back to back, the order alternating between repetitions (A/B, then B/A), and keeps the ratio of the
two medians; the table gives the median ratio over the repetitions and its min-max spread, so a
drift of the machine's speed during the run shows up as spread instead of bias. The CPU model, ISA,
threads and the load average before and after are printed with the table: a ratio from a loaded
machine is only as good as its spread.

Target (issue 16): fused <= 1.10x LoRA at 1024x1024, M = 512 and 2048, fp32 and bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flatlora_kernels import flat_lora_linear  # noqa: E402
from flatlora_kernels.backends import cpp  # noqa: E402
from flatlora_kernels.baselines import lora_linear  # noqa: E402

RANK = 16
SCALING = 2.0
SIGMA = 0.05
SHAPES = [(1024, 1024), (768, 3072), (3072, 768)]  # (out_features, in_features)
TOKENS = [256, 512, 2048]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET = {"shape": (1024, 1024), "tokens": (512, 2048), "max_ratio": 1.10}


def cpu_model() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown"
    return (
        f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, "
        f"model {fields.get('model', '?')}), {os.cpu_count()} logical CPUs"
    )


def load_average() -> str:
    try:
        return "%.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        return "unknown"


def make_case(out_features: int, in_features: int, tokens: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(out_features * 7 + in_features + tokens)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    lora_A = (torch.randn(RANK, in_features, generator=g) / in_features**0.5).to(dtype).requires_grad_(True)
    lora_B = (torch.randn(out_features, RANK, generator=g) * 0.1).to(dtype).requires_grad_(True)
    bias = (torch.randn(out_features, generator=g) * 0.1).to(dtype)
    x = torch.randn(tokens, in_features, generator=g).to(dtype).requires_grad_(True)
    dy = torch.randn(tokens, out_features, generator=g).to(dtype)
    return weight, lora_A, lora_B, bias, x, dy


def steps(case):
    weight, lora_A, lora_B, bias, x, dy = case
    sigma, seed = torch.tensor(SIGMA), torch.tensor(1234)

    def fused():
        y = flat_lora_linear(x, weight, lora_A, lora_B, bias, scaling=SCALING, sigma=sigma, seed=seed, backend="cpp")
        return torch.autograd.grad(y, (x, lora_A, lora_B), dy)

    def lora():
        y = lora_linear(x, weight, lora_A, lora_B, bias, scaling=SCALING)
        return torch.autograd.grad(y, (x, lora_A, lora_B), dy)

    return fused, lora


def median_time(fn, inner: int, clock) -> float:
    times = []
    for _ in range(inner):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def measure(fused, lora, reps: int, inner: int, clock) -> dict:
    for fn in (fused, lora, fused, lora):  # warm-up: allocator, oneDNN kernels, first-call set-up
        fn()
    ratios, fused_s, lora_s = [], [], []
    for rep in range(reps):
        order = (fused, lora) if rep % 2 == 0 else (lora, fused)
        t = {fn: median_time(fn, inner, clock) for fn in order}
        fused_s.append(t[fused])
        lora_s.append(t[lora])
        ratios.append(t[fused] / t[lora])
    return dict(
        fused_ms=1e3 * statistics.median(fused_s),
        lora_ms=1e3 * statistics.median(lora_s),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7, help="A/B repetitions per case (>= 7 for the table)")
    parser.add_argument("--inner", type=int, default=3, help="steps per implementation per repetition")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: perf_counter (the target); cpu: process CPU time (steadier on a loaded "
                        "machine, only meaningful with --threads 1)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=TOKENS)
    parser.add_argument("--shapes", nargs="+", default=[f"{o}x{i}" for o, i in SHAPES], help="OUTxIN")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    header = dict(
        cpu=cpu_model(), isa=cpp.cpu_isa(), threads=torch.get_num_threads(), torch=torch.__version__,
        python=platform.python_version(), clock=args.clock, reps=args.reps, inner=args.inner,
        load_before=load_average(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    print(f"# CPU target: {header['cpu']}; ISA {header['isa']}; {header['threads']} threads; torch {header['torch']}")
    print(f"# {header['date']}; load average before: {header['load_before']}; clock {args.clock}; "
          f"{args.reps} A/B repetitions x {args.inner} steps each; r={RANK}, fwd+bwd")
    print()
    print("| shape (out x in) | M | dtype | LoRA ms | fused ms | fused/LoRA (median) | spread (min-max) | target |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    started = time.perf_counter()
    for shape in args.shapes:
        out_features, in_features = (int(v) for v in shape.lower().split("x"))
        for dtype_name in args.dtypes:
            for tokens in args.tokens:
                case = make_case(out_features, in_features, tokens, DTYPES[dtype_name])
                row = dict(shape=shape, tokens=tokens, dtype=dtype_name, **measure(*steps(case), args.reps, args.inner, clock))
                targeted = (out_features, in_features) == TARGET["shape"] and tokens in TARGET["tokens"]
                row["target"] = ("met" if row["ratio"] <= TARGET["max_ratio"] else "MISSED") if targeted else ""
                rows.append(row)
                print(f"| {shape} | {tokens} | {dtype_name} | {row['lora_ms']:.2f} | {row['fused_ms']:.2f} | "
                      f"{row['ratio']:.2f}x | {row['ratio_min']:.2f}-{row['ratio_max']:.2f} | {row['target']} |",
                      flush=True)
                del case
    header["load_after"] = load_average()
    header["seconds"] = round(time.perf_counter() - started, 1)
    print()
    print(f"# load average after: {header['load_after']}; {header['seconds']} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump(dict(header=header, rows=rows), out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
