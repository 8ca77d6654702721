"""``python -m flatlora_kernels.info``: versions, the machine, how the extension was built, the backend
"auto" picks, and self-checks that can fail. Lines are checked by content, not by spacing."""

import os
import re
import subprocess
import sys

import torch

import flatlora_kernels.functional as functional
from flatlora_kernels import _C, info


def _line(lines, prefix):
    matches = [line for line in lines if line.strip().startswith(prefix)]
    assert len(matches) == 1, f"expected one line starting with {prefix!r} in:\n" + "\n".join(lines)
    return matches[0]


def _self_checks(lines):
    """{(backend, device): verdict line} from the self-check lines."""
    found = {}
    for line in lines:
        match = re.match(r"\s*self-check\s+(\w+)\s+on\s+(\w+):\s*(.*)", line)
        if match:
            found[match.group(1), match.group(2)] = match.group(3)
    return found


def test_report_lists_machine_versions_build_auto_backend_and_passing_self_checks():
    lines, ok = info.report()
    assert ok
    assert torch.__version__ in _line(lines, "torch ") and _line(lines, "triton ")
    cpu = _line(lines, "CPU:")
    assert f"threads in use {torch.get_num_threads()}" in cpu
    build = _line(lines, "C++ extension:")
    # The extension's own record of its build: the compiler and the torch headers it was built against.
    assert _C.build_info()["compiler"] in build and f"against torch {torch.__version__.split('+')[0]}" in build
    assert "optimised" in build and "MISMATCH" not in build
    assert _line(lines, "C++ CPU ISA:").split(":", 1)[1].strip() in ("scalar", "avx2", "avx512")
    assert re.search(r'backend "auto" on cpu:\s*cpp', "\n".join(lines))
    checks = _self_checks(lines)
    assert checks["cpp", "cpu"].startswith("ok") and checks["reference", "cpu"].startswith("ok")


def test_a_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    lines, _ = info.report()
    verdict = _self_checks(lines)["triton", "cpu"]
    assert verdict.startswith("skipped") and "TRITON_INTERPRET=1" in verdict


def test_self_check_fails_when_a_backend_drifts_from_the_noise_definition(monkeypatch, capsys):
    real = functional.flat_lora_linear

    def drifted(x, *args, backend="auto", **kwargs):
        y = real(x, *args, backend=backend, **kwargs)
        return y + 1e-2 if backend == "cpp" else y  # what a wrong noise stream would look like

    monkeypatch.setattr(functional, "flat_lora_linear", drifted)
    assert info.main() == 1
    checks = _self_checks(capsys.readouterr().out.splitlines())
    assert checks["cpp", "cpu"].startswith("FAILED") and checks["reference", "cpu"].startswith("ok")


def test_an_extension_built_against_another_torch_fails_the_report(monkeypatch):
    record = dict(_C.build_info(), torch="1.0.0")
    monkeypatch.setattr(_C, "build_info", lambda: record)
    lines, ok = info.report()
    assert not ok and "MISMATCH" in _line(lines, "C++ extension:") and "against torch 1.0.0" in _line(lines, "C++ extension:")


def _run_with_isa(level, code):
    env = dict(os.environ, FLATLORA_CPU_ISA=level)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_an_unknown_cpu_isa_is_an_error_line_in_info_not_a_traceback():
    result = _run_with_isa("bogus", "import sys; from flatlora_kernels import info; sys.exit(info.main())")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    isa = _line(result.stdout.splitlines(), "C++ CPU ISA:")
    assert "ERROR" in isa and "FLATLORA_CPU_ISA" in isa and "bogus" in isa


def test_an_unknown_cpu_isa_is_a_clear_error_at_the_first_training_call():
    code = (
        "import torch\n"
        "from flatlora_kernels import flat_lora_linear\n"
        "x, w, a, b = torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)\n"
        "try:\n"
        "    flat_lora_linear(x, w, a, b, scaling=2.0, sigma=0.1, seed=0, backend='cpp')\n"
        "except ValueError as error:\n"
        "    print('ValueError:', error)\n"
    )
    result = _run_with_isa("bogus", code)
    assert result.returncode == 0, result.stderr
    assert "ValueError:" in result.stdout and "FLATLORA_CPU_ISA" in result.stdout and "bogus" in result.stdout


def test_the_thread_line_names_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert "OMP_NUM_THREADS 1" in info.thread_line()
