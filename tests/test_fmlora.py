"""FMLoRA / EFMLoRA (flatlora_kernels.sharpness): the low-rank perturbation against the paper's dense
formulas, exact restores, the EMA, the two-pass step, gradient accumulation, mixed precision and
argument errors.

The dense references below spell out the paper's formulas with ``torch.linalg.pinv`` on full
``out x in`` matrices in fp64; the package never forms those.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from flatlora_kernels.modules import FlatLoraLinear
from flatlora_kernels.baselines import lora_linear
from flatlora_kernels.sharpness import (
    EFMLoRA,
    FMLoRA,
    RhoSchedule,
    compute_b_perturbations,
    estimate_full_gradient,
    find_lora_layers,
    transfer_to_B,
)

F64 = torch.float64


# --- dense references (the paper's formulas, spelled out) ---------------------------------------


def dense_gradient_estimate(A, B, grad_A, grad_B, s):
    """``g = 0.5 * ((1/s) gB pinv(A^T) + (1/s) pinv(B^T) gA)`` with dense fp64 pseudo-inverses."""
    A, B, grad_A, grad_B = (t.detach().double() for t in (A, B, grad_A, grad_B))
    pinv = torch.linalg.pinv
    return 0.5 * ((1 / s) * grad_B @ pinv(A.T) + (1 / s) * pinv(B.T) @ grad_A)


def dense_transfer(g, A, s, rho, norm):
    """``E_B = (1/s) * (rho * g / norm) @ pinv(A)``."""
    return (1 / s) * (rho * g / norm) @ torch.linalg.pinv(A.detach().double())


def dense_layer_perturbations(modules, rho, normalization="layer"):
    """E_B of every LoRA module from its current ``.grad``, by the dense formulas."""
    gs = [dense_gradient_estimate(m.lora_A, m.lora_B, m.lora_A.grad, m.lora_B.grad, m.scaling) for m in modules]
    global_norm = torch.sqrt(sum(g.pow(2).sum() for g in gs))
    return [
        dense_transfer(g, m.lora_A, m.scaling, rho, g.norm() if normalization == "layer" else global_norm)
        for g, m in zip(gs, modules)
    ]


def lora_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.Tensor)]


# --- small models ---------------------------------------------------------------------------------


class TinyLoraLinear(nn.Module):
    """A minimal LoRA layer with the duck-typed contract (lora_A, lora_B, scaling); B is non-zero."""

    def __init__(self, in_features, out_features, r, alpha, *, dtype=F64, generator=None):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(out_features, in_features, generator=generator, dtype=dtype) / in_features**0.5,
            requires_grad=False,
        )
        self.lora_A = nn.Parameter(torch.randn(r, in_features, generator=generator, dtype=dtype) / in_features**0.5)
        self.lora_B = nn.Parameter(0.3 * torch.randn(out_features, r, generator=generator, dtype=dtype))
        self.scaling = alpha / r

    def forward(self, x):
        return lora_linear(x.to(self.weight.dtype), self.weight, self.lora_A, self.lora_B, scaling=self.scaling)


# (in, out, r, alpha): two layers of one shape exercise the batched path; r=6 > out=5 makes B rank-deficient.
LAYER_SHAPES = [(12, 10, 3, 6), (10, 10, 3, 6), (10, 10, 3, 6), (10, 5, 6, 6)]
MODEL_KINDS = ["tiny", "flat_sigma0", "flat_noise"]


def make_model(kind="tiny", *, dtype=F64, seed=0, zero_B=False):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for index, (n_in, n_out, r, alpha) in enumerate(LAYER_SHAPES):
        if kind == "tiny":
            layer = TinyLoraLinear(n_in, n_out, r, alpha, dtype=dtype, generator=g)
        else:
            sigma = 0.1 if kind == "flat_noise" else 0.0
            layer = FlatLoraLinear(
                n_in, n_out, r=r, lora_alpha=alpha, sigma=sigma, bias=False, fused=False, dtype=dtype
            )
            with torch.no_grad():
                layer.weight.copy_(torch.randn(n_out, n_in, generator=g, dtype=dtype) / n_in**0.5)
                layer.lora_A.copy_(torch.randn(r, n_in, generator=g, dtype=dtype) / n_in**0.5)
                layer.lora_B.copy_(0.3 * torch.randn(n_out, r, generator=g, dtype=dtype))
            layer.set_noise(seed=1000 + index, factor=1.0)  # fixed draw: the noise is part of the loss
        if zero_B:
            nn.init.zeros_(layer.lora_B)
        layers += [layer, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def make_batch(dtype=F64, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g, dtype=dtype), torch.randn(n, 5, generator=g, dtype=dtype)


def loss_fn(model, x, y):
    return (model(x).to(y.dtype) - y).pow(2).mean()


def backward_once(model, x, y):
    for p in model.parameters():
        p.grad = None
    loss_fn(model, x, y).backward()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# --- the perturbation of one layer ----------------------------------------------------------------


@pytest.mark.parametrize("m,n,r", [(30, 20, 4), (7, 50, 3), (5, 9, 8), (40, 6, 8)])
@pytest.mark.parametrize("zero_B", [False, True])
def test_lowrank_perturbation_matches_dense_pinv_formulas(m, n, r, zero_B):
    """g, ||g|| and E_B from r x r matrices equal the dense pinv formulas (incl. rank-deficient A or B)."""
    g = torch.Generator().manual_seed(m * 100 + n + r)
    s, rho = 1.5, 0.07
    A = torch.randn(r, n, generator=g, dtype=F64)
    B = torch.zeros(m, r, dtype=F64) if zero_B else torch.randn(m, r, generator=g, dtype=F64)
    G = torch.randn(m, n, generator=g, dtype=F64)
    grad_A, grad_B = s * B.T @ G, s * G @ A.T
    dense_g = dense_gradient_estimate(A, B, grad_A, grad_B, s)
    est = estimate_full_gradient(A, B, grad_A, grad_B, s, rtol=1e-12)
    torch.testing.assert_close(est.dense(), dense_g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.sq_norm.sqrt(), dense_g.norm(), rtol=1e-9, atol=0)
    E_B = transfer_to_B(est, rho / est.sq_norm.sqrt(), s)
    torch.testing.assert_close(E_B, dense_transfer(dense_g, A, s, rho, dense_g.norm()), rtol=1e-8, atol=1e-14)


def test_batched_layers_and_fp32_math_match_dense_fp64():
    """compute_b_perturbations (fp32 math, stacked same-shape layers) vs the dense fp64 formulas."""
    model = make_model("tiny", dtype=torch.float32)
    backward_once(model, *make_batch(torch.float32))
    got = compute_b_perturbations(find_lora_layers(model), 0.05)
    want = dense_layer_perturbations(lora_modules(model), 0.05)
    for E, W in zip(got, want):
        assert E.dtype == torch.float32
        torch.testing.assert_close(E.double(), W, rtol=2e-4, atol=2e-4 * W.abs().max().item())


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_layer_and_global_normalisation_match_dense(kind):
    model = make_model(kind)
    backward_once(model, *make_batch())
    layers, modules = find_lora_layers(model), lora_modules(model)
    rho = 0.05
    for normalization in ("layer", "global"):
        got = compute_b_perturbations(layers, rho, normalization=normalization)
        want = dense_layer_perturbations(modules, rho, normalization)
        for E, W in zip(got, want):
            torch.testing.assert_close(E, W, rtol=1e-8, atol=1e-13)
    # The implied full-weight perturbations s * E_B @ A = E_W @ P_A: per layer each has norm <= rho,
    # globally the whole set does; the global one is the per-layer one times ||g_l|| / ||g||.
    per_layer = compute_b_perturbations(layers, rho, normalization="layer")
    global_ = compute_b_perturbations(layers, rho, normalization="global")
    gs = [dense_gradient_estimate(m.lora_A, m.lora_B, m.lora_A.grad, m.lora_B.grad, m.scaling) for m in modules]
    total = torch.sqrt(sum(g.pow(2).sum() for g in gs))
    for E_l, E_g, g in zip(per_layer, global_, gs):
        torch.testing.assert_close(E_g, E_l * (g.norm() / total), rtol=1e-9, atol=1e-14)


def test_zero_B_uses_the_A_term_only_and_stays_finite():
    """B = 0 (LoRA's initialisation): pinv(B^T) = 0, so E_B = (1/s) rho (G P_A / ||G P_A||) pinv(A)."""
    model = make_model("flat_sigma0", zero_B=True)
    backward_once(model, *make_batch())
    got = compute_b_perturbations(find_lora_layers(model), 0.05)
    for E, m in zip(got, lora_modules(model)):
        assert torch.isfinite(E).all() and E.abs().max() > 0
        A = m.lora_A.detach()
        a_term = 0.5 * (1 / m.scaling) * m.lora_B.grad @ torch.linalg.pinv(A.T)
        torch.testing.assert_close(E, dense_transfer(a_term, A, m.scaling, 0.05, a_term.norm()), rtol=1e-9, atol=1e-14)


def test_zero_and_non_finite_gradients_give_no_perturbation():
    model = make_model("tiny")
    backward_once(model, *make_batch())
    layers = find_lora_layers(model)
    layers[0].lora_B.grad.zero_()
    layers[0].lora_A.grad.zero_()
    layers[1].lora_B.grad[0, 0] = float("inf")
    layers[2].lora_A.grad = None  # missing gradient counts as zero: only the A-term direction
    got = compute_b_perturbations(layers, 0.05)
    assert all(torch.isfinite(E).all() for E in got)
    assert got[0].abs().max() == 0 and got[1].abs().max() == 0
    assert got[2].abs().max() > 0 and got[3].abs().max() > 0
    # One non-finite layer under the global norm: no layer is perturbed.
    assert all(E.abs().max() == 0 for E in compute_b_perturbations(layers, 0.05, normalization="global"))


def test_no_dense_pseudo_inverse_is_used(monkeypatch):
    """Only r x r eigendecompositions: a dense pinv/SVD would be O(out * in * min(out, in))."""

    def forbidden(*args, **kwargs):
        raise AssertionError("dense pinv/svd called")

    for name in ("pinv", "svd", "lstsq"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    layer = TinyLoraLinear(2048, 1536, 4, 8, dtype=torch.float32)
    layer.lora_A.grad = torch.randn_like(layer.lora_A)
    layer.lora_B.grad = torch.randn_like(layer.lora_B)
    (E,) = compute_b_perturbations(find_lora_layers(layer), 0.05)
    assert E.shape == (1536, 4) and torch.isfinite(E).all()


def test_math_ignores_an_enclosing_autocast():
    model = make_model("tiny", dtype=torch.float32)
    backward_once(model, *make_batch(torch.float32))
    layers = find_lora_layers(model)
    plain = compute_b_perturbations(layers, 0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = compute_b_perturbations(layers, 0.05)
    for a, b in zip(plain, under_autocast):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# --- FMLoRA: the two-pass step ---------------------------------------------------------------------


def hand_fmlora_step(model, optimizer, x, y, rho, normalization="layer"):
    """The paper's step written out with dense formulas: pass 1, E_B, pass 2 at B + E_B, restore, step."""
    modules = lora_modules(model)
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    perturbations = dense_layer_perturbations(modules, rho, normalization)
    saved = [m.lora_B.detach().clone() for m in modules]
    with torch.no_grad():
        for m, E in zip(modules, perturbations):
            m.lora_B += E
    optimizer.zero_grad()
    loss_fn(model, x, y).backward()
    with torch.no_grad():
        for m, B in zip(modules, saved):
            m.lora_B.copy_(B)
    optimizer.step()


@pytest.mark.parametrize(
    "kind,normalization", [(kind, "layer") for kind in MODEL_KINDS] + [("tiny", "global"), ("flat_noise", "global")]
)
def test_fmlora_step_equals_hand_written_two_pass_loop(kind, normalization):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    x, y = make_batch()
    opt = FMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2), rho=0.05, normalization=normalization)
    ref_opt = torch.optim.AdamW(trainable(reference), lr=1e-2)

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    for _ in range(3):
        clean_loss = opt.step(closure)
        hand_fmlora_step(reference, ref_opt, x, y, 0.05, normalization)
    assert opt.steps_done == 3
    assert opt.last_perturbed_loss > clean_loss  # an ascent direction of radius rho
    for p, q in zip(trainable(model), trainable(reference)):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


# FlatLoraLinear's reference backend materialises W + s*B@A + eps in fp32, so regrouping a batch
# changes its gradients at the fp32 level even for fp64 models.
ACCUMULATION_RTOL = {"tiny": 1e-9, "flat_noise": 1e-5}


@pytest.mark.parametrize("kind", ACCUMULATION_RTOL)
def test_fmlora_gradient_accumulation_in_the_closure(kind):
    """Two half-batches accumulated by the closure = one full batch (mean losses)."""
    x, y = make_batch(n=16)
    whole, split = make_model(kind), make_model(kind)
    opt_whole = FMLoRA(whole, torch.optim.AdamW(trainable(whole), lr=1e-2), rho=0.05)
    opt_split = FMLoRA(split, torch.optim.AdamW(trainable(split), lr=1e-2), rho=0.05)

    def closure_whole():
        loss = loss_fn(whole, x, y)
        loss.backward()
        return loss

    def closure_split():
        total = 0.0
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            loss = loss_fn(split, xs, ys) / 2
            loss.backward()
            total += loss.detach()
        return total

    rtol = ACCUMULATION_RTOL[kind]
    for _ in range(3):
        torch.testing.assert_close(opt_whole.step(closure_whole), opt_split.step(closure_split), rtol=rtol, atol=0)
    for p, q in zip(trainable(whole), trainable(split)):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fmlora_restores_B_bit_exactly(dtype):
    """With a zero learning rate the step must leave B exactly as it was (bf16: no add-then-subtract)."""
    model = make_model("tiny", dtype=dtype)
    before = [p.detach().clone() for p in trainable(model)]
    x, y = make_batch(dtype)
    opt = FMLoRA(model, torch.optim.SGD(trainable(model), lr=0.0), rho=0.5)
    seen = []

    def closure():
        seen.append([m.lora_B.detach().clone() for m in lora_modules(model)])
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert any(not torch.equal(a, b) for a, b in zip(seen[1], before[1::2]))  # pass 2 did see B + E_B
    for p, q in zip(trainable(model), before):
        assert torch.equal(p, q)


def test_fmlora_with_zero_radius_is_one_pass_of_the_base_optimizer():
    model = make_model("tiny")
    reference = copy.deepcopy(model)
    x, y = make_batch()
    opt = FMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2), rho=0.0)
    ref_opt = torch.optim.AdamW(trainable(reference), lr=1e-2)
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
        ref_opt.zero_grad()
        loss_fn(reference, x, y).backward()
        ref_opt.step()
    assert len(calls) == 2
    for p, q in zip(trainable(model), trainable(reference)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_fmlora_restores_B_when_the_closure_fails():
    model = make_model("tiny")
    before = [m.lora_B.detach().clone() for m in lora_modules(model)]
    x, y = make_batch()
    opt = FMLoRA(model, torch.optim.SGD(trainable(model), lr=0.1))
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(closure)
    for m, B in zip(lora_modules(model), before):
        assert torch.equal(m.lora_B, B)


# --- EFMLoRA: one pass per step, EMA of perturbations -----------------------------------------------


def hand_efmlora_loop(model, optimizer, batches, rho, beta):
    """The paper's EFMLoRA written out: train at B + E_hat, E_B from those gradients, restore, EMA, step."""
    modules = lora_modules(model)
    ema = [torch.zeros_like(m.lora_B, dtype=F64) for m in modules]
    for micro_batches in batches:
        saved = [m.lora_B.detach().clone() for m in modules]
        with torch.no_grad():
            for m, E in zip(modules, ema):
                m.lora_B += E
        optimizer.zero_grad()
        for x, y in micro_batches:
            (loss_fn(model, x, y) / len(micro_batches)).backward()
        perturbations = dense_layer_perturbations(modules, rho)  # with the perturbed B
        with torch.no_grad():
            for m, B in zip(modules, saved):
                m.lora_B.copy_(B)
        ema = [(1 - beta) * E + beta * new for E, new in zip(ema, perturbations)]
        optimizer.step()
    return ema


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("beta", [0.9, 0.3, 1.0])
def test_efmlora_ema_matches_hand_rolled_dense_loop(kind, beta):
    model = make_model(kind)
    reference = copy.deepcopy(model)
    batches = [[make_batch(seed=t)] for t in range(4)]
    opt = EFMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2), rho=0.05, beta=beta)
    for ((x, y),) in batches:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    ema = hand_efmlora_loop(reference, torch.optim.AdamW(trainable(reference), lr=1e-2), batches, 0.05, beta)
    assert opt.perturbation_applied
    for E, W in zip(opt.perturbation_ema, ema):
        torch.testing.assert_close(E, W, rtol=1e-8, atol=1e-13)
    with opt.unperturbed():
        for p, q in zip(trainable(model), trainable(reference)):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # Between steps the model holds B + E_hat (rounded once).
    for m, ref_m, E in zip(lora_modules(model), lora_modules(reference), opt.perturbation_ema):
        torch.testing.assert_close(m.lora_B, ref_m.lora_B + E, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ACCUMULATION_RTOL)
