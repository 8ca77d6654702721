"""Time of one Flat-LoRA layer per implementation: forward, and forward + backward.

Parametrised (in conftest) over case (layer shape x tokens x dtype) x pass x implementation. Ratios
to ``lora`` are computed afterwards by ``benchmarks/report.py`` from the JSON of the same run.
"""

from __future__ import annotations

from harness import check_or_skip, own_copy_if_editing, record, time_step, training_step
from implementations import IMPLEMENTATIONS
from workloads import linear_workload


def test_linear(benchmark, linear_run, bench_settings, bench_facts):
    case, kind, name = linear_run
    impl = IMPLEMENTATIONS[name]
    workload = own_copy_if_editing(impl, linear_workload(case, bench_settings.device))
    sanity_facts = check_or_skip(impl, workload, bench_settings, case)
    run = training_step(impl, workload, bench_settings, backward=kind == "forward+backward")
    record(
        benchmark,
        bench_facts,
        group=f"linear {kind} {case.id}",
        suite="linear",
        implementation=name,
        pass_kind=kind,
        **case.result_fields(),
        **sanity_facts,
    )
    time_step(benchmark, run, bench_settings)
