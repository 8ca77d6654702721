"""MoE experts group: one training step of a config-built Qwen3-MoE with PEFT ``target_parameters``
LoRA on its experts, PEFT's forward vs Flat-LoRA's (``enable_flat_lora``); peak memory in
``extra_info`` (builders: ``experts_memory.py``, which also prints the RESULTS.md table).

Smoke mode: 4 experts of 64x64 (fast); ``--full``: ``experts_memory.CASES``. CPU only (the C++
generator; on CUDA the same code runs the Triton one, not timed here yet).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from experts_memory import CASES, IMPLEMENTATIONS, QUICK_CASES, case_id, setup, stack_mib  # noqa: E402
from harness import cpu_step_and_peak, parametrize_runs, record  # noqa: E402

_PEAKS: dict = {}  # (case, implementation) -> MiB, for the target check


def pytest_generate_tests(metafunc):
    parametrize_runs(metafunc, "experts_run", QUICK_CASES, CASES, IMPLEMENTATIONS, case_id)


def test_experts_step(benchmark, experts_run, bench_settings, bench_facts):
    step, peak = cpu_step_and_peak(experts_run, setup, bench_settings, "the experts group")
    case, name = experts_run
    _PEAKS[case, name] = peak
    layers, experts, hidden, intermediate, tokens, dtype = case
    record(benchmark, bench_facts, group=f"experts {case_id(case)}", suite="experts", implementation=name,
           pass_kind="forward+backward", layers=layers, experts=experts, hidden=hidden, intermediate=intermediate,
           M=tokens, dtype=str(dtype)[6:], peak_memory_bytes=int(peak * 2**20),
           peak_memory_method="torch.profiler memory events")  # fmt: skip
    if name == "flat" and (case, "peft") in _PEAKS:  # the target: PEFT's own plus one expert stack
        assert peak <= _PEAKS[case, "peft"] + stack_mib(experts, hidden, intermediate, dtype)
    benchmark.pedantic(step, rounds=bench_settings.rounds, iterations=1, warmup_rounds=0)
