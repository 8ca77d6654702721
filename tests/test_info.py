"""``python -m flatlora_kernels.info``: versions, the backend "auto" picks, and a self-check that can fail."""

import torch

import flatlora_kernels.functional as functional
from flatlora_kernels import info


def test_report_lists_versions_auto_backend_and_passing_self_checks():
    lines, ok = info.report()
    text = "\n".join(lines)
    assert ok
    assert f"torch {torch.__version__}" in text and "triton " in text and "CPU ISA " in text
    assert "flags -O3" in text  # the C++ build flags, read from setup.py
    assert 'backend "auto" on cpu: cpp' in text
    assert "self-check cpp       on cpu: ok" in text
    assert "self-check reference on cpu: ok" in text


def test_self_check_fails_when_a_backend_drifts_from_the_noise_definition(monkeypatch, capsys):
    real = functional.flat_lora_linear

    def drifted(x, *args, backend="auto", **kwargs):
        y = real(x, *args, backend=backend, **kwargs)
        return y + 1e-2 if backend == "cpp" else y  # what a wrong noise stream would look like

    monkeypatch.setattr(functional, "flat_lora_linear", drifted)
    assert info.main() == 1
    out = capsys.readouterr().out
    assert "self-check cpp       on cpu: FAILED" in out and "self-check reference on cpu: ok" in out
