"""Bi-LoRA (flatlora_kernels/sharpness/bilora.py) against its paper (arXiv 2508.19564): one step is
Eq. 9 (descent on (B1, A1), plain gradient ascent on (B2, A2), both from the gradient G = dL/dW at
W0 + s*B1@A1 + s*B2@A2) followed by Eq. 10 (the global clip), written out below in tensor arithmetic;
then two of the paper's qualitative claims on toy problems (Proposition 2: the ascent moves the
perturbation along the gradient; the clip keeps it on its rho-ball, which unclipped ascent leaves)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlora_kernels import FlatLoraLinear
from flatlora_kernels.sharpness.bilora import BiLoRA

LR = 0.5


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


def _base_weights(refs):
    layers = [ref.module if ref.adapter is None else ref.module.get_base_layer() for ref in refs]
    return [layer.weight.detach().clone() for layer in layers], [layer.bias.detach().clone() for layer in layers]


def _loss_at(weights, bias, x, y):
    """The two-layer model's loss with each layer's whole weight given (the merged W)."""
    h = torch.tanh(x @ weights[0].T + bias[0])
    return (h @ weights[1].T + bias[1] - y).square().mean()


def _merged_gradients(W0, bias, s, A1, B1, A2, B2, x, y):
    """G_i = dL/dW_i at W_i = W0_i + s*B1_i@A1_i + s*B2_i@A2_i (autograd on the merged weights)."""
    W = [(W0[i] + s[i] * B1[i] @ A1[i] + s[i] * B2[i] @ A2[i]).requires_grad_() for i in range(len(W0))]
    return torch.autograd.grad(_loss_at(W, bias, x, y), W)


def _paper_steps(refs, aux, x, y, steps, rho, eta):
    """Eq. 9 then Eq. 10, ``steps`` times, with LoRA's scaling s written out (dL/dB = s*G@A^T,
    dL/dA = s*B^T@G). Returns the factors and, per step, whether the clip bound."""
    W0, bias = _base_weights(refs)
    s = [ref.scaling for ref in refs]
    A1 = [ref.lora_A.detach().clone() for ref in refs]
    B1 = [ref.lora_B.detach().clone() for ref in refs]
    A2 = [a.detach().clone() for a, _ in aux]
    B2 = [b.detach().clone() for _, b in aux]
    bound = []
    for _ in range(steps):
        G = _merged_gradients(W0, bias, s, A1, B1, A2, B2, x, y)
        for i, g in enumerate(G):  # every right-hand side uses step k's factors
            B1[i], A1[i] = B1[i] - eta * s[i] * g @ A1[i].T, A1[i] - eta * s[i] * B1[i].T @ g
            B2[i], A2[i] = B2[i] + eta * s[i] * g @ A2[i].T, A2[i] + eta * s[i] * B2[i].T @ g
        c = math.sqrt(sum(float((s[i] * B2[i] @ A2[i]).square().sum()) for i in range(len(G))))
        bound.append(c > rho)
        if c > rho:
            A2 = [a * math.sqrt(rho / c) for a in A2]
            B2 = [b * math.sqrt(rho / c) for b in B2]
    return A1, B1, A2, B2, bound


def _train(model, opt, x, y, steps):
    norms = []
    for _ in range(steps):
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        norms.append(float(opt.perturbation_norm()))
    return norms


@pytest.mark.parametrize(("build", "rho"), [(_flat_model, 0.5), (_peft_model, 1.0)], ids=["FlatLoraLinear", "peft"])
def test_bilora_steps_are_the_papers_equations_9_and_10(build, rho):
    model = build().train()
    steps = 3
    opt = BiLoRA(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR), rho=rho, seed=3)
    assert len(opt.layers) == 2 and all(float(b.detach().abs().sum()) == 0 for b in opt.aux_B)
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)), torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    A1, B1, A2, B2, bound = _paper_steps(opt.layers, list(zip(opt.aux_A, opt.aux_B)), x, y, steps, rho, LR)
    assert bound == [False, True, True], "step 1 must run unclipped and the later ones clipped, or the test checks less"
    norms = _train(model, opt, x, y, steps)
    for i, ref in enumerate(opt.layers):
        torch.testing.assert_close(ref.lora_A.detach(), A1[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ref.lora_B.detach(), B1[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.aux_A[i].detach(), A2[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.aux_B[i].detach(), B2[i], rtol=1e-5, atol=1e-6)
    assert norms[0] < rho and norms[1:] == pytest.approx([rho, rho], rel=1e-5)
    assert opt.clip_bound_steps == 2 and opt.state_dict()["wrapper"]["clip_bound_steps"] == 2
    direct_norm = math.sqrt(sum(float(opt.perturbation(i).square().sum()) for i in range(2)))
    assert norms[-1] == pytest.approx(direct_norm, rel=1e-5)


def test_bilora_eta2_follows_the_base_learning_rate_and_its_scale():
    """eta2 = ascent_lr_scale * the base group's current rate (a scheduler on the wrapper moves both)."""
    model = _flat_model().train()
    rho, steps = 10.0, 2  # the clip never binds
    opt = BiLoRA(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR), rho=rho,
                 ascent_lr_scale=0.25, seed=3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)  # halves eta1 (and so eta2) from step 1
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    aux = [(a.detach().clone(), b.detach().clone()) for a, b in zip(opt.aux_A, opt.aux_B)]
    refs_before = [(ref.lora_A.detach().clone(), ref.lora_B.detach().clone()) for ref in opt.layers]
    _train(model, opt, x, y, steps)
    W0, bias = _base_weights(opt.layers)
    s = [ref.scaling for ref in opt.layers]
    A1, B1 = [a for a, _ in refs_before], [b for _, b in refs_before]
    A2, B2 = [a for a, _ in aux], [b for _, b in aux]
    for _ in range(steps):
        G = _merged_gradients(W0, bias, s, A1, B1, A2, B2, x, y)
        eta1 = LR * 0.5
        eta2 = 0.25 * eta1
        for i, g in enumerate(G):
            B1[i], A1[i] = B1[i] - eta1 * s[i] * g @ A1[i].T, A1[i] - eta1 * s[i] * B1[i].T @ g
            B2[i], A2[i] = B2[i] + eta2 * s[i] * g @ A2[i].T, A2[i] + eta2 * s[i] * B2[i].T @ g
    assert scheduler.get_last_lr() == [LR * 0.5]
    for i in range(2):
        torch.testing.assert_close(opt.aux_A[i].detach(), A2[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.aux_B[i].detach(), B2[i], rtol=1e-5, atol=1e-6)


def test_bilora_adam_ascent_option_is_adam_with_maximize():
    """ascent="adam" (not the paper's step): Adam's update along +grad, bias-corrected, then the clip."""
    model = _flat_model().train()
    rho, lr, steps = 0.02, 0.05, 4
    opt = BiLoRA(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr), rho=rho, ascent="adam", seed=3)
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    W0, bias = _base_weights(opt.layers)
    s = [ref.scaling for ref in opt.layers]
    A1 = [ref.lora_A.detach().clone() for ref in opt.layers]
    B1 = [ref.lora_B.detach().clone() for ref in opt.layers]
    A2 = [a.detach().clone() for a in opt.aux_A]
    B2 = [b.detach().clone() for b in opt.aux_B]
    moments = {}
    for t in range(1, steps + 1):
        G = _merged_gradients(W0, bias, s, A1, B1, A2, B2, x, y)
        for i, g in enumerate(G):
            grads = {"A2": s[i] * B2[i].T @ g, "B2": s[i] * g @ A2[i].T}
            B1[i], A1[i] = B1[i] - lr * s[i] * g @ A1[i].T, A1[i] - lr * s[i] * B1[i].T @ g
            for name, grad in grads.items():
                m, v = moments.get((i, name), (0.0, 0.0))
                m, v = 0.9 * m + 0.1 * grad, 0.999 * v + 0.001 * grad * grad
                moments[(i, name)] = (m, v)
                step = lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
                if name == "A2":
                    A2[i] = A2[i] + step
                else:
                    B2[i] = B2[i] + step
        c = math.sqrt(sum(float((s[i] * B2[i] @ A2[i]).square().sum()) for i in range(2)))
        if c > rho:
            A2, B2 = [a * math.sqrt(rho / c) for a in A2], [b * math.sqrt(rho / c) for b in B2]
    norms = _train(model, opt, x, y, steps)
    assert max(norms) == pytest.approx(rho, rel=1e-5), "the clip never bound: the test would not check it"
    for i in range(2):
        torch.testing.assert_close(opt.aux_A[i].detach(), A2[i], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.aux_B[i].detach(), B2[i], rtol=1e-5, atol=1e-6)


