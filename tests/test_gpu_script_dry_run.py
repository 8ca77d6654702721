"""CPU dry run of ``benchmarks/gpu_kernels.py``: every mode ``scripts/gpu_check.sh`` runs (and the full
timing run) executes end to end in Triton's interpreter with tiny shapes, so the first lent GPU
cannot fail on a Python error in the script.

Substituted, and only because it cannot run without CUDA: ``triton.testing.do_bench`` and
``do_bench_cudagraph`` (CUDA events, CUDA graphs) call their closure twice instead of timing it;
``torch.cuda``'s synchronisation and memory statistics are stubs; the script's ``DEVICE`` is
``"cpu"`` (so the profiler table lists CPU operators); the sizes are tiny. Everything else (closures,
correctness gate, noise checks, strategies, chunk caps, the incremental report, PASS/FAIL lines) is
the script's own code. No number it prints here means anything.

The shell script itself is run end to end too (``--dry-run``), and so is a stage stopped half-way.

Also a command (``scripts/gpu_check.sh --dry-run`` uses it, with ``TRITON_INTERPRET=1`` exported):
``python -m tests.test_gpu_script_dry_run [gpu_kernels.py arguments]``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import math
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the dry run needs TRITON_INTERPRET=1 (set before triton is imported)", allow_module_level=True)

import triton.testing  # noqa: E402

from .test_gpu_readiness import gpu_kernels_module  # noqa: E402


ROOT = pathlib.Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "scripts" / "gpu_check.sh"
FAKE_MS = 1.0
FAKE_PEAK_BYTES = 3 * 2**20
STAGES = ["selfcheck", "timing", "gpu_tests", "compile_tests", "memory"]


def stub_timer(real):
    """A timer with ``real``'s interface (the call must bind to its signature) that runs the closure
    twice instead of timing it (the real ones rerun it too, so state carried between calls must be
    right), resetting gradients before each call as ``grad_to_none`` asks."""
    signature = inspect.signature(real)

    def two_calls(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        fn, grad_to_none, quantiles = (bound.arguments[k] for k in ("fn", "grad_to_none", "quantiles"))
        for _call in range(2):
            for tensor in grad_to_none or ():
                tensor.grad = None
            fn()
        return [FAKE_MS * (1 + q) for q in quantiles] if quantiles else FAKE_MS

    return two_calls


@contextlib.contextmanager
def dry_run(module):
    """The script made runnable on CPU in the interpreter at tiny sizes (see the module docstring)."""
    tiny = {
        "DEVICE": "cpu",
        # M=80: auto streams; M=40: auto stays in registers
        "TARGETS": [((80, 96, 72), 0.90), ((40, 96, 72), 1.00), ((80, 112, 72), 1.00)],
        "SMALL_M": [1, 16, 65],
        "SQUARE_LAYER": (64, 64),
        "ODD_SHAPE": (21, 40, 46),  # K = 46: Kq = 12, the last column strip is short
        "CROSSOVER_M": [16, 80],
        "CHUNK_CAPS_MIB": [4],
        "STRIP_SHAPES": [(16, 40, 256), (24, 40, 256)],
        "WHOLE_WEIGHT_SHAPE": (80, 96, 72),
    }
    # Sizes the script passes as defaults; the strips check gets a cap of a few counters so its
    # streamed dx really runs in chunks (4 * N * 2 bytes per counter, Kq = 64).
    defaults = {
        "poison_allocator": dict(nbytes=2**16),
        "noise_accuracy_at_scale": dict(n_rows=64, in_features=72),
        "chunk_eps_equality": dict(N=40, K=72, counters_per_chunk=8),  # Kq = 18: chunks of 8, 8, 2
        "regen_rate": dict(shapes=((64, 72),)),
        "crossover_sweep": dict(N=64, K=64),
        "chunk_sweep": dict(M=80, N=96, K=72),
        "strip_gemm_check": dict(cap_mib=16 * 4 * 40 * 2 / 2**20),
        "stack_peak_memory": dict(depth=3, width=64, M=80),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in tiny.items():
            assert hasattr(module, name), name  # a renamed constant must not be patched silently
            mp.setattr(module, name, value)
        for name, kwargs in defaults.items():
            mp.setattr(module, name, functools.partial(getattr(module, name), **kwargs))
        for name in ("do_bench", "do_bench_cudagraph"):
            mp.setattr(triton.testing, name, stub_timer(getattr(triton.testing, name)))
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


def records(path):
    """The JSON-lines file's objects (every line must parse: each was written whole)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def verdicts(items):
    return {r["verdict"]: r["passed"] for r in items if "verdict" in r}


