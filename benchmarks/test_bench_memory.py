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
from workloads import linear_workload, stack_workload


def _measure(benchmark, name, case, workload_of, settings, facts, *, suite, group, **info):
    impl = IMPLEMENTATIONS[name]
    workload = own_copy_if_editing(impl, workload_of(case, settings.device))
    sanity_facts = check_or_skip(impl, workload, settings, case)
    run = training_step(impl, workload, settings, backward=True)
    peak = peak_memory_bytes(run, settings)
    record(
        benchmark,
        facts,
        group=group,
        suite=suite,
        implementation=name,
        pass_kind="forward+backward",
        peak_memory_bytes=peak,
        peak_memory_method=MEMORY_METHOD[settings.device.type],
        **case.result_fields(),
        **info,
        **sanity_facts,
    )
    time_step(benchmark, run, settings)


def test_memory_one_layer(benchmark, memory_layer_run, bench_settings, bench_facts):
    case, name = memory_layer_run
    _measure(
        benchmark, name, case, linear_workload, bench_settings, bench_facts,
        suite="memory_layer", group=f"memory one layer {case.id}", depth=1,
    )


def test_memory_stack(benchmark, stack_run, bench_settings, bench_facts):
    case, name = stack_run
    _measure(
        benchmark, name, case, stack_workload, bench_settings, bench_facts,
        suite="memory_stack", group=f"memory stack {case.id}",
    )
