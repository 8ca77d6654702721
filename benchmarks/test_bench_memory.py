"""Peak memory of a training step (forward + backward) per implementation, and its time.

* one layer (the C++ target shape on CPU, Llama-2-7B layers on GPU);
* a stack of 1, 2, 4, 8, 16 square layers: what an implementation keeps per layer until backward
  (``naive`` keeps ``W + s*B@A + eps``) shows up as memory growing with depth.

Memory is measured in an untimed run before the timed rounds (see ``harness.MEMORY_METHOD``) and
stored in ``extra_info["peak_memory_bytes"]``.
"""

from __future__ import annotations

from harness import MEMORY_METHOD, check_or_skip, own_copy_if_editing, peak_memory_bytes, record, time_step, training_step
from implementations import IMPLEMENTATIONS
from workloads import dtype_name, linear_workload, stack_workload


def _measure(benchmark, impl, workload, case, settings, facts, group, **info):
    sanity_facts = check_or_skip(impl, workload, settings, case)
    run = training_step(impl, workload, settings, backward=True)
    peak = peak_memory_bytes(run, settings)
    record(
        benchmark,
        facts,
        group=group,
        implementation=impl.name,
        pass_kind="forward+backward",
        peak_memory_bytes=peak,
        peak_memory_method=MEMORY_METHOD[settings.device.type],
        **info,
        **sanity_facts,
    )
    time_step(benchmark, run, settings)


def test_memory_one_layer(benchmark, memory_layer_run, bench_settings, bench_facts):
    case, name = memory_layer_run
    impl = IMPLEMENTATIONS[name]
    workload = own_copy_if_editing(impl, linear_workload(case, bench_settings.device))
    _measure(
        benchmark, impl, workload, case, bench_settings, bench_facts,
        group=f"memory one layer {case.id}",
        suite="memory_layer",
        shape=case.shape.name, M=case.tokens, N=case.shape.out_features, K=case.shape.in_features, r=case.rank,
        dtype=dtype_name(case.dtype), depth=1,
    )


def test_memory_stack(benchmark, stack_run, bench_settings, bench_facts):
    case, name = stack_run
    impl = IMPLEMENTATIONS[name]
    workload = own_copy_if_editing(impl, stack_workload(case, bench_settings.device))
    _measure(
        benchmark, impl, workload, case, bench_settings, bench_facts,
        group=f"memory stack {case.id}",
        suite="memory_stack",
        shape=f"stack-{case.width}", M=case.tokens, N=case.width, K=case.width, r=case.rank,
        dtype=dtype_name(case.dtype), depth=case.depth,
    )
