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


def test_hf_peft_trainer_example(tmp_path, capsys, monkeypatch):
    """Trainer + PEFT + enable_flat_lora, save_model, then vanilla PEFT in a fresh process: equal logits."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    import hf_peft_trainer  # run in this process: one interpreter start fewer than a subprocess

    assert hf_peft_trainer.main(["--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step=2, total_steps=2" in out  # FlatLoraCallback drove the patched PEFT layers
    assert "without flatlora_kernels: True logits equal: True" in out
    assert "adapter_model.safetensors" in out