def check_timing_records(items):
    """The timing stage's records: gate, the three targets under do_bench, regeneration rate, profile,
    the targets under do_bench_cudagraph, the tuning flag; a PASS/FAIL line per target and timer."""
    shapes = ["80x96x72", "40x96x72", "80x112x72"]
    assert [r["table"] for r in items if "table" in r] == [
        "facts", "correctness", *(f"layer {s} do_bench" for s in shapes), "regen", "profile",
        *(f"layer {s} do_bench_cudagraph" for s in shapes), "flag WHOLE_WEIGHT_INPUT_GRAD_BYTES",
        "flag BATCHED_STRIP_GEMM 16x40x256", "flag BATCHED_STRIP_GEMM 24x40x256",
    ]  # fmt: skip
    results = verdicts(items)
    assert list(results) == [
        "correctness", *(f"speed {s} do_bench" for s in shapes), "regen", *(f"speed {s} do_bench_cudagraph" for s in shapes),
    ]  # fmt: skip
    assert results["correctness"]
    # Stub timers give every row the same time: 1.00x LoRA fails the 0.90x target and meets the 1.00x ones.
    assert [results[f"speed {s} {timer}"] for timer in ("do_bench", "do_bench_cudagraph") for s in shapes] == [False, True, True] * 2
    tables_by_key = {r["table"]: r["rows"] for r in items if "table" in r}
    checks = tables_by_key["correctness"]
    assert len(checks) == 3 and all(c["ok"] and c["strategy"] == "auto" for c in checks.values()), checks
    rows = tables_by_key["layer 80x96x72 do_bench"]
    assert set(rows) == {"cuBLAS x@W^T", "LoRA fwd", "Flat-LoRA fwd", "LoRA fwd+bwd", "Flat-LoRA fwd+bwd", "naive perturbation fwd+bwd"}
    assert all(set(r) >= {"ms", "p20", "p80"} for r in rows.values()) and rows["LoRA fwd+bwd"]["x LoRA"] == 1.0
    graphs = tables_by_key["layer 80x96x72 do_bench_cudagraph"]
    assert set(graphs) == {"LoRA fwd+bwd", "Flat-LoRA fwd+bwd", "naive perturbation fwd+bwd"}
    profile = tables_by_key["profile"]
    assert profile["(total)"]["share"] == 1.0 and len(profile) >= 3
    assert tables_by_key["facts"]["device"]["value"] == "cpu (dry run)"


def test_full_mode_runs_the_sweeps(script, tmp_path):
    """``--full``: the small-M and odd-shape checks too, the kernels alone, both sweeps, the stack memory."""
    # The timing stage's own part runs end to end below; one target and few checks keep this run short.
    script.TARGETS, script.SMALL_M, script.ODD_SHAPE = [((80, 96, 72), 0.90)], [16], (17, 24, 26)
    jsonl = tmp_path / "full.jsonl"
    script.main(["--full", "--jsonl", str(jsonl)])
    tables_by_key = {r["table"]: r["rows"] for r in records(jsonl) if "table" in r}
    assert len(tables_by_key["correctness"]) == 1 + 1 + 2 + 4
    assert list(tables_by_key["crossover"]) == [f"M={m} {s}" for m in (16, 80) for s in ("streamed", "in_register", "LoRA")]
    assert list(tables_by_key["chunks"]) == ["cap 4 MiB", "cap 16 MiB, grows to output"]
    assert "G normals/s" in tables_by_key["kernels"]["in-register fwd GEMM, M=256"]
    assert tables_by_key["memory"]["LoRA"]["x LoRA"] == 1.0 and len(tables_by_key["memory"]) == 4


def test_failed_gate_takes_no_timings(script, monkeypatch, tmp_path):
    """A correctness failure stops the run before anything is timed, and says so in the report."""
    script.TARGETS = [((17, 24, 26), 1.0)]
    monkeypatch.setattr(script, "MAX_RELATIVE_ERROR", {dtype: 0.0 for dtype in script.MAX_RELATIVE_ERROR})
    monkeypatch.setattr(script, "time_target", lambda *a, **k: pytest.fail("timed after a failed check"))
    md = tmp_path / "report.md"
    with pytest.raises(SystemExit, match="correctness check failed"):
        script.main(["--report", str(md)])
    assert "- **FAIL** correctness gate" in md.read_text()


def test_selfcheck_mode_passes_and_reports_accuracy(script, tmp_path):
    jsonl = tmp_path / "results.jsonl"
    with pytest.raises(SystemExit) as stop:
        script.main(["--selfcheck", "--jsonl", str(jsonl)])
    assert stop.value.code == 0
    items = records(jsonl)
    assert verdicts(items) == {"selfcheck": True, "noise_accuracy": True, "chunk_eps": True}
    accuracy = next(r for r in items if r.get("table") == "noise_accuracy")["rows"]["z block"]
    assert accuracy["normals"] == 64 * 72 and accuracy["max_ulps"] <= 8 and 0 < accuracy["share_bit_equal"] <= 1
    assert next(r for r in items if r.get("table") == "chunk_eps")["rows"]["eps"]["backward_chunks"] == 3


