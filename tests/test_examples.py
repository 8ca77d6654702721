"""The Hugging Face example runs end to end (a few steps) and its own checks pass."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the example builds a transformers Llama")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_tiny_llama.py"


@pytest.mark.parametrize("loop", ["plain", "trainer"])
def test_hf_tiny_llama_example(loop):
    if loop == "trainer":
        pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    args = [sys.executable, str(EXAMPLE), "--pretrain-steps", "20", "--steps", "4"]
    args += ["--trainer"] if loop == "trainer" else []
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "frozen base weights bit-identical after training: True" in run.stdout
    assert "outputs equal: True" in run.stdout