def test_efmlora_gradient_accumulation_sees_one_perturbation(kind):
    """Micro-batches between two steps share B + E_hat: two halves = the whole batch."""
    whole, split = make_model(kind), make_model(kind)
    opt_whole = EFMLoRA(whole, torch.optim.AdamW(trainable(whole), lr=1e-2))
    opt_split = EFMLoRA(split, torch.optim.AdamW(trainable(split), lr=1e-2))
    for t in range(3):
        x, y = make_batch(seed=t)
        loss_fn(whole, x, y).backward()
        opt_whole.step()
        opt_whole.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (loss_fn(split, xs, ys) / 2).backward()
        opt_split.step()
        opt_split.zero_grad()
    rtol = ACCUMULATION_RTOL[kind]
    for E, W in zip(opt_whole.perturbation_ema, opt_split.perturbation_ema):
        torch.testing.assert_close(E, W, rtol=rtol, atol=rtol * 1e-4)
    for p, q in zip(trainable(whole), trainable(split)):
        torch.testing.assert_close(p, q, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_efmlora_restore_and_unperturbed_are_bit_exact(dtype):
    model = make_model("tiny", dtype=dtype)
    before = [m.lora_B.detach().clone() for m in lora_modules(model)]
    opt = EFMLoRA(model, torch.optim.SGD(trainable(model), lr=0.0), rho=0.5, beta=0.9)
    for t in range(3):
        loss_fn(model, *make_batch(dtype, seed=t)).backward()
        opt.step()
        opt.zero_grad()
    assert all(E.dtype == torch.promote_types(dtype, torch.float32) for E in opt.perturbation_ema)
    perturbed = [m.lora_B.detach().clone() for m in lora_modules(model)]
    assert any(not torch.equal(P, B) for P, B in zip(perturbed, before))
    with opt.unperturbed():
        assert not opt.perturbation_applied
        for m, B in zip(lora_modules(model), before):
            assert torch.equal(m.lora_B, B)
    for m, P in zip(lora_modules(model), perturbed):  # re-applied, the same bits
        assert torch.equal(m.lora_B, P)
    opt.restore()
    for m, B in zip(lora_modules(model), before):
        assert torch.equal(m.lora_B, B)
    opt.perturb()
    for m, P in zip(lora_modules(model), perturbed):
        assert torch.equal(m.lora_B, P)


def test_efmlora_first_step_trains_at_the_unperturbed_point_and_B_zero_is_safe():
    model = make_model("flat_sigma0", zero_B=True)
    opt = EFMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-3))
    assert not opt.perturbation_applied and opt.perturbation_ema is None
    loss_fn(model, *make_batch()).backward()
    opt.step()
    assert all(torch.isfinite(E).all() and E.abs().max() > 0 for E in opt.perturbation_ema)


