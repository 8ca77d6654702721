"""Bi-LoRA (flatlora_kernels/sharpness/bilora.py) against a direct implementation of its update:
the merged weight W0 + s*B1@A1 + s*B2@A2 materialised, autograd, descent on (B1, A1), Adam ascent on
(B2, A2) written out by hand, then the global clip computed from the materialised products."""

import math

import pytest
import torch
from torch import nn

from flatlora_kernels import FlatLoraLinear
from flatlora_kernels.sharpness.bilora import BiLoRA

LR, RHO, STEPS = 0.05, 0.02, 5


def _flat_model():
    torch.manual_seed(0)
    layers = [FlatLoraLinear.from_linear(nn.Linear(6, 5), r=3, lora_alpha=6, sigma=0.0),
              FlatLoraLinear.from_linear(nn.Linear(5, 4), r=3, lora_alpha=6, sigma=0.0)]
    for layer in layers:
        nn.init.normal_(layer.lora_B, std=0.3)  # non-zero B: every factor gets a gradient
    return nn.Sequential(layers[0], nn.Tanh(), layers[1])


def _peft_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    return model


def _direct(refs, aux, x, y, steps):
    """The update rule written out: returns the (A1, B1, A2, B2) per layer after ``steps`` steps."""
    W0 = [ref.module.weight.detach().clone() if hasattr(ref.module, "weight") and ref.adapter is None
          else ref.module.get_base_layer().weight.detach().clone() for ref in refs]
    bias = [ref.module.bias.detach().clone() if ref.adapter is None else ref.module.get_base_layer().bias.detach().clone()
            for ref in refs]
    s = [ref.scaling for ref in refs]
    A1 = [ref.lora_A.detach().clone().requires_grad_() for ref in refs]
    B1 = [ref.lora_B.detach().clone().requires_grad_() for ref in refs]
    A2 = [a.detach().clone().requires_grad_() for a, _ in aux]
    B2 = [b.detach().clone().requires_grad_() for _, b in aux]
    aux_params = [p for pair in zip(A2, B2) for p in pair]
    m = [torch.zeros_like(p) for p in aux_params]
    v = [torch.zeros_like(p) for p in aux_params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        h = x
        for i in range(len(refs)):
            W = W0[i] + s[i] * B1[i] @ A1[i] + s[i] * B2[i] @ A2[i]
            h = h @ W.T + bias[i]
            if i == 0:
                h = torch.tanh(h)
        loss = (h - y).square().mean()
        grads = torch.autograd.grad(loss, A1 + B1 + aux_params)
        n = len(refs)
        with torch.no_grad():
            for p, g in zip(A1 + B1, grads[: 2 * n]):
                p -= LR * g  # the base optimizer: SGD, descent
            for k, (p, g) in enumerate(zip(aux_params, grads[2 * n:])):
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                m_hat, v_hat = m[k] / (1 - beta1**t), v[k] / (1 - beta2**t)
                p += LR * m_hat / (v_hat.sqrt() + eps)  # ascent at the base learning rate
            c = math.sqrt(sum(float((s[i] * B2[i] @ A2[i]).square().sum()) for i in range(n)))
            if c > RHO:
                for p in aux_params:
                    p *= math.sqrt(RHO / c)
    return A1, B1, A2, B2


@pytest.mark.parametrize("build", [_flat_model, _peft_model], ids=["FlatLoraLinear", "peft"])
def test_bilora_step_matches_the_direct_update(build):
    model = build().train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = BiLoRA(model, torch.optim.SGD(trainable, lr=LR), rho=RHO, seed=3)
    assert len(opt.layers) == 2 and all(float(b.detach().abs().sum()) == 0 for b in opt.aux_B)
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    expected = _direct(opt.layers, list(zip(opt.aux_A, opt.aux_B)), x, y, STEPS)
    norms = []
    for _ in range(STEPS):
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        norms.append(float(opt.perturbation_norm()))
    A1, B1, A2, B2 = expected
    for i, ref in enumerate(opt.layers):
        torch.testing.assert_close(ref.lora_A.detach(), A1[i].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref.lora_B.detach(), B1[i].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.aux_A[i].detach(), A2[i].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.aux_B[i].detach(), B2[i].detach(), rtol=1e-5, atol=1e-6)
    assert max(norms) == pytest.approx(RHO, rel=1e-5), "the clip never bound: the test would not check it"
    direct_norm = math.sqrt(sum(float(opt.perturbation(i).square().sum()) for i in range(2)))
    assert float(opt.perturbation_norm()) == pytest.approx(direct_norm, rel=1e-5)


def test_bilora_perturbs_training_forwards_only_and_can_be_removed():
    model = _flat_model()
    opt = BiLoRA(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR), rho=1.0)
    x = torch.randn(8, 6)
    with torch.no_grad():
        opt.aux_B[0].normal_()
    model.eval()
    plain = model(x)
    model.train()
    perturbed = model(x)
    assert not torch.allclose(plain, perturbed)  # training forward: s * B2 @ A2 is added
    layer = model[0]
    inner = torch.tanh(x @ (layer.weight + layer.scaling * layer.lora_B @ layer.lora_A + opt.perturbation(0)).T + layer.bias)
    torch.testing.assert_close(perturbed, model[2].eval()(inner), rtol=1e-5, atol=1e-5)
    opt.remove()
    torch.testing.assert_close(model.train()(x), plain, rtol=1e-6, atol=1e-6)


def test_bilora_rho_zero_is_lora_and_state_round_trips():
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    lora, bi = _flat_model(), _flat_model()
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=LR)
    bi_opt = BiLoRA(bi, torch.optim.AdamW([p for p in bi.parameters() if p.requires_grad], lr=LR), rho=0.0)
    for model, opt in ((lora, lora_opt), (bi, bi_opt)):
        for _ in range(3):
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(lora.parameters(), bi.parameters()):
        assert torch.equal(a, b)
    assert float(bi_opt.perturbation_norm()) == 0.0
    state = bi_opt.state_dict()
    again = BiLoRA(bi, torch.optim.AdamW([p for p in bi.parameters() if p.requires_grad], lr=LR), rho=0.0, seed=9)
    again.load_state_dict(state)
    assert again.steps_done == 3 and all(torch.equal(a, b) for a, b in zip(again.aux_A, bi_opt.aux_A))


def test_bilora_rejects_bad_arguments():
    model = _flat_model()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="rho"):
        BiLoRA(model, torch.optim.SGD(params, lr=LR), rho=-1.0)
    with pytest.raises(ValueError, match="rank"):
        BiLoRA(model, torch.optim.SGD(params, lr=LR), rank=0)
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        BiLoRA(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=LR))
