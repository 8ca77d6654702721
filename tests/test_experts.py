"""enable_flat_lora on PEFT ``target_parameters`` LoRA over MoE expert stacks (config-built Qwen3-MoE,
Mixtral, gpt-oss): the layouts, the training forward against PEFT on ``W + eps``, sigma 0 and eval
equal to PEFT, refusals, and Trainer training (noise in every expert parameter, one draw per step,
bit-identical resume, the adapter reloaded in plain PEFT)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from flatlora_kernels import FlatLoraSchedule, UnsupportedLayerError  # noqa: E402
from flatlora_kernels.experts import expert_layout  # noqa: E402
from flatlora_kernels.experts import peft_wrapper  # noqa: E402
from flatlora_kernels.noise import expert_filter_noise  # noqa: E402
from flatlora_kernels.peft import disable_flat_lora, enable_flat_lora, patched_layers  # noqa: E402

from .conftest import enable_checkpointing, undriven_warnings  # noqa: E402

# Sizes keep every expert row a multiple of 16 bytes in bf16: grouped_mm (transformers' default) needs it on CPU.
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=8, max_position_embeddings=32)  # fmt: skip


def tiny_qwen3_moe(seed=0):
    torch.manual_seed(seed)
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        intermediate_size=32, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, **SMALL))


def tiny_mixtral(seed=0):
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        intermediate_size=8, num_local_experts=4, num_experts_per_tok=2, **SMALL))


def tiny_gpt_oss(seed=0):
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                       sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                       **SMALL)  # fmt: skip
    return transformers.GptOssForCausalLM(config)


MODELS = [tiny_qwen3_moe, tiny_mixtral, tiny_gpt_oss]
EXPERT_PARAMETERS = ["gate_up_proj", "down_proj"]
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def experts_lora(model, seed=1, **config):
    torch.manual_seed(seed)
    config = {"r": 2, "lora_alpha": 4, "target_modules": [], "target_parameters": EXPERT_PARAMETERS, **config}
    model = peft.get_peft_model(model, peft.LoraConfig(**config))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero: make the adapter change the output
            torch.nn.init.normal_(p, std=0.1)
    return model


def wrappers(model):
    return [(name, m) for name, m in patched_layers(model) if isinstance(m, peft_wrapper.FlatLoraParamWrapper)]


def experts_of(model):
    return next(m for m in model.modules() if type(m).__name__.endswith("Experts"))


def routed(experts, tokens=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, 32, generator=g)
    top_k = torch.stack([torch.randperm(experts.num_experts, generator=g)[:2] for _ in range(tokens)])
    return hidden, top_k, torch.rand(tokens, 2, generator=g)


@pytest.mark.parametrize("build", MODELS)
def test_layout_axes_are_the_ones_the_model_computes_with(build):
    """Perturbing one "in" column of gate_up_proj where that input feature is 0 changes nothing;
    perturbing one "out" row of down_proj changes that output feature only."""
    experts = experts_of(build())
    hidden, top_k, weights = routed(experts)
    hidden[:, 3] = 0
    with torch.no_grad():
        for name in EXPERT_PARAMETERS:
            torch.nn.init.normal_(getattr(experts, name), std=0.3)
        base = experts(hidden, top_k, weights)
        gate_up = expert_layout(experts, "gate_up_proj")
        assert gate_up.in_features == 32 and gate_up.out_features == 16
        gate_up.out_in(experts.gate_up_proj)[:, :, 3] += 5.0
        assert torch.equal(experts(hidden, top_k, weights), base)
        gate_up.out_in(experts.gate_up_proj)[:, :, 4] += 5.0
        assert not torch.allclose(experts(hidden, top_k, weights), base)
        base = experts(hidden, top_k, weights)
        down = expert_layout(experts, "down_proj")
        assert (down.out_features, down.in_features) == (32, 8)
        down.out_in(experts.down_proj)[:, 5, :] += 5.0
        changed = (experts(hidden, top_k, weights) - base).abs().amax(dim=0) > 0
        assert changed.nonzero().flatten().tolist() == [5]


def materialised_reference(model, reference):
    """``reference`` (a copy of ``model`` before enable_flat_lora) with each expert stack's base
    weight replaced by ``W + eps``, eps materialised by plain PyTorch from the wrappers' seeds."""
    for name, layer in wrappers(model):
        layout = expert_layout(layer.get_base_layer(), layer.parameter_name)
        lora_A, lora_B = peft_wrapper.expert_factors(layer, "default")
        weight = layout.out_in(layer.get_param())
        eps = expert_filter_noise(weight, lora_A, lora_B, scaling=layer.scaling["default"],
                                  sigma=layer.effective_sigma(), seed=layer.effective_seed())  # fmt: skip
        target = reference.get_submodule(name)
        with torch.no_grad():
            layout.out_in(getattr(target.get_base_layer(), layer.parameter_name)).add_(eps)
    return reference


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


