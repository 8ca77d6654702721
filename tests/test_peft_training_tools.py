"""enable_flat_lora under the training tools around it: gradient checkpointing (the recomputed forward
draws the same noise, so the gradients are those of the plain run), accelerate's ``prepare`` and
``torch.compile`` (one graph, no recompilation per step)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from flatlora_kernels import FlatLoraSchedule  # noqa: E402
from flatlora_kernels.peft import enable_flat_lora, patched_layers  # noqa: E402

from .conftest import enable_checkpointing  # noqa: E402
from .test_hf_peft_native import IDS, tiny_llama  # noqa: E402


def _noisy_peft_llama(sigma=0.5):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = enable_flat_lora(peft.get_peft_model(tiny_llama(), config), sigma=sigma)
    FlatLoraSchedule(model, total_steps=2, seed=3).step()
    return model.train()


def _adapter_grads(model):
    model.zero_grad()
    model(IDS, labels=IDS).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same_noise(reentrant):
    plain = _adapter_grads(_noisy_peft_llama())
    model = _noisy_peft_llama()
    enable_checkpointing(model, use_reentrant=reentrant)
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    calls = []
    layer = next(m for _, m in patched_layers(model))
    layer.register_forward_hook(lambda module, args, out: calls.append(module.training))
    checkpointed = _adapter_grads(model)
    assert calls == [True, True]  # forward, then the recomputation in backward
    assert checkpointed.keys() == plain.keys() and len(plain) == 6
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    unnoised = _adapter_grads(_noisy_peft_llama(sigma=0.0))
    assert any(not torch.allclose(g, plain[n]) for n, g in unnoised.items())  # the noise is in the gradients


def test_accelerate_prepare_trains_with_noise():
    accelerate = pytest.importorskip("accelerate")
    model = _noisy_peft_llama()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    reference = _adapter_grads(_noisy_peft_llama())
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier Trainer's settings (e.g. bf16) stay
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="no")
    prepared, optimizer = accelerator.prepare(model, optimizer)
    optimizer.zero_grad()
    accelerator.backward(prepared(IDS, labels=IDS).loss)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, reference[name], rtol=1e-5, atol=1e-6, msg=name)


# torch 2.6's dynamo cannot inline PEFT's own PeftModel.forward (a contextlib.contextmanager it skips:
# "inline in skipfiles: PeftModel._enable_peft_forward_hooks"); the package's layers compile there too
# (tests/test_compile_dynamic.py), the whole PeftModel in one graph from torch 2.11 on (the other stacks).
@pytest.mark.skipif(
    tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 7),
    reason=f"torch {torch.__version__}: dynamo cannot trace PEFT's PeftModel.forward (contextmanager) with fullgraph",
)
def test_torch_compile_of_a_patched_peft_model_is_one_graph_and_matches_eager():
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    model = enable_flat_lora(peft.get_peft_model(mlp, config), sigma=0.5).train()
    schedule = FlatLoraSchedule(model, total_steps=4, seed=1)
    schedule.step()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(4, 8)
    for _ in range(2):  # a new draw each step, no recompilation (seed and factor are buffers)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        schedule.step()
    assert counter.frame_count == 1