def test_selfcheck_catches_a_backward_chunk_off_by_one_ulp(script, monkeypatch):
    """The chunk comparison is bit for bit: one element of one backward chunk moved by one ulp fails it."""
    tb = script.triton_backend_module()
    real = tb.regenerate_perturbed_weight

    def nudged(out, *args, **kwargs):
        real(out, *args, **kwargs)
        if out.dim() == 3:  # a backward (counter) chunk
            out[3, 1, 0] = torch.nextafter(out[3, 1, 0], torch.tensor(math.inf))

    monkeypatch.setattr(tb, "regenerate_perturbed_weight", nudged)
    result = script.chunk_eps_equality()
    assert result["eps_nonzero"] and not result["bit_equal"] and not result["ok"]


def test_strips_check_chunks_and_both_gemms_agree(script, monkeypatch):
    """The BATCHED_STRIP_GEMM flag's check: the streamed dx runs in several counter chunks, and both
    GEMM forms give one dx."""
    tb = script.triton_backend_module()
    chunks = []
    real = tb.regenerate_perturbed_weight
    monkeypatch.setattr(tb, "regenerate_perturbed_weight", lambda out, *a, **k: (chunks.append(out.shape), real(out, *a, **k)))
    rows = script.strip_gemm_check(*script.STRIP_SHAPES[1])
    assert chunks and all(shape[1:] == (4, 16) for shape in chunks), chunks  # Kq = 64 in chunks of 16 counters
    assert rows["one batched GEMM per chunk"]["max_abs_diff"] <= 1e-2
    assert rows["four strip GEMMs per chunk"]["peak_MiB"] == FAKE_PEAK_BYTES / 2**20


def test_flag_both_ways_runs_each_value(script, monkeypatch):
    """The WHOLE_WEIGHT_INPUT_GRAD_BYTES timing: off, the backward regenerates counter chunks; on, W' whole."""
    tb = script.triton_backend_module()
    monkeypatch.setattr(tb.triton_tuning, "CHUNK_BYTES", 4 * 96 * 2 * 8)  # 8 counters a chunk (Kq = 18)
    monkeypatch.setattr(tb.triton_tuning, "CHUNK_GROWS_TO_OUTPUT", False)
    seen = []
    real = tb.regenerate_perturbed_weight
    monkeypatch.setattr(tb, "regenerate_perturbed_weight", lambda out, *a, **k: (seen.append(out.dim()), real(out, *a, **k)))
    flag = "WHOLE_WEIGHT_INPUT_GRAD_BYTES"
    rows = script.flag_both_ways(flag, [0, 2**20], *script.WHOLE_WEIGHT_SHAPE)
    assert list(rows) == [f"{flag} = 0", f"{flag} = {2**20}"] and rows[f"{flag} = 0"]["x first"] == 1.0
    counter_chunks = seen.count(3)  # [N, 4, width] outputs: backward counter chunks
    assert counter_chunks == 3 * 3, seen  # value 0: one measured + two stub-timed steps, 3 chunks each; 2**20: none


def test_memory_mode(script, tmp_path):
    md = tmp_path / "report.md"
    script.main(["--memory", "--report", str(md)])
    text = md.read_text()
    assert "| Flat-LoRA (streamed, fixed 16 MiB chunks) |" in text and "| naive perturbation |" in text
    assert "- **PASS** 16-layer peak" in text  # stub peaks are equal: 1.00x LoRA


def test_interrupted_stage_keeps_what_it_finished(tmp_path):
    """SIGINT (what a stage's time limit sends first) half-way through the timing stage: the process
    ends at once with 130, the tables finished before it are in the report, every JSON line parses,
    and the last record says where it stopped."""
    md, jsonl = tmp_path / "report.md", tmp_path / "results.jsonl"
    command = [sys.executable, "-u", "-m", "tests.test_gpu_script_dry_run", "--timing", "--report", str(md), "--jsonl", str(jsonl)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, TRITON_INTERPRET="1"))  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while "### Correctness" not in (md.read_text() if md.exists() else ""):
            assert process.poll() is None and time.monotonic() < deadline, "the timing stage never wrote its gate"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    items = records(jsonl)
    assert items[0]["table"] == "facts" and items[1]["table"] == "correctness"
    assert items[-1] == dict(note="interrupted", text=items[-1]["text"]) and "stopped by its time limit" in md.read_text()


def script_setting(name):
    """A ``NAME=...`` line of scripts/gpu_check.sh."""
    return re.search(rf"^{name}=(.*)$", GPU_CHECK.read_text(), re.M).group(1)