TRITON_RUNS = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
ON_TRITON = pytest.mark.skipif(not TRITON_RUNS, reason="needs CUDA or TRITON_INTERPRET=1")
CASES = [(build, "auto") for build in MODELS] + [pytest.param(tiny_qwen3_moe, "triton", marks=ON_TRITON)]


@pytest.mark.parametrize("build,backend", CASES)
def test_training_forward_and_grads_equal_peft_on_the_materialised_noise(monkeypatch, build, backend):
    if backend == "triton":  # the CUDA path's generator (the Triton z tile), in the interpreter on CPU
        monkeypatch.setattr(peft_wrapper.FlatLoraParamWrapper, "_op_backend", lambda self: "triton")
    model = experts_lora(build())
    reference = copy.deepcopy(model)
    enable_flat_lora(model, sigma=0.5)
    assert len(wrappers(model)) == 2
    FlatLoraSchedule(model, total_steps=2, seed=3).set_step(2)  # full noise
    model.train()
    out = model(IDS).logits
    out.square().mean().backward()
    reference = materialised_reference(model, reference).train()
    want = reference(IDS).logits
    want.square().mean().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(out, model.eval()(IDS).logits, atol=1e-4)  # the noise is on
    got, expected = lora_grads(model), lora_grads(reference)
    assert got.keys() == expected.keys() and len(got) == 4
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", [tiny_qwen3_moe, tiny_gpt_oss])
def test_noise_factor_zero_eval_and_merge_equal_peft_exactly(build, dtype):
    model = experts_lora(build().to(dtype))
    reference = copy.deepcopy(model)
    enable_flat_lora(model, sigma=0.1)
    FlatLoraSchedule(model, total_steps=4)  # step 0: factor 0
    for m in (model, reference):
        m.train()
        m(IDS).logits.float().square().mean().backward()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
        assert torch.equal(model.eval()(IDS).logits, reference.eval()(IDS).logits)
    got, expected = lora_grads(model), lora_grads(reference)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    merged, merged_reference = model.merge_and_unload(), reference.merge_and_unload()
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(), merged_reference.state_dict().values()))


def test_bf16_autocast_training_forward_equals_peft_at_factor_zero_and_carries_noise_after():
    model = experts_lora(tiny_qwen3_moe())
    reference = copy.deepcopy(model).train()
    enable_flat_lora(model, sigma=0.5).train()
    schedule = FlatLoraSchedule(model, total_steps=1)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        want = reference(IDS).logits
        assert torch.equal(model(IDS).logits, want)
        schedule.step()
        noisy = model(IDS).logits
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, want, atol=1e-3)


def test_disable_flat_lora_hands_back_peft_wrappers():
    model = enable_flat_lora(experts_lora(tiny_qwen3_moe()), sigma=0.1)
    disable_flat_lora(model)
    classes = {type(m).__name__ for m in model.modules() if "ParamWrapper" in type(m).__name__}
    assert classes == {"ParamWrapper"}
    assert not any(isinstance(m, peft_wrapper.FlatLoraParamWrapper) for m in model.modules())