def test_efmlora_training_continues_after_restore():
    """restore() mid-training: the next step takes gradients at the plain B and re-applies E_hat."""
    model = make_model("tiny")
    opt = EFMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2))
    for t in range(2):
        loss_fn(model, *make_batch(seed=t)).backward()
        opt.step()
        opt.zero_grad()
    opt.restore()
    loss_fn(model, *make_batch(seed=5)).backward()
    opt.step()
    assert opt.perturbation_applied and opt.steps_done == 3


def test_efmlora_state_dict_round_trip():
    model = make_model("tiny")
    opt = EFMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2), beta=0.5)
    for t in range(2):
        loss_fn(model, *make_batch(seed=t)).backward()
        opt.step()
        opt.zero_grad()
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="restore"):
        opt.load_state_dict(state)
    opt.restore()
    clone = copy.deepcopy(model)
    opt2 = EFMLoRA(clone, torch.optim.AdamW(trainable(clone), lr=1e-2), beta=0.5)
    opt2.load_state_dict(state)
    assert opt2.steps_done == 2 and not opt2.perturbation_applied
    opt.perturb()
    opt2.perturb()
    for t in range(2, 4):
        for o, mdl in ((opt, model), (opt2, clone)):
            loss_fn(mdl, *make_batch(seed=t)).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(trainable(model), trainable(clone)):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