def _toy_classifier(seed=0):
    """A tiny two-layer classifier on a fixed logistic toy problem (the paper's claims, small)."""
    torch.manual_seed(seed)
    layers = [FlatLoraLinear.from_linear(nn.Linear(10, 16), r=4, lora_alpha=8, sigma=0.0),
              FlatLoraLinear.from_linear(nn.Linear(16, 3), r=4, lora_alpha=8, sigma=0.0)]
    model = nn.Sequential(layers[0], nn.Tanh(), layers[1])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 10, generator=g)
    y = (x[:, :3] + 0.5 * torch.randn(256, 3, generator=g)).argmax(1)
    return model, x, y


def test_bilora_ascent_moves_the_perturbation_along_the_gradient_proposition_2():
    """<G_t, eps_{t+1} - eps_t> >= 0 for an unclipped ascent step (Proposition 2 / Eq. A7), and the
    same step with the opposite sign (descent) would make it negative: the sign is checked."""
    model, x, y = _toy_classifier()
    opt = BiLoRA(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05), rho=1e6, seed=1)
    W0, bias = _base_weights(opt.layers)
    s = [ref.scaling for ref in opt.layers]
    g = torch.Generator().manual_seed(7)
    products = []
    for _ in range(30):
        index = torch.randint(0, 256, (32,), generator=g)
        A1 = [ref.lora_A.detach() for ref in opt.layers]
        B1 = [ref.lora_B.detach() for ref in opt.layers]
        W = [(W0[i] + s[i] * B1[i] @ A1[i] + opt.perturbation(i)).requires_grad_() for i in range(2)]
        h = torch.tanh(x[index] @ W[0].T + bias[0])
        G = torch.autograd.grad(F.cross_entropy(h @ W[1].T + bias[1], y[index]), W)
        before = [opt.perturbation(i) for i in range(2)]
        F.cross_entropy(model(x[index]), y[index]).backward()
        opt.step()
        opt.zero_grad()
        products.append(sum(float((G[i] * (opt.perturbation(i) - before[i])).sum()) for i in range(2)))
    assert min(products) > 0, products