def test_training_forward_without_a_schedule_warns_once_at_the_user_line():
    model = enable_flat_lora(experts_lora(tiny_qwen3_moe()), sigma=0.1).train()
    with undriven_warnings() as caught:
        model(IDS)
        model(IDS)
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "FlatLoraParamWrapper is training with no noise" in str(caught[0].message)


class UnflaggedExperts(torch.nn.Module):
    """Llama 4's layout (``[E, in, out]`` used by bmm) without transformers' layout flags."""

    def __init__(self):
        super().__init__()
        self.num_experts = 2
        self.gate_up_proj = torch.nn.Parameter(torch.randn(2, 16, 12))
        self.down_proj = torch.nn.Parameter(torch.randn(2, 6, 16))

    def forward(self, x):
        gate, up = torch.bmm(x.view(2, -1, 16), self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(torch.nn.functional.silu(gate) * up, self.down_proj).view(-1, 16)


class TinyMoe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = UnflaggedExperts()
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.experts(x))


def test_unknown_layout_is_refused_naming_the_module_once_with_its_parameters():
    config = peft.LoraConfig(r=2, target_modules=["head"], target_parameters=EXPERT_PARAMETERS)
    model = peft.get_peft_model(TinyMoe(), config)
    with pytest.raises(UnsupportedLayerError) as error:
        enable_flat_lora(model)
    message = str(error.value)
    assert "cannot run 1 layer(s)" in message and "base_layer" not in message
    assert message.count("'base_model.model.experts") == 1
    assert "(target_parameters down_proj, gate_up_proj)" in message
    assert "UnflaggedExperts.gate_up_proj (2, 16, 12) has no known layout" in message
    with pytest.warns(UserWarning, match=r"train without Flat-LoRA.*target_parameters down_proj, gate_up_proj"):
        enable_flat_lora(model, skip_unsupported=True)
    assert [type(m).__name__ for _, m in patched_layers(model)] == ["FlatLoraPeftLinear"]


def test_two_dimensional_and_trainable_parameters_are_refused_by_name():
    model = experts_lora(tiny_gpt_oss(), target_parameters=["gate_up_proj", "down_proj_bias"])
    with pytest.raises(UnsupportedLayerError, match=r"GptOssExperts\.down_proj_bias is 2-D \(4, 32\)"):
        enable_flat_lora(model)
    model = experts_lora(tiny_qwen3_moe())
    experts_of(model).down_proj.requires_grad_(True)
    with pytest.raises(UnsupportedLayerError, match=r"Qwen3MoeExperts\.down_proj requires grad"):
        enable_flat_lora(model)


# -- Trainer: noise in every expert parameter, one draw per optimizer step, resume, reload ----------------