# --- mixed precision -------------------------------------------------------------------------------


def test_efmlora_under_autocast_with_bf16_adapters():
    """bf16 LoRA factors, autocast forwards: fp32 EMA, finite values, exact restore."""
    layers = [
        FlatLoraLinear(12, 10, r=4, lora_alpha=8, sigma=0.05, fused=False, lora_dtype=torch.bfloat16),
        nn.Tanh(),
        FlatLoraLinear(10, 5, r=4, lora_alpha=8, sigma=0.05, fused=False, lora_dtype=torch.bfloat16),
    ]
    model = nn.Sequential(*layers)
    for index, layer in enumerate(lora_modules(model)):
        layer.set_noise(seed=index, factor=1.0)
    opt = EFMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2))
    x, y = make_batch(torch.float32)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()  # called inside autocast on purpose
        opt.zero_grad()
    assert all(E.dtype == torch.float32 and torch.isfinite(E).all() for E in opt.perturbation_ema)
    assert all(m.lora_B.dtype == torch.bfloat16 for m in lora_modules(model))
    with opt.unperturbed():
        clean = [m.lora_B.detach().clone() for m in lora_modules(model)]
    opt.restore()
    assert all(torch.equal(m.lora_B, B) for m, B in zip(lora_modules(model), clean))


