"""CPU dry run of ``benchmarks/gpu_kernels.py``: every mode ``scripts/gpu_check.sh`` runs (and the full
timing run) executes end to end in Triton's interpreter with tiny shapes, so the first lent GPU
cannot fail on a Python error in the script.

Substituted, and only because it cannot run without CUDA: ``triton.testing.do_bench`` (CUDA events)
calls its closure twice instead of timing it; ``torch.cuda``'s synchronisation and memory statistics
are stubs; the script's ``DEVICE`` is ``"cpu"``; the sizes are tiny. Everything else (closures,
correctness gate, strategies, chunk caps, JSON, tables) is the script's own code. No number it prints
here means anything.

Also a command (``scripts/gpu_check.sh --dry-run`` uses it, with ``TRITON_INTERPRET=1`` exported):
``python -m tests.test_gpu_script_dry_run [gpu_kernels.py arguments]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the dry run needs TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)

import triton.testing  # noqa: E402

from .test_gpu_readiness import gpu_kernels_module  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAKE_MS = 1.0
FAKE_PEAK_BYTES = 3 * 2**20
REAL_DO_BENCH = inspect.signature(triton.testing.do_bench)


def two_calls(*args, **kwargs):
    """do_bench's interface (the call must bind to the real signature): the closure runs twice
    (do_bench reruns it, so state carried between calls must be right), gradients reset before each
    call as ``grad_to_none`` asks."""
    bound = REAL_DO_BENCH.bind(*args, **kwargs)
    bound.apply_defaults()
    fn, grad_to_none, quantiles = (bound.arguments[k] for k in ("fn", "grad_to_none", "quantiles"))
    for _call in range(2):
        for tensor in grad_to_none or ():
            tensor.grad = None
        fn()
    return [FAKE_MS * (1 + q) for q in quantiles] if quantiles else FAKE_MS


@contextlib.contextmanager
def dry_run(module):
    """The script made runnable on CPU in the interpreter at tiny sizes (see the module docstring)."""
    tiny = {
        "DEVICE": "cpu",
        "TARGET_SHAPES": [(80, 96, 72), (40, 96, 72)],  # M=80: auto streams; M=40: auto stays in registers
        "SMALL_M": [1, 16, 65],
        "SQUARE_LAYER": (64, 64),
        "ODD_SHAPE": (21, 40, 46),  # K = 46: Kq = 12, the last column strip is short
        "CROSSOVER_M": [16, 80],
        "CHUNK_CAPS_MIB": [4],
    }
    # Sizes the script passes as defaults; the strips check gets a cap of a few counters so its
    # streamed dx really runs in chunks (4 * N * 2 bytes per counter, Kq = 64).
    defaults = {
        "poison_allocator": dict(nbytes=2**16),
        "regen_rate": dict(shapes=((64, 72),)),
        "crossover_sweep": dict(N=64, K=64),
        "chunk_sweep": dict(M=80, N=96, K=72),
        "strip_gemm_check": dict(M=24, N=40, K=256, cap_mib=16 * 4 * 40 * 2 / 2**20),
        "stack_peak_memory": dict(depth=3, width=64, M=80),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in tiny.items():
            assert hasattr(module, name), name  # a renamed constant must not be patched silently
            mp.setattr(module, name, value)
        for name, kwargs in defaults.items():
            mp.setattr(module, name, functools.partial(getattr(module, name), **kwargs))
        mp.setattr(triton.testing, "do_bench", two_calls)
        for name in ("synchronize", "reset_peak_memory_stats"):
            mp.setattr(torch.cuda, name, lambda *a, **k: None)
        mp.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
        mp.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: FAKE_PEAK_BYTES)
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "get_device_name", lambda *a, **k: "cpu (dry run)")
        tf32 = torch.backends.cuda.matmul.allow_tf32  # main() sets this process-wide flag: put it back
        try:
            yield module
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def script():
    with dry_run(gpu_kernels_module()) as module:
        yield module


def tables(text):
    """Titles of the markdown tables in the script's output."""
    return [line[4:] for line in text.splitlines() if line.startswith("### ")]


def test_quick_mode_writes_json_and_tables(script, tmp_path, capsys):
    """gpu_check.sh's timing stage (``--quick --json``): correctness gate, first target shape, kernels alone."""
    out = tmp_path / "gpu_kernels.json"
    script.main(["--quick", "--json", str(out)])
    report = json.loads(out.read_text())
    checks = report["correctness"]
    assert len(checks) == 2 + 2 * 3 + 4 and all(c["ok"] for c in checks), checks
    assert {c["strategy"] for c in checks} == {"auto", "streamed", "in_register"}
    assert list(report["layers"]) == ["80x96x72"]
    rows = report["layers"]["80x96x72"]
    assert rows["LoRA fwd+bwd"]["x LoRA"] == 1.0 and "Flat-LoRA streamed fwd+bwd" in rows
    assert all(set(r) >= {"ms", "p20", "p80"} for r in rows.values())
    assert "G normals/s" in report["kernels"]["in-register fwd GEMM, M=256"]
    assert "crossover" not in report and report["facts"]["device"] == "cpu (dry run)"
    titles = tables(capsys.readouterr().out)
    assert titles[0].startswith("Correctness") and "Kernels alone, (N, K) = (64, 64)" in titles, titles


