"""A tiny run of the README's main job (``python -m flatlora_kernels.demo``), end to end."""

import json
import re

import pytest

pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn")
pytest.importorskip("matplotlib", reason="the demo saves a matplotlib plot")

from flatlora_kernels.demo.__main__ import main  # noqa: E402
from flatlora_kernels.demo.finetune import METHODS  # noqa: E402


def test_tiny_demo_runs_every_method_and_saves_its_results(tmp_path, capsys):
    assert main(["--steps", "4", "--seeds", "2", "--pretrain-steps", "30", "--no-progress", "--out", str(tmp_path)]) == 0

    printed = capsys.readouterr().out
    for method in METHODS:
        assert re.search(rf"^\| {method} +\|", printed, re.MULTILINE), f"the table has no row for {method}"
    assert (tmp_path / "curves.png").stat().st_size > 1000

    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in range(2))
    for run in runs:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert len(run["losses"]) == 4 and all(loss == loss for loss in run["losses"])  # finite, not NaN
        assert len(run["corrupted_accuracy"]) == 12
        assert run["step_ms"] > 0 and run["peak_memory_mib"] > 0


def test_flat_lora_changes_training_but_sigma_zero_is_lora(tmp_path):
    """The Flat-LoRA run must actually perturb (different losses from LoRA), and sigma=0 must not."""

    def losses(sigma, method):
        out = tmp_path / f"{method}-{sigma}"
        args = ["--steps", "3", "--seeds", "1", "--pretrain-steps", "20", "--no-progress", "--out", str(out)]
        main([*args, "--sigma", str(sigma), "--methods", method])
        return json.loads((out / "results.json").read_text())["runs"][0]["losses"]

    lora = losses(0.1, "lora")
    assert losses(0.0, "flat-lora") == pytest.approx(lora, rel=1e-5)
    assert losses(0.5, "flat-lora") != pytest.approx(lora, rel=1e-5)