def _scaled_and_plain_runs(make_opt, run_step, steps=3):
    plain, scaled = make_model("tiny", dtype=torch.float32), make_model("tiny", dtype=torch.float32)
    opt_plain, opt_scaled = make_opt(plain, None), None
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt_scaled = make_opt(scaled, scaler)
    for t in range(steps):
        x, y = make_batch(torch.float32, seed=t)
        run_step(plain, opt_plain, None, x, y)
        run_step(scaled, opt_scaled, scaler, x, y)
    return (plain, opt_plain), (scaled, opt_scaled), scaler


def test_efmlora_with_grad_scaler_equals_unscaled():
    def run_step(model, opt, scaler, x, y):
        loss = loss_fn(model, x, y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()

    make_opt = lambda model, _: EFMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2))  # noqa: E731
    (plain, opt_plain), (scaled, opt_scaled), scaler = _scaled_and_plain_runs(make_opt, run_step)
    for p, q in zip(trainable(plain), trainable(scaled)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    # An overflow: GradScaler skips the step, and B, E_hat and the applied perturbation stay put.
    B_before = [m.lora_B.detach().clone() for m in lora_modules(scaled)]
    ema_before = [E.clone() for E in opt_scaled.perturbation_ema]
    scaler.scale(loss_fn(scaled, *make_batch(torch.float32, seed=9))).backward()
    lora_modules(scaled)[0].lora_B.grad[0, 0] = float("inf")
    scaler.step(opt_scaled)
    scaler.update()
    assert opt_scaled.steps_done == 3 and opt_scaled.perturbation_applied
    assert all(torch.equal(m.lora_B, B) for m, B in zip(lora_modules(scaled), B_before))
    assert all(torch.equal(E, F) for E, F in zip(opt_scaled.perturbation_ema, ema_before))


def test_fmlora_with_grad_scaler_equals_unscaled():
    def run_step(model, opt, scaler, x, y):
        def closure():
            loss = loss_fn(model, x, y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        opt.step(closure)
        if scaler is not None:
            scaler.update()

    def make_opt(model, scaler):
        return FMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2), grad_scaler=scaler)

    (plain, _), (scaled, _), _ = _scaled_and_plain_runs(make_opt, run_step)
    for p, q in zip(trainable(plain), trainable(scaled)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# --- PEFT layers, schedules, optimizer plumbing --------------------------------------------------


def test_peft_lora_layers():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 5)).double()
    model = peft.get_peft_model(base, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    layers = find_lora_layers(model)
    assert [layer.adapter for layer in layers] == ["default", "default"]
    backward_once(model, *make_batch())
    got = compute_b_perturbations(layers, 0.05)
    for E, layer in zip(got, layers):
        g = dense_gradient_estimate(layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad, layer.scaling)
        torch.testing.assert_close(
            E, dense_transfer(g, layer.lora_A, layer.scaling, 0.05, g.norm()), rtol=1e-8, atol=1e-13
        )
    opt = EFMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2))
    opt.step()
    assert opt.perturbation_applied