def train(model, output_dir, max_steps, resume=None, record=None):
    from flatlora_kernels.hf import FlatLoraCallback

    schedule = FlatLoraSchedule(model, total_steps=None, seed=7)
    rows = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in rows]
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=5e-2, report_to=[], save_strategy="steps", save_steps=2, logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[FlatLoraCallback(schedule)])
    trainer.train(resume_from_checkpoint=resume)
    return schedule


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Qwen3-MoE with LoRA on its experts and attention, trained 4 optimizer steps (2 micro-batches
    each), every expert noise draw recorded."""
    pytest.importorskip("accelerate")
    root = tmp_path_factory.mktemp("experts_trainer")
    model = enable_flat_lora(experts_lora(tiny_qwen3_moe(), target_modules=["q_proj", "v_proj"]), sigma=0.2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    draws = []
    add = peft_wrapper.add_stack_noise_

    def recording(merged, weight, lora_A, lora_B, **kw):
        draws.append((weight.data_ptr(), int(kw["seed"]), float(kw["sigma"])))
        return add(merged, weight, lora_A, lora_B, **kw)

    peft_wrapper.add_stack_noise_ = recording
    try:
        schedule = train(model, root / "run", max_steps=4)
    finally:
        peft_wrapper.add_stack_noise_ = add
    return dict(root=root, model=model, frozen=frozen, draws=draws, schedule=schedule)


def test_trainer_draws_noise_in_every_expert_parameter_once_per_step(trained):
    model, draws = trained["model"], trained["draws"]
    assert trained["schedule"].step_count == 4
    kinds = sorted(type(m).__name__ for _, m in patched_layers(model))
    assert kinds == ["FlatLoraParamWrapper"] * 2 + ["FlatLoraPeftLinear"] * 2  # experts and attention
    stacks = {layer.get_param().data_ptr() for _, layer in wrappers(model)}
    assert len(stacks) == 2 and {ptr for ptr, _, _ in draws} == stacks
    for ptr in stacks:
        seeds = [seed for p, seed, _ in draws if p == ptr]
        sigmas = [sigma for p, _, sigma in draws if p == ptr]
        assert len(seeds) == 8  # 4 steps x 2 micro-batches
        assert all(seeds[i] == seeds[i + 1] for i in range(0, 8, 2))  # one draw shared by a step's micro-batches
        assert len(set(seeds)) == 4
        assert sigmas[0] == 0 and all(s > 0 for s in sigmas[2:])  # the cosine ramp: on from the second step
    assert len({seed for _, seed, _ in draws}) == 8  # no two expert parameters share a seed
    assert all(torch.equal(model.get_parameter(n), p) for n, p in trained["frozen"].items())  # eps never written


def test_trainer_resume_is_bit_identical(trained):
    model = enable_flat_lora(experts_lora(tiny_qwen3_moe(), target_modules=["q_proj", "v_proj"]), sigma=0.2)
    train(model, trained["root"] / "run", max_steps=4, resume=str(trained["root"] / "run" / "checkpoint-2"))
    want = {n: p for n, p in trained["model"].named_parameters() if p.requires_grad}
    got = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and len(got) == 8  # experts' and attention's factors
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_saved_adapter_reloads_in_plain_peft_with_equal_outputs(trained):
    model = trained["model"]
    model.save_pretrained(trained["root"] / "adapter")
    reloaded = peft.PeftModel.from_pretrained(tiny_qwen3_moe(), trained["root"] / "adapter")
    assert not any(isinstance(m, peft_wrapper.FlatLoraParamWrapper) for m in reloaded.modules())
    with torch.no_grad():
        want = model.eval()(IDS).logits
        torch.testing.assert_close(reloaded.eval()(IDS).logits, want, rtol=0, atol=0)


def test_from_peft_points_target_parameters_to_enable_flat_lora():
    from flatlora_kernels import from_peft

    with pytest.raises(UnsupportedLayerError, match=r"experts \(target_parameters down_proj, gate_up_proj\)': it is "
                                                    r"PEFT target_parameters LoRA .*enable_flat_lora trains in place"):
        from_peft(experts_lora(tiny_qwen3_moe()))


def test_gradient_checkpointing_recomputes_the_same_noise(monkeypatch):
    grads, calls = [], []
    add = peft_wrapper.add_stack_noise_
    monkeypatch.setattr(peft_wrapper, "add_stack_noise_", lambda *a, **kw: calls.append(1) or add(*a, **kw))
    for checkpointing in (False, True):
        model = enable_flat_lora(experts_lora(tiny_qwen3_moe()), sigma=0.5)
        FlatLoraSchedule(model, total_steps=2, seed=3).set_step(1)
        if checkpointing:
            enable_checkpointing(model, use_reentrant=False)
        model.train()
        calls.clear()
        model(IDS).logits.square().mean().backward()
        assert len(calls) == (4 if checkpointing else 2)  # the recomputed forward draws again
        grads.append(lora_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
