"""The README's main job (``python -m flatlora_kernels.demo``) in tiny mode, and its measures."""

import json
import re

import pytest
import torch

pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn")
pytest.importorskip("matplotlib", reason="the demo saves matplotlib plots")
pytest.importorskip("scipy", reason="the demo's paired t-intervals use scipy")

from flatlora_kernels import apply_flat_lora  # noqa: E402
from flatlora_kernels.demo.__main__ import main  # noqa: E402
from flatlora_kernels.demo.data import make_digits_task  # noqa: E402
from flatlora_kernels.demo.finetune import METHODS  # noqa: E402
from flatlora_kernels.demo.flatness import loss_under_noise, mean_nll  # noqa: E402
from flatlora_kernels.demo.digits_mlp import DigitsMLP  # noqa: E402
from flatlora_kernels.demo.stats import paired_difference  # noqa: E402

TINY = ["--steps", "4", "--seeds", "2", "--select-seeds", "1", "--pretrain-steps", "10", "--max-extensions", "1",
        "--dropout-grid", "0.1,0.2", "--sigma-grid", "0.1,0.2", "--efm-rho-grid", "0.05,0.1", "--bilora-rho-grid", "0.05,0.1",
        "--noise-draws", "1", "--workers", "1", "--cost-tokens", "16", "--cost-width", "32", "--no-progress"]
TIMING = {"step_ms", "peak_memory_mib"}


def _runs(path):
    return [{k: v for k, v in run.items() if k not in TIMING} for run in json.loads((path / "results.json").read_text())["runs"]]


def test_tiny_demo_prints_every_measure_and_reproduces(tmp_path, capsys):
    assert main([*TINY, "--out", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out
    for method in METHODS:
        name = re.escape("lora (the recipe)" if method == "lora" else f"recipe + {method}")
        assert re.search(rf"^\| {name} +\|", printed, re.MULTILINE), f"the table has no row for {method}"
    for column in ("accuracy %", "corrupted acc %", "test NLL", "loss under noise", "naive perturbation", "bi-lora", "p=",
                   "time vs lora [min-max]", "load average", "knobs chosen on the validation split"):
        assert column in printed
    for plot in ("loss_under_noise.png", "training_loss.png", "accuracy.png"):
        assert (tmp_path / "a" / plot).stat().st_size > 1000
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["settings"]["seeds"] == 2
    assert saved["machine"]["cpu"] and len(saved["machine"]["load average at start"]) == 3
    assert saved["plain lora validation NLL by step"] and "plain LoRA (no dropout) validation NLL by step" in printed
    assert "1. the LoRA recipe" in printed and "2. each method on the recipe" in printed
    config, selection = saved["settings"]["config"], saved["selection"]
    for method, knob in (("lora", "lora_dropout"), ("flat-lora", "sigma"), ("efmlora", "efm_rho"), ("bilora", "bilora_rho")):
        chosen = selection[method]
        assert chosen["knob"] == knob and config[knob] == chosen["choice"]
        assert chosen["initial grid"] == ([0.1, 0.2] if method in ("lora", "flat-lora") else [0.05, 0.1])
        assert len(chosen["validation NLL"]) == 2 + len(chosen["extensions"]) and chosen["status"]
        assert min(chosen["validation NLL"].values()) == chosen["validation NLL"][str(chosen["choice"])]
        # the step rule: each candidate's score is the lowest point of its validation curve, the chosen step is there
        curves = chosen["validation NLL by step"]
        assert set(curves) == set(chosen["validation NLL"])
        assert all(min(curves[v].values()) == score for v, score in chosen["validation NLL"].items())
        assert curves[str(chosen["choice"])][str(chosen["step"])] == chosen["validation NLL"][str(chosen["choice"])]
    assert config["lora_dropout"] == selection["lora"]["choice"]  # every method trained with the recipe's dropout
    cost = saved["cost"]
    assert [r["method"] for r in cost["rows"]] == ["lora", "flat-lora (fused)", "naive perturbation", "bi-lora"]
    assert len(cost["load average before"]) == 3 and all(r["ratio min"] <= r["time vs lora"] <= r["ratio max"] for r in cost["rows"])
    runs = saved["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in range(2))
    for run in runs:
        assert 0.0 <= run["accuracy"] <= 1.0 and run["test_nll"] > 0 and len(run["corrupted_accuracy"]) == 12
        assert run["steps_done"] == selection[run["method"]]["step"]  # stopped at its method's chosen step
        assert len(run["losses"]) == run["steps_done"] and all(loss == loss for loss in run["losses"])
        assert set(run["loss_under_noise"]) >= {"0.05", "0.1", "0.2", "0.3"}

    # same seeds and threads: the same numbers, bit for bit, also when the runs go to 2 spawned workers
    main([*TINY, "--workers", "2", "--cost-tokens", "0", "--out", str(tmp_path / "b")])
    assert saved["selection"] == json.loads((tmp_path / "b" / "results.json").read_text())["selection"]
    assert _runs(tmp_path / "a") == _runs(tmp_path / "b")


def test_loss_under_noise_grows_with_sigma_and_restores_the_weights():
    task = make_digits_task(target_train_size=50)
    torch.manual_seed(0)
    model = apply_flat_lora(DigitsMLP(hidden=64), target_modules=["fc1", "fc2", "fc3", "head"], r=4, sigma=0.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clean = mean_nll(model, task.target_test)
    curve = loss_under_noise(model, task.target_test, [0.0, 0.5, 3.0], draws=2)
    assert curve[0.0] == pytest.approx(0.0, abs=1e-6)
    assert curve[3.0] > curve[0.5] > 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert mean_nll(model, task.target_test) == clean
    assert loss_under_noise(model, task.target_test, [0.5], draws=2) == {0.5: curve[0.5]}  # fixed draws
    with pytest.raises(ValueError, match="draws"):
        loss_under_noise(model, task.target_test, [0.5], draws=0)


def test_paired_difference_matches_a_hand_computed_t_interval():
    diff = paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0])  # diffs 1, 2, 2, 3
    half = 3.182446305284263 * (2 / 3) ** 0.5 / 2  # t_{0.975, 3} * sd / sqrt(n)
    assert diff.mean == pytest.approx(2.0) and diff.high - diff.mean == pytest.approx(half)
    assert 0 < diff.p_value < 0.05
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


def test_demo_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--seeds", "1"])
    with pytest.raises(SystemExit):
        main(["--sigma-grid", "0,-1"])
    with pytest.raises(SystemExit):  # unequal grids: not the same search budget for every method
        main(["--sigma-grid", "0.1,0.2,0.4"])
    with pytest.raises(SystemExit):
        main(["--dropout-grid", "0.5,1.0,2.0,4.0"])