def test_rho_schedules():
    assert RhoSchedule(0.1).rho_at(1000) == 0.1
    assert RhoSchedule(0.1, "inverse_sqrt").rho_at(4) == pytest.approx(0.05)
    linear = RhoSchedule(0.1, "linear", total_steps=11)
    assert [linear.rho_at(t) for t in (1, 6, 11, 20)] == pytest.approx([0.1, 0.05, 0.0, 0.0])
    cosine = RhoSchedule(0.1, "cosine", total_steps=3)
    assert [cosine.rho_at(t) for t in (1, 2, 3)] == pytest.approx([0.1, 0.05, 0.0])
    assert RhoSchedule(0.1, lambda t: 0.5**t).rho_at(2) == pytest.approx(0.025)


def test_rho_schedule_drives_the_step():
    """inverse_sqrt: step 4 uses rho/2, i.e. half the perturbation of a constant-rho step."""
    model = make_model("tiny")
    opt = EFMLoRA(model, torch.optim.SGD(trainable(model), lr=0.0), rho=0.08, beta=1.0, rho_schedule="inverse_sqrt")
    opt.steps_done = 3
    loss_fn(model, *make_batch()).backward()
    opt.step()
    with opt.unperturbed():
        want = dense_layer_perturbations(lora_modules(model), 0.04)
    for E, W in zip(opt.perturbation_ema, want):
        torch.testing.assert_close(E, W, rtol=1e-8, atol=1e-13)