def default_limits():
    """The default call's stage limits, from the ``LIMIT_<STAGE>=${LIMIT_<STAGE>:-seconds}`` lines."""
    return {stage: int(re.fullmatch(r"\$\{LIMIT_\w+:-(\d+)\}", script_setting(f"LIMIT_{stage.upper()}")).group(1))
            for stage in STAGES}  # fmt: skip


def test_gpu_check_default_limits_fit_300_seconds():
    """Stage limits of the default call sum to <= 300 s (a failed first call leaves room for a second
    in a 15-minute device budget); every stage has one."""
    limits = default_limits()
    assert sum(limits.values()) <= 300 and min(limits.values()) >= 20, limits


def test_gpu_check_pytest_stages_select_every_gpu_only_test():
    """The two pytest stages of scripts/gpu_check.sh, collected with their own files and -k
    expressions, hold every test those files skip without CUDA (a skipif naming a CUDA device) and the
    whole readiness file, each once; the compile/opcheck/autocast ones in the last stage."""
    files = shlex.split(script_setting("GPU_TEST_FILES")[1:-1])
    selection = shlex.split(script_setting("GPU_TEST_SELECTION"))[0]
    last = shlex.split(script_setting("GPU_TEST_LAST"))[0]

    expressions = [f"({selection}) and not ({last})", f"({selection}) and ({last})"]
    collect_both = (  # one process: the test modules (and torch) are imported once
        "import sys, pytest\n"
        "for expression in sys.argv[1:]:\n"
        "    print('=== stage', flush=True)\n"
        f"    pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *{files!r}, '-k', expression])\n"
    )
    collected = subprocess.run([sys.executable, "-c", collect_both, *expressions], cwd=ROOT, capture_output=True, text=True).stdout
    first, second = (
        [line.split("[")[0] for line in part.splitlines() if "::" in line] for part in collected.split("=== stage\n")[1:]
    )
    expected = set()
    for path in files:
        module = importlib.import_module("tests." + pathlib.Path(path).stem)
        for name, fn in vars(module).items():
            if not name.startswith("test_"):
                continue
            needs_cuda = any("CUDA device" in mark.kwargs.get("reason", "") for mark in getattr(fn, "pytestmark", []))
            if needs_cuda or path.endswith("readiness.py"):
                expected.add(f"{path}::{name}")
    assert len(expected) >= 6 + 6 + 3 and set(first) | set(second) == expected and not set(first) & set(second), (
        set(first) | set(second)) ^ expected  # fmt: skip
    assert {name.split("::")[1] for name in second} == {
        "test_gpu_compiles_fullgraph_without_recompiles", "test_gpu_opcheck_triton_ops", "test_opcheck_triton_ops_on_cuda",
        "test_compile_fullgraph_on_cuda", "test_autocast_bf16_and_checkpoint_on_cuda",
    }  # fmt: skip


def test_gpu_check_dry_run_end_to_end(tmp_path):
    """``scripts/gpu_check.sh --dry-run``: every stage runs through this module's command line, in order;
    $OUT holds three files; every stage writes its record and line as it ends. The last stage gets a
    1 s limit here, so the kill path (SIGINT, then SIGKILL) is taken: rc 124, and the script goes on."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, LIMIT_MEMORY="1")
    done = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "report.md", "results.jsonl"]
    items = records(tmp_path / "results.jsonl")
    stages = [r for r in items if "stage" in r]
    timing = items[items.index(stages[0]) + 1 : items.index(stages[1])]
    check_timing_records(timing)
    assert [r["stage"] for r in stages] == STAGES, stages
    assert [r["rc"] for r in stages] == [0, 0, 0, 0, 124], stages
    assert [r["limit_s"] for r in stages] == [default_limits()[s] for s in STAGES[:-1]] + [1]
    report = (tmp_path / "report.md").read_text()
    assert report in done.stdout  # the report is printed at the end
    assert report.count("- **PASS**") + report.count("- **FAIL**") == len(verdicts(items))  # a line per verdict
    for title in ("Noise stream self-check", "Noise accuracy at scale", "Correctness", "One Flat-LoRA fwd+bwd step"):
        assert f"### {title}" in report, title
    assert verdicts(items)["selfcheck"] and verdicts(items)["correctness"]
    assert re.search(r"\d+ passed[^\n]*\n- stage \*\*gpu_tests\*\*: rc=0 ", report), report
    assert "- stage **memory**: rc=124, stopped at its limit" in report
    assert "dry run" in report.splitlines()[0]


if __name__ == "__main__":  # scripts/gpu_check.sh --dry-run: the script's own command line, dry
    with dry_run(gpu_kernels_module()) as dry:
        dry.main(sys.argv[1:])
