"""Flat-QLoRA group: fused Flat-QLoRA vs PEFT QLoRA vs naive Flat-QLoRA on bitsandbytes NF4 bases,
one layer and a stack, forward + backward; peak memory in ``extra_info`` (builders and the
implementations' definitions: ``qlora_target.py``, which also runs the issue's target shapes).

Smoke mode: 256-wide layers, M=64 (fast); ``--full``: the targets' 2048-wide layers at M=512 (bf16),
one layer and 16. CPU only (bitsandbytes' 4-bit path here runs on the CPU).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

from harness import cpu_step_and_peak, parametrize_runs, record  # noqa: E402
from qlora_target import IMPLEMENTATIONS, setup  # noqa: E402

SMOKE_CASES = [(1, 64, 256, torch.float32), (1, 64, 256, torch.bfloat16), (4, 64, 256, torch.bfloat16)]
FULL_CASES = [(1, 512, 2048, torch.bfloat16), (16, 512, 2048, torch.bfloat16), (1, 512, 2048, torch.float32)]


def _case_id(case):
    depth, m, n, dtype = case
    return f"{depth}x{n}-M{m}-{str(dtype)[6:]}"


def pytest_generate_tests(metafunc):
    parametrize_runs(metafunc, "qlora_run", SMOKE_CASES, FULL_CASES, IMPLEMENTATIONS, _case_id)


def test_qlora_step(benchmark, qlora_run, bench_settings, bench_facts):
    step, peak = cpu_step_and_peak(qlora_run, setup, bench_settings, "the Flat-QLoRA group")
    case, name = qlora_run
    depth, m, n, dtype = case
    record(benchmark, bench_facts, group=f"qlora {_case_id(case)}", suite="qlora", implementation=name,
           pass_kind="forward+backward", layers=depth, M=m, N=n, K=n, dtype=str(dtype)[6:],
           peak_memory_bytes=int(peak * 2**20), peak_memory_method="torch.profiler memory events")  # fmt: skip
    assert peak > 0
    benchmark.pedantic(step, rounds=bench_settings.rounds, iterations=1, warmup_rounds=0)