def test_wrapper_shares_param_groups_with_the_base_optimizer():
    model = make_model("tiny")
    base = torch.optim.AdamW(trainable(model), lr=1e-2)
    opt = EFMLoRA(model, base)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    loss_fn(model, *make_batch()).backward()
    opt.step()
    scheduler.step()
    assert base.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert opt.param_groups is base.param_groups


def test_model_built_with_apply_flat_lora():
    model_conversion = pytest.importorskip("flatlora_kernels.model_conversion")
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 5))
    model_conversion.apply_flat_lora(model, r=4, lora_alpha=8, sigma=0.0, fused=False)
    opt = FMLoRA(model, torch.optim.AdamW(trainable(model), lr=1e-2))
    x, y = make_batch(torch.float32)

    def closure():
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss

    first = opt.step(closure)
    for _ in range(5):
        last = opt.step(closure)
    assert len(opt.layers) == 2 and math.isfinite(last.item()) and last < first


# --- bad arguments -----------------------------------------------------------------------------------


def _opt_for(model, **kw):
    return torch.optim.SGD(trainable(model), lr=0.1, **kw)


@pytest.mark.parametrize("rho", [-0.01, float("nan"), float("inf"), True, "0.05"])
def test_bad_rho(rho):
    model = make_model("tiny")
    for cls in (FMLoRA, EFMLoRA):
        with pytest.raises(ValueError, match="rho"):
            cls(model, _opt_for(model), rho=rho)


