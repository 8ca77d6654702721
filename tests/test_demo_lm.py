"""``python -m flatlora_kernels.demo --task lm`` in miniature: a tiny GPT-2 pretrained on stdlib code,
fine-tuned through PEFT + Trainer (+ enable_flat_lora / FlatLoraCallback, + Bi-LoRA), every knob
chosen on validation without the test split."""

import json
import math
import re
from dataclasses import replace

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from flatlora_kernels.demo.__main__ import main  # noqa: E402

TINY_LM = ["--task", "lm", "--lm-tiny", "--steps", "4", "--pretrain-steps", "10", "--seeds", "2", "--select-seeds", "1",
           "--dropout-grid", "0.1,0.2", "--sigma-grid", "0.1,0.2", "--bilora-rho-grid", "0.05,0.1", "--max-extensions", "1",
           "--noise-draws", "1", "--workers", "1", "--no-progress"]


def test_tiny_lm_demo_runs_every_method_through_peft_and_the_trainer(tmp_path, capsys):
    assert main([*TINY_LM, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for method in ("lora", "flat-lora", "bilora"):
        name = re.escape("lora (the recipe)" if method == "lora" else f"recipe + {method}")
        assert re.search(rf"^\| {name} +\|", printed, re.MULTILINE), f"the table has no row for {method}"
    for text in ("test NLL (nats/byte)", "test ppl (per byte)", "loss under noise", "p=", "knobs chosen on the validation split"):
        assert text in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task"] == "lm" and set(saved["selection"]) == {"lora", "flat-lora", "bilora"}
    for run in saved["runs"]:
        assert math.isfinite(run["test_nll"]) and run["test_nll"] > 0 and len(run["losses"]) >= 1
        step = saved["selection"][run["method"]]["step"]
        assert run["steps_done"] == step and run["eval_steps"][-1] == step  # stopped early at its chosen step
        assert set(run["loss_under_noise"]) >= {"0.05", "0.1", "0.2", "0.3"}
        if run["method"] == "flat-lora":  # the callback stepped the schedule every optimizer step: noise was on
            assert run["method_check"] == {"schedule steps": step, "total steps": 4}  # sigma's schedule spans the budget
        if run["method"] == "bilora":  # the wrapper ran inside the Trainer and its clip holds
            rho = saved["settings"]["config"]["bilora_rho"]
            assert run["method_check"]["bilora steps"] == step and 0 < run["method_check"]["perturbation norm"] <= rho * (1 + 1e-5)
    for plot in ("lm_loss_under_noise.png", "lm_training_loss.png", "lm_test_nll.png"):
        assert (tmp_path / plot).stat().st_size > 1000


class _ForbiddenBlocks:
    def __getattr__(self, name):
        raise AssertionError(f"the test split was used ({name}) during the validation search")

    def __getitem__(self, index):
        raise AssertionError("the test split was used during the validation search")


def test_the_lm_search_never_touches_the_test_split(monkeypatch):
    from flatlora_kernels.demo import lm_task, runner
    from flatlora_kernels.demo.lm_finetune import LmConfig
    from flatlora_kernels.demo.selection import Knob, validation_search

    guarded = replace(lm_task.make_lm_task(lm_task.TINY), test=_ForbiddenBlocks())
    monkeypatch.setattr(lm_task, "make_lm_task", lambda settings: guarded)
    payload = (lm_task.tiny_gpt(lm_task.TINY).state_dict(), lm_task.TINY)
    workers = runner.Workers(task_name="lm", payload=payload, workers=1, threads=1, progress=False)
    knobs = [Knob("lora", "lora_dropout", (0.1, 0.2), 0.05, 0.8), Knob("flat-lora", "sigma", (0.1, 0.2), 0.05, 0.8)]
    choices, reference = validation_search(knobs, LmConfig(steps=2, batch_size=4), select_seeds=1, max_rounds=1, run=workers.run)
    assert reference["val"] > 0 and all(c.value in c.validation for c in choices.values())
    with pytest.raises(AssertionError, match="test split was used"):  # the guard bites when a reported run touches it
        workers.run([("lora", 0, LmConfig(steps=2, batch_size=4), False)], "reported")
