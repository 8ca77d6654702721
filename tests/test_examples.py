"""The Hugging Face examples run end to end (a few steps) and their own checks pass. Printed lines are
read for their values (words and numbers), not for their spacing."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the example builds a transformers Llama")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_tiny_llama.py"


def _says(output: str, *words: str) -> bool:
    """Whether some line holds ``words`` in this order, whatever the spacing and punctuation between them."""
    pattern = r"\W*".join(r"\s*".join(map(re.escape, word.split())) for word in words)
    return any(re.search(pattern, line) for line in output.splitlines())


@pytest.mark.parametrize("loop", ["plain", "trainer"])
def test_hf_tiny_llama_example(loop):
    if loop == "trainer":
        pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    args = [sys.executable, str(EXAMPLE), "--pretrain-steps", "20", "--steps", "4"]
    args += ["--trainer"] if loop == "trainer" else []
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert _says(run.stdout, "frozen base weights bit-identical after training", "True")
    assert _says(run.stdout, "outputs equal", "True")


def test_hf_peft_trainer_example(tmp_path, capsys, monkeypatch):
    """Trainer + PEFT + enable_flat_lora, save_model, then vanilla PEFT in a fresh process: equal logits."""
    pytest.importorskip("peft")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    import hf_peft_trainer  # run in this process: one interpreter start fewer than a subprocess

    assert hf_peft_trainer.main(["--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert _says(out, "step", "2", "total_steps", "2")  # FlatLoraCallback drove the patched PEFT layers
    assert _says(out, "without flatlora_kernels", "True", "logits equal", "True")
    (files_line,) = [line for line in out.splitlines() if line.strip().startswith("adapter files")]
    files = ast.literal_eval(files_line.split(":", 1)[1].strip())  # the directory listing, as a list
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