@pytest.mark.parametrize("beta", [0.0, -0.5, 1.5, float("nan"), None])
def test_bad_beta(beta):
    model = make_model("tiny")
    with pytest.raises(ValueError, match="beta"):
        EFMLoRA(model, _opt_for(model), beta=beta)


def test_other_bad_arguments():
    model = make_model("tiny")
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        FMLoRA(nn.Sequential(nn.Linear(4, 4)), torch.optim.SGD(nn.Linear(4, 4).parameters(), lr=0.1))
    frozen = make_model("tiny")
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable LoRA layers"):
        EFMLoRA(frozen, _opt_for(model))
    with pytest.raises(ValueError, match="normalization"):
        FMLoRA(model, _opt_for(model), normalization="per-row")
    with pytest.raises(ValueError, match="total_steps"):
        FMLoRA(model, _opt_for(model), rho_schedule="cosine")
    with pytest.raises(ValueError, match="rho_schedule"):
        FMLoRA(model, _opt_for(model), rho_schedule="exponential")
    with pytest.raises(TypeError, match="base_optimizer"):
        FMLoRA(model, trainable(model))
    with pytest.raises(ValueError, match="not in base_optimizer"):
        FMLoRA(model, torch.optim.SGD([lora_modules(model)[0].lora_A], lr=0.1))
    with pytest.raises(ValueError, match="pinv_rtol"):
        EFMLoRA(model, _opt_for(model), pinv_rtol=2.0)
    with pytest.raises(ValueError, match="closure"):
        FMLoRA(model, _opt_for(model)).step()
    half_frozen = make_model("tiny")
    lora_modules(half_frozen)[0].lora_A.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        EFMLoRA(half_frozen, _opt_for(half_frozen))


def test_peft_layers_the_shared_check_refuses_are_named_or_skipped():
    """DoRA and embedding LoRA: refused by the same check as enable_flat_lora (an embedding LoRA used to be
    skipped silently); skip_unsupported=True perturbs the others and names the skipped ones."""
    peft = pytest.importorskip("peft")
    from flatlora_kernels import UnsupportedLayerError

    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 12)
            self.proj = nn.Linear(12, 5)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    model = peft.get_peft_model(WithEmbedding(), peft.LoraConfig(r=2, target_modules=["embed", "proj"]))
    with pytest.raises(UnsupportedLayerError, match=r"embed.*embedding"):
        EFMLoRA(model, torch.optim.SGD(trainable(model), lr=0.1))
    with pytest.warns(UserWarning, match=r"skip_unsupported=True.*embed"):
        opt = EFMLoRA(model, torch.optim.SGD(trainable(model), lr=0.1), skip_unsupported=True)
    assert [layer.name.rsplit(".", 1)[-1] for layer in opt.layers] == ["proj"]
    dora = peft.get_peft_model(nn.Sequential(nn.Linear(12, 5)), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(UnsupportedLayerError, match="DoRA"):
        FMLoRA(dora, torch.optim.SGD(trainable(dora), lr=0.1))
