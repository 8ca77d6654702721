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

from experts_memory import CASES, IMPLEMENTATIONS, QUICK_CASES, setup, stack_mib  # noqa: E402
from harness import record  # noqa: E402
from qlora_target import peak_memory_mib  # noqa: E402

_STEPS: dict = {}  # one setup per case, shared by its implementations
_PEAKS: dict = {}


def _case_id(case):
    layers, experts, hidden, intermediate, tokens, dtype = case
    return f"{layers}x{experts}e-{hidden}x{intermediate}-T{tokens}-{str(dtype)[6:]}"


def pytest_generate_tests(metafunc):
    if "experts_run" in metafunc.fixturenames:
        from conftest import SETTINGS_KEY

        full = metafunc.config.stash[SETTINGS_KEY].full
        runs = [(case, name) for case in (CASES if full else QUICK_CASES) for name in IMPLEMENTATIONS]
        metafunc.parametrize("experts_run", runs, ids=[f"{_case_id(c)}-{n}" for c, n in runs])


def test_experts_step(benchmark, experts_run, bench_settings, bench_facts):
    if bench_settings.device.type != "cpu":
        pytest.skip("the experts group runs on the CPU")
    case, name = experts_run
    if case not in _STEPS:
        _STEPS.clear()
        _STEPS[case] = setup(*case)
    step = _STEPS[case][name]
    step()  # warm
    peak = _PEAKS[case, name] = peak_memory_mib(step)
    layers, experts, hidden, intermediate, tokens, dtype = case
    record(benchmark, bench_facts, group=f"experts {_case_id(case)}", suite="experts", implementation=name,
           pass_kind="forward+backward", layers=layers, experts=experts, hidden=hidden, intermediate=intermediate,
           M=tokens, dtype=str(dtype)[6:], peak_memory_bytes=int(peak * 2**20),
           peak_memory_method="torch.profiler memory events")  # fmt: skip
    if name == "flat" and (case, "peft") in _PEAKS:  # the target: PEFT's own plus one expert stack
        assert peak <= _PEAKS[case, "peft"] + stack_mib(experts, hidden, intermediate, dtype)
    benchmark.pedantic(step, rounds=bench_settings.rounds, iterations=1, warmup_rounds=0)
