"""The validation search (flatlora_kernels/demo/selection.py and its use by the digits demo): grid
extension until the choice is interior or capped, and no access to the test split while choosing."""

import math

import pytest
import torch

from flatlora_kernels.demo.selection import Knob, choose, next_value


def _search(knob, score, max_rounds=4):
    calls = []

    def evaluate(candidates):
        calls.append(list(candidates))
        return [score(v) for _, v in candidates]

    return choose([knob], evaluate, max_rounds=max_rounds, log=lambda _: None)[knob.method], calls


def test_an_interior_choice_does_not_extend():
    choice, calls = _search(Knob("m", "k", (0.1, 0.2, 0.4, 0.8), 0.01, 10.0), lambda v: (v - 0.3) ** 2)
    assert choice.value == 0.2 and choice.status == "interior" and choice.extensions == [] and len(calls) == 1


def test_a_choice_at_the_top_extends_geometrically_until_interior():
    choice, calls = _search(Knob("m", "k", (0.05, 0.1, 0.2, 0.4), 0.001, 10.0), lambda v: (v - 1.5) ** 2)
    assert choice.extensions == [0.8, 1.6, 3.2] and choice.value == 1.6 and choice.status == "interior"
    assert [len(c) for c in calls] == [4, 1, 1, 1] and choice.grid == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]


def test_a_choice_at_the_bottom_extends_down_and_stops_at_the_cap():
    choice, _ = _search(Knob("m", "k", (0.05, 0.1, 0.2, 0.4), 0.0125, 1.0), lambda v: v)  # lower is always better
    assert choice.extensions == [0.025, 0.0125] and choice.value == 0.0125
    assert choice.status.startswith("capped at the low end")


def test_a_probability_extends_in_its_odds_and_stays_below_one():
    choice, _ = _search(Knob("lora", "lora_dropout", (0.1, 0.2, 0.4, 0.8), 0.01, 0.97, probability=True), lambda v: -v)
    assert choice.extensions == pytest.approx([8 / 9, 16 / 17, 32 / 33]) and choice.value == pytest.approx(32 / 33)
    assert "rounds" in choice.status or "capped" in choice.status
    low, _ = _search(Knob("lora", "lora_dropout", (0.1, 0.2), 0.02, 0.97, probability=True), lambda v: v)
    assert low.extensions[0] == pytest.approx((0.1 / 0.9 / 2) / (1 + 0.1 / 0.9 / 2))  # odds halved
    with pytest.raises(ValueError, match="probability"):
        Knob("lora", "lora_dropout", (0.1, 0.2), 0.01, 1.5, probability=True)


def test_the_rounds_limit_is_reported():
    choice, calls = _search(Knob("m", "k", (1.0, 2.0), 0.5, 1e6), lambda v: -v, max_rounds=2)
    assert choice.extensions == [4.0, 8.0] and choice.value == 8.0 and "2 extension rounds" in choice.status and len(calls) == 3


def test_several_knobs_extend_in_the_same_rounds():
    knobs = [Knob("a", "x", (1.0, 2.0, 4.0), 0.1, 100.0), Knob("b", "y", (1.0, 2.0, 4.0), 0.1, 100.0)]
    calls = []

    def evaluate(candidates):
        calls.append(candidates)
        return [(v - 3) ** 2 if m == "a" else -v for m, v in candidates]

    choices = choose(knobs, evaluate, max_rounds=1, log=lambda _: None)
    assert choices["a"].value == 4.0 or choices["a"].value == 2.0
    assert calls[1] == [("b", 8.0)] and choices["b"].value == 8.0


def test_next_value_and_knob_checks():
    knob = Knob("m", "k", (0.1, 0.2, 0.4), 0.05, 0.8)
    assert next_value(knob, {0.1: 3.0, 0.2: 2.0, 0.4: 1.0}) == (0.8, "")
    assert next_value(knob, {0.1: 3.0, 0.2: 2.0, 0.4: 1.0, 0.8: 0.5})[0] is None
    with pytest.raises(ValueError, match="grid"):
        Knob("m", "k", (0.0, 0.1), 0.0, 1.0)
    with pytest.raises(ValueError, match="caps"):
        Knob("m", "k", (0.1, 0.2), 0.15, 1.0)


