"""The two dependency messages the package hides, and that it hides nothing else: pyproject's pytest
filter for the Triton interpreter's NumPy deprecation, and PeakMemory's filter for c10's allocator
line. Each filter is matched on a message and where it comes from, never a blanket ignore."""

import builtins
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parent.parent
FILTERS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]


def _parsed(entry: str) -> dict:
    """A pytest ``filterwarnings`` line (``action:message:category:module``) as ``warnings.filterwarnings`` arguments."""
    action, message, category, module = (entry.split(":") + ["", "", "", ""])[:4]
    return {"action": action, "message": message, "category": getattr(builtins, category or "Warning"), "module": module}


def test_every_warning_filter_names_a_message_a_category_and_a_module():
    assert FILTERS
    for entry in FILTERS:
        parsed = _parsed(entry)
        assert parsed["action"] == "ignore" and parsed["message"] and parsed["category"] is not Warning and parsed["module"], f"too broad: {entry!r}"


def _interpreter_deprecations(apply_filters: bool) -> list:
    from flatlora_kernels import flat_lora_linear

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if apply_filters:
            for entry in FILTERS:
                warnings.filterwarnings(**_parsed(entry))
        x, weight, lora_A, lora_B = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        flat_lora_linear(x, weight, lora_A, lora_B, scaling=1.0, sigma=0.1, seed=1, backend="triton")
    return [w for w in caught if issubclass(w.category, DeprecationWarning) and "triton" in w.filename]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the warning comes from Triton's interpreter")
def test_the_interpreter_numpy_deprecation_is_filtered():
    if not _interpreter_deprecations(apply_filters=False):
        pytest.skip("this Triton/NumPy pair no longer warns: pyproject's filter can go")
    assert _interpreter_deprecations(apply_filters=True) == []


# c10 logs its allocator line once per process (then once per 1000), so each case runs in a fresh one.
_FREE_UNDER_THE_PROFILER = """
import os, sys, torch
from torch.profiler import ProfilerActivity, profile
from flatlora_kernels.memory import PeakMemory
made_before = torch.randn(256, 256)
block = PeakMemory("cpu") if sys.argv[1] == "peak" else profile(activities=[ProfilerActivity.CPU], profile_memory=True)
with block:
    del made_before  # freed under the profiler: c10 logs "Memory block of unknown size ..."
    os.write(2, b"a line of the caller's own\\n")
"""


def test_peak_memory_hides_the_allocator_line_and_keeps_other_stderr():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs = {mode: subprocess.Popen([sys.executable, "-c", _FREE_UNDER_THE_PROFILER, mode], stderr=subprocess.PIPE, env=env)
            for mode in ("profiler", "peak")}
    err = {mode: run.communicate(timeout=120)[1].decode() for mode, run in runs.items()}
    assert all(run.returncode == 0 for run in runs.values()), err
    if "Memory block of unknown size" not in err["profiler"]:
        pytest.skip("this torch no longer logs the allocator line: PeakMemory's filter can go")
    assert "Memory block of unknown size" not in err["peak"]
    assert "a line of the caller's own" in err["peak"]