def test_full_mode_runs_the_sweeps(script, tmp_path, capsys):
    """The run without ``--quick``: every target shape, the crossover and chunk sweeps, the stack memory."""
    script.SMALL_M, script.ODD_SHAPE = [16], (17, 24, 26)  # the gate is checked above; keep this run short
    out = tmp_path / "full.json"
    script.main(["--json", str(out)])
    report = json.loads(out.read_text())
    assert list(report["layers"]) == ["80x96x72", "40x96x72"]
    assert list(report["crossover"]) == [f"M={m} {s}" for m in (16, 80) for s in ("streamed", "in_register", "LoRA")]
    assert list(report["chunks"]) == ["cap 4 MiB", "cap 16 MiB, grows to output"]
    assert report["memory"]["LoRA"]["x LoRA"] == 1.0 and len(report["memory"]) == 4
    assert len(tables(capsys.readouterr().out)) == 1 + 2 + 1 + 3


def test_failed_gate_takes_no_timings(script, monkeypatch):
    """A correctness failure stops the run before anything is timed."""
    script.SMALL_M, script.TARGET_SHAPES = [16], [(17, 24, 26)]
    monkeypatch.setattr(script, "MAX_RELATIVE_ERROR", {dtype: 0.0 for dtype in script.MAX_RELATIVE_ERROR})
    monkeypatch.setattr(script, "time_layer", lambda *a: pytest.fail("timed after a failed check"))
    with pytest.raises(SystemExit, match="correctness check failed"):
        script.main(["--quick"])


def test_selfcheck_mode_exits_zero(script, capsys):
    with pytest.raises(SystemExit) as stop:
        script.main(["--selfcheck"])
    assert stop.value.code == 0
    assert tables(capsys.readouterr().out) == ["Noise stream self-check (GPU vs noise.py)"]


def test_regen_mode(script, capsys):
    script.main(["--regen"])
    out = capsys.readouterr().out
    assert "| regenerate W' 64x72 |" in out and "| z tile only 64x72 |" in out


def test_strips_mode_chunks_and_both_gemms_agree(script, capsys, monkeypatch):
    """``--strips``: the streamed dx runs in several counter chunks, and both GEMM forms give one dx."""
    tb = script.triton_backend_module()
    chunks = []
    real = tb.regenerate_perturbed_weight
    monkeypatch.setattr(tb, "regenerate_perturbed_weight", lambda out, *a, **k: (chunks.append(out.shape), real(out, *a, **k)))
    rows = script.strip_gemm_check()
    assert chunks and all(shape[1:] == (4, 16) for shape in chunks), chunks  # Kq = 64 in chunks of 16 counters
    assert rows["one batched GEMM per chunk"]["max_abs_diff"] <= 1e-2
    assert rows["four strip GEMMs per chunk"]["peak_MiB"] == FAKE_PEAK_BYTES / 2**20
    script.main(["--strips"])
    assert "| one batched GEMM per chunk |" in capsys.readouterr().out


def test_memory_mode(script, capsys):
    script.main(["--memory"])
    out = capsys.readouterr().out
    assert "| Flat-LoRA (streamed, fixed 16 MiB chunks) |" in out and "| naive perturbation |" in out


def test_gpu_check_pytest_stage_selects_every_gpu_only_test():
    """The pytest stage of scripts/gpu_check.sh, collected with its own files and -k expression, holds
    every test those files skip without CUDA (a skipif naming a CUDA device), and the whole readiness
    file; nothing else."""
    shell = (ROOT / "scripts" / "gpu_check.sh").read_text()
    files = shlex.split(re.search(r"^GPU_TEST_FILES=\((.*)\)$", shell, re.M).group(1))
    selection = shlex.split(re.search(r"^GPU_TEST_SELECTION=(.*)$", shell, re.M).group(1))[0]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files, "-k", selection],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    got = {line.split("[")[0] for line in collected.splitlines() if "::" in line}
    expected = set()
    for path in files:
        module = importlib.import_module("tests." + pathlib.Path(path).stem)
        for name, fn in vars(module).items():
            if not name.startswith("test_"):
                continue
            needs_cuda = any("CUDA device" in mark.kwargs.get("reason", "") for mark in getattr(fn, "pytestmark", []))
            if needs_cuda or path.endswith("readiness.py"):
                expected.add(f"{path}::{name}")
    assert len(expected) >= 6 + 6 + 3 and got == expected, (got ^ expected)


def test_gpu_check_dry_run_end_to_end(tmp_path):
    """``scripts/gpu_check.sh --dry-run``: every stage of the default call exits 0 through this module's
    command line, and the summary holds each stage's table."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True, text=True)
    stages = (tmp_path / "stages.txt").read_text().splitlines()
    assert done.returncode == 0 and [line.split(":")[0] for line in stages] == [
        "selfcheck", "gpu_tests", "gpu_kernels", "regen", "strips", "memory",
    ] and all(": rc=0 " in line for line in stages), done.stdout + done.stderr  # fmt: skip
    assert done.stdout.count("\n### ") == 1 + 1 + 2 + 1 + 1 + 1, done.stdout
    assert json.loads((tmp_path / "gpu_kernels.json").read_text())["correctness"]


if __name__ == "__main__":  # scripts/gpu_check.sh --dry-run: the script's own command line, dry
    with dry_run(gpu_kernels_module()) as dry:
        dry.main(sys.argv[1:])
