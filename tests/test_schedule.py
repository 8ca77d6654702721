"""FlatLoraSchedule: the cosine factor, seeds (independent, reproducible, per rank), one draw per
optimizer step, checkpoint safety, resume, no global-RNG use, no recompiles; the Trainer callback."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flatlora_kernels import filter_noise
from flatlora_kernels.model_conversion import apply_flat_lora, flat_lora_layers
from flatlora_kernels.noise import normal_rows
from flatlora_kernels.schedule import FlatLoraSchedule, cosine_factor, derive_seed


def make_model(seed=0, fused=True, sigma=0.1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    apply_flat_lora(model, target_modules=["0", "2", "4"], r=4, lora_alpha=8, sigma=sigma, fused=fused)
    with torch.no_grad():
        for _, layer in flat_lora_layers(model):
            layer.lora_B.normal_(0, 0.2)
    return model


def noise_state(model):
    return [(int(l.effective_seed()), float(l.noise_factor)) for _, l in flat_lora_layers(model)]


@pytest.mark.parametrize("t, expected", [(0, 0.0), (25, 0.5 * (1 - math.cos(math.pi / 4))), (50, 0.5),
                                         (75, 0.5 * (1 + math.cos(math.pi / 4))), (100, 1.0), (250, 1.0)])
def test_cosine_factor_values(t, expected):
    assert cosine_factor(t, 100) == pytest.approx(expected, abs=1e-12)
    model = make_model()
    schedule = FlatLoraSchedule(model, total_steps=100)
    schedule.set_step(t)
    assert schedule.factor == pytest.approx(expected, abs=1e-12)
    assert all(f == pytest.approx(expected, abs=1e-7) for _, f in noise_state(model))


def test_factor_ramps_with_step_calls():
    model = make_model()
    schedule = FlatLoraSchedule(model, total_steps=4)
    factors = [schedule.factor]
    for _ in range(5):
        schedule.step()
        factors.append(float(model[0].noise_factor))
    quarter = 0.5 * (1 - math.cos(math.pi / 4))
    assert factors == pytest.approx([0.0, quarter, 0.5, 1 - quarter, 1.0, 1.0])


def test_seeds_distinct_across_layers_steps_ranks_and_in_range():
    seeds = {derive_seed(7, step, layer, rank) for step in range(40) for layer in range(25) for rank in range(4)}
    assert len(seeds) == 40 * 25 * 4
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(7, 3, 2, 1) == derive_seed(7, 3, 2, 1)
    assert derive_seed(7, 3, 2, 1) != derive_seed(8, 3, 2, 1)


def test_draws_are_uncorrelated_across_layers_steps_and_ranks():
    keys = [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1)]  # (step, layer, rank)
    z = torch.stack([normal_rows(derive_seed(3, *k), 256, 0, 16).flatten() for k in keys])
    corr = torch.corrcoef(z)
    off_diagonal = corr[~torch.eye(len(keys), dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.06  # 4096 samples: |corr| of independent draws ~ 0.016


def test_schedule_writes_derived_seeds_and_is_reproducible():
    model_a, model_b = make_model(), make_model()
    sched_a, sched_b = FlatLoraSchedule(model_a, 10, seed=5, rank=0), FlatLoraSchedule(model_b, 10, seed=5, rank=0)
    for _ in range(3):
        sched_a.step()
        sched_b.step()
    assert noise_state(model_a) == noise_state(model_b)
    assert [s for s, _ in noise_state(model_a)] == [derive_seed(5, 3, i, 0) for i in range(3)]
    other = make_model()
    FlatLoraSchedule(other, 10, seed=6).set_step(3)
    assert [s for s, _ in noise_state(other)] != [s for s, _ in noise_state(model_a)]


def test_per_rank_seeds():
    states = {}
    for rank in (0, 1):
        for per_rank in (True, False):
            model = make_model()
            FlatLoraSchedule(model, 10, seed=2, rank=rank, per_rank_seeds=per_rank).set_step(4)
            states[rank, per_rank] = [s for s, _ in noise_state(model)]
    assert states[0, True] != states[1, True]
    assert states[1, True] == [derive_seed(2, 4, i, 1) for i in range(3)]
    assert states[0, False] == states[1, False] == states[0, True]


def test_one_draw_per_optimizer_step_across_gradient_accumulation():
    model = make_model()
    schedule = FlatLoraSchedule(model, total_steps=4, seed=1)
    schedule.step()  # factor > 0
    layer = model[0]
    x = torch.randn(8, 16)
    micro_batches = x.chunk(2)

    # Every micro-batch of the step sees the same eps: the one derived for (seed, step 1, layer 0).
    eps = filter_noise(layer.weight, layer.lora_A, layer.lora_B, scaling=layer.scaling,
                       sigma=layer.sigma * schedule.factor, seed=derive_seed(1, 1, 0, 0))
    w_eff = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A + eps
    for xb in micro_batches:
        torch.testing.assert_close(layer(xb), xb @ w_eff.t() + layer.bias, rtol=1e-5, atol=1e-5)

    # Hence accumulated micro-batch gradients equal the full-batch gradient.
    params = [p for p in model.parameters() if p.requires_grad]
    full = torch.autograd.grad(model(x).pow(2).sum(), params)
    accumulated = [torch.zeros_like(p) for p in params]
    for xb in micro_batches:
        for acc, g in zip(accumulated, torch.autograd.grad(model(xb).pow(2).sum(), params)):
            acc += g
    for a, b in zip(accumulated, full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    before = model(x)
    assert torch.equal(model(x), before)
    schedule.step()
    assert not torch.allclose(model(x), before)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_forward_equals_plain(use_reentrant):
    model = make_model()
    schedule = FlatLoraSchedule(model, total_steps=2, seed=4)
    schedule.step()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(6, 16)

    def forward_backward(run):
        inputs = x.clone().requires_grad_(True)
        model.zero_grad()
        y = run(inputs)
        y.sum().backward()  # (.grad() is not allowed with reentrant checkpointing)
        return [y.detach(), inputs.grad, *(p.grad.clone() for p in params)]

    plain = forward_backward(model)
    checkpointed = forward_backward(lambda inputs: checkpoint(model, inputs, use_reentrant=use_reentrant))
    for a, b in zip(plain, checkpointed):
        assert torch.equal(a, b)


def test_state_dict_resume_continues_the_stream():
    model_a = make_model()
    run = FlatLoraSchedule(model_a, total_steps=20, seed=9)
    for _ in range(7):
        run.step()
    state = run.state_dict()
    assert state == {"step": 7, "total_steps": 20, "seed": 9, "per_rank_seeds": True}

    model_b = make_model()
    resumed = FlatLoraSchedule(model_b, total_steps=1, seed=0)
    resumed.load_state_dict(state)
    assert noise_state(model_b) == noise_state(model_a)
    run.step()
    resumed.step()
    assert noise_state(model_b) == noise_state(model_a)


def test_never_touches_the_global_rng_and_buffers_keep_identity():
    model = make_model()
    rng_before = torch.get_rng_state()
    schedule = FlatLoraSchedule(model, total_steps=5, seed=3)
    def buffer_identities():
        return [(id(l.noise_seed), l.noise_seed.data_ptr(), id(l.noise_factor)) for _, l in flat_lora_layers(model)]

    buffers = buffer_identities()
    x = torch.ones(4, 16)
    for _ in range(3):
        model(x).sum().backward()
        schedule.step()
    schedule.load_state_dict(schedule.state_dict())
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert buffers == buffer_identities()


def test_new_seeds_do_not_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = make_model()
    schedule = FlatLoraSchedule(model, total_steps=4, seed=1, rank=1)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(5, 16)
    for _ in range(4):
        schedule.step()
        y = compiled(x)
        y.sum().backward()
        assert torch.equal(y, model(x))
    assert counter.frame_count == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="no Flat-LoRA layers.*enable_flat_lora"):
        FlatLoraSchedule(nn.Linear(3, 3), total_steps=5)
    model = make_model()
    for kwargs, match in [(dict(total_steps=0), "total_steps"), (dict(total_steps=5, seed=-1), "seed"),
                          (dict(total_steps=5, rank=-1), "rank")]:
        with pytest.raises(ValueError, match=match):
            FlatLoraSchedule(model, **kwargs)
    pending = FlatLoraSchedule(model, total_steps=None)
    assert pending.factor == 0.0  # no T yet: noise-free until someone sets it


def test_schedule_without_total_steps_is_loud_outside_the_trainer():
    """README's PEFT snippet leaves T to FlatLoraCallback; reused in a plain loop without the callback,
    the factor would stay 0 for ever: the first training forward warns (naming the cause) and step() raises."""
    model = make_model()
    schedule = FlatLoraSchedule(model, total_steps=None, seed=0)
    model.train()
    with pytest.warns(UserWarning, match=r"total_steps=None.*FlatLoraCallback"):
        model(torch.randn(4, 16))
    with pytest.raises(RuntimeError, match=r"total_steps is None"):
        schedule.step()
    schedule.total_steps = 10  # what the callback does at on_train_begin
    schedule.step()
    assert schedule.factor > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(4, 16))  # driven now: no warning


def test_hf_callback_steps_once_per_optimizer_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from flatlora_kernels.hf import FlatLoraCallback

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    apply_flat_lora(model, "all-linear", r=4, sigma=0.1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    schedule = FlatLoraSchedule(model, total_steps=None, seed=0)
    data = [{"input_ids": torch.randint(0, 64, (16,)), "labels": torch.randint(0, 64, (16,))} for _ in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[FlatLoraCallback(schedule)])
    trainer.train()
    assert schedule.total_steps == 3 and schedule.step_count == 3
    assert all(torch.equal(model.get_parameter(n), p) for n, p in frozen.items())
