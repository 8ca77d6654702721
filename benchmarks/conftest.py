"""pytest wiring of the benchmark suite: options, thread count, device, and what every result records.

Options (each also settable from the environment, for CI):

``--full``            real layer shapes (``FLATLORA_BENCH_FULL=1``); default: the short smoke run.
``--bench-device``    ``auto`` (CUDA when present), ``cpu`` or ``cuda`` (``FLATLORA_BENCH_DEVICE``).
``--bench-threads``   CPU threads for torch (``FLATLORA_BENCH_THREADS``); default: all usable cores.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# OpenMP reads its thread count once, when its runtime starts: set it before torch is imported, so the
# C++ extension's OpenMP loops use the same count as torch's own.
if os.environ.get("FLATLORA_BENCH_THREADS"):
    os.environ.setdefault("OMP_NUM_THREADS", os.environ["FLATLORA_BENCH_THREADS"])

# Benchmarks run from a checkout: make the package importable without installing it.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("flatlora_kernels") is None:
    sys.path.insert(0, str(_REPO_ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from harness import PASSES  # noqa: E402
from implementations import IMPLEMENTATIONS  # noqa: E402
from settings import BenchSettings, env_flag, environment_facts, make_settings  # noqa: E402
from workloads import linear_cases, memory_layer_cases, stack_cases  # noqa: E402

SETTINGS_KEY = pytest.StashKey[BenchSettings]()
FACTS_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("flatlora benchmarks")
    group.addoption("--full", action="store_true", default=False, help="benchmark real layer shapes (slow)")
    group.addoption("--bench-device", default=None, help="auto (default), cpu or cuda")
    group.addoption("--bench-threads", type=int, default=None, help="torch CPU threads (default: all usable cores)")


def pytest_configure(config):
    full = config.getoption("--full") or env_flag("FLATLORA_BENCH_FULL")
    device = config.getoption("--bench-device") or os.environ.get("FLATLORA_BENCH_DEVICE", "auto")
    threads = config.getoption("--bench-threads") or int(os.environ.get("FLATLORA_BENCH_THREADS", "0") or 0)
    settings = make_settings(full=full, device_name=device, threads=threads or None)
    torch.set_num_threads(settings.threads)
    config.stash[SETTINGS_KEY] = settings
    config.stash[FACTS_KEY] = environment_facts(settings)
    # An implementation that cannot run here is skipped, not failed: always print the reasons.
    if "s" not in config.option.reportchars and "a" not in config.option.reportchars:
        config.option.reportchars += "s"


def pytest_report_header(config):
    facts = config.stash[FACTS_KEY]
    return (
        f"flatlora benchmarks: mode={facts['mode']} device={facts['device']} ({facts['device_type']}) "
        f"threads={facts['threads']} torch={facts['torch']} triton={facts['triton']}"
    )


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["flatlora"] = config.stash[FACTS_KEY]


def pytest_generate_tests(metafunc):
    """Parametrise by the cases of the chosen mode and device, in the order they should run: all
    implementations of one case back to back (its tensors are built once and shared)."""
    settings = metafunc.config.stash[SETTINGS_KEY]
    device, full = settings.device, settings.full
    names = list(IMPLEMENTATIONS)
    if "linear_run" in metafunc.fixturenames:
        runs = [(case, kind, name) for case in linear_cases(device, full) for kind in PASSES for name in names]
        metafunc.parametrize("linear_run", runs, ids=[f"{c.id}-{k}-{n}" for c, k, n in runs])
    if "memory_layer_run" in metafunc.fixturenames:
        runs = [(case, name) for case in memory_layer_cases(device, full) for name in names]
        metafunc.parametrize("memory_layer_run", runs, ids=[f"{c.id}-{n}" for c, n in runs])
    if "stack_run" in metafunc.fixturenames:
        runs = [(case, name) for case in stack_cases(device, full) for name in names]
        metafunc.parametrize("stack_run", runs, ids=[f"{c.id}-{n}" for c, n in runs])


@pytest.fixture(scope="session")
def bench_settings(request) -> BenchSettings:
    return request.config.stash[SETTINGS_KEY]


@pytest.fixture(scope="session")
def bench_facts(request) -> dict:
    """Device name, versions, threads and mode: copied into every benchmark's ``extra_info``."""
    return dict(request.config.stash[FACTS_KEY])