def test_bilora_perturbation_reaches_its_rho_ball_and_stays_in_it():
    """The ascent pushes the perturbation outward: unclipped it grows past rho (the paper's no-clip
    ablation, Table 5); clipped it reaches the ball early, never leaves it (Eq. 8) and keeps coming
    back to its surface (plain ascent follows each batch's gradient, so between clips it can also
    shrink: the norm is on the ball on about a quarter of the steps here)."""
    rho, steps = 0.05, 150

    def train(rho):
        model, x, y = _toy_classifier()
        opt = BiLoRA(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.0),
                     rho=rho, seed=1)
        g = torch.Generator().manual_seed(7)
        norms = []
        for _ in range(steps):
            index = torch.randint(0, 256, (32,), generator=g)
            F.cross_entropy(model(x[index]), y[index]).backward()
            opt.step()
            opt.zero_grad()
            norms.append(float(opt.perturbation_norm()))
        return norms

    norms = train(rho)
    on_ball = [n >= rho * (1 - 1e-5) for n in norms]
    first = on_ball.index(True) if any(on_ball) else steps
    assert first < 30, f"the perturbation took {first} steps to reach rho"
    assert max(norms) <= rho * (1 + 1e-5)
    assert sum(on_ball[first:]) >= 0.1 * (steps - first), "the clip stopped binding: the ascent no longer pushes outward"
    assert max(train(1e6)) > 3 * rho


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


@pytest.mark.parametrize("ascent", ["sgd", "adam"])
def test_bilora_rho_zero_is_lora_and_state_round_trips(ascent):
    x, y = torch.randn(16, 6), torch.randn(16, 4)
    lora, bi = _flat_model(), _flat_model()
    lora_opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=0.05)
    bi_opt = BiLoRA(bi, torch.optim.AdamW([p for p in bi.parameters() if p.requires_grad], lr=0.05), rho=0.0, ascent=ascent)
    for model, opt in ((lora, lora_opt), (bi, bi_opt)):
        for _ in range(3):
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(lora.parameters(), bi.parameters()):
        assert torch.equal(a, b)
    assert float(bi_opt.perturbation_norm()) == 0.0
    state = bi_opt.state_dict()
    again = BiLoRA(bi, torch.optim.AdamW([p for p in bi.parameters() if p.requires_grad], lr=0.05), rho=0.0, ascent=ascent, seed=9)
    again.load_state_dict(state)
    assert again.steps_done == 3 and all(torch.equal(a, b) for a, b in zip(again.aux_A, bi_opt.aux_A))
    other = BiLoRA(bi, torch.optim.AdamW([p for p in bi.parameters() if p.requires_grad], lr=0.05), rho=0.0,
                   ascent="adam" if ascent == "sgd" else "sgd")
    with pytest.raises(ValueError, match="ascent step"):
        other.load_state_dict(state)


def test_bilora_rejects_bad_arguments():
    model = _flat_model()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="rho"):
        BiLoRA(model, torch.optim.SGD(params, lr=LR), rho=-1.0)
    with pytest.raises(ValueError, match="rank"):
        BiLoRA(model, torch.optim.SGD(params, lr=LR), rank=0)
    with pytest.raises(ValueError, match="ascent"):
        BiLoRA(model, torch.optim.SGD(params, lr=LR), ascent="rmsprop")
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        BiLoRA(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=LR))
