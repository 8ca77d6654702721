"""``torch.compile(dynamic=True, fullgraph=True)`` over varying token counts: one compile, eager's values."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from flatlora_kernels import FlatLoraLinear

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model():
    torch.manual_seed(0)
    layers = [FlatLoraLinear(24, 16, r=4, lora_alpha=8, sigma=0.1), FlatLoraLinear(16, 8, r=4, lora_alpha=8, sigma=0.1)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # non-zero B, so B@A is in play
    for seed, layer in enumerate(layers):
        layer.set_noise(seed=11 + seed, factor=1.0)  # noise on: the regenerated eps is in play
    return torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])


def test_dynamic_fullgraph_compiles_once_and_matches_eager():
    torch._dynamo.reset()
    model = _model().train()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")  # fakes traced symbolically
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    frames_after_first = None
    for n_tokens in (3, 7, 12, 5):
        x = torch.randn(2, n_tokens, 24, generator=torch.Generator().manual_seed(n_tokens), requires_grad=True)
        eager_out = model(x)
        eager_grads = torch.autograd.grad(eager_out.square().sum(), (x, model[0].lora_A, model[2].lora_B))
        out = compiled(x)
        grads = torch.autograd.grad(out.square().sum(), (x, model[0].lora_A, model[2].lora_B))
        frames_after_first = frames_after_first or counter.frame_count
        torch.testing.assert_close(out, eager_out)
        for got, expected in zip(grads, eager_grads):
            torch.testing.assert_close(got, expected)
    assert frames_after_first >= 1
    assert counter.frame_count == frames_after_first, "recompiled for a new token count"
