"""The validation search (flatlora_kernels/demo/selection.py and its use by the digits demo): grid
extension until the choice is interior or capped, and no access to the test split while choosing."""

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
    choices, reference = job.search(args, config, job.knobs_for(args, digits_job.KNOBS), run)
    assert set(choices) == {"lora", "flat-lora", "efmlora", "bilora"} and reference["val"] > 0
    assert all(len(c.validation) >= 4 for c in choices.values())
    with pytest.raises(AssertionError, match="test split was used"):  # the guard bites when a reported run touches it
        run([("lora", 0, config, False)], "reported")