class _Forbidden:
    """A test split that raises on any use."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was used ({name}) during the validation search")

    def items(self):
        raise AssertionError("the corrupted test splits were used during the validation search")


def test_the_digits_search_never_touches_the_test_split(monkeypatch):
    pytest.importorskip("sklearn")
    from dataclasses import replace

    from flatlora_kernels.demo import digits_job, job, runner
    from flatlora_kernels.demo.data import make_digits_task
    from flatlora_kernels.demo.digits_mlp import DigitsMLP
    from flatlora_kernels.demo.finetune import FinetuneConfig
    from flatlora_kernels.demo.__main__ import parse_args

    guarded = replace(make_digits_task(target_train_size=20), target_test=_Forbidden(), target_test_corrupted=_Forbidden())
    monkeypatch.setattr(runner.data, "make_digits_task", lambda **_: guarded)
    args = parse_args(["--select-seeds", "1", "--max-extensions", "1", "--workers", "1"])
    torch.manual_seed(0)
    payload = (DigitsMLP().state_dict(), 20)
    run = runner.Workers(task_name="digits", payload=payload, workers=1, threads=1, progress=False).run
    config = FinetuneConfig(steps=3, eval_every=2)
    choices, reference = job.search(args, config, job.knobs_for(args, digits_job.KNOBS), run, stage="all at once")
    assert set(choices) == {"lora", "flat-lora", "efmlora", "bilora"} and reference["val"] > 0
    assert all(len(c.validation) >= 4 for c in choices.values())
    with pytest.raises(AssertionError, match="test split was used"):  # the guard bites when a reported run touches it
        run([("lora", 0, config, False)], "reported")


def test_the_recipe_is_tuned_first_and_every_method_runs_on_it_stopped_at_its_chosen_step():
    """tuned_runs with a fake ``run``: stage 1 tunes only LoRA's dropout (with plain LoRA beside it),
    stage 2 runs every other method with the recipe's dropout, and each reported run stops at the
    step its method's validation curve chose; no reported job comes before the search ends."""
    from types import SimpleNamespace

    from flatlora_kernels.demo import job
    from flatlora_kernels.demo.__main__ import parse_args
    from flatlora_kernels.demo.finetune import KNOBS, FinetuneConfig

    best_dropout, best_step = {"lora": 0.2}, {"lora": 40, "flat-lora": 80, "efmlora": 20, "bilora": 100}
    calls = []

    def curve(method, value, search):  # validation NLL over checkpoints 20..100: a bowl in the knob and in the step
        target = best_dropout.get(method, 0.4)
        return [abs(math.log(value / target)) + ((step - best_step[method]) / 100) ** 2 for step in range(20, 101, 20)]

    def run(jobs, label):
        calls.append((label, jobs))
        results = []
        for method, seed, config, search in jobs:
            value = getattr(config, KNOBS[method]) or 1e-3
            nll = curve(method, value, search)
            results.append(SimpleNamespace(method=method, seed=seed, eval_steps=list(range(20, 101, 20)), eval_val_nll=nll, val_nll=nll[-1]))
        return results

    args = parse_args(["--select-seeds", "1", "--seeds", "2", "--max-extensions", "2", "--workers", "1"])
    config, choices, reference, _ = job.tuned_runs(args, FinetuneConfig(steps=100, eval_every=20), KNOBS, run)
    assert choices["lora"].value == 0.2 and config.lora_dropout == 0.2
    assert {m: c.step for m, c in choices.items()} == best_step and reference["val"] > 0
    labels = [label for label, _ in calls]
    assert labels[-1] == "fine-tuning" and labels.count("fine-tuning") == 1
    stage_one = calls[0][1]
    assert {m for m, *_ in stage_one} == {"lora"} and any(c.lora_dropout == 0.0 for _, _, c, _ in stage_one)  # + plain LoRA
    later_search = [j for label, jobs in calls[1:-1] for j in jobs]
    assert {m for m, *_ in later_search} == {"flat-lora", "efmlora", "bilora"}
    assert all(c.lora_dropout == 0.2 and search for _, _, c, search in later_search)
    reported = calls[-1][1]
    assert all(not search and c.stop_at == best_step[m] and c.lora_dropout == 0.2 for m, _, c, search in reported)
